"""`CachedTransformer`: the drop-in module `tocache_fx.transform` returns.

Per call it (1) checks the model has not changed since it was captured
(`tocache_fx.watch`), (2) prepares the call signature once (`tocache_fx.units`: block
units, or one whole-model unit), (3) works out the denoising step
(`tocache_fx.steps`), and (4) runs the step: with block capture the model's own
forward runs and every block call is served by the compiled graph of that block's
plan, with whole-model capture one graph runs the step. Cache slots live per cache
context and per call site; the graphs take and return them.

Planned length: `policy.num_steps` if set, else what the pipeline or the scheduler's
timestep array tells, else 50 (with a warning saying how to pass `num_steps`). Steps
past the planned length run FULL. A generation's first call, and every call after the
model changed within a generation, run FULL: every cached value comes from an earlier
step of the same generation and the same model.

Example:
    >>> model = CachedTransformer(dit, ToCa(), compile=False)   # doctest: +SKIP
    >>> out = model(hidden_states=x, timestep=t, class_labels=y).sample
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .blocks import calls_served_by
from .capture import call_leaves, call_signature, has_signature
from .compiling import compile_step_graph
from .errors import CacheStateError
from .layout import CacheLayout, plan_layout
from .opaque import CURRENT_UNIT
from .pipeline import PipelineBinding
from .policies import Policy
from .schedule import Plan, Schedule, StepKind, build_schedule
from .steps import StepTracker, observe
from .units import CaptureMode, Prepared, Site, prepare
from .variants import StepGraph, build_step_graph, plan_shape
from .watch import fingerprint, registrations

__all__ = ["CachedTransformer", "DEFAULT_NUM_STEPS"]

DEFAULT_NUM_STEPS = 50


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` contiguous with the canonical strides, size-1 dims included (a batch-1
    slice `x[:, 8:]` is contiguous with another batch stride, which a compiled graph's
    guards would recompile for)."""
    tensor = tensor.contiguous()
    if 1 not in tensor.shape:
        return tensor  # contiguous strides are canonical without size-1 dims
    canonical, step = [], 1
    for size in reversed(tensor.shape):
        canonical.insert(0, step)
        step *= max(size, 1)
    if tensor.stride() != tuple(canonical):
        tensor = tensor.as_strided(tensor.shape, canonical)
    return tensor


class _ModelChanged(Exception):
    """A block's fingerprint changed since its capture: prepare again and rerun."""


@dataclass
class _Generation:
    """Step tracker, planned length and cache slots of one cache context."""

    tracker: StepTracker = field(default_factory=StepTracker)
    num_steps: int = DEFAULT_NUM_STEPS
    slots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # per site
    generator: torch.Generator | None = None
    cfg_halves: bool = False
    fresh: bool = True  # no step of this generation has run yet
    uncached: bool = False  # the model changed mid-generation: the rest runs FULL
    checked: set[int] = field(default_factory=set)  # sites fingerprinted this generation
    kinds: list[int] = field(default_factory=list)  # the step kind each call ran


@dataclass
class _BoundStep:
    """A site's step graph under one plan and what every call of it needs."""

    graph: StepGraph
    run: Callable[..., Any]
    released: list[str]  # slots it overwrites without reading: released before it runs


@dataclass
class _Plan:
    """What a schedule needs at run time, built once per generation length (it holds
    `prepared`, whose id keys it, so the id cannot be reused while it lives)."""

    prepared: Prepared
    schedule: Schedule
    layout: CacheLayout
    coefficients: torch.Tensor | None  # per step forecast coefficients (TaylorSeer)
    listed: dict[tuple[int, int], torch.Tensor]  # (step, branch) -> tokens (TokenCache)
    locals: dict[int, tuple[CacheLayout, tuple]] = field(default_factory=dict)  # per site
    bound: dict[tuple[int, Plan], _BoundStep] = field(default_factory=dict)  # (site, plan)

    def local(self, site: Site) -> tuple[CacheLayout, tuple]:
        """The layout of `site`'s branches and the layout's key."""
        if site.index not in self.locals:
            layout = self.layout.local(site.branch_range)
            self.locals[site.index] = (layout, layout.key())
        return self.locals[site.index]


@dataclass
class _Step:
    """What the current call runs (block dispatch reads it)."""

    runtime: CachedTransformer
    planned: _Plan
    generation: _Generation
    step: int
    plan: Plan

    @property
    def prepared(self) -> Prepared:
        return self.planned.prepared


_ACTIVE: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("tocache_step",
                                                                      default=None)


@dataclass
class _Shared:
    """State shared by `with_policy` copies of one model: captures and compiled graphs."""

    prepared: dict[tuple, Prepared] = field(default_factory=dict)
    last_signature: tuple | None = None
    registrations: int = field(default_factory=registrations)


def _timestep(bound: dict[str, Any]) -> Any:
    """The call's timestep argument (`timestep`, else any argument named like it)."""
    if "timestep" in bound:
        return bound["timestep"]
    return next((value for name, value in bound.items() if "timestep" in name), None)


def _latent(bound: dict[str, Any]) -> torch.Tensor | None:
    value = bound.get("hidden_states", bound.get("sample"))
    if isinstance(value, torch.Tensor):
        return value
    return next((v for v in bound.values() if isinstance(v, torch.Tensor) and v.dim() >= 3), None)


def _forecast_coefficients(schedule: Schedule, order: int, device: torch.device) -> torch.Tensor:
    """Per step the coefficients the forecast graphs read: at FULL steps 1 / distance per
    difference it can update, at reusing steps distance^i / i! per difference known."""
    rows = []
    for step in range(schedule.num_steps):
        terms, distance = schedule.forecast_at(step)
        full = schedule.plan(step)[0] == StepKind.FULL
        rows.append([(1 / distance if full else distance ** i / math.factorial(i))
                     if i <= terms and distance else 0.0 for i in range(1, order + 1)])
    return torch.tensor(rows, dtype=torch.float32, device=device).view(-1, order)


class CachedTransformer(torch.nn.Module):
    """A diffusers transformer whose residual branches follow a caching policy.

    Behaves like the wrapped model (same call signature and outputs, `config`,
    `dtype`, `device`, `cache_context`, other attributes forwarded); `original` is the
    untouched model.
    """

    def __init__(self, model: torch.nn.Module, policy: Policy, compile: bool = True,
                 compile_mode: str | None = None, capture: CaptureMode = "auto",
                 cache_dtype: torch.dtype | None = None, binding: PipelineBinding | None = None,
                 _shared: _Shared | None = None) -> None:
        super().__init__()
        self.original = model
        self.policy = policy
        self.compile = compile
        self.compile_mode = compile_mode
        self.capture = capture
        self.cache_dtype = cache_dtype
        self._binding = binding
        self._forward_signature = inspect.signature(model.forward)
        self._shared = _shared or _Shared()
        self._plans: dict[tuple, _Plan] = {}
        self._generations: dict[str, _Generation] = {}
        self._context: tuple[str, dict[str, Any]] = ("default", {})
        self._carriers: dict[torch.device, torch.Tensor] = {}
        self._counts: dict[tuple, torch.Tensor] = {}
        self._warned_length = False
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
    def cache_context(self, name: str, **info: Any) -> Iterator[None]:
        """A separate cache and step counter for calls inside this context. Accepts what
        diffusers pipelines pass (`step_index`, `num_inference_steps`, `sigma`, ...) and
        uses the step index and length when given."""
        previous, self._context = self._context, (name, info)
        try:
            yield
        finally:
            self._context = previous

    def reset(self) -> None:
        """Forget every cached value and step counter; the next call starts a generation."""
        self._generations.clear()

    def with_policy(self, policy: Policy, compile: bool | None = None) -> CachedTransformer:
        """The same model under another policy, reusing the captures (and any step graph
        both policies share) instead of capturing again.

        >>> fast = cached.with_policy(DuCa(interval=5))   # doctest: +SKIP
        """
        return CachedTransformer(self.original, policy,
                                 compile=self.compile if compile is None else compile,
                                 compile_mode=self.compile_mode, capture=self.capture,
                                 cache_dtype=self.cache_dtype, binding=self._binding,
                                 _shared=self._shared)

    @property
    def num_compiled_graphs(self) -> int:
        """Graphs compiled with inductor so far (shared with `with_policy` copies)."""
        return sum(key[-2] for p in self._shared.prepared.values() for unit in p.units
                   for key in unit.compiled)

    # -- the call --------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training or self.original.training:
            raise CacheStateError("caching is for inference only: call .eval() on the model "
                                  "(training mode changes dropout and needs gradients)")
        self._check_registrations()
        for _ in range(3):
            trackers = {name: dataclasses.replace(g.tracker) for name, g in self._generations.items()}
            try:
                return self._call(args, kwargs)
            except _ModelChanged:  # captured at this call: count it once, capture again
                for name, generation in self._generations.items():
                    generation.tracker = trackers.get(name, StepTracker())
        raise CacheStateError("the model keeps changing while it is called")

    def _call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        bound = self._keyword_arguments(args, kwargs)
        return_dict = bound.pop("return_dict", True)
        return_dict = True if return_dict is None else return_dict
        numbers = {name: value for name, value in bound.items() if "timestep" in name
                   and isinstance(value, (int, float)) and not isinstance(value, bool)}
        call = {**bound, **{name: torch.tensor(value) for name, value in numbers.items()}}
        if "return_dict" in self._forward_signature.parameters:
            call["return_dict"] = True  # the whole-model graph returns the output object
        prepared = self._prepare(call, args, kwargs)
        if numbers and prepared.mode == "model":
            self._check_numbers(bound, call)
        generation = self._advance(bound, prepared)
        planned = self._schedule(prepared, generation)
        schedule, step = planned.schedule, generation.tracker.step
        plan = schedule.full_plan() if generation.fresh or generation.uncached \
            else schedule.plan(step)
        current = _Step(self, planned, generation, step, plan)
        with torch.no_grad():
            if prepared.mode == "model":
                result = self._run_site(current, prepared.sites[0], (), call)
            else:
                result = self._run_blocks(current, args, kwargs)
        generation.fresh = False
        generation.kinds.append(plan[0])
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

    # -- preparing a call signature ---------------------------------------------------
    def _prepare(self, call: dict[str, Any], args: tuple, kwargs: dict[str, Any]) -> Prepared:
        """The captures of this call signature (`call`: the call with Python-number
        timesteps as tensors; the blocks are probed with the call as given)."""
        param = next(self.original.parameters(), None)
        weights = (param.dtype, param.device) if param is not None else None
        signature = (call_signature(call), weights, self.capture)
        shared = self._shared
        if signature not in shared.prepared:
            shared.prepared[signature] = prepare(self.original, (args, kwargs), call, self.capture)
        shared.last_signature = signature
        return shared.prepared[signature]

    def _check_numbers(self, bound: dict[str, Any], call: dict[str, Any]) -> None:
        """A Python-number timestep is captured as a tensor input (one graph for every
        value): check the model computes the same from both."""
        with torch.no_grad():
            ref = pytree.tree_leaves(self.original(**bound))
            out = pytree.tree_leaves(self.original(**call))
        if not all(torch.allclose(a, b) for a, b in zip(ref, out) if isinstance(a, torch.Tensor)):
            numbers = sorted(name for name in bound if call[name] is not bound[name])
            raise CacheStateError(f"{type(self.original).__name__} computes something else from "
                                  f"{numbers} given as a tensor than as a Python number: pass "
                                  "the timestep as a tensor")

    def _check_registrations(self) -> None:
        """After any submodule / parameter / buffer assignment: re-resolve where every
        site's parameters live and drop the captures whose modules changed."""
        shared = self._shared
        now = registrations()
        if now == shared.registrations:
            return
        for signature, prepared in list(shared.prepared.items()):
            if any(fingerprint(site.module) != site.unit.fingerprint for site in prepared.sites):
                del shared.prepared[signature]
                self._model_changed()
            else:
                for site in prepared.sites:
                    site.refresh()
        shared.registrations = registrations()

    def _model_changed(self) -> None:
        """Captures were dropped: generations under way finish uncached."""
        self._plans.clear()
        for generation in self._generations.values():
            generation.slots.clear()
            generation.uncached = not generation.fresh

    # -- steps -----------------------------------------------------------------------
    def _advance(self, bound: dict[str, Any], prepared: Prepared) -> _Generation:
        name, info = self._context
        generation = self._generations.setdefault(name, _Generation())
        binding = self._binding
        obs = observe(_timestep(bound), step_index=info.get("step_index"),
                      length=info.get("num_inference_steps") or (binding.length() if binding else None),
                      generation=binding.generation if binding else None,
                      scheduler_step=binding.scheduler_step() if binding else None)
        if generation.tracker.advance((prepared.signature, id(prepared)), obs):
            tracker = generation.tracker
            generation.slots.clear()
            generation.fresh, generation.uncached = True, False
            generation.checked.clear()
            generation.kinds = []
            generation.num_steps = getattr(self.policy, "num_steps", None) or tracker.length \
                or self._default_length()
            seed = getattr(self.policy, "seed", 0)  # random selections repeat per generation
            generation.generator = torch.Generator(prepared.device).manual_seed(seed)
            generation.cfg_halves = self._cfg_halves(bound, name, prepared)
        return generation

    def _default_length(self) -> int:
        if self.policy.caches and not self._warned_length:
            warnings.warn(f"tocache_fx: cannot tell how many steps this generation has (the "
                          f"timestep is not a view of a scheduler array and no pipeline is "
                          f"bound), planning {DEFAULT_NUM_STEPS}: pass "
                          f"`{type(self.policy).__name__}(..., num_steps=N)` or transform the "
                          "pipeline (`tocache_fx.transform(pipe, policy)`)", stacklevel=4)
            self._warned_length = True
        return DEFAULT_NUM_STEPS

    def _cfg_halves(self, bound: dict[str, Any], context: str, prepared: Prepared) -> bool:
        """Whether this generation's batch is `[uncond; cond]` classifier-free guidance:
        only for a policy that would share selections, a batch built by duplicating the
        latents, outside a per-branch cache context, unless the pipeline says no CFG."""
        wants = self.policy.token_selection(None).share_halves
        latent = _latent(bound)
        if not wants or latent is None or latent.shape[0] % 2 or context != "default":
            return False
        if self._binding is not None and not self._binding.allows_cfg_halves():
            return False
        half = latent.shape[0] // 2
        return bool(torch.equal(latent[:half], latent[half:]))

    def _schedule(self, prepared: Prepared, generation: _Generation) -> _Plan:
        key = (id(prepared), generation.num_steps, generation.cfg_halves)
        if key not in self._plans:
            live = {id(p) for p in self._shared.prepared.values()}  # captures another copy dropped
            self._plans = {k: v for k, v in self._plans.items() if k[0] in live}
            self.policy.check(type(self.original).__name__, prepared.branches)
            schedule = build_schedule(self.policy, prepared.branches, generation.num_steps)
            layout = plan_layout(self.policy, schedule, prepared.branches, prepared.grid,
                                 generation.cfg_halves, self.cache_dtype)
            coefficients = _forecast_coefficients(schedule, layout.forecast_order,
                                                  prepared.device) \
                if layout.forecast_order else None
            listed = {key: tokens.to(prepared.device) for key, tokens in
                      self.policy.listed_tokens(prepared.branches, generation.num_steps).items()}
            self._plans[key] = _Plan(prepared, schedule, layout, coefficients, listed)
        return self._plans[key]

    # -- running sites ---------------------------------------------------------------
    def _run_blocks(self, current: _Step, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run the model's forward with every block call served by its step graph."""
        token = _ACTIVE.set(current)
        try:
            with calls_served_by([(site.module, _dispatcher(site))
                                  for site in current.prepared.sites]):
                return self.original(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    def _site_plan(self, current: _Step, site: Site) -> Plan:
        branches = site.branch_range
        return current.plan[:1] + current.plan[1 + branches.start:1 + branches.stop]

    def _run_site(self, current: _Step, site: Site, args: tuple, kwargs: dict[str, Any]) -> Any:
        """One call of `site` under the current step's plan."""
        unit, generation = site.unit, current.generation
        if site.index not in generation.checked:  # once per generation (PEFT scales, processors)
            if fingerprint(site.module) != unit.fingerprint:
                for key, prepared in list(self._shared.prepared.items()):
                    if prepared is current.prepared:
                        del self._shared.prepared[key]
                self._model_changed()
                raise _ModelChanged
            generation.checked.add(site.index)
        leaves, structure = call_leaves(args, kwargs)
        if current.prepared.mode == "blocks" and not has_signature(
                leaves, structure, unit.signature, unit.structures, (args, kwargs)):
            raise CacheStateError(
                f"{site.path} was called with other arguments than in the first call of this "
                "signature (shapes, dtypes or constants changed inside the forward)")
        # one layout for every call: a compiled graph is specialised on its inputs' strides
        inputs = [_dense(leaves[i]) for i in unit.captured.tensor_leaves]
        slots = generation.slots.setdefault(site.index, {})
        plan = self._site_plan(current, site)
        if plan[0] == StepKind.AGGRESSIVE and current.prepared.mode == "blocks":
            if site is current.prepared.sites[-1]:
                return unit.captured.unflatten(slots["stream"])
            if unit.passthrough is not None:
                return unit.captured.unflatten([inputs[i] for i in unit.passthrough])
            plan = (int(StepKind.PARTIAL),) + (0,) * len(unit.branches)
        bound = current.planned.bound.get((site.index, plan)) or self._bind(current, site, plan)
        step_graph = bound.graph
        for name in bound.released:  # overwritten: release before the step runs
            slots.pop(name, None)
        feeds = [self._feed(name, plan, step_graph, slots, current, site)
                 for name in step_graph.reads]
        token = CURRENT_UNIT.set(site.module)
        try:
            outputs = bound.run(*site.state(), *inputs, *feeds)
        finally:
            CURRENT_UNIT.reset(token)
        slots.update(zip(step_graph.writes, outputs[step_graph.num_outputs:]))
        results = list(outputs[:step_graph.num_outputs])
        if current.planned.layout.stream and current.prepared.mode == "blocks" and \
                site is current.prepared.sites[-1]:
            slots["stream"] = results
        return unit.captured.unflatten(results)

    def _bind(self, current: _Step, site: Site, plan: Plan) -> _BoundStep:
        """The step graph `site` runs under `plan` (kept for the rest of the schedule)."""
        unit = site.unit
        planned = current.planned
        layout, key = planned.local(site) if current.prepared.mode == "blocks" else \
            (planned.layout, planned.layout.key())
        step_graph, run = self._step_graph(unit, plan_shape(plan, unit.tokens), layout, key)
        released = [name for name in step_graph.writes if name not in step_graph.reads]
        bound = planned.bound[(site.index, plan)] = _BoundStep(step_graph, run, released)
        return bound

    def _feed(self, name: str, plan: Plan, step_graph: StepGraph, slots: dict[str, torch.Tensor],
              current: _Step, site: Site) -> torch.Tensor:
        generation, device = current.generation, current.prepared.device
        if name.startswith("noise."):  # random ranking: fresh per call and branch
            return torch.rand(step_graph.examples[name].shape, generator=generation.generator,
                              device=device)
        if name.startswith("ksize."):  # a dynamic token count: its length is k (>= 2)
            return self._carrier(device, name, max(2, plan[1 + int(name.split(".")[1])]))
        if name.startswith("kvalid."):  # the tokens really chosen (k = 1 runs as 2)
            return self._count(device, name, plan[1 + int(name.split(".")[1])])
        if name.startswith("prune."):  # the tokens the policy lists for this step
            return current.planned.listed[(current.step,
                                           site.first_branch + int(name.split(".")[1]))]
        if name == "keep":  # the block's kept image tokens (TokenCache's merge)
            return current.planned.listed[(current.step, ("keep", site.index))]
        if name == "forecast":
            coefficients = current.planned.coefficients
            return coefficients[current.step] if not generation.fresh and \
                current.step < current.planned.schedule.num_steps else \
                torch.zeros_like(coefficients[0])
        if name in slots:
            return slots[name]
        if name in step_graph.optional:
            example = step_graph.examples[name]
            return torch.zeros(example.shape, dtype=example.dtype, device=device)
        raise CacheStateError(f"cache slot {name!r} is empty at step {current.step}: the "
                              "schedule must start with a FULL step")

    def _count(self, device: torch.device, name: str, k: int) -> torch.Tensor:
        """A 0-d tensor holding k, made once per input, value and device (no copy per
        step; inputs never share a tensor, which a compiled graph would guard on)."""
        key = (device, name, k)
        if key not in self._counts:
            self._counts[key] = torch.tensor(k, device=device)
        return self._counts[key]

    def _carrier(self, device: torch.device, name: str, k: int) -> torch.Tensor:
        """An empty tensor of length k: its size is the input (one buffer per input)."""
        carrier = self._carriers.get((device, name))
        if carrier is None or carrier.shape[0] < k:
            carrier = self._carriers[(device, name)] = torch.empty(max(k, 256), device=device)
        return carrier[:k]

    def _step_graph(self, unit, plan: Plan, layout: CacheLayout,
                    layout_key: tuple) -> tuple[StepGraph, Any]:
        key = (plan, layout_key)
        if key not in unit.step_graphs:
            unit.step_graphs[key] = build_step_graph(unit.captured.graph_module, unit.branches,
                                                     plan, layout)
        step = unit.step_graphs[key]
        compiled_key = key + (self.compile, self.compile_mode)
        if compiled_key not in unit.compiled:
            unit.compiled[compiled_key] = compile_step_graph(step.graph_module, self.compile_mode) \
                if self.compile else step.graph_module
        return step, unit.compiled[compiled_key]

    # -- introspection ---------------------------------------------------------------
    def last_prepared(self) -> Prepared:
        if self._shared.last_signature not in self._shared.prepared:
            raise CacheStateError("the model has not been called yet: run one generation (or "
                                  "one call) first so the graph can be captured")
        return self._shared.prepared[self._shared.last_signature]

    def schedule_for(self, num_steps: int | None = None) -> tuple[Schedule, CacheLayout]:
        """The schedule and cache layout used for a generation of `num_steps` steps."""
        prepared = self.last_prepared()
        generation = self._generations.get(self._context[0])
        planned = num_steps or getattr(self.policy, "num_steps", None) or (
            generation.num_steps if generation else DEFAULT_NUM_STEPS)
        probe = _Generation(num_steps=planned,
                            cfg_halves=generation.cfg_halves if generation else False)
        planned = self._schedule(prepared, probe)
        return planned.schedule, planned.layout


def _dispatcher(site: Site):
    """The block's call while a cached step runs: its step graph (see `_run_blocks`)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        current = _ACTIVE.get()
        return current.runtime._run_site(current, site, args, kwargs)
    return call
