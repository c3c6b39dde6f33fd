"""Rewrite pass: compute only the output features of a linear that the step still uses.

An adaLN-Zero block computes all its modulation parameters with one linear and splits
them (`linear(silu(emb)).chunk(6, -1)`: shift, scale and gate of attention and MLP).
A step that reuses a branch keeps only its gate; after dead-code elimination the other
chunks have no users, but the linear (one GEMM) still computes them and, on a small
batch, reads its whole weight. A REUSE step of a DiT block needs 2 of the 6 chunks,
of a FLUX single-stream block 1 of 3.

Requires: a rewritten step graph after dead-code elimination.
Ensures: every `aten.linear` whose users are all `chunk` / `split` / `split_with_sizes`
along the last dim, or `getitem` of those, and that leaves some features unused, is
replaced by one linear per run of adjacent used chunks, on row slices of the weight and
bias (views: no copy); each used chunk reads its slice of the narrowed output.
The graph's values are unchanged (a narrowed GEMM computes the same dot products).

Example:
    >>> narrow_linears(step_graph_module)   # doctest: +SKIP
    1
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

__all__ = ["narrow_linears"]

aten = torch.ops.aten
_SPLITS = (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)


def _chunk_ranges(split: Node, features: int) -> list[tuple[int, int]] | None:
    """The feature range of each output of `split` (None unless along the last dim)."""
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    ndim = split.args[0].meta["val"].dim()
    if dim not in (-1, ndim - 1) or features == 0:
        return None
    if split.target is aten.chunk.default:
        size = -(-features // split.args[1])
        sizes = [min(size, features - start) for start in range(0, features, size)]
    elif split.target is aten.split.Tensor:
        size = split.args[1]
        if isinstance(size, int) and size <= 0:
            return None
        sizes = [min(size, features - start) for start in range(0, features, size)] \
            if isinstance(size, int) else list(size)
    else:
        sizes = list(split.args[1])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(start, start + size) for start, size in zip(starts, sizes)]


def _used_chunks(linear: Node) -> tuple[Node, list[tuple[int, int]], dict[int, list[Node]]] | None:
    """(the split, its chunk ranges, the getitems of each used chunk), or None when the
    linear's users are not one split along the last dim read only through getitem."""
    users = list(linear.users)
    if len(users) != 1 or users[0].target not in _SPLITS:
        return None
    split = users[0]
    ranges = _chunk_ranges(split, linear.meta["val"].shape[-1])
    if ranges is None or not all(u.op == "call_function" and u.target is operator.getitem
                                 for u in split.users):
        return None
    used: dict[int, list[Node]] = {}
    for getitem in split.users:
        used.setdefault(getitem.args[1] % len(ranges), []).append(getitem)
    return split, ranges, used


def _runs(indices: list[int]) -> list[list[int]]:
    """Runs of consecutive chunk indices: [0, 1, 3] -> [[0, 1], [3]]."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def narrow_linears(gm: GraphModule) -> int:
    """Narrow every linear whose output features are partly unused (see module doc);
    returns how many were narrowed. Node values (`meta["val"]`) are set on new nodes."""
    graph, narrowed = gm.graph, 0
    for linear in list(graph.find_nodes(op="call_function", target=aten.linear.default)):
        found = _used_chunks(linear)
        if found is None:
            continue
        split, ranges, used = found
        if len(used) == len(ranges):
            continue
        x, weight, *rest = linear.args
        bias = rest[0] if rest else linear.kwargs.get("bias")
        for run in _runs(list(used)):
            start, stop = ranges[run[0]][0], ranges[run[-1]][1]
            with graph.inserting_before(split):
                rows = graph.call_function(aten.slice.Tensor, (weight, 0, start, stop))
                rows.meta["val"] = weight.meta["val"][start:stop]
                part_bias = None
                if bias is not None:
                    part_bias = graph.call_function(aten.slice.Tensor, (bias, 0, start, stop))
                    part_bias.meta["val"] = bias.meta["val"][start:stop]
                part = graph.call_function(aten.linear.default, (x, rows, part_bias))
                part.meta = {**linear.meta, "val": linear.meta["val"][..., start:stop]}
            for index in run:
                begin, end = ranges[index][0] - start, ranges[index][1] - start
                for getitem in used[index]:
                    if (begin, end) == (0, stop - start):
                        getitem.replace_all_uses_with(part)
                    else:
                        with graph.inserting_before(getitem):
                            piece = graph.call_function(aten.slice.Tensor, (part, -1, begin, end))
                        piece.meta = {**getitem.meta}
                        getitem.replace_all_uses_with(piece)
                    graph.erase_node(getitem)
        graph.erase_node(split)
        graph.erase_node(linear)
        narrowed += 1
    return narrowed
