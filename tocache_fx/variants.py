"""Build the graph of one step plan by running the rewrite passes on a copy.

One `StepGraph` per distinct schedule row; the runtime compiles each once with
inductor and picks the one for the current step on the host (no device sync).

Example:
    >>> step = build_step_graph(captured.graph_module, branches, plan, layout)  # doctest: +SKIP
    >>> step.reads, step.writes
    (['cache_0', 'cache_1'], ['cache.1'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from tocache_fx.passes.attention_scores import attention_scores
from tocache_fx.passes.cache_branches import cache_branches
from tocache_fx.passes.find_branches import Branch
from tocache_fx.passes.skip_blocks import skip_blocks
from tocache_fx.passes.state import GraphState

from .layout import CacheLayout
from .meta import refresh_meta
from .schedule import StepKind

__all__ = ["StepGraph", "build_step_graph"]


@dataclass
class StepGraph:
    """A rewritten graph: `gm(*model_inputs, *state[reads]) -> (*outputs, *state[writes])`."""

    plan: tuple[int, ...]
    graph_module: GraphModule
    reads: list[str]
    writes: list[str]
    num_outputs: int


def _copy(base: GraphModule) -> GraphModule:
    graph = Graph()
    graph._codegen = base.graph._codegen
    output = graph.graph_copy(base.graph, {})
    graph.output(output)
    return GraphModule(base, graph)


def _is_impure(node: Node) -> bool:
    """Only mutation makes a node impure here: eval-mode SDPA and dropout carry a
    "seeded" tag that would otherwise keep every dead attention branch alive."""
    if node.op in ("placeholder", "output"):
        return True
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def build_step_graph(base: GraphModule, branches: Sequence[Branch], plan: tuple[int, ...],
                     layout: CacheLayout, forecast: tuple[int, int] = (0, 0)) -> StepGraph:
    """Rewrite a copy of `base` for `plan` (a schedule row) and `forecast` (the step's
    `Schedule.forecast_at`, for forecasting policies)."""
    gm = _copy(base)
    num_outputs = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    state = GraphState(gm.graph)
    skip_blocks(gm, branches, plan, layout, state)
    if plan[0] != StepKind.AGGRESSIVE:
        attention_scores(gm, branches, plan, layout, state)
        cache_branches(gm, branches, plan, layout, state, forecast)
    state.finish()
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    refresh_meta(gm)
    return StepGraph(plan, gm, list(state.reads), list(state.writes), num_outputs)
