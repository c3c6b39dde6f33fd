"""What a policy's schedule keeps between steps, and how it picks tokens.

`plan_layout` reads the whole schedule once and decides the cache slots every step
graph agrees on: a branch value is cached only if a later step reuses it, staleness
counters and attention scores exist only for branches that are ever PARTIAL, and the
last block's output is cached only if some step is AGGRESSIVE. With `NoCache` or
`interval=1` the layout is empty, so the rewritten graph is the original one.
`CacheLayout.local` cuts out one call site's part (its branches re-indexed from 0),
which is what that site's step graphs are built and shared by.

Example:
    >>> layout = plan_layout(ToCa(), schedule, branches, grid=(16, 16))  # doctest: +SKIP
    >>> sorted(layout.cached)[:3], layout.stream
    ([0, 1, 2], False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tocache_fx.passes.shards import local_attention_inputs
from tocache_fx.passes.token_axis import token_span

from .schedule import Schedule, StepKind

__all__ = ["TokenSelection", "CacheLayout", "plan_layout"]


@dataclass(frozen=True)
class TokenSelection:
    """Arguments of `ops.select_tokens` shared by every PARTIAL branch."""

    score_weight: float = 1.0
    staleness_weight: float = 0.0
    interval: int = 1
    noise: str = "none"  # "none" | "random" | "similarity"
    similarity_base: float = 0.01
    grid: tuple[int, int] | None = None
    grid_size: int = 1
    grid_bonus: float = 0.0
    share_halves: bool = False
    query_chunk: int = 256
    listed: bool = False  # the policy lists the tokens per step (TokenCache): no scoring
    listed_attention: str = "all"  # their queries attend to "all" / "kept" / "cached" keys
    listed_cache: str = "branches"  # their pruned tokens: "branches", "output", "change"


@dataclass
class CacheLayout:
    """The slots every step graph of one schedule reads and writes."""

    cached: set[int] = field(default_factory=set)  # branch values reused later
    staleness: set[int] = field(default_factory=set)  # per-token counters
    attention: set[int] = field(default_factory=set)  # attention_mlp: attention outputs
    # partial branch -> (scoring branch, start, length): its tokens in that attention's
    # sequence (a span of a joint text+image attention)
    score_source: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    scores: dict[tuple[int, int, int], str] = field(default_factory=dict)  # -> score kind
    noise: set[int] = field(default_factory=set)  # branches ranked with random noise
    prune: set[int] = field(default_factory=set)  # tokens listed by the policy (TokenCache)
    kv_cache: set[int] = field(default_factory=set)  # pruned tokens' keys/values cached
    stream: bool = False  # DuCa: the last block's output
    forecast_order: int = 0  # TaylorSeer: differences kept per cached branch
    selection: TokenSelection = field(default_factory=TokenSelection)
    cache_dtype: torch.dtype | None = None  # branch values stored in this dtype

    def local(self, indices: range) -> CacheLayout:
        """The part of the layout over branches `indices` (one block's), re-indexed from
        0; the stream is then the runtime's to keep (the last block's outputs)."""
        start = indices.start

        def cut(values) -> set[int]:
            return {i - start for i in values if i in indices}

        return CacheLayout(
            cut(self.cached), cut(self.staleness), cut(self.attention),
            {k - start: (v[0] - start,) + v[1:] for k, v in self.score_source.items()
             if k in indices},
            {(k[0] - start,) + k[1:]: v for k, v in self.scores.items() if k[0] in indices},
            cut(self.noise), cut(self.prune), cut(self.kv_cache), False, self.forecast_order,
            self.selection, self.cache_dtype)

    def key(self) -> tuple:
        """A hashable description (step graphs are shared by equal layouts)."""
        return (tuple(sorted(self.cached)), tuple(sorted(self.staleness)),
                tuple(sorted(self.attention)), tuple(sorted(self.score_source.items())),
                tuple(sorted(self.scores.items())), tuple(sorted(self.noise)),
                tuple(sorted(self.prune)), tuple(sorted(self.kv_cache)), self.stream, self.forecast_order, self.selection, self.cache_dtype)


def chain_start(branch, branches: Sequence):
    """The stream `branch` updates, where the block's chain of residual adds starts."""
    adds = {b.add: b for b in branches}
    node = branch.skip
    while node in adds:
        node = adds[node].skip
    return node


def score_span(source, kind: str, branch, branches: Sequence) -> tuple[int, int] | None:
    """(start, length) of `branch`'s tokens in the sequence its source attention scores
    (keys for influence and V-norm, queries for cross-attention entropy; under context
    parallelism, in the rank's local keys or queries before the collectives, see
    `passes.shards`); None when they are not one run of it of the same batch."""
    attention = source.attention
    which = 0 if kind == "entropy" else 1 if kind == "influence" else 2
    scored = attention.args[which]
    start = chain_start(branch, branches)
    gm_nodes = list(attention.graph.nodes)
    order = {node: i for i, node in enumerate(gm_nodes)}
    between = [n for n in gm_nodes[order[start] + 1:order[scored] + 1]]
    found = token_span(between, start, scored)
    sequence_axis = scored.meta["val"].dim() - 2
    if found is None:
        local = local_attention_inputs(attention, start)
        if local is not None:
            scored, found = local.nodes[which], local.spans[which]
            sequence_axis = found[0]
    val = scored.meta["val"]
    if found is None or found[0] != sequence_axis or found[2] != branch.num_tokens or \
            val.shape[0] != branch.skip.meta["val"].shape[0]:
        return None
    return found[1], found[2]


def plan_layout(policy, schedule: Schedule, branches: Sequence,
                grid: tuple[int, int] | None = None, cfg_halves: bool = False,
                cache_dtype: torch.dtype | None = None) -> CacheLayout:
    """The cache layout of `schedule` (see the module docstring). `cfg_halves`: the
    batch is `[uncond; cond]`, so a policy that shares selections across the halves may;
    `cache_dtype`: store branch values in this dtype."""
    selection = policy.token_selection(grid)
    selection = dataclasses.replace(selection, share_halves=selection.share_halves and cfg_halves)
    layout = CacheLayout(selection=selection,
                         forecast_order=getattr(policy, "order", 0) if schedule.forecast else 0,
                         cache_dtype=cache_dtype)
    for plan in schedule.plans():
        if plan[0] == StepKind.AGGRESSIVE:
            layout.stream = True
            continue
        if plan[0] != StepKind.PARTIAL:
            continue
        for branch, k in zip(branches, plan[1:]):
            if k < branch.num_tokens:
                layout.cached.add(branch.index)
            if 0 < k < branch.num_tokens and selection.listed:
                layout.prune.add(branch.index)
                query = getattr(branch, "query", None)
                if selection.listed_attention == "cached" and branch.kind in (
                        "self_attention", "attention_mlp") and query is not None \
                        and query.keys_values is not None:
                    layout.kv_cache.add(branch.index)
            elif 0 < k < branch.num_tokens:
                if branch.reused_attention is not None:
                    layout.attention.add(branch.index)
                source = policy.score_source(branches, branch)
                span = score_span(*source, branch, branches) if source is not None else None
                if span is not None:
                    key = (source[0].index,) + span
                    layout.score_source[branch.index] = key
                    layout.scores[key] = source[1]
                if selection.staleness_weight:
                    layout.staleness.add(branch.index)
            if selection.noise != "none" or (branch.index not in layout.score_source
                                             and branch.index not in layout.staleness):
                # a branch with no score source and no staleness still needs a rule that
                # can run: random ranking, drawn per generation from the policy's seed
                layout.noise.add(branch.index)
    return layout
