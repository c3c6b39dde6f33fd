"""Analysis helper: where a context-parallel rank's tokens sit, and the attention inputs
they have before the collectives.

Under diffusers' context parallelism a captured block holds one rank's shard of the
tokens (a contiguous chunk of each split sequence, rank order) and its attention's
collectives as `_c10d_functional` ops: Ulysses' all-to-alls trade the sequence shard for
a head shard, Ring gathers keys and values. An attention score over a rank's tokens
then needs the other ranks' heads or queries; `local_attention_inputs` finds the
rank's queries, keys and values as they are before any collective (every head, the
rank's tokens), from which `tocache_fx.ops.sharded_attention_score` computes the score
with collectives of its own.

Example:
    >>> shard = graph_shard(graph_module.graph)   # doctest: +SKIP
    >>> shard.rank, shard.world
    (0, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .token_axis import token_spans

__all__ = ["Shard", "LocalInputs", "graph_shard", "is_collective", "local_attention_inputs"]


@dataclass(frozen=True)
class Shard:
    """The process group a graph's collectives run on, and this rank's place in it."""

    group: str
    rank: int
    world: int


@dataclass(frozen=True)
class LocalInputs:
    """An attention's rank-local query, key and value (`[batch, tokens, heads, dim]` or
    `[batch, heads, tokens, dim]`), where the stream's tokens sit in each (token axis,
    start, length), and their shard."""

    nodes: tuple[Node, Node, Node]
    spans: tuple[tuple[int, int, int], ...]
    shard: Shard

    @property
    def token_axes(self) -> tuple[int, ...]:
        return tuple(span[0] for span in self.spans)


def is_collective(node: Node) -> bool:
    return node.op == "call_function" and "_c10d_functional" in str(node.target)


def graph_shard(graph: Graph) -> Shard | None:
    """The shard of a graph whose collectives all run on one process group (None
    without collectives, or with several groups: Ulysses x Ring hybrids)."""
    groups = {arg for node in graph.nodes if is_collective(node)
              for arg in node.args if isinstance(arg, str) and arg not in ("sum", "avg")}
    if len(groups) != 1:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = groups.pop()
    process_group = _resolve_process_group(group)
    return Shard(group, process_group.rank(), process_group.size())


def _ancestors(node: Node, stop: set[Node]) -> set[Node]:
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in seen or current in stop:
            continue
        seen.add(current)
        todo.extend(current.all_input_nodes)
    return seen


def local_attention_inputs(attention: Node, stream: Node) -> LocalInputs | None:
    """The rank-local q, k, v behind `attention`, whose tokens come from `stream`
    (see module doc; the inputs themselves where no collective sits between them, as in
    an attention a CP plan leaves local); None outside context parallelism, where the
    attention takes a mask (its layout would be the gathered one), or where an input
    has no `[batch, tokens, heads, dim]` ancestor carrying the stream's tokens."""
    from .find_branches import attention_mask  # find_branches imports this module

    shard = graph_shard(attention.graph)
    if shard is None or attention_mask(attention) is not None:
        return None
    nodes = list(attention.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    spans = token_spans(nodes[order[stream] + 1:order[attention]], stream)
    batch, head_dim = stream.meta["val"].shape[0], attention.args[0].meta["val"].shape[-1]
    found, found_spans = [], []
    for arg in attention.args[:3]:
        behind = _ancestors(arg, {stream})
        candidates = [n for n in behind if n in spans and _is_heads_tensor(n, spans[n][0], batch,
                                                                             head_dim)]
        if candidates:
            local = max(candidates, key=order.__getitem__)  # the last: after norms, rotary
        elif not any(is_collective(n) for n in behind):
            local = arg  # another stream's tokens, kept local (SDPA layout)
            spans[arg] = (2, 0, arg.meta["val"].shape[2])
        else:
            return None
        if any(is_collective(n) for n in _ancestors(local, {stream})):
            return None
        found.append(local)
        found_spans.append(spans[local])
    return LocalInputs(tuple(found), tuple(found_spans), shard)


def _is_heads_tensor(node: Node, token_axis: int, batch: int, head_dim: int) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 4 and token_axis in (1, 2) \
        and value.shape[0] == batch and value.shape[-1] == head_dim

