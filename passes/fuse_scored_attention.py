"""Rewrite pass: an attention scored at a FULL step takes its output and its score from
one softmax.

Requires: a step graph after `attention_scores` and `GraphState.finish` (each score
node next to the attention whose query and key it reads).
Ensures: where the attention runs on the CPU in float32, each `attention_influence` /
`cross_attention_entropy` node and its `scaled_dot_product_attention` (no dropout,
causal mask or GQA; a boolean or float mask) are replaced by one `ops.attention_with_score`
node: attention computed explicitly, as the ToCa authors compute it to read the map,
instead of SDPA's kernel plus a second pass over the same logits. A DiT 384-wide
attention with 256 tokens (CPU, 2 threads): 4.30 ms unscored, 5.92 ms scored apart,
4.66 ms fused (docs/design.md). On other devices and dtypes the graph is left as it
is: there SDPA's fused kernels are the fast path and the fused form is not measured.
Its output equals SDPA's within float rounding; the score is unchanged.

Example:
    >>> fuse_scored_attention(gm)   # doctest: +SKIP
    1
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from tocache_fx import ops

__all__ = ["fuse_scored_attention"]

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}
_SCORES = {ops.attention_influence: "influence", ops.cross_attention_entropy: "entropy"}


def _sdpa_arguments(node: Node) -> dict[str, object]:
    names = [argument.name for argument in _SDPA._schema.arguments]
    return {**_SDPA_DEFAULTS, **dict(zip(names, node.args)), **node.kwargs}


def _fusable(arguments: dict[str, object]) -> bool:
    query, key, mask = arguments["query"], arguments["key"], arguments["attn_mask"]
    q, k = query.meta.get("val"), key.meta.get("val")
    mask_val = mask.meta.get("val") if isinstance(mask, Node) else None
    return (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and q.device.type == "cpu" and q.dtype == torch.float32
            and q.dim() == 4 and k.shape[1] == q.shape[1]
            and arguments["dropout_p"] == 0.0 and not arguments["is_causal"]
            and not arguments["enable_gqa"] and (mask is None or mask_val is not None))


def _scored_attention(score: Node, attentions: list[Node]) -> Node | None:
    """The one SDPA whose query, key, mask and scale the score node reads, if fusable."""
    read = tuple(score.args[:4])  # query, key, mask, scale
    matches = [a for a in attentions if tuple(_sdpa_arguments(a)[name] for name in (
        "query", "key", "attn_mask", "scale")) == read]
    return matches[0] if len(matches) == 1 and _fusable(_sdpa_arguments(matches[0])) else None


def fuse_scored_attention(gm: GraphModule) -> int:
    """Fuse each scored CPU float32 attention with its score (see module doc); returns
    how many were fused."""
    graph = gm.graph
    attentions = [n for n in graph.nodes if n.op == "call_function" and n.target is _SDPA]
    fused = 0
    for score in [n for n in graph.nodes if n.op == "call_function" and n.target in _SCORES]:
        attention = _scored_attention(score, attentions)
        if attention is None:
            continue
        kind = _SCORES[score.target]
        if kind == "influence":
            _, _, mask, scale, chunk, span = score.args
            share_halves = False
        else:
            _, _, mask, scale, chunk, share_halves, span = score.args
        value = _sdpa_arguments(attention)["value"]
        with graph.inserting_before(attention):
            both = graph.call_function(ops.attention_with_score, (
                kind, score.args[0], score.args[1], value, mask, scale, chunk, share_halves,
                span))
            output = graph.call_function(operator.getitem, (both, 0))
            scores = graph.call_function(operator.getitem, (both, 1))
        both.meta.update(attention.meta)  # values are recomputed by `refresh_meta`
        output.meta.update(attention.meta)
        scores.meta.update(score.meta)
        attention.replace_all_uses_with(output)
        score.replace_all_uses_with(scores)
        graph.erase_node(score)
        graph.erase_node(attention)
        attentions.remove(attention)
        fused += 1
    return fused
