"""Analysis pass: find the residual branches of a captured transformer graph.

Requires: an ATen-level graph from `torch.export` with `meta["val"]` on every node
(`nn_module_stack` is used for labels only).
Ensures: the graph is unchanged; returns one `Branch` per residual update
`x = x + g * f(...)` or `x = x + f(...)` of the token stream, in graph order.

A residual branch is found from structure alone: an `add` of two `[batch, tokens,
channels]` tensors where one operand (the skip, `x`) is an ancestor of the other
(`y`), and the nodes between them contain a linear, matmul, convolution or attention.
Walking back from `y` through views, scalar scaling and one multiplication by a tensor
that does not depend on `x` (the gate) reaches `f`, the value that is cached.

Example:
    >>> branches = find_branches(graph_module, model_name="DiTTransformer2DModel")  # doctest: +SKIP
    >>> [(b.block, b.kind) for b in branches][:2]
    [(0, 'self_attention'), (0, 'mlp')]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from tocache_fx.errors import UnsupportedModelError
from tocache_fx.opaque import OPAQUE_OP

from .shards import Shard, graph_shard, is_collective
from .token_axis import NotTokenWise, query_path, token_axes

aten = torch.ops.aten

__all__ = ["Branch", "QueryPath", "find_branches", "ATTENTION_OPS", "attention_mask"]

# SDPA, and the fused kernels that also return the log-sum-exp (Ring attention calls them
# once per key/value chunk): attention in either case, whose masks sit at other places
_MASK_AT = {aten.scaled_dot_product_attention.default: (3, "attn_mask"),
            aten._scaled_dot_product_flash_attention_for_cpu.default: (None, "attn_mask"),
            aten._scaled_dot_product_flash_attention.default: (None, None),
            aten._scaled_dot_product_efficient_attention.default: (3, "attn_bias"),
            aten._scaled_dot_product_cudnn_attention.default: (3, "attn_bias")}
ATTENTION_OPS = set(_MASK_AT)
_HEAVY_OPS = ATTENTION_OPS | {
    aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default,
    aten.addmm.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    OPAQUE_OP,  # a submodule run eagerly (tocache_fx.opaque), e.g. a mixture of experts
}
# Single-input ops that may sit between the cached value and the residual add.
_POST_VIEWS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.to.dtype,
    aten._to_copy.default, aten.clone.default, aten.contiguous.default,
    aten.dropout.default, aten.alias.default,
}


@dataclass(eq=False)
class QueryPath:
    """A self-attention branch computed for chosen queries: the nodes to run on them
    (with their token axes), the side inputs to gather and the joint-sequence bypass,
    key and value projections running over all tokens; and the same with keys and
    values computed on the chosen tokens too (`keys_values`: None for a joint
    attention, whose other stream's keys would be dropped)."""

    token_axes: dict[Node, object]
    side_inputs: dict[Node, tuple[int, int, int]]
    bypass: dict[Node, Node]
    keys_values: tuple[dict[Node, object], dict[Node, tuple[int, int, int]],
                       dict[Node, Node]] | None = None


@dataclass(eq=False)
class Branch:
    """One residual branch `add = skip + post(gate * output)` of the token stream."""

    index: int
    block: int
    block_path: str
    kind: str  # "self_attention" | "cross_attention" | "mlp" | "attention_mlp"
    add: Node
    skip: Node  # the residual stream entering the branch; the branch reads it
    output: Node  # f: the branch value before the gate, what the cache holds
    consumer: Node  # the node on the output side that reads `output`
    gate: Node | None
    attention: Node | None  # the attention op inside the branch, if any
    nodes: list[Node] = field(repr=False)  # between skip and output, in graph order
    token_axes: dict[Node, object] | None = field(repr=False, default=None)
    partial_reason: str | None = None  # None: PARTIAL-able (token-wise)
    # attention_mlp: the attention whose output PARTIAL steps reuse (cached at FULL steps)
    reused_attention: Node | None = field(repr=False, default=None)
    # per-token side inputs (rotary tables, per-token modulation) -> (token axis, rank,
    # offset into a joint sequence's table)
    side_inputs: dict[Node, tuple[int, int, int]] = field(repr=False, default_factory=dict)
    # cat/slice pairs around a joint sequence: node -> the node whose value it takes
    bypass: dict[Node, Node] = field(repr=False, default_factory=dict)
    # self-attention recomputed for chosen queries, keys and values over all tokens
    # (TokenCache's pruned blocks): the query path, or why there is none
    query: QueryPath | None = field(repr=False, default=None)
    query_reason: str | None = None
    # (start, length) of the block's image tokens in this branch's stream (TokenCache)
    image_span: tuple[int, int] | None = None
    # context parallelism: the process group of the graph's collectives, this rank in it
    shard: Shard | None = None

    @property
    def partial_ok(self) -> bool:
        return self.partial_reason is None

    @property
    def prunable(self) -> bool:
        """Whether chosen tokens can be recomputed with all others reused: token-wise,
        or self-attention recomputed for those queries."""
        return self.partial_ok or self.query is not None

    @property
    def num_tokens(self) -> int:
        return self.skip.meta["val"].shape[1]


def _tensor_shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _between(skip: Node, y: Node, order: dict[Node, int]) -> list[Node] | None:
    """Nodes on a path from `skip` to `y` (inclusive of y), or None if y ignores skip."""
    ancestors = _ancestors(y) | {y}
    if skip not in ancestors:
        return None
    seen, stack = set(), [skip]
    limit = order[y]
    while stack:
        for user in stack.pop().users:
            if user not in seen and order[user] <= limit and user in ancestors:
                seen.add(user)
                stack.append(user)
    return sorted(seen, key=order.__getitem__)


_CASTS = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
          aten.alias.default}


def _strip_casts(node: object) -> object:
    """The residual stream behind dtype casts and copies (`x.float() + f(x.float())`
    reads the stream through two separate casts)."""
    while isinstance(node, Node) and node.target in _CASTS and isinstance(node.args[0], Node) \
            and _tensor_shape(node.args[0]) == _tensor_shape(node):
        node = node.args[0]
    return node


def _split_output(y: Node, inside: set[Node]) -> tuple[Node, Node | None, Node | None]:
    """Walk back from `y` to the cached value f; returns (f, gate, consumer of f)."""
    node, gate, consumer = y, None, None
    while True:
        if node.target in _POST_VIEWS and node.args[0] in inside:
            node, consumer = node.args[0], node
            continue
        if node.target in (aten.mul.Tensor, aten.div.Tensor):
            a, b = node.args[:2]
            if a in inside and b not in inside:
                inner, other = a, b
            elif b in inside and a not in inside and node.target is aten.mul.Tensor:
                inner, other = b, a
            else:
                break
            if isinstance(other, Node):
                if gate is not None or node.target is aten.div.Tensor:
                    break
                gate = other
            node, consumer = inner, node
            continue
        break
    return node, gate, consumer


def attention_mask(attention: Node) -> Node | None:
    """The mask (or bias) an attention op takes, None if it takes none."""
    position, keyword = _MASK_AT[attention.target]
    mask = attention.args[position] if position is not None and len(attention.args) > position \
        else attention.kwargs.get(keyword) if keyword else None
    return mask if isinstance(mask, Node) else None


def _attention_kind(nodes: list[Node], inside: set[Node]) -> tuple[str, Node | None]:
    for node in nodes:
        if node.target in ATTENTION_OPS:
            query, key, value = node.args[:3]
            is_self = key in inside or value in inside
            return ("self_attention" if is_self else "cross_attention"), node
    for node in nodes:
        if node.target in (aten.softmax.int, aten._softmax.default):
            return "self_attention", None
    return "mlp", None


def _block_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [value[0] for value in stack.values()]
    return paths[-1] if paths else ""


def find_branches(gm: GraphModule, model_name: str = "model") -> list[Branch]:
    """Find every residual branch of `gm`; raise `UnsupportedModelError` if none."""
    nodes = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    candidates, adds_3d = [], 0
    for add in nodes:
        if add.target is not aten.add.Tensor or len(add.args) < 2 or add.kwargs.get("alpha", 1) != 1:
            continue
        a, b = add.args[:2]
        shape_a, shape_b = _tensor_shape(a), _tensor_shape(b)
        if shape_a is None or shape_a != shape_b or len(shape_a) != 3 or shape_a[1] < 2:
            continue
        adds_3d += 1
        for skip, y in ((b, a), (a, b)):
            skip = _strip_casts(skip)
            between = _between(skip, y, order)
            if between and any(n.target in _HEAVY_OPS for n in between):
                candidates.append((add, skip, y, between))
                break
    inner_nodes = {n for _, _, _, between in candidates for n in between}
    candidates = [c for c in candidates if c[0] not in inner_nodes]
    if not candidates:
        raise UnsupportedModelError(
            f"{model_name}: found no residual branch (x + f(x) or x + g*f(x) over "
            f"[batch, tokens, channels] tensors). The graph has {len(nodes)} nodes and "
            f"{adds_3d} adds of two equal 3-d tensors, none of which adds a linear, "
            f"matmul, convolution or attention computed from the other operand."
        )

    block_ids: dict[str, int] = {}
    branches = []
    shard = graph_shard(gm.graph)
    for add, skip, y, between in candidates:
        inside = set(between) | {skip}
        output, gate, consumer = _split_output(y, inside)
        body = [n for n in between if order[n] <= order[output]]
        kind, attention = _attention_kind(body, inside)
        path = _block_path(add)
        block = block_ids.setdefault(path, len(block_ids)) if path else len(branches)
        branch = Branch(
            index=len(branches), block=block, block_path=path, kind=kind, add=add, skip=skip,
            output=output, consumer=consumer or add, gate=gate, attention=attention, nodes=body,
            shard=shard,
        )
        _mark_partial(branch)
        branches.append(branch)
    return branches


def _live_nodes(branch: Branch, barrier: Node) -> list[Node]:
    """The branch nodes its output depends on without looking behind `barrier`."""
    inside, live, stack = set(branch.nodes), set(), [branch.output]
    while stack:
        node = stack.pop()
        if node in live or node not in inside:
            continue
        live.add(node)
        if node.target is aten.type_as.default:  # reads only the dtype of its 2nd input
            stack.append(node.args[0])
        elif node is not barrier:
            stack.extend(node.all_input_nodes)
    return [n for n in branch.nodes if n in live]


def _mark_attention_mlp(branch: Branch) -> None:
    """A branch that computes an MLP besides its self-attention: in parallel from one
    input (FLUX single-stream blocks, `f = proj(cat(attention(x), mlp(x)))`) or after it
    (`f = mlp(norm(x + attention(x)))`, AuraFlow). Such a branch is PARTIAL-able with
    the attention output reused from the last FULL step and the rest run on chosen
    tokens. A plain attention branch (only the output projection after the attention)
    stays reused whole."""
    branch.partial_reason = "self-attention (never partial, as in ToCa)"
    if branch.attention is None:
        return
    found = _reused_attention_value(branch)
    if found is None:
        return
    reused, axis, live = found
    side: dict[Node, tuple[int, int, int]] = {}
    try:
        axes = token_axes(live, branch.skip, axis=1, cached={reused: axis}, side_inputs=side)
    except NotTokenWise as error:
        branch.partial_reason = f"attention with a parallel MLP, but {error}"
        return
    if axes.get(branch.output) != 1:
        return
    branch.kind, branch.partial_reason = "attention_mlp", None
    branch.token_axes, branch.reused_attention, branch.side_inputs = axes, reused, side


def _reused_attention_value(branch: Branch) -> tuple[Node, int, list[Node]] | None:
    """The value an attention+MLP branch reuses at PARTIAL steps, its token axis, and the
    live nodes behind it: the attention op's output ([batch, heads, tokens, dim] with the
    branch's tokens), or, where the attention sees other tokens than the branch (context
    parallelism: Ulysses' all-to-all trades the sequence shard for a head shard, Ring
    merges per-chunk outputs), the first later value with the branch's [batch, tokens]
    layout that cuts every attention op and collective off the output. None if the
    branch has no second heavy op (a plain attention branch)."""
    attention, skip = branch.attention, _tensor_shape(branch.skip)
    cut_off = {n for n in branch.nodes if n.target in ATTENTION_OPS or is_collective(n)}
    out = _tensor_shape(attention)
    if out is not None and (out[0], out[-2]) == skip[:2] and len(cut_off) == 1:
        candidates = [(attention, len(out) - 2)]
    else:
        last = max(branch.nodes.index(n) for n in cut_off)
        candidates = [(n, 1) for n in branch.nodes[last + 1:]
                      if len(_tensor_shape(n) or ()) >= 3 and _tensor_shape(n)[:2] == skip[:2]]
    for reused, axis in candidates:
        live = _live_nodes(branch, reused)
        if any(n in cut_off for n in live if n is not reused):
            continue
        heavy = [n for n in live if n.target in _HEAVY_OPS and n is not reused]
        return (reused, axis, live) if len(heavy) >= 2 else None
    return None


def _mark_query_path(branch: Branch) -> None:
    """Record the query path of a self-attention branch (see `QueryPath`)."""
    side: dict[Node, tuple[int, int, int]] = {}
    bypass: dict[Node, Node] = {}
    try:
        axes = token_axes(branch.nodes, branch.skip, axis=1, side_inputs=side, bypass=bypass,
                          queries_only=True)
    except NotTokenWise as error:
        branch.query_reason = str(error)
        return
    if axes.get(branch.output) != 1 or len(_tensor_shape(branch.output) or ()) != 3:
        branch.query_reason = "the cached value is not a [batch, tokens, channels] tensor"
        return
    needed = query_path(branch.nodes, axes, branch.output)
    joint = any(node not in needed for node in bypass)  # a cat on the key/value side
    branch.query = QueryPath({n: a for n, a in axes.items() if n in needed},
                             {n: v for n, v in side.items() if any(u in needed for u in n.users)},
                             {n: v for n, v in bypass.items() if n in needed},
                             None if joint else (axes, side, bypass))


def _mark_partial(branch: Branch) -> None:
    """Record whether the branch can run on a gathered subset of its tokens."""
    if branch.kind == "self_attention":
        _mark_attention_mlp(branch)
        _mark_query_path(branch)
        return
    side: dict[Node, tuple[int, int, int]] = {}
    bypass: dict[Node, Node] = {}
    spans: dict[Node, tuple[int, int]] = {}
    try:
        axes = token_axes(branch.nodes, branch.skip, axis=1, side_inputs=side, bypass=bypass,
                          spans=spans)
    except NotTokenWise as error:
        branch.partial_reason = str(error)
        return
    if axes.get(branch.output) != 1 or len(_tensor_shape(branch.output) or ()) != 3 \
            or branch.output in spans:
        branch.partial_reason = "the cached value is not a [batch, tokens, channels] tensor"
        return
    branch.token_axes, branch.side_inputs, branch.bypass = axes, side, bypass
