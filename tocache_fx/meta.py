"""Shape metadata of rewritten graphs, recomputed with fake tensors, their FLOPs, and
graph copies.

Example:
    >>> refresh_meta(graph_module)            # doctest: +SKIP
    >>> graph_module.graph.find_nodes(op="placeholder")[0].meta["val"].shape
    torch.Size([2, 4, 8, 8])
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                            DynamicOutputShapeException, FakeTensorMode)
from torch.fx import Graph, GraphModule
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._python_dispatch import _pop_mode_temporarily
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

from tocache_fx.errors import UnsupportedModelError

__all__ = ["copy_graph_module", "fake_inputs", "flop_counter", "graph_flops", "refresh_meta",
           "traced_from"]


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None,
                         **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# SDPA's CPU kernel, which torch's formulas leave out: uncounted, an attention on the CPU
# would cost 0 FLOPs (its CUDA kernels are counted)
_MISSING_FORMULAS = {op: _cpu_attention_flops
                     for op in (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,)
                     if op not in flop_registry}


def flop_counter() -> FlopCounterMode:
    """torch's `FlopCounterMode` (no display), also counting attention on the CPU.

    Example:
        >>> with flop_counter() as counter:
        ...     F.scaled_dot_product_attention(q, k, v)   # doctest: +SKIP
        >>> counter.get_total_flops()   # doctest: +SKIP
    """
    return FlopCounterMode(display=False, custom_mapping=_MISSING_FORMULAS)


def copy_graph_module(base: GraphModule) -> GraphModule:
    """A copy of `base` with its own graph (passes and compilers may rewrite it)."""
    graph = Graph()
    graph._codegen = base.graph._codegen
    output = graph.graph_copy(base.graph, {})
    graph.output(output)
    copy = GraphModule(base, graph)
    copy.meta.update(base.meta)
    return copy


def fake_inputs(gm: GraphModule, mode: FakeTensorMode) -> list[torch.Tensor]:
    """Fake tensors matching the graph's placeholders (slots described on "meta" take
    the device of the model inputs)."""
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    device = next(v.device for v in vals if v.device.type != "meta")
    with mode:
        return [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype,
                                    device=device if v.device.type == "meta" else v.device)
                for v in vals]


DATA_DEPENDENT = (DynamicOutputShapeException, DataDependentOutputException,
                  GuardOnDataDependentSymNode)
"""Fake-tensor failures of ops whose output shape depends on tensor values."""


class _NamingFailures(FakeTensorProp):
    """FakeTensorProp whose failures name the op and the module it was traced from
    (data-dependent shapes, which callers explain, carry the node as `failed_node`)."""

    extra_traceback = False

    def run_node(self, node: torch.fx.Node):
        try:
            return super().run_node(node)
        except DATA_DEPENDENT as error:
            error.failed_node = node  # for the caller's message
            raise
        except Exception as error:  # noqa: BLE001 - re-raised saying what failed
            first = (str(error).strip().splitlines() or [""])[0][:200]
            raise UnsupportedModelError(
                f"{_op_name(node.target)} in {traced_from(node)} cannot run on fake tensors, "
                f"which the rewritten graphs need ({type(error).__name__}: {first})") from error


def _op_name(target: object) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}"


def traced_from(node: torch.fx.Node) -> str:
    """The innermost module (path and class) `node` was traced in, from export's stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the captured module"
    path, cls = list(stack.values())[-1]
    name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))
    return f"{path or 'the captured module'} ({name})"


def refresh_meta(gm: GraphModule) -> None:
    """Recompute `meta["val"]` (and check every shape) with fake tensors; an op that cannot
    run on them raises `UnsupportedModelError` naming it and its module."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _NamingFailures(gm, mode).propagate_dont_convert_inputs(*fake_inputs(gm, mode))


def graph_flops(gm: GraphModule, inputs: list[torch.Tensor], mode: FakeTensorMode,
                by_op: bool = False) -> int | dict:
    """FLOPs of one run of `gm` on the fake `inputs` (total, or per op), counted with
    `FlopCounterMode`. A higher-order op that cannot run under the counter (eager flex
    attention) runs beside it and is counted by torch's own formula for it."""
    try:
        with mode, flop_counter() as counter:
            gm(*inputs)
        counts = dict(counter.get_flop_counts().get("Global", {}))
    except Exception:  # noqa: BLE001 - the counter's failure: count around the op
        hops = _HopsBesideCounter(gm)
        with mode, flop_counter() as counter:
            hops.run(*inputs)
        counts = Counter(counter.get_flop_counts().get("Global", {})) + hops.flops
    return counts if by_op else sum(counts.values())


class _HopsBesideCounter(torch.fx.Interpreter):
    """Runs higher-order ops with the (innermost) counter mode popped, adding their FLOPs
    from `flop_registry`."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.flops: Counter = Counter()

    def call_function(self, target, args, kwargs):
        if not isinstance(target, torch._ops.HigherOrderOperator):
            return super().call_function(target, args, kwargs)
        with _pop_mode_temporarily():
            out = super().call_function(target, args, kwargs)
        if target in flop_registry:
            self.flops[target] += flop_registry[target](*args, **kwargs, out_val=out)
        return out
