"""tocache-fx: token-wise feature caching for diffusers DiTs as a graph pass.

Example:
    >>> import tocache_fx
    >>> from tocache_fx import ToCa
    >>> pipe = tocache_fx.transform(pipe, ToCa.pixart())   # doctest: +SKIP
    >>> images = pipe(...).images
    >>> print(tocache_fx.explain(pipe.transformer))
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CacheStateError, UnsupportedModelError
from .explain import explain
from .pipeline import PipelineBinding, is_pipeline
from .policies import FORA, DuCa, NoCache, Policy, TaylorSeer, ToCa, TokenCache, policy_from_dict
from .predictor import CachePredictor
from .training import train_token_cache
from .runtime import CachedTransformer
from .schedule import Schedule, StepKind, build_schedule
from .units import CaptureMode

__all__ = [
    "transform", "untransform", "explain", "CachedTransformer", "Policy", "NoCache", "FORA",
    "TaylorSeer", "ToCa", "DuCa", "TokenCache", "CachePredictor", "train_token_cache",
    "policy_from_dict", "Schedule", "StepKind", "build_schedule", "UnsupportedModelError",
    "CacheStateError",
]
__version__ = "0.2.0"


def _transformers(pipe: Any) -> list[str]:
    """The pipeline's transformer components (`transformer`, Wan 2.2's `transformer_2`)."""
    return [name for name, component in pipe.components.items()
            if name.startswith("transformer") and isinstance(component, torch.nn.Module)]


def transform(model: Any, policy: Policy, *, compile: bool = True, compile_mode: str | None = None,
              capture: CaptureMode = "auto", cache_dtype: torch.dtype | None = None) -> Any:
    """Make a diffusers transformer (in eval mode), or a pipeline's transformers, follow a
    caching `policy`.

    Given a pipeline, its transformer(s) are replaced in place and the pipeline is
    returned: the transformer then learns each generation's start and length from the
    pipeline's scheduler. Given a model, the cached model is returned; it reads the
    step from the timestep (exact for the scheduler array's views most pipelines pass;
    otherwise pass `num_steps` in the policy).

    `capture`: "blocks" captures and compiles each repeated block once per block class
    (the model's forward runs the rest eagerly), "model" the whole forward as one graph
    per step plan, "auto" blocks where the model has repeated blocks. `cache_dtype`
    (e.g. `torch.bfloat16` for a float32 model) stores the cached branch values in a
    lower precision: half the cache memory.

    Example:
        >>> pipe = transform(pipe, ToCa(interval=3, cache_ratio=0.93))    # doctest: +SKIP
        >>> cached = transform(dit, FORA(interval=3), compile=False)       # doctest: +SKIP
        >>> cached(hidden_states=x, timestep=t, class_labels=y).sample.shape
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a tocache_fx Policy (NoCache, FORA, TaylorSeer, ToCa, "
                        f"DuCa), got {type(policy).__name__}")
    if capture not in ("auto", "blocks", "model"):
        raise ValueError(f"capture must be 'auto', 'blocks' or 'model', got {capture!r}")
    if is_pipeline(model):
        pipe = model
        binding = getattr(pipe, "_tocache_binding", None) or PipelineBinding(pipe)
        pipe._tocache_binding = binding
        for name in _transformers(pipe):
            cached = CachedTransformer(_eval_model(untransform(getattr(pipe, name))), policy,
                                       compile=compile, compile_mode=compile_mode,
                                       capture=capture, cache_dtype=cache_dtype, binding=binding)
            setattr(pipe, name, cached)
        return pipe
    return CachedTransformer(_eval_model(untransform(model)), policy, compile=compile,
                             compile_mode=compile_mode, capture=capture, cache_dtype=cache_dtype)


def _eval_model(model: torch.nn.Module) -> torch.nn.Module:
    if model.training:
        raise CacheStateError("caching is for inference only: call model.eval() first")
    return model


def untransform(model: Any) -> Any:
    """The original model behind a `transform`ed one; for a pipeline, its transformers
    are put back (any other object is returned as is)."""
    if is_pipeline(model):
        for name in _transformers(model):
            setattr(model, name, untransform(getattr(model, name)))
        binding = model.__dict__.pop("_tocache_binding", None)
        if binding is not None:
            binding.unbind()
        return model
    return model.original if isinstance(model, CachedTransformer) else model
