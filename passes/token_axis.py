"""Analysis pass: is a branch token-wise, and where is the token axis of each node?

Requires: `node.meta["val"]` on every node (as `torch.export` leaves it).
Ensures: nothing is modified; returns, for the nodes of one branch, the dimension
that carries the token axis of the branch input, or the reason why computing the
branch on a gathered subset of tokens would not give the same values per token.

A branch is token-wise when every op on the path from its input to its output keeps
tokens independent: pointwise ops with per-token-broadcast side inputs, linear layers,
norms over channels, reshapes and permutes that keep the token axis whole, and
attention where only the queries come from the branch input (cross-attention).

Example:
    >>> axes = token_axes(branch_nodes, branch_input)   # doctest: +SKIP
    >>> axes[linear_node]
    1
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

import torch
from torch.fx import Node

from tocache_fx.opaque import OPAQUE_OP, REGISTRY

aten = torch.ops.aten

__all__ = ["NotTokenWise", "token_axes", "SIZE_ARG_OPS"]


class NotTokenWise(Exception):
    """Raised with a human-readable reason when a branch is not token-wise."""


# Ops whose output keeps the input's shape and that act on each element independently
# or are identities in eval mode.
_SHAPE_PRESERVING = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.dropout.default,
    aten.type_as.default,
}
# Ops with an explicit size list as their second argument (the token entry is edited
# to the partial token count when the branch is rewritten).
SIZE_ARG_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                aten.expand.default}
_LINEAR = {aten.linear.default}
_LEFT_MATMUL = {aten.matmul.default, aten.mm.default, aten.bmm.default}
_NORMS = {aten.layer_norm.default, aten.rms_norm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
           aten.unbind.int}
_SDPA = {aten.scaled_dot_product_attention.default}


def _shape(node: object) -> Sequence[int] | None:
    if isinstance(node, Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(val.shape)
    return None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _view_axis(in_shape: Sequence[int], axis: int, out_shape: Sequence[int]) -> int | None:
    """Where the token axis lands after a reshape, if it stays whole and unmerged."""
    prefix, size = math.prod(in_shape[:axis]), in_shape[axis]
    for j, out_size in enumerate(out_shape):
        if math.prod(out_shape[:j]) == prefix and out_size == size:
            return j
    return None


def token_axes(nodes: Iterable[Node], branch_input: Node, axis: int = 1,
               cached: dict[Node, int] | None = None,
               side_inputs: dict[Node, tuple[int, int, int]] | None = None,
               bypass: dict[Node, Node] | None = None,
               spans: dict[Node, tuple[int, int]] | None = None,
               queries_only: bool = False) -> dict[Node, object]:
    """Token axis of every node of a branch (`nodes`, in graph order).

    `cached` maps nodes whose values come from a cache (gathered per token, not
    computed) to their token axis. Values are an int, or a tuple of ints/None for ops
    returning several tensors. Per-token side inputs of pointwise ops (rotary tables,
    per-token modulation) are recorded in `side_inputs` as (token axis, rank, offset)
    once left-padded to the rank of the op that reads them: a PARTIAL step gathers them
    at the chosen tokens (shifted by `offset` where the table spans a joint sequence).

    Other tokens may ride along: `cat([other, x], dim=tokens)` ... `y[:, start:end]`
    (CogVideoX runs one MLP over text and image tokens, then slices each stream back).
    Nodes in between get a `spans` entry (start, length) of the branch's tokens; a
    PARTIAL step runs them on the chosen tokens only, so the cat and the closing slice
    are in `bypass` (node -> the node whose value it takes).

    `queries_only`: attention may also take its keys and values from the branch's
    tokens (self-attention); the analysis then proves the *query* path token-wise (see
    `query_path`): chosen tokens attend to the keys and values of all tokens.
    Raises `NotTokenWise` naming the first op that mixes tokens.
    """
    side_inputs = {} if side_inputs is None else side_inputs
    bypass = {} if bypass is None else bypass
    spans = {} if spans is None else spans
    axes: dict[Node, object] = {branch_input: axis, **(cached or {})}
    num_tokens = _shape(branch_input)[axis]
    for node in nodes:
        if node in axes:
            continue
        carried = [a for a in node.all_input_nodes if a in axes]
        if not carried:
            continue
        if _opens_span(node, axes, spans, bypass) or _closes_span(node, axes, spans, bypass):
            continue
        span = {spans.get(a) for a in carried}
        if len(span) > 1:
            raise _fail(node, "combines tensors that carry different extra tokens")
        span = span.pop()
        known = set(side_inputs)
        axes[node] = _node_axis(node, axes, num_tokens, side_inputs, queries_only)
        if span is not None:
            for new in set(side_inputs) - known:  # a table over the joint sequence
                side_axis, rank, _ = side_inputs[new]
                if _shape(new)[side_axis - (rank - len(_shape(new)))] != _shape(node)[axes[node]]:
                    raise _fail(node, "reads a per-token side input next to extra tokens")
                side_inputs[new] = (side_axis, rank, span[0])
            spans[node] = span
    return axes


def query_path(nodes: Sequence[Node], axes: dict[Node, object], output: Node) -> set[Node]:
    """The nodes of a `queries_only` analysis that the output needs on the query side:
    key and value projections stay computed over all tokens (not gathered)."""
    attentions = [n for n in nodes if n.target in _SDPA and n in axes]
    keys_values = {arg for n in attentions for arg in n.args[1:3] if isinstance(arg, Node)}
    needed, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in needed or node not in axes:
            continue
        needed.add(node)
        inputs = [node.args[0]] if node in attentions else node.all_input_nodes
        stack.extend(a for a in inputs if a not in keys_values)
    return needed


def _opens_span(node: Node, axes: dict[Node, object], spans: dict[Node, tuple[int, int]],
                bypass: dict[Node, Node]) -> bool:
    """`cat([other, x, ...], dim=token axis)` with one token-carrying input."""
    if node.target is not aten.cat.default:
        return False
    tensors = list(node.args[0])
    carried = [t for t in tensors if t in axes]
    if len(carried) != 1 or carried[0] in spans or not isinstance(axes[carried[0]], int):
        return False
    x = carried[0]
    axis = axes[x]
    if _norm_dim(_arg(node, 1, "dim", 0), len(_shape(x))) != axis:
        return False
    start = sum(_shape(t)[axis] for t in tensors[:tensors.index(x)])
    axes[node], spans[node], bypass[node] = axis, (start, _shape(x)[axis]), x
    return True


def _closes_span(node: Node, axes: dict[Node, object], spans: dict[Node, tuple[int, int]],
                 bypass: dict[Node, Node]) -> bool:
    """`y[:, start:start + length]`, or the chunk of a split, taking back exactly the
    branch's tokens."""
    src = node.args[0] if node.args else None
    if node.target in (aten.split_with_sizes.default, aten.split.Tensor) and src in spans:
        return _closes_span_by_split(node, src, axes, spans, bypass)
    if node.target is operator.getitem and src in bypass and \
            src.target in (aten.split_with_sizes.default, aten.split.Tensor):
        if axes[src][node.args[1]] is None:
            return True  # another stream's chunk: not the branch's
        axes[node], bypass[node] = axes[src][node.args[1]], bypass[src]
        return True
    if node.target is not aten.slice.Tensor or src not in spans:
        return False
    axis, (start, length) = axes[src], spans[src]
    total = _shape(src)[axis]
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(src)))
    begin, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    begin = 0 if begin is None else begin + (total if begin < 0 else 0)
    end = total if end is None else min(end + (total if end < 0 else 0), total)
    if dim != axis or step != 1 or (begin, end) != (start, start + length):
        raise _fail(node, "slices other tokens than the branch's out of a joint sequence")
    axes[node], bypass[node] = axis, src
    return True


def _closes_span_by_split(node: Node, src: Node, axes: dict[Node, object],
                          spans: dict[Node, tuple[int, int]], bypass: dict[Node, Node]) -> bool:
    axis, (start, length) = axes[src], spans[src]
    total = _shape(src)[axis]
    if _norm_dim(_arg(node, 2, "dim", 0), len(_shape(src))) != axis:
        return False
    sizes = _arg(node, 1, "split_size", None)
    if isinstance(sizes, int):
        sizes = [sizes] * (total // sizes) + ([total % sizes] if total % sizes else [])
    begins = [sum(sizes[:i]) for i in range(len(sizes))]
    if (start, length) not in zip(begins, sizes):
        raise _fail(node, "splits other tokens than the branch's out of a joint sequence")
    chunk = list(zip(begins, sizes)).index((start, length))
    axes[node] = tuple(axis if i == chunk else None for i in range(len(sizes)))
    bypass[node] = src
    return True


def _arg(node: Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _fail(node: Node, why: str) -> NotTokenWise:
    return NotTokenWise(f"{node.name} ({node.target}) {why}")


def _node_axis(node: Node, axes: dict[Node, object], num_tokens: int,
               side_inputs: dict[Node, tuple[int, int, int]],
               queries_only: bool = False) -> object:
    target, args = node.target, node.args
    out_shape = _shape(node)
    src = args[0] if args else None

    if node.op != "call_function":
        raise _fail(node, "is not a function call")
    if target is OPAQUE_OP:
        opaque = REGISTRY[args[0]]
        if not opaque.token_wise:
            raise _fail(node, f"runs {opaque.path} ({opaque.class_name}), which is not "
                              "token-wise on the captured inputs")
        if axes[args[1]] == len(out_shape) - 1:
            raise _fail(node, "gets tokens along its channel axis")
        return axes[args[1]]
    if target is operator.getitem:
        parent = axes[src]
        if not isinstance(parent, tuple) or parent[args[1]] is None:
            raise _fail(node, "indexes a tensor along tokens")
        return parent[args[1]]
    if src not in axes and target not in _SDPA and not (
        isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
    ) and target not in (aten.cat.default, aten.stack.default):
        raise _fail(node, "reads the branch input through a non-leading argument")

    if target in _SHAPE_PRESERVING:
        return axes[src]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return _pointwise_axis(node, axes, side_inputs)
    if target in _LINEAR or target in _LEFT_MATMUL:
        axis = axes[src]
        if any(a in axes for a in node.all_input_nodes if a is not src):
            raise _fail(node, "multiplies two token-carrying tensors")
        if axis == len(_shape(src)) - 1:
            raise _fail(node, "contracts over the token axis")
        return axis
    if target in _NORMS:
        axis, ndim = axes[src], len(_shape(src))
        if axis >= ndim - len(args[1]):
            raise _fail(node, "normalises over the token axis")
        return axis
    if target in _SOFTMAX:
        if _norm_dim(args[1], len(out_shape)) == axes[src]:
            raise _fail(node, "normalises over the token axis")
        return axes[src]
    if target in _REDUCTIONS:
        return _reduction_axis(node, axes)
    if target in SIZE_ARG_OPS or target in (aten.flatten.using_ints, aten.unflatten.int):
        new = _view_axis(_shape(src), axes[src], out_shape)
        if new is None:
            raise _fail(node, "merges or splits the token axis")
        return new
    if target is aten.unsqueeze.default:
        dim = _norm_dim(args[1], len(out_shape))
        return axes[src] + (1 if dim <= axes[src] else 0)
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        new = _view_axis(_shape(src), axes[src], out_shape)
        if new is None:
            raise _fail(node, "squeezes the token axis")
        return new
    if target is aten.transpose.int:
        ndim, axis = len(out_shape), axes[src]
        d0, d1 = _norm_dim(args[1], ndim), _norm_dim(args[2], ndim)
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if target is aten.permute.default:
        return [_norm_dim(d, len(out_shape)) for d in args[1]].index(axes[src])
    if target in _SPLITS:
        unbind = target is aten.unbind.int
        dim = _norm_dim(_arg(node, 1 if unbind else 2, "dim", 0), len(_shape(src)))
        if dim == axes[src]:
            raise _fail(node, "splits along the token axis")
        axis = axes[src] - (1 if unbind and dim < axes[src] else 0)
        return tuple(axis for _ in node.meta["val"])
    if target in (aten.cat.default, aten.stack.default):
        return _cat_axis(node, axes)
    if target is aten.slice.Tensor or target is aten.select.int:
        dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(src)))
        if dim == axes[src]:
            raise _fail(node, "slices along the token axis")
        return axes[src] - (1 if target is aten.select.int and dim < axes[src] else 0)
    if target in _SDPA:
        return _attention_axis(node, axes, queries_only)
    raise _fail(node, "is not known to be token-wise")


def _pointwise_axis(node: Node, axes: dict[Node, object],
                    side_inputs: dict[Node, tuple[int, int, int]]) -> int:
    out_shape = _shape(node)
    out_ndim = len(out_shape)
    aligned = {out_ndim - len(_shape(a)) + axes[a] for a in node.all_input_nodes if a in axes}
    if len(aligned) != 1:
        raise _fail(node, "combines tensors whose token axes disagree")
    axis = aligned.pop()
    for other in node.all_input_nodes:
        shape = _shape(other)
        if other in axes or shape is None:
            continue
        pos = axis - (out_ndim - len(shape))
        if pos < 0 or shape[pos] == 1:
            continue  # broadcast over tokens
        padded_batch = shape[0] if len(shape) == out_ndim else 1
        if shape[pos] != out_shape[axis] or axis == 0 or padded_batch not in (1, out_shape[0]) \
                or side_inputs.get(other, (axis, out_ndim, 0))[:2] != (axis, out_ndim):
            raise _fail(node, f"reads a side input {other.name} of shape {list(shape)} that "
                              "is neither per token nor broadcast over tokens")
        side_inputs.setdefault(other, (axis, out_ndim, 0))
    return axis


def _reduction_axis(node: Node, axes: dict[Node, object]) -> int:
    src = node.args[0]
    ndim, axis = len(_shape(src)), axes[src]
    dims = _arg(node, 1, "dim", None)
    dims = [dims] if isinstance(dims, int) else dims
    if not dims:
        raise _fail(node, "reduces over all dimensions")
    dims = {_norm_dim(d, ndim) for d in dims}
    if axis in dims:
        raise _fail(node, "reduces over the token axis")
    keepdim = _arg(node, 2, "keepdim", False)
    return axis if keepdim else axis - sum(d < axis for d in dims)


def _cat_axis(node: Node, axes: dict[Node, object]) -> int:
    tensors = node.args[0]
    dim = _arg(node, 1, "dim", 0)
    first = next(t for t in tensors if t in axes)
    ndim = len(_shape(first))
    if any(t not in axes for t in tensors):
        raise _fail(node, "concatenates token-carrying and other tensors")
    if len({axes[t] for t in tensors}) != 1:
        raise _fail(node, "concatenates tensors whose token axes disagree")
    axis = axes[first]
    if node.target is aten.stack.default:
        return axis + (1 if _norm_dim(dim, ndim + 1) <= axis else 0)
    if _norm_dim(dim, ndim) == axis:
        raise _fail(node, "concatenates along the token axis")
    return axis


def _attention_axis(node: Node, axes: dict[Node, object], queries_only: bool = False) -> int:
    query, key, value = node.args[:3]
    if (key in axes or value in axes) and not queries_only:
        raise _fail(node, "attends over the branch's own tokens (self-attention)")
    for kv in (key, value):
        if kv in axes and axes[kv] != len(_shape(kv)) - 2:
            raise _fail(node, "takes keys or values with tokens off the sequence axis")
    mask = _arg(node, 3, "attn_mask", None)
    if isinstance(mask, Node) and (mask in axes or (_shape(mask) or (1, 1))[-2] > 1):
        raise _fail(node, "uses an attention mask with one row per query token")
    if query not in axes or axes[query] != len(_shape(query)) - 2:
        raise _fail(node, "does not take tokens along the query sequence axis")
    return axes[query]


def main_stream(gm) -> Node | None:
    """A block graph's image-token input: its `hidden_states` input, else its first
    [batch, tokens, channels] input (after the `tocache_num_state` state inputs)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"][gm.meta.get("tocache_num_state", 0):]
    streams = [n for n in inputs if isinstance(n.meta.get("val"), torch.Tensor)
               and n.meta["val"].dim() == 3 and "tocache_slot" not in n.meta]
    return next((n for n in streams if n.name == "hidden_states"), streams[0] if streams else None)


def token_span(nodes: Sequence[Node], source: Node, target: Node,
               axis: int = 1) -> tuple[int, int, int] | None:
    """Where `source`'s tokens sit along an axis of `target` (downstream of it, `nodes`
    between them in graph order): `(axis, start, length)`, or None if they do not stay
    one contiguous run (a joint attention's keys are `cat([text, image])`, the image
    stream's tokens a span of them). Unlike `token_axes`, any op may mix tokens."""
    return token_spans(nodes, source, axis).get(target)


def token_spans(nodes: Sequence[Node], source: Node,
                axis: int = 1) -> dict[Node, tuple[int, int, int]]:
    """`token_span` of every node of `nodes` that carries `source`'s tokens as one run."""
    spans: dict[Node, tuple[int, int, int]] = {source: (axis, 0, _shape(source)[axis])}
    for node in nodes:
        carried = {spans[a] for a in node.all_input_nodes if a in spans}
        if node in spans or not carried:
            continue
        if len(carried) > 1:
            continue
        (at, start, length), out = carried.pop(), _shape(node)
        src = node.args[0] if node.args else None
        if out is None:
            continue
        if node.target is aten.cat.default:
            tensors = list(node.args[0])
            dim = _norm_dim(_arg(node, 1, "dim", 0), len(out))
            first = next(t for t in tensors if t in spans)
            if dim == at:
                start += sum(_shape(t)[at] for t in tensors[:tensors.index(first)])
            spans[node] = (at, start, length)
        elif node.target is aten.permute.default and src in spans:
            spans[node] = ([_norm_dim(d, len(out)) for d in node.args[1]].index(at), start, length)
        elif node.target is aten.transpose.int and src in spans:
            d0, d1 = (_norm_dim(d, len(out)) for d in node.args[1:3])
            spans[node] = (d1 if at == d0 else d0 if at == d1 else at, start, length)
        elif node.target in SIZE_ARG_OPS and src in spans and node.target is not aten.expand.default:
            new = _view_axis(_shape(src), at, out)
            if new is not None:
                spans[node] = (new, start, length)
        elif node.target is aten.slice.Tensor and src in spans and \
                _norm_dim(_arg(node, 1, "dim", 0), len(out)) == at:
            begin = _arg(node, 2, "start", None) or 0
            begin += _shape(src)[at] if begin < 0 else 0
            if begin <= start and start + length <= begin + out[at]:
                spans[node] = (at, start - begin, length)
        elif node.target is operator.getitem and src in spans and \
                src.target in (aten.split_with_sizes.default, aten.split.Tensor):
            sizes = [_shape(u)[at] for u in sorted(src.users, key=lambda u: u.args[1])]
            begin = sum(sizes[:node.args[1]])
            if begin <= start and start + length <= begin + out[at]:
                spans[node] = (at, start - begin, length)
        elif len(out) > at and out[at] >= start + length and all(
                _shape(a) is None or len(_shape(a)) != len(out) or _shape(a)[at] in (1, out[at])
                for a in node.all_input_nodes):
            spans[node] = (at, start, length)
    return spans
