"""Build and compile the graph of one step plan by running the rewrite passes on a copy.

A plan row is reduced to its *shape* first (`plan_shape`): per branch FULL, REUSE, or
PARTIAL with the token count a dynamic size (`DYNAMIC`). One `StepGraph` per distinct
shape, compiled once with inductor; the runtime feeds the exact counts as inputs.

Example:
    >>> step = build_step_graph(unit.captured, unit.branches, plan_shape(plan, tokens), layout)  # doctest: +SKIP
    >>> step.reads, step.writes
    (['cache.0', 'ksize.1'], ['cache.1'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from tocache_fx.passes.attention_scores import attention_scores
from tocache_fx.passes.cache_branches import DYNAMIC, cache_branches
from tocache_fx.passes.find_branches import Branch
from tocache_fx.passes.merge_pruned import merge_pruned
from tocache_fx.passes.skip_blocks import skip_blocks
from tocache_fx.passes.state import GraphState

from .layout import CacheLayout
from .errors import UnsupportedModelError
from .meta import refresh_meta, traced_from
from .schedule import Plan, StepKind

__all__ = ["StepGraph", "build_step_graph", "plan_shape", "compile_step_graph", "DYNAMIC"]


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


def _copy(base: GraphModule) -> GraphModule:
    graph = Graph()
    graph._codegen = base.graph._codegen
    output = graph.graph_copy(base.graph, {})
    graph.output(output)
    copy = GraphModule(base, graph)
    copy.meta.update(base.meta)
    return copy


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


def build_step_graph(base: GraphModule, branches: Sequence[Branch], plan: Plan,
                     layout: CacheLayout) -> StepGraph:
    """Rewrite a copy of `base` for `plan` (a `plan_shape`) under `layout`."""
    gm = _copy(base)
    num_outputs = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    state = GraphState(gm.graph, layout.cache_dtype)
    skip_blocks(gm, branches, plan, layout, state)
    if plan[0] != StepKind.AGGRESSIVE:
        attention_scores(gm, branches, plan, layout, state)
        cache_branches(gm, branches, plan, layout, state)
        merge_pruned(gm, branches, plan, layout, state)
    state.finish()
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    refresh_meta(gm)
    return StepGraph(plan, gm, list(state.reads), list(state.writes), state.optional,
                     num_outputs, dict(state.examples))


# Higher-order ops whose captured (exported) form Dynamo cannot trace again: exported
# flex attention carries the mask and score buffers as two more arguments than Dynamo's
# flex_attention takes ("too many values to unpack").
NOT_RECOMPILABLE = (torch.ops.higher_order.flex_attention,)


def compile_step_graph(step: StepGraph, mode: str | None) -> Any:
    """`step`'s graph compiled with inductor: static shapes, except each `ksize.b` or
    `prune.b` input whose length is the branch's token count (one graph for every k)."""
    for node in step.graph_module.graph.nodes:
        if node.op == "call_function" and node.target in NOT_RECOMPILABLE:
            raise UnsupportedModelError(
                f"{node.target} in {traced_from(node)}: torch.compile cannot trace the "
                "captured op again; run this model with compile=False")
    compiled = torch.compile(step.graph_module, backend="inductor", fullgraph=True,
                             dynamic=False, mode=mode)
    dynamic = [(i, node.meta["tocache_max"]) for i, node in enumerate(
        n for n in step.graph_module.graph.nodes if n.op == "placeholder")
        if str(node.meta.get("tocache_slot", "")).startswith(("ksize.", "prune.", "keep"))]
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
