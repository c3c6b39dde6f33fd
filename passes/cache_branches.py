"""Rewrite pass: turn each residual branch into its cache-aware form for one step plan.

Requires: a copy of the captured graph (node names as in the base graph), the
branches found by `find_branches` on the base graph, a plan row
`(kind, k_0, ..., k_{B-1})` and the schedule's `CacheLayout`.
Ensures: for every branch with `k_b`
  * `k_b = N` (FULL): the branch runs as before; its value `f` is written to
    `cache.b` if a later step reuses it (staleness reset to 0);
  * `k_b = 0` (REUSE): the gate and the residual add read `cache.b` instead of `f`,
    so the branch becomes dead code;
  * `0 < k_b < N` or `DYNAMIC` (PARTIAL): `select_tokens` picks k tokens, the branch
    is cloned to run on the gathered `[B, k, C]` input (token sizes in reshapes edited
    to k), and `scatter_tokens` writes the result into `cache.b`, which the gate then
    reads. With `DYNAMIC`, k is the length of the graph input `ksize.b`, a dynamic size,
    and `kvalid.b` how many of those tokens are really chosen: one compiled graph
    serves every k (k = 1 runs as 2 with the top token twice). An `attention_mlp` branch (single-stream
    block) reads its attention output from slot `attn.b`, stored at the last FULL
    step, gathered at the same tokens.
With `layout.forecast_order = m` (`TaylorSeer`), a FULL step also writes the finite
differences `diff1.b .. diff<m>.b` of its value against the previous FULL step's, scaled
by the step's coefficients (graph input `forecast`, zero where no difference is known
yet), and a REUSE step feeds the gate `cache.b + sum_i forecast[i] * diff<i>.b`: the
distances are data, so every FULL step shares one graph and every forecast another.
The current step's gate is always re-applied to the cached value. Inserted nodes
carry `meta["tocache"]` naming their role and branch.

Example:
    >>> state = GraphState(gm.graph)                                        # doctest: +SKIP
    >>> cache_branches(gm, branches, (1, 0, DYNAMIC), layout, state)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Node

from tocache_fx import ops
from tocache_fx.layout import CacheLayout

from .attention_scores import score_slot
from .find_branches import Branch
from .state import GraphState, slot_example
from .token_axis import SIZE_ARG_OPS

__all__ = ["cache_branches", "DYNAMIC"]

DYNAMIC = -1
"""A plan entry: PARTIAL with the token count given at run time by input `ksize.b`."""


def _tag(node: Node, role: str, branch: Branch) -> Node:
    node.meta["tocache"] = f"{role}:{branch.index}"
    return node


def _batch_tokens(branch: Branch) -> torch.Tensor:
    batch, tokens = branch.skip.meta["val"].shape[:2]
    return slot_example(branch.skip, dtype=torch.float32, shape=(batch, tokens))


def cache_branches(gm: GraphModule, branches: Sequence[Branch], plan: tuple[int, ...],
                   layout: CacheLayout, state: GraphState) -> bool:
    """Apply the plan's FULL / REUSE / PARTIAL form to every branch (see module doc)."""
    by_name = {node.name: node for node in gm.graph.nodes}
    modified = False
    for branch, k in zip(branches, plan[1:]):
        if branch.index not in layout.cached:
            continue
        if k >= branch.num_tokens:
            _store_full(branch, by_name, layout, state)
        elif k == 0:
            _reuse(branch, by_name, layout, state)
        elif branch.index in layout.prune:
            _prune(gm, branch, by_name, layout, state)
        else:
            _partial(gm, branch, k, by_name, layout, state)
        modified = True
    return modified


def _coefficient(state: GraphState, order: int, i: int, before: Node) -> Node:
    """Element i of the step's forecast coefficients (graph input `forecast`)."""
    vector = state.read("forecast", slot_example_shape((order,)))
    with before.graph.inserting_before(before):
        return before.graph.call_function(torch.ops.aten.select.int, (vector, 0, i))


def slot_example_shape(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device="meta")


def _store_full(branch: Branch, by_name: dict[str, Node], layout: CacheLayout,
                state: GraphState) -> None:
    output = by_name[branch.output.name]
    order = layout.forecast_order
    if order:
        slots = [f"cache.{branch.index}"] + [f"diff{i}.{branch.index}" for i in range(1, order)]
        olds = [state.read(slot, slot_example(branch.output), optional=True) for slot in slots]
        new = output
        for i, old in enumerate(olds):
            anchor = new.next
            coefficient = _coefficient(state, order, i, anchor)
            with output.graph.inserting_before(anchor):
                new = output.graph.call_function(ops.finite_difference, (new, old, coefficient))
            new.meta["val"] = output.meta["val"]
            state.write(f"diff{i + 1}.{branch.index}", _tag(new, "forecast", branch))
    state.write(f"cache.{branch.index}", output)
    if branch.index in layout.kv_cache:  # keys and values of every token, for P-steps
        attentions = [n for n in branch.nodes
                      if n.target is torch.ops.aten.scaled_dot_product_attention.default]
        for i, attention in enumerate(attentions):
            state.write(f"kv.{branch.index}.{i}k", by_name[attention.args[1].name])
            state.write(f"kv.{branch.index}.{i}v", by_name[attention.args[2].name])
    if branch.index in layout.attention:
        state.write(f"attn.{branch.index}", by_name[branch.reused_attention.name])
    if branch.index in layout.staleness:
        skip = by_name[branch.skip.name]
        with skip.graph.inserting_after(skip):
            fresh = skip.graph.call_function(ops.fresh_staleness, (skip,))
        state.write(f"stale.{branch.index}", _tag(fresh, "staleness", branch))


def _reuse(branch: Branch, by_name: dict[str, Node], layout: CacheLayout,
           state: GraphState) -> None:
    cache = state.read(f"cache.{branch.index}", slot_example(branch.output))
    consumer = by_name[branch.consumer.name]
    order = layout.forecast_order
    if order:
        differences = [state.read(f"diff{i}.{branch.index}", slot_example(branch.output))
                       for i in range(1, order + 1)]
        coefficients = state.read("forecast", slot_example_shape((order,)))
        with cache.graph.inserting_before(consumer):
            cache = _tag(cache.graph.call_function(ops.taylor_forecast,
                                                   (cache, differences, coefficients)),
                         "forecast", branch)
    consumer.replace_input_with(by_name[branch.output.name], cache)
    if branch.index in layout.staleness:
        stale = state.read(f"stale.{branch.index}", _batch_tokens(branch))
        graph = cache.graph
        with graph.inserting_before(by_name[branch.consumer.name]):
            older = graph.call_function(ops.advance_staleness, (stale, None))
        state.write(f"stale.{branch.index}", _tag(older, "staleness", branch))


def _select(branch: Branch, k: int | Node, valid: Node | None, skip: Node,
            layout: CacheLayout, state: GraphState) -> Node:
    selection = layout.selection
    grid = selection.grid  # the image token grid, for branches over exactly those tokens
    if grid is not None and grid[0] * grid[1] != branch.num_tokens:
        grid = None
    kwargs: dict[str, object] = {
        "score_weight": selection.score_weight, "staleness_weight": selection.staleness_weight,
        "interval": selection.interval, "grid": grid, "grid_size": selection.grid_size,
        "grid_bonus": selection.grid_bonus, "share_halves": selection.share_halves,
        "valid": valid,
    }
    batch_tokens = _batch_tokens(branch)
    if branch.index in layout.score_source:
        kwargs["score"] = state.read(score_slot(layout.score_source[branch.index]), batch_tokens)
    if branch.index in layout.staleness:
        kwargs["staleness"] = state.read(f"stale.{branch.index}", batch_tokens)
    if branch.index in layout.noise:
        kwargs["noise"] = state.read(f"noise.{branch.index}", batch_tokens)  # fresh per call
        if selection.noise == "similarity":
            kwargs["similarity_to"] = skip
            kwargs["similarity_base"] = selection.similarity_base
    return skip.graph.call_function(ops.select_tokens, (k,), kwargs)


def _token_count(branch: Branch, k: int, state: GraphState) -> tuple[int | Node, Node | None]:
    """(count, valid): k itself, or (DYNAMIC) the length of graph input `ksize.b`, a
    dynamic size >= 2, and the 0-d input `kvalid.b` <= it, the tokens really chosen
    (compiled graphs specialise sizes 0 and 1, so k = 1 runs as 2 with one repeat)."""
    if k != DYNAMIC:
        return k, None
    example = max(2, min(branch.num_tokens - 1, branch.num_tokens // 2))
    carrier = state.read(f"ksize.{branch.index}",
                         torch.empty(example, dtype=torch.float32, device="meta"))
    carrier.meta["tocache_max"] = branch.num_tokens
    valid = state.read(f"kvalid.{branch.index}",
                       torch.empty((), dtype=torch.int64, device="meta"))
    graph = carrier.graph
    with graph.inserting_after(carrier):
        size = graph.call_function(torch.ops.aten.sym_size.int, (carrier, 0))
    size.meta["val"] = example
    return _tag(size, "ksize", branch), valid


def _partial(gm: GraphModule, branch: Branch, k: int, by_name: dict[str, Node],
             layout: CacheLayout, state: GraphState) -> None:
    """Recompute the k tokens `select_tokens` picks; the rest of the branch is cached."""
    skip, consumer = by_name[branch.skip.name], by_name[branch.consumer.name]
    count, valid = _token_count(branch, k, state)
    with gm.graph.inserting_before(consumer):
        idx = _tag(_select(branch, count, valid, skip, layout, state), "select", branch)
    _recompute(gm, branch, idx, count, branch.token_axes, branch.side_inputs, branch.bypass,
               branch.reused_attention, by_name, state)
    if branch.index in layout.staleness:
        stale = state.read(f"stale.{branch.index}", _batch_tokens(branch))
        with gm.graph.inserting_before(consumer):
            older = _tag(gm.graph.call_function(ops.advance_staleness, (stale, idx)),
                         "staleness", branch)
        state.write(f"stale.{branch.index}", older)


_ATTENTION_KINDS = ("self_attention", "attention_mlp")


def _prune(gm: GraphModule, branch: Branch, by_name: dict[str, Node], layout: CacheLayout,
           state: GraphState) -> None:
    """Recompute the tokens listed in graph input `prune.b` (the same for every sample,
    a dynamic size): TokenCache's pruned block. A self-attention branch runs for those
    queries over the keys and values of all tokens of the current stream
    (`listed_attention` "all"), of the listed ones only ("kept"), or of the listed ones
    with the others' last computed ones ("cached", slots `kv.b.<i>`: written at FULL
    steps, updated with the listed tokens' at every P-step)."""
    example = max(2, min(branch.num_tokens - 1, branch.num_tokens // 2))
    listed = state.read(f"prune.{branch.index}",
                        torch.empty(example, dtype=torch.int64, device="meta"))
    listed.meta["tocache_max"] = branch.num_tokens
    consumer = by_name[branch.consumer.name]
    graph = gm.graph
    with graph.inserting_before(consumer):
        count = _tag(graph.call_function(torch.ops.aten.sym_size.int, (listed, 0)), "ksize", branch)
        idx = _tag(graph.call_function(ops.batch_index, (listed, by_name[branch.skip.name])),
                   "select", branch)
    path = branch.query if branch.kind in _ATTENTION_KINDS else None
    mode = layout.selection.listed_attention
    if path is None:
        axes, side, bypass = branch.token_axes, branch.side_inputs, branch.bypass
    elif mode == "all" or path.keys_values is None:  # a joint attention keeps all its keys
        axes, side, bypass = path.token_axes, path.side_inputs, path.bypass
    else:
        axes, side, bypass = path.keys_values
    reused = branch.reused_attention if path is None else None
    _recompute(gm, branch, idx, count, axes, side, bypass, reused, by_name, state)
    if branch.index in layout.kv_cache:
        _cached_keys_values(gm, branch, idx, state)


def _cached_keys_values(gm: GraphModule, branch: Branch, idx: Node, state: GraphState) -> None:
    """The recomputed attention reads the listed tokens' fresh keys and values and the
    others' last computed ones."""
    clones = [n for n in gm.graph.nodes if n.meta.get("tocache") == f"compute:{branch.index}"
              and n.target is torch.ops.aten.scaled_dot_product_attention.default]
    originals = [n for n in branch.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    for i, (clone, original) in enumerate(zip(clones, originals)):
        args = list(clone.args)
        for position, name in ((1, "k"), (2, "v")):
            cached = state.read(f"kv.{branch.index}.{i}{name}", slot_example(original.args[position]))
            with gm.graph.inserting_before(clone):
                merged = gm.graph.call_function(ops.scatter_tokens, (cached, idx, args[position], 2))
            merged.meta["val"] = original.args[position].meta["val"]
            args[position] = _tag(merged, "scatter", branch)
            state.write(f"kv.{branch.index}.{i}{name}", merged)
        clone.args = tuple(args)


def _recompute(gm: GraphModule, branch: Branch, idx: Node, count: int | Node,
               axes: dict[Node, object], side_inputs: dict[Node, tuple[int, int, int]],
               bypass: dict[Node, Node], reused_attention: Node | None,
               by_name: dict[str, Node], state: GraphState) -> Node:
    """Clone the branch onto tokens `idx` and scatter the result into `cache.b`, which the
    gate then reads; returns the updated cache."""
    graph = gm.graph
    skip, output = by_name[branch.skip.name], by_name[branch.output.name]
    consumer = by_name[branch.consumer.name]
    cache = state.read(f"cache.{branch.index}", slot_example(branch.output))
    with graph.inserting_before(consumer):
        env = {skip: _tag(graph.call_function(ops.gather_tokens, (skip, idx)), "gather", branch)}
        for side, (axis, rank, offset) in side_inputs.items():
            node = by_name[side.name]
            gathered = graph.call_function(ops.gather_side_input, (node, idx, axis, rank, offset))
            env[node] = _tag(gathered, "gather", branch)
        if reused_attention is not None:
            cached = state.read(f"attn.{branch.index}", slot_example(reused_attention))
            gathered = graph.call_function(ops.gather_tokens,
                                           (cached, idx, axes[reused_attention]))
            env[by_name[reused_attention.name]] = _tag(gathered, "gather", branch)
        for old in branch.nodes:
            node = by_name[old.name]
            if node in env or old not in axes:
                continue
            if old in bypass:  # a joint sequence's cat or closing slice
                env[node] = env[by_name[bypass[old].name]]
                continue
            clone = graph.node_copy(node, lambda n: env.get(n, n))
            if node.target in SIZE_ARG_OPS:
                sizes = list(clone.args[1])
                axis = axes[old]
                if sizes[axis] != -1:
                    sizes[axis] = count
                clone.args = (clone.args[0], sizes) + tuple(clone.args[2:])
            env[node] = _tag(clone, "compute", branch)
        updated = graph.call_function(ops.scatter_tokens, (cache, idx, env[output]))
        updated.meta["val"] = output.meta["val"]
        _tag(updated, "scatter", branch)
    consumer.replace_input_with(output, updated)
    state.write(f"cache.{branch.index}", updated)
    return updated
