"""tocache-fx: token-wise feature caching for diffusers DiTs as a graph pass.

Example:
    >>> import tocache_fx
    >>> from tocache_fx import ToCa
    >>> pipe.transformer = tocache_fx.transform(pipe.transformer, ToCa(interval=3))  # doctest: +SKIP
    >>> images = pipe(...).images
    >>> print(tocache_fx.explain(pipe.transformer))
"""

from __future__ import annotations

import torch

from .errors import CacheStateError, UnsupportedModelError
from .explain import explain
from .policies import FORA, DuCa, NoCache, Policy, TaylorSeer, ToCa, policy_from_dict
from .runtime import CachedTransformer
from .schedule import Schedule, StepKind, build_schedule

__all__ = [
    "transform", "untransform", "explain", "CachedTransformer", "Policy", "NoCache", "FORA",
    "TaylorSeer", "ToCa", "DuCa", "policy_from_dict", "Schedule", "StepKind", "build_schedule",
    "UnsupportedModelError", "CacheStateError",
]
__version__ = "0.1.0"


def transform(model: torch.nn.Module, policy: Policy, *, compile: bool = True,
              compile_mode: str | None = None) -> CachedTransformer:
    """Make `model` (a diffusers transformer in eval mode) follow a caching `policy`.

    The graph is captured with `torch.export` at the first call (and again for each
    new call signature), its residual branches rewritten into cache-aware
    gather/compute/scatter subgraphs, and one graph per distinct step plan compiled
    with inductor (`compile=False` runs the same rewritten graphs eagerly).

    Example:
        >>> cached = transform(dit, ToCa(interval=3, cache_ratio=0.93))   # doctest: +SKIP
        >>> cached(hidden_states=x, timestep=t, class_labels=y).sample.shape
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a tocache_fx Policy (NoCache, FORA, TaylorSeer, ToCa, DuCa), "
                        f"got {type(policy).__name__}")
    if isinstance(model, CachedTransformer):
        model = model.original
    if model.training:
        raise CacheStateError("caching is for inference only: call model.eval() first")
    return CachedTransformer(model, policy, compile=compile, compile_mode=compile_mode)


def untransform(model: torch.nn.Module) -> torch.nn.Module:
    """The original model behind a `transform`ed one (any other model is returned as is)."""
    return model.original if isinstance(model, CachedTransformer) else model
