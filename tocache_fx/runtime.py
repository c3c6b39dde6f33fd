"""`CachedTransformer`: the drop-in module `tocache_fx.transform` returns.

Per call it (1) binds the arguments to the original forward's signature, (2) captures
and analyses the graph once per call signature (shapes, dtypes, constants), (3) works
out the denoising step from the timestep sequence, (4) runs the compiled graph of that
step's plan with the cache slots as extra inputs and stores the slots it returns.

Step counting (`tocache_fx/steps.py`): a generation starts at the first call, after
`reset()`, when the call signature changes (batch size, resolution, dtype: the caches
are dropped, never mixed), or when the timestep sequence restarts. In diffusers
pipelines the timestep is a view into the scheduler's array, so the step index and the
generation's length are read from tensor metadata without a device sync.

Planned length: `policy.num_steps` if set, else the scheduler array's length when the
timestep is such a view, else the previous generation's length in this cache context,
else 50. Steps past the planned length run FULL (uncached); a shorter generation
simply ends early. Either way every cached value comes from an earlier step of the
same generation.

Example:
    >>> model = CachedTransformer(dit, ToCa(interval=3), compile=False)   # doctest: +SKIP
    >>> out = model(hidden_states=x, timestep=t, class_labels=y).sample
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tocache_fx.passes.find_branches import Branch, find_branches

from .capture import CapturedGraph, call_signature, capture
from .errors import CacheStateError
from .layout import CacheLayout, plan_layout
from .policies import Policy
from .schedule import Schedule, build_schedule
from .steps import StepTracker
from .variants import StepGraph, build_step_graph

__all__ = ["CachedTransformer", "DEFAULT_NUM_STEPS"]

DEFAULT_NUM_STEPS = 50


@dataclass
class _Prepared:
    """Everything derived from one call signature."""

    captured: CapturedGraph
    branches: list[Branch]
    grid: tuple[int, int] | None
    batch: int
    device: torch.device
    step_graphs: dict[tuple, StepGraph] = field(default_factory=dict)
    compiled: dict[tuple, Any] = field(default_factory=dict)


@dataclass
class _Generation:
    """Step tracker, planned length and cache slots of one cache context."""

    tracker: StepTracker = field(default_factory=StepTracker)
    num_steps: int = DEFAULT_NUM_STEPS
    slots: dict[str, torch.Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None


def _timestep(bound: dict[str, Any]) -> Any:
    """The call's timestep argument (`timestep`, else any argument named like it)."""
    if "timestep" in bound:
        return bound["timestep"]
    return next((value for name, value in bound.items() if "timestep" in name), None)


def _token_grid(kwargs: dict[str, Any], config: Any, num_tokens: int) -> tuple[int, int] | None:
    """(rows, cols) of the image token grid, from a 4-d latent input and the patch size."""
    patch = getattr(config, "patch_size", None) if config is not None else None
    latent = kwargs.get("hidden_states")
    if not isinstance(patch, int) or not isinstance(latent, torch.Tensor) or latent.dim() != 4:
        return None
    rows, cols = latent.shape[-2] // patch, latent.shape[-1] // patch
    return (rows, cols) if rows * cols == num_tokens else None


class CachedTransformer(torch.nn.Module):
    """A diffusers transformer whose residual branches follow a caching policy.

    Behaves like the wrapped model (same call signature and outputs, `config`,
    `dtype`, `device`, other attributes forwarded); `original` is the untouched model.
    """

    def __init__(self, model: torch.nn.Module, policy: Policy, compile: bool = True,
                 compile_mode: str | None = None) -> None:
        super().__init__()
        self.original = model
        self.policy = policy
        self.compile = compile
        self.compile_mode = compile_mode
        self._forward_signature = inspect.signature(model.forward)
        self._prepared: dict[tuple, _Prepared] = {}  # shared by `with_policy` copies
        self._plans: dict[tuple[int, int], tuple[Schedule, CacheLayout]] = {}
        self._last_signature: tuple | None = None
        self._generations: dict[str, _Generation] = {}
        self._context = "default"
        self.train(model.training)

    # -- drop-in surface -------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.original.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.original.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.original.parameters()).device

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self._modules.get("original")
            if original is None:
                raise
            return getattr(original, name)

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """Keep a separate cache and step counter for calls inside this context."""
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    def reset(self) -> None:
        """Forget every cached value and step counter; the next call starts a generation."""
        self._generations.clear()

    def with_policy(self, policy: Policy, compile: bool | None = None) -> CachedTransformer:
        """The same model under another policy, reusing the captured graphs (and any
        step graph both policies share) instead of capturing again.

        >>> fast = cached.with_policy(DuCa(interval=5))   # doctest: +SKIP
        """
        other = CachedTransformer(self.original, policy,
                                  compile=self.compile if compile is None else compile,
                                  compile_mode=self.compile_mode)
        other._prepared, other._last_signature = self._prepared, self._last_signature
        return other

    @property
    def num_compiled_graphs(self) -> int:
        """Graphs compiled with inductor so far (shared with `with_policy` copies)."""
        return sum(key[-2] for p in self._prepared.values() for key in p.compiled)

    # -- the call --------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training or self.original.training:
            raise CacheStateError("caching is for inference only: call .eval() on the model "
                                  "(training mode changes dropout and needs gradients)")
        bound = self._keyword_arguments(args, kwargs)
        return_dict = bound.pop("return_dict", True)
        return_dict = True if return_dict is None else return_dict
        prepared, signature = self._prepare(bound)
        generation = self._generations.setdefault(self._context, _Generation())
        tracker = generation.tracker
        if tracker.advance(signature, _timestep(bound)):
            generation.slots.clear()
            generation.num_steps = (getattr(self.policy, "num_steps", None) or tracker.length_hint
                                    or tracker.last_length or DEFAULT_NUM_STEPS)
            seed = getattr(self.policy, "seed", 0)  # random selections repeat per generation
            generation.generator = torch.Generator(prepared.device).manual_seed(seed)
        schedule, layout = self._schedule(prepared, generation.num_steps)
        step = generation.tracker.step
        step_graph, run = self._step_graph(prepared, schedule.plan(step), layout,
                                           schedule.forecast_at(step))
        inputs = prepared.captured.flatten(bound) + [
            self._slot(name, prepared, generation) for name in step_graph.reads]
        with torch.no_grad():
            outputs = run(*inputs)
        generation.slots.update(zip(step_graph.writes, outputs[step_graph.num_outputs:]))
        result = prepared.captured.unflatten(outputs[:step_graph.num_outputs])
        if not return_dict and hasattr(result, "to_tuple"):
            return result.to_tuple()
        return result

    def _keyword_arguments(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call as keyword arguments in the forward's parameter order."""
        bound = self._forward_signature.bind(*args, **kwargs).arguments
        flat: dict[str, Any] = {}
        for name, value in bound.items():
            kind = self._forward_signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                flat.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{type(self.original).__name__}.forward takes *{name}; "
                                    "pass those arguments by keyword")
            else:
                flat[name] = value
        return flat

    def _slot(self, name: str, prepared: _Prepared, generation: _Generation) -> torch.Tensor:
        if name.startswith("noise."):  # "noise.<batch>x<tokens>"
            shape = tuple(int(size) for size in name.split(".")[1].split("x"))
            return torch.rand(shape, generator=generation.generator, device=prepared.device)
        if name not in generation.slots:
            raise CacheStateError(f"cache slot {name!r} is empty at step "
                                  f"{generation.tracker.step}: the schedule must start with a "
                                  "FULL step")
        return generation.slots[name]

    def _prepare(self, bound: dict[str, Any]) -> tuple[_Prepared, tuple]:
        signature = call_signature(bound, self.original)
        if signature not in self._prepared:
            captured = capture(self.original, bound)
            branches = find_branches(captured.graph_module, type(self.original).__name__)
            skip = branches[0].skip.meta["val"]
            grid = _token_grid(bound, getattr(self.original, "config", None), skip.shape[1])
            self._prepared[signature] = _Prepared(captured, branches, grid, skip.shape[0],
                                                  self.device)
        self._last_signature = signature
        return self._prepared[signature], signature

    def _schedule(self, prepared: _Prepared, num_steps: int) -> tuple[Schedule, CacheLayout]:
        key = (id(prepared), num_steps)
        if key not in self._plans:
            schedule = build_schedule(self.policy, prepared.branches, num_steps)
            layout = plan_layout(self.policy, schedule, prepared.branches, prepared.grid)
            self._plans[key] = (schedule, layout)
        return self._plans[key]

    def _step_graph(self, prepared: _Prepared, plan: tuple[int, ...], layout: CacheLayout,
                    forecast: tuple[int, int]) -> tuple[StepGraph, Any]:
        key = (plan, forecast, repr(layout))
        if key not in prepared.step_graphs:
            prepared.step_graphs[key] = build_step_graph(
                prepared.captured.graph_module, prepared.branches, plan, layout, forecast)
        step = prepared.step_graphs[key]
        compiled_key = key + (self.compile, self.compile_mode)
        if compiled_key not in prepared.compiled:
            prepared.compiled[compiled_key] = (
                torch.compile(step.graph_module, backend="inductor", fullgraph=True,
                              dynamic=False, mode=self.compile_mode)
                if self.compile else step.graph_module)
        return step, prepared.compiled[compiled_key]

    # -- introspection ---------------------------------------------------------------
    def last_prepared(self) -> _Prepared:
        if self._last_signature is None:
            raise CacheStateError("the model has not been called yet: run one generation (or "
                                  "one call) first so the graph can be captured")
        return self._prepared[self._last_signature]

    def schedule_for(self, num_steps: int | None = None) -> tuple[Schedule, CacheLayout]:
        """The schedule and cache layout used for a generation of `num_steps` steps."""
        prepared = self.last_prepared()
        generation = self._generations.get(self._context)
        planned = num_steps or getattr(self.policy, "num_steps", None) or (
            generation.num_steps if generation else DEFAULT_NUM_STEPS)
        return self._schedule(prepared, planned)
