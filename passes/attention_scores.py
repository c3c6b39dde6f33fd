"""Rewrite pass: at FULL steps, compute the token scores later PARTIAL steps select by.

Requires: a copy of the captured graph, the branches, and a `CacheLayout` whose
`scores` maps (attention branch, start, length) to a score kind: "influence" (ToCa
s1, how much attention each token receives), "entropy" (ToCa s2, cross-attention
entropy per query token) or "vnorm" (DuCa, value norms), over the tokens
`start:start + length` of the attention's sequence (one stream of a joint attention).
Ensures: next to each such attention op, a node computes the score from the op's own
Q/K/V inputs in chunks of queries (`fuse_scored_attention` may later merge it with the
attention) and is written to
slot `score_slot(key)` wherever the attention runs in full (FULL steps, and a
per-kind cycle's FULL branches inside a PARTIAL step, as the authors refresh their maps).
Under context parallelism (collectives between the stream and the attention) the score
is computed from the rank's local Q/K/V before the collectives (`passes.shards`), with
the keys gathered and the partial sums all-reduced across the ranks, so each rank gets
the one-process score of its own tokens.

Example:
    >>> attention_scores(gm, branches, full_plan, layout, state)   # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import GraphModule

from tocache_fx import ops
from tocache_fx.layout import CacheLayout, chain_start
from tocache_fx.schedule import StepKind

from .find_branches import Branch, attention_mask
from .shards import local_attention_inputs
from .state import GraphState

__all__ = ["attention_scores", "score_slot"]


def attention_scores(gm: GraphModule, branches: Sequence[Branch], plan: tuple[int, ...],
                     layout: CacheLayout, state: GraphState) -> bool:
    """Insert the score computations of a FULL step (see module doc)."""
    if plan[0] == StepKind.AGGRESSIVE or not layout.scores:
        return False
    by_name = {node.name: node for node in gm.graph.nodes}
    chunk = layout.selection.query_chunk
    written = False
    for source, kind in layout.scores.items():
        index, start, length = source
        if plan[1 + index] != branches[index].num_tokens:
            continue  # the attention is not computed in full at this step
        attention = by_name[branches[index].attention.name]
        query, key, value = attention.args[:3]
        mask = attention_mask(attention)
        scale = attention.kwargs.get("scale")
        span = (start, length)
        scored_by = next(b for b, key in layout.score_source.items() if key == source)
        local = local_attention_inputs(attention,
                                       by_name[chain_start(branches[scored_by], branches).name])
        with gm.graph.inserting_after(attention):
            if local is not None:
                shard = local.shard
                score = gm.graph.call_function(ops.sharded_attention_score, (
                    kind, *local.nodes, local.token_axes, scale, chunk, span,
                    layout.selection.share_halves, shard.group, shard.rank, shard.world))
            elif kind == "influence":
                score = gm.graph.call_function(ops.attention_influence,
                                               (query, key, mask, scale, chunk, span))
            elif kind == "entropy":
                score = gm.graph.call_function(
                    ops.cross_attention_entropy, (query, key, mask, scale, chunk,
                                                  layout.selection.share_halves, span))
            else:
                score = gm.graph.call_function(ops.value_norm_score, (value, span))
        score.meta["tocache"] = f"score:{index}"
        state.write(score_slot(source), score)
        written = True
    return written


def score_slot(source: tuple[int, int, int]) -> str:
    """The slot of the scores of attention branch `index` over tokens start:start+length."""
    index, start, length = source
    return f"score.{index}.{start}x{length}"
