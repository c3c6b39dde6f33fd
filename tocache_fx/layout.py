"""What a policy's schedule keeps between steps, and how it picks tokens.

`plan_layout` reads the whole schedule once and decides the cache slots every step
graph agrees on: a branch value is cached only if a later step reuses it, staleness
counters and attention scores exist only for branches that are ever PARTIAL, and the
last block's output is cached only if some step is AGGRESSIVE. With `NoCache` or
`interval=1` the layout is empty, so the rewritten graph is the original one.

Example:
    >>> layout = plan_layout(ToCa(), schedule, branches, grid=(16, 16))  # doctest: +SKIP
    >>> sorted(layout.cached)[:3], layout.stream
    ([0, 1, 2], False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .policies import DuCa, Policy, ToCa
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


@dataclass
class CacheLayout:
    """The slots every step graph of one schedule reads and writes."""

    cached: set[int] = field(default_factory=set)  # branch values reused later
    staleness: set[int] = field(default_factory=set)  # per-token counters
    attention: set[int] = field(default_factory=set)  # attention_mlp: attention outputs
    score_source: dict[int, int] = field(default_factory=dict)  # partial -> scoring branch
    scores: dict[int, str] = field(default_factory=dict)  # scoring branch -> score kind
    stream: bool = False  # DuCa: the last block's output
    selection: TokenSelection = field(default_factory=TokenSelection)


def _block_branch(branches: Sequence, block: int, *kinds: str):
    return next((b for b in branches if b.block == block and b.kind in kinds
                 and b.attention is not None), None)


def _score_branch(policy: Policy, branches: Sequence, branch) -> tuple[object, str] | None:
    """The attention branch whose FULL-step map scores `branch`'s tokens, and how; None
    also when that attention's tokens are not the branch's (joint text+image attention
    scores more tokens than one stream has)."""
    found = _score_source(policy, branches, branch)
    if found is None:
        return None
    source, kind = found
    query, key = source.attention.args[:2]
    scored = (query if kind == "entropy" else key).meta["val"].shape
    wanted = branch.skip.meta["val"].shape
    return found if (scored[0], scored[-2]) == (wanted[0], wanted[1]) else None


def _score_source(policy: Policy, branches: Sequence, branch) -> tuple[object, str] | None:
    if isinstance(policy, DuCa):
        if policy.selection != "vnorm":
            return None
        source = _block_branch(branches, branch.block, "self_attention", "attention_mlp")
        return (source, "vnorm") if source else None
    if not isinstance(policy, ToCa) or policy.attention_score == "none":
        return None
    cross = _block_branch(branches, branch.block, "cross_attention")
    self_ = _block_branch(branches, branch.block, "self_attention", "attention_mlp")
    wanted = policy.attention_score
    if wanted == "cross" or (wanted == "auto" and cross is not None):
        return (cross, "entropy") if cross else None
    return (self_, "influence") if self_ else None


def _selection(policy: Policy, grid: tuple[int, int] | None) -> TokenSelection:
    if isinstance(policy, ToCa):
        use_grid = grid is not None and policy.grid_bonus and all(
            size % policy.grid_size == 0 for size in grid)
        return TokenSelection(
            score_weight=policy.attention_weight, staleness_weight=policy.staleness_weight,
            interval=policy.interval, grid=grid if use_grid else None,
            grid_size=policy.grid_size, grid_bonus=policy.grid_bonus,
            share_halves=policy.share_cfg_selection, query_chunk=policy.query_chunk)
    if isinstance(policy, DuCa):
        noise = {"random": "random", "similarity": "similarity"}.get(policy.selection, "none")
        return TokenSelection(noise=noise, similarity_base=policy.similarity_base,
                              share_halves=policy.share_cfg_selection)
    return TokenSelection()


def plan_layout(policy: Policy, schedule: Schedule, branches: Sequence,
                grid: tuple[int, int] | None = None) -> CacheLayout:
    """The cache layout of `schedule` (see the module docstring)."""
    layout = CacheLayout(selection=_selection(policy, grid))
    any_partial = False
    for plan in schedule.plans():
        if plan[0] == StepKind.AGGRESSIVE:
            layout.stream = True
            continue
        if plan[0] != StepKind.PARTIAL:
            continue
        for branch, k in zip(branches, plan[1:]):
            if k < branch.num_tokens:
                layout.cached.add(branch.index)
            if 0 < k < branch.num_tokens:
                any_partial = True
                if branch.reused_attention is not None:
                    layout.attention.add(branch.index)
                source = _score_branch(policy, branches, branch)
                if source is not None:
                    layout.score_source[branch.index] = source[0].index
                    layout.scores[source[0].index] = source[1]
                if layout.selection.staleness_weight:
                    layout.staleness.add(branch.index)
    selection = layout.selection
    if any_partial and selection.noise == "none" and not layout.score_source \
            and not selection.staleness_weight:
        layout.selection = TokenSelection(**{**selection.__dict__, "noise": "random"})
    return layout
