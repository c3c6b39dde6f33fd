"""Compile a step graph with inductor (`compile_step_graph`).

A step graph with static shapes goes to inductor directly (`torch._inductor.compile`),
not through `torch.compile`: no Dynamo frame and guard tree runs per call, which on a
small block is a large share of the call (a DiT 28 x 128 REUSE block: 0.08 ms of
compiled code against 0.15 ms through `torch.compile`, docs/design.md). What Dynamo's
guards would check is still checked at every call, in C++ (~3 us):

* every input's dtype, device, shape, strides and autograd flags (Dynamo's
  `TensorGuards`, taken on the inputs of the first call);
* global state: grad mode, autocast, default dtype, thread count, deterministic and
  TF32 flags (Dynamo's `GlobalStateGuard`).

The compiled code's own per-input `assert_size_stride` checks would repeat the first
of these in Python, so they are compiled out (a DiT REUSE block call: 118 -> 107 us).

The fake inputs it compiles on carry a shape environment and the package's own ops in
the graph are marked cacheable (by a hash of their source), which inductor's and
AOTAutograd's on-disk caches need: a second process loads the graphs.

A call that fails a check runs the graph through `torch.compile`, which compiles for it
(a recompile: under `torch._dynamo.config.error_on_recompile` it raises instead). Graphs
with a run-time token count (`ksize.b`, `prune.b`, `keep` inputs: one graph for every
k) and modes that use CUDA graphs always go through `torch.compile`.

Example:
    >>> run = compile_step_graph(step, mode=None)   # doctest: +SKIP
    >>> outputs = run(*state, *inputs, *slots)
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._dynamo.exc import RecompileError
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from .errors import UnsupportedModelError
from .meta import copy_graph_module, traced_from

__all__ = ["compile_step_graph", "DirectlyCompiled", "NOT_RECOMPILABLE"]

# Higher-order ops whose captured (exported) form neither Dynamo nor inductor's lowering
# takes: exported flex attention carries the mask and score buffers as two more arguments
# than they unpack ("too many values to unpack").
NOT_RECOMPILABLE = (torch.ops.higher_order.flex_attention,)

_DYNAMIC_INPUTS = ("ksize.", "prune.", "keep")


def _cacheable_functions(gm: GraphModule) -> dict[str, str]:
    """This package's Python functions the graph calls (`tocache_fx.ops`), each keyed by
    a hash of its module's source. Marked cacheable, they let AOTAutograd's on-disk cache
    take the graph (it refuses unknown functions); a changed module changes the key."""
    found = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, types.FunctionType) and \
                target.__module__.startswith("tocache_fx."):
            source = inspect.getsource(sys.modules[target.__module__])
            found[f"{target.__module__}.{target.__name__}"] = hashlib.sha256(
                source.encode()).hexdigest()
    return found


def _dynamic_inputs(gm: GraphModule) -> list[tuple[int, int]]:
    """(position, most tokens) of each input whose length is a run-time token count."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [(i, node.meta["tocache_max"]) for i, node in enumerate(placeholders)
            if str(node.meta.get("tocache_slot", "")).startswith(_DYNAMIC_INPUTS)]


def _through_dynamo(gm: GraphModule, mode: str | None,
                    dynamic: Sequence[tuple[int, int]]) -> Callable[..., Any]:
    """`gm` compiled by `torch.compile`, its dynamic inputs marked at the first call."""
    compiled = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False, mode=mode)
    if not dynamic:
        return compiled
    marked = {"done": False}

    def run(*inputs: torch.Tensor) -> Any:
        if not marked["done"]:
            for i, most in dynamic:
                torch._dynamo.mark_dynamic(inputs[i], 0, min=2, max=most)
            marked["done"] = True
        return compiled(*inputs)

    return run


class DirectlyCompiled:
    """A static step graph compiled by inductor at its first call, run without Dynamo
    while its inputs and the global state match that call's (see the module docstring).

    `fallbacks` counts the calls that did not match and ran through `torch.compile`.
    """

    def __init__(self, gm: GraphModule, mode: str | None) -> None:
        self._graph_module = gm
        self._mode = mode
        self._compiled: Callable[..., Any] | None = None
        self._inputs: Any = None  # TensorGuards of the first call's inputs
        self._state: Any = None  # GlobalStateGuard at compile time
        self._dynamo: Callable[..., Any] | None = None
        self.fallbacks = 0

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self._compiled is None:
            self._compile(inputs)
        if self._state.check() and self._inputs.check(*inputs):
            return self._compiled(*inputs)
        return self._run_through_dynamo(inputs)

    def _compile(self, inputs: Sequence[torch.Tensor]) -> None:
        guards = torch._C._dynamo.guards
        self._inputs = guards.TensorGuards(
            *inputs, dynamic_dims_sizes=[list(t.shape) for t in inputs],
            dynamic_dims_strides=[list(t.stride()) for t in inputs])
        # fake inputs with a shape environment: inductor's on-disk graph cache needs one
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in inputs]
        options = {**torch._inductor.list_mode_options(self._mode or "default"), "size_asserts": False,
                   "unsafe_marked_cacheable_functions": _cacheable_functions(self._graph_module)}
        self._compiled = torch._inductor.compile(copy_graph_module(self._graph_module), fakes,
                                                 options=options)
        self._state = guards.GlobalStateGuard()

    def _run_through_dynamo(self, inputs: Sequence[torch.Tensor]) -> Any:
        if self._dynamo is None:
            if torch._dynamo.config.error_on_recompile:
                names = [f"input {i}" for i in range(len(inputs))]
                reason = self._state.reason() if not self._state.check() else \
                    self._inputs.check_verbose(*inputs, tensor_check_names=names)
                raise RecompileError(f"a step graph compiled for other inputs: {reason}")
            self._dynamo = _through_dynamo(self._graph_module, self._mode, ())
        self.fallbacks += 1
        return self._dynamo(*inputs)


def compile_step_graph(gm: GraphModule, mode: str | None) -> Callable[..., Any]:
    """`gm` (a step graph) compiled with inductor: directly where its shapes are static
    and `mode` uses no CUDA graphs, else through `torch.compile` (each `ksize.b`,
    `prune.b` or `keep` input's length dynamic: one graph for every k)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in NOT_RECOMPILABLE:
            raise UnsupportedModelError(
                f"{node.target} in {traced_from(node)}: torch.compile cannot compile the "
                "captured op; run this model with compile=False")
    dynamic = _dynamic_inputs(gm)
    if dynamic or torch._inductor.list_mode_options(mode or "default").get("triton.cudagraphs"):
        return _through_dynamo(gm, mode, dynamic)
    return DirectlyCompiled(gm, mode)
