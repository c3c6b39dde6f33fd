"""Rewrite pass: what TokenCache's pruned tokens take at the end of a block.

Requires: a block's captured graph (`graph_module.meta["tocache_num_state"]` state
inputs first), its branches, a plan row and a `CacheLayout` whose selection lists the
tokens (`listed_cache` "output" or "change"; "branches" needs no pass: each branch
reuses its cached value under the current gate).
Ensures: for every output that carries the block's image tokens (its `hidden_states`
stream), a FULL plan writes slot `block.<j>` (the output, or with "change" the output
minus the block's input); a PARTIAL plan that prunes replaces the output's pruned tokens
by the cached output (or the current input plus the cached change), keeping the tokens
listed in graph input `keep` (the block's kept image tokens).

Example:
    >>> merge_pruned(gm, branches, plan, layout, state)   # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Node

from tocache_fx import ops
from tocache_fx.layout import CacheLayout

from .cache_branches import DYNAMIC
from .find_branches import Branch
from .state import GraphState, slot_example
from .token_axis import main_stream, token_span

__all__ = ["merge_pruned"]


def merge_pruned(gm: GraphModule, branches: Sequence[Branch], plan: tuple[int, ...],
                 layout: CacheLayout, state: GraphState) -> bool:
    """Store or merge the block's image-token outputs (see module doc)."""
    mode = layout.selection.listed_cache
    if not layout.prune or mode == "branches":
        return False
    nodes = list(gm.graph.nodes)
    main = main_stream(gm)
    output = nodes[-1]
    streams = [j for j, node in enumerate(output.args[0]) if isinstance(node, Node)
               and token_span(nodes, main, node) == (1, 0, main.meta["val"].shape[1])]
    if not streams:
        return False
    pruning = plan[0] != 0 and any(k == DYNAMIC or 0 < k < b.num_tokens
                                   for b, k in zip(branches, plan[1:]) if b.index in layout.prune)
    if plan[0] != 0 and not pruning:
        return False
    results = list(output.args[0])
    for j in streams:
        node = results[j]
        slot = f"block.{j}"
        with gm.graph.inserting_before(output):
            if plan[0] == 0:
                value = node if mode == "output" else gm.graph.call_function(
                    torch.ops.aten.sub.Tensor, (node, main))
                value.meta["val"] = node.meta["val"]
                state.write(slot, value)
                continue
            example = main.meta["val"]
            keep = state.read("keep", torch.empty(example.shape[1] // 2, dtype=torch.int64,
                                                  device="meta"))
            keep.meta["tocache_max"] = example.shape[1]
            idx = gm.graph.call_function(ops.batch_index, (keep, main))
            base = state.read(slot, slot_example(node))
            if mode == "change":
                base = gm.graph.call_function(torch.ops.aten.add.Tensor, (main, base))
            kept = gm.graph.call_function(ops.gather_tokens, (node, idx))
            merged = gm.graph.call_function(ops.scatter_tokens, (base, idx, kept))
            merged.meta["tocache"] = "merge"
        results[j] = merged
    output.args = (tuple(results),)
    return True
