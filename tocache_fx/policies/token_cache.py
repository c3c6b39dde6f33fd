"""TokenCache (Lou et al., docs/methods.md §4): a learned Cache Predictor decides which
image tokens a block prunes, adaptive block selection decides which blocks prune, and
Two-Phase Round-Robin decides when.

* I-steps (FULL) refresh every cache; P-steps follow them round-robin: after an I-step
  come `k1` P-steps before the `boundary` (a fraction of the generation), `k2` after it.
* In a P-step, a pruning block recomputes its kept image tokens only (every residual
  branch of the block, self-attention for those queries over the keys and values of
  all tokens); its pruned tokens take their cached branch values under the current
  gates. Other streams' tokens (a joint attention's text) are always computed.
* Kept tokens: per cell of `grid` x `grid` image tokens, the highest predicted weights
  (the paper's grid-level pruning); the tables are constants per (block, step).
* Blocks: all, or the `blocks` (a count or a fraction) whose tokens the predictor
  finds least important on average; `block_ratios` gives each block its own ratio.

Example:
    >>> policy = TokenCache.from_pretrained(MODEL_DIR / "token_cache", prune_ratio=0.5)  # doctest: +SKIP
    >>> pipe = tocache_fx.transform(pipe, policy)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tocache_fx.layout import TokenSelection
from tocache_fx.predictor import CachePredictor

from .base import FULL, PARTIAL, Plan, Policy, check_choice, check_float, check_int, full_row

__all__ = ["TokenCache"]


@dataclass(frozen=True)
class TokenCache(Policy):
    """TokenCache with a trained `CachePredictor` (or the directory it was saved in).

    Important arguments:
        predictor: from `tocache_fx.train_token_cache`, or its `save_pretrained` folder.
        prune_ratio: fraction of a pruning block's image tokens pruned at P-steps.
        k1, k2, boundary: TPRR, P-steps per I-step before / after `boundary` (a
            fraction of the steps; k1 > k2 spends the I-steps late, where the paper
            finds the output most sensitive).

    Arguments to tinker with: `blocks` (a count or a fraction of the blocks that prune,
    least important first; None: every block), `block_ratios` (a pruning ratio per
    block instead), `grid` (cell size of grid-level pruning; 1: rank all tokens),
    `attention` (the kept queries attend to the keys and values of "all" tokens,
    recomputed from the current stream, of the "kept" ones only, or of the kept ones
    with the pruned ones' last computed ("cached"); a joint text+image attention
    always uses "all"), `cache` (what a pruned token takes: each branch's cached value
    under the current gate, "branches"; the block's cached "output"; or the current
    input plus the block's cached "change"). docs/design.md has the measurements
    behind the defaults.
    """

    predictor: Any = None
    prune_ratio: float = 0.5
    k1: int = 3
    k2: int = 1
    boundary: float = 0.5
    blocks: int | float | None = None
    block_ratios: tuple[float, ...] | None = None
    grid: int = 2
    attention: str = "all"
    cache: str = "branches"
    num_steps: int | None = None
    _loaded: CachePredictor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.predictor, (str, Path)):
            object.__setattr__(self, "_loaded", CachePredictor.from_pretrained(self.predictor))
            object.__setattr__(self, "predictor", str(self.predictor))
        elif isinstance(self.predictor, CachePredictor):
            object.__setattr__(self, "_loaded", self.predictor)
        else:
            raise ValueError("predictor must be a CachePredictor or the directory one was saved "
                             f"in (tocache_fx.train_token_cache), got {self.predictor!r}")
        check_float("prune_ratio", self.prune_ratio, 0.0, 1.0)
        check_int("k1", self.k1, 0)
        check_int("k2", self.k2, 0)
        check_float("boundary", self.boundary, 0.0, 1.0)
        check_int("grid", self.grid, 1)
        check_choice("attention", self.attention, ("all", "kept", "cached"))
        check_choice("cache", self.cache, ("branches", "output", "change"))
        if self.block_ratios is not None:
            object.__setattr__(self, "block_ratios", tuple(self.block_ratios))
            for ratio in self.block_ratios:
                check_float("block_ratios", ratio, 0.0, 1.0)
        if isinstance(self.blocks, float):
            check_float("blocks", self.blocks, 0.0, 1.0)
        elif self.blocks is not None:
            check_int("blocks", self.blocks, 0)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> TokenCache:
        """The policy of a shipped or saved predictor."""
        return cls(predictor=str(directory), **overrides)

    def to_dict(self) -> dict[str, Any]:
        if not isinstance(self.predictor, str):
            raise ValueError("save the predictor (predictor.save_pretrained(dir)) and pass the "
                             "directory: a policy dict names its predictor by path")
        data = super().to_dict()
        data.pop("_loaded")
        return data

    @property
    def caches(self) -> bool:
        return self.k1 > 0 or self.k2 > 0

    # -- the schedule ----------------------------------------------------------------
    def step_kinds(self, num_steps: int) -> list[int]:
        """TPRR: an I-step (FULL), then k1 (before the boundary) or k2 P-steps, again."""
        kinds, since = [], None
        for step in range(num_steps):
            run = self.k1 if step < self.boundary * num_steps else self.k2
            if since is None or since >= run:
                kinds.append(FULL)
                since = 0
            else:
                kinds.append(PARTIAL)
                since += 1
        return kinds

    def ratios(self, num_blocks: int) -> list[float]:
        """The pruning ratio of each block (adaptive selection: least important first)."""
        if self.block_ratios is not None:
            if len(self.block_ratios) != num_blocks:
                raise ValueError(f"block_ratios has {len(self.block_ratios)} entries for "
                                 f"{num_blocks} blocks")
            return list(self.block_ratios)
        if self.blocks is None:
            return [self.prune_ratio] * num_blocks
        count = self.blocks if isinstance(self.blocks, int) else round(self.blocks * num_blocks)
        order = self._loaded.importance(10).mean(dim=(1, 2)).argsort().tolist()
        chosen = set(order[:count])
        return [self.prune_ratio if block in chosen else 0.0 for block in range(num_blocks)]

    def kept(self, num_steps: int, shard: tuple[int, int] | None = None,
             ) -> list[list[torch.Tensor | None]]:
        """Per block and step, the image tokens a P-step recomputes (sorted; None: the
        block does not prune). `shard` (rank, ranks): context parallelism, where a rank
        holds the contiguous chunk `rank` of the image tokens; indices are then the
        chunk's, and every rank keeps as many tokens (see docs/design.md)."""
        weights = self._loaded.importance(num_steps)
        num_blocks, _, num_tokens = weights.shape
        side = math.isqrt(num_tokens)
        grid = self.grid if side * side == num_tokens and side % self.grid == 0 else 1
        rank, ranks = shard or (0, 1)
        local = num_tokens // ranks
        if grid > 1 and local % (side * grid):
            grid = 1  # grid cells would straddle two ranks' chunks
        table = []
        for block, ratio in enumerate(self.ratios(num_blocks)):
            # tokens kept in every cell (grid), or at least 2 (no grid): a P-step graph's
            # token count is a dynamic size >= 2
            pruned = min(round(ratio * grid * grid), grid * grid - 1)
            if grid == 1:
                pruned = min(round(ratio * local), local - 2)
            if pruned <= 0:
                table.append([None] * num_steps)
                continue
            row = []
            for step in range(num_steps):
                if grid > 1:
                    keep = _keep(weights[block, step], side, grid, pruned)
                    keep = keep[(keep >= rank * local) & (keep < (rank + 1) * local)]
                else:
                    chunk = weights[block, step, rank * local:(rank + 1) * local]
                    keep = chunk.topk(local - pruned).indices.sort().values + rank * local
                row.append(keep - rank * local)
            table.append(row)
        return table

    def _block_of(self, branches: Sequence) -> dict[int, int]:
        """Block -> its position in call order (the predictor's block index)."""
        return {block: i for i, block in enumerate(sorted({b.block for b in branches}))}

    def listed_tokens(self, branches: Sequence, num_steps: int) -> dict[tuple[int, int], torch.Tensor]:
        """Per (step, branch), the stream positions a P-step recomputes: the branch's
        other tokens and its image tokens the block keeps."""
        position = self._block_of(branches)
        kept = self.kept(num_steps, _shard(branches))
        kinds = self.step_kinds(num_steps)
        listed = {}
        for branch in branches:
            span = getattr(branch, "image_span", None)
            if span is None or not _recomputes_queries(branch):
                continue  # computed in full
            start, length = span
            others = torch.cat([torch.arange(start),
                                torch.arange(start + length, branch.num_tokens)])
            for step, kind in enumerate(kinds):
                keep = kept[position[branch.block]][step]
                if kind == PARTIAL and keep is not None:
                    listed[(step, branch.index)] = torch.cat([others, keep + start]).sort().values
                    listed[(step, ("keep", branch.block))] = keep
        return listed

    def plan_steps(self, branches: Sequence, num_steps: int) -> list[Plan]:
        """I-steps FULL; in P-steps a pruning block's branches recompute their listed
        tokens, every other branch all of its tokens."""
        listed = self.listed_tokens(branches, num_steps)
        return [full_row(branches) if kind == FULL else (PARTIAL,) + tuple(
            len(listed[(step, b.index)]) if (step, b.index) in listed else b.num_tokens
            for b in branches)
            for step, kind in enumerate(self.step_kinds(num_steps))]

    def check(self, model_name: str, branches: Sequence) -> None:
        """The predictor must have been trained for this model's blocks and tokens (under
        context parallelism, a rank's chunk of them)."""
        _, ranks = _shard(branches) or (0, 1)
        self._loaded.check(model_name, len({b.block for b in branches}),
                           ranks * max((b.image_span[1] for b in branches
                                        if getattr(b, "image_span", None)), default=0))

    def token_selection(self, grid: tuple[int, int] | None) -> TokenSelection:
        return TokenSelection(listed=True, listed_attention=self.attention,
                              listed_cache=self.cache)


def _recomputes_queries(branch) -> bool:
    """Whether a P-step can recompute the branch for chosen tokens as TokenCache does: a
    self-attention for those queries (its query path; under context parallelism the
    collectives hide it, and the branch runs in full), anything else token-wise."""
    if branch.kind in ("self_attention", "attention_mlp"):
        return getattr(branch, "query", None) is not None
    return branch.prunable


def _shard(branches: Sequence) -> tuple[int, int] | None:
    """(rank, ranks) of a context-parallel capture, None in one process."""
    shard = next((b.shard for b in branches if getattr(b, "shard", None)), None)
    return (shard.rank, shard.world) if shard else None


def _keep(weights: torch.Tensor, side: int, grid: int, pruned: int) -> torch.Tensor:
    """Per grid x grid cell of a side x side token map, all but the `pruned` lowest
    weights: sorted token indices."""
    cells = weights.view(side // grid, grid, side // grid, grid).permute(0, 2, 1, 3)
    cells = cells.reshape(-1, grid * grid)
    keep = cells.topk(grid * grid - pruned, dim=1).indices  # position within the cell
    rows, cols = keep // grid, keep % grid
    cell = torch.arange(cells.shape[0])[:, None]
    token = (cell // (side // grid) * grid + rows) * side + cell % (side // grid) * grid + cols
    return token.flatten().sort().values
