"""Build the graph of one step plan by running the rewrite passes on a copy.

A plan row is reduced to its *shape* first (`plan_shape`): per branch FULL, REUSE, or
PARTIAL with the token count a dynamic size (`DYNAMIC`). One `StepGraph` per distinct
shape, compiled once (`tocache_fx.compiling`); the runtime feeds the exact counts as inputs.

Example:
    >>> step = build_step_graph(unit.captured, unit.branches, plan_shape(plan, tokens), layout)  # doctest: +SKIP
    >>> step.reads, step.writes
    (['cache.0', 'ksize.1'], ['cache.1'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from tocache_fx.passes.attention_scores import attention_scores
from tocache_fx.passes.fuse_scored_attention import fuse_scored_attention
from tocache_fx.passes.cache_branches import DYNAMIC, cache_branches
from tocache_fx.passes.find_branches import Branch
from tocache_fx.passes.merge_pruned import merge_pruned
from tocache_fx.passes.narrow_linears import narrow_linears
from tocache_fx.passes.skip_blocks import skip_blocks
from tocache_fx.passes.state import GraphState

from .layout import CacheLayout
from .meta import copy_graph_module, refresh_meta
from .schedule import Plan, StepKind

__all__ = ["StepGraph", "build_step_graph", "plan_shape", "DYNAMIC"]


@dataclass
class StepGraph:
    """A rewritten graph: `gm(*state, *inputs, *slots[reads]) -> (*outputs, *slots[writes])`."""

    plan: Plan  # its shape: k per branch, DYNAMIC for a run-time token count
    graph_module: GraphModule
    reads: list[str]
    writes: list[str]
    optional: set[str]  # reads fed as zeros while the cache does not hold them
    num_outputs: int
    examples: dict[str, torch.Tensor]  # meta tensors: each read's shape and dtype


def plan_shape(plan: Plan, tokens: Sequence[int]) -> Plan:
    """The graph a plan row needs: per branch FULL (N), REUSE (0) or DYNAMIC."""
    return plan[:1] + tuple(k if k in (0, n) else DYNAMIC for k, n in zip(plan[1:], tokens))


def _is_impure(node: Node) -> bool:
    """Mutation, and the calls that set interpreter state (grad mode, autocast, functorch's
    vmap levels, which flex attention's traced masks enter and leave) make a node impure
    here; eval-mode SDPA and dropout carry a "seeded" tag that would otherwise keep every
    dead attention branch alive."""
    if node.op in ("placeholder", "output"):
        return True
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return node.op == "call_function" and (
        target in torch.fx.node._side_effectful_functions
        or getattr(target, "__module__", "") == "torch._functorch.predispatch")


def _dense_outputs(gm: GraphModule, num_outputs: int) -> None:
    """Make the step's own outputs that are strided views (FLUX's single-stream block
    returns its two streams as slices of one joint sequence) contiguous inside the graph,
    where inductor writes them directly: the next block then takes them as they are
    instead of copying them to the layout its graph is compiled for."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(output.args[0])
    for i, value in enumerate(values[:num_outputs]):
        val = value.meta.get("val") if isinstance(value, Node) else None
        if isinstance(val, torch.Tensor) and not val.is_contiguous():
            with gm.graph.inserting_before(output):
                dense = gm.graph.call_function(torch.ops.aten.clone.default, (value,),
                                               {"memory_format": torch.contiguous_format})
            dense.meta["val"] = val.clone(memory_format=torch.contiguous_format)
            values[i] = dense
    output.args = (tuple(values),)


def build_step_graph(base: GraphModule, branches: Sequence[Branch], plan: Plan,
                     layout: CacheLayout) -> StepGraph:
    """Rewrite a copy of `base` for `plan` (a `plan_shape`) under `layout`."""
    gm = copy_graph_module(base)
    num_outputs = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    state = GraphState(gm.graph, layout.cache_dtype)
    skip_blocks(gm, branches, plan, layout, state)
    if plan[0] != StepKind.AGGRESSIVE:
        attention_scores(gm, branches, plan, layout, state)
        cache_branches(gm, branches, plan, layout, state)
        merge_pruned(gm, branches, plan, layout, state)
    state.finish()
    fuse_scored_attention(gm)
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    narrow_linears(gm)
    refresh_meta(gm)
    _dense_outputs(gm, num_outputs)
    gm.graph.lint()
    gm.recompile()
    return StepGraph(plan, gm, list(state.reads), list(state.writes), state.optional,
                     num_outputs, dict(state.examples))
