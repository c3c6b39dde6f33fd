"""DuCa: dual caching (Zou et al.), as the authors' code computes it (docs/methods.md §3).

DuCa runs ToCa's FULL-step rule and classifies every other step by the residue
`i % n` of that rule: odd -> conservative (a ToCa PARTIAL step, same token counts),
even -> aggressive (every block skipped, the last block's cached output used). With the
DiT's countdown clock this gives FULL -> aggressive -> conservative -> FULL. The
OpenSora configuration has its own 6-step pattern per branch kind.

Example:
    >>> DuCa.pixart()
    DuCa(interval=3, cache_ratio=0.25, ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tocache_fx.layout import TokenSelection

from .base import AGGRESSIVE, FULL, PARTIAL, Plan, check_choice, check_float, full_row
from .toca import ToCa, interval_steps, stack_depths

__all__ = ["DuCa"]

Selection = Literal["attention", "random", "vnorm", "similarity"]

# OpenSora's per-kind pattern after the 3 FULL warm-up steps, by step % 6 (DuCa's
# `lists_ToCa_CN`): "F" FULL, "R" reuse, "P" partial, "A" aggressive
_OPENSORA_PATTERN = {
    "self_attention": "FRAFRA", "attention_mlp": "FPAFPA", "mlp": "FPAFPA",
    "cross_attention": "FRARRA",
}


@dataclass(frozen=True)
class DuCa(ToCa):
    """Dual caching; the defaults are the authors' DiT DDIM-50 setting (N=3, r0=0.05,
    attention scores, s4 2x2 with bonus 0.8).

    `selection` picks the tokens conservative steps recompute: "attention" (ToCa's
    scores), "random", "vnorm" (small value norms of the block's self-attention at the
    last FULL step) or "similarity" (least similar to a random `similarity_base`
    fraction of tokens); staleness (s3) and the grid bonus (s4) apply to each. `seed`
    seeds the random draws at every generation start.

    Example:
        >>> DuCa(interval=3, cache_ratio=0.95, selection="random")
        DuCa(interval=3, cache_ratio=0.95, ...)
    """

    cache_ratio: float = 0.95
    grid_bonus: float = 0.8
    selection: Selection = "attention"
    similarity_base: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("selection", self.selection,
                     ("attention", "random", "vnorm", "similarity"))
        check_float("similarity_base", self.similarity_base, 0.0, 1.0)
        if self.seed < 0 or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @classmethod
    def dit_ddim50(cls, **overrides: Any) -> DuCa:
        """DiT-XL/2, DDIM-50: N=3, R=95%, ToCa's DDIM-50 time and depth terms."""
        return cls(**overrides)

    @classmethod
    def pixart(cls, **overrides: Any) -> DuCa:
        """PixArt-alpha, DPM-Solver++ 20: N=3 fixed (FULL, conservative, aggressive),
        r0=0.75, ToCa PixArt's terms and scores (s2, s4 4x4 0.4), CFG halves shared."""
        base = ToCa.pixart()
        return cls(**{"interval": 3, "cache_ratio": 0.25, "full_schedule": "fixed",
                      "step_clock": "countup", "time_weight": base.time_weight,
                      "depth_weight": base.depth_weight, "kind_factors": base.kind_factors,
                      "attention_score": "cross", "grid_size": 4, "grid_bonus": 0.4,
                      "share_cfg_selection": True, **overrides})

    @classmethod
    def opensora(cls, **overrides: Any) -> DuCa:
        """OpenSora rflow-30: steps 0-2 FULL, then the authors' 6-step pattern per kind
        (aggressive at steps 2 and 5 of it), MLPs recompute 14.95%, V-norm selection."""
        base = ToCa.opensora()
        return cls(**{"interval": 3, "cache_ratio": 0.9, "full_schedule": "opensora",
                      "step_clock": "countup", "time_weight": 0.0, "depth_weight": 0.0,
                      "kind_factors": base.kind_factors, "selection": "vnorm",
                      "grid_bonus": 0.0, **overrides})

    def step_kinds(self, num_steps: int) -> list[int]:
        if self.interval == 1:
            return [FULL] * num_steps
        warm = min(self.warmup, num_steps)
        if self.full_schedule == "opensora":
            kinds = []
            for s in range(num_steps):
                letters = {pattern[s % 6] for pattern in _OPENSORA_PATTERN.values()}
                kinds.append(FULL if s < 3 or letters == {"F"} else
                             AGGRESSIVE if letters == {"A"} else PARTIAL)
            return kinds
        steps = interval_steps(self.full_schedule, self.interval, num_steps - warm,
                               adaptive=self.cache_ratio < 1)
        return [FULL] * warm + [FULL if full else PARTIAL if residue % 2 else AGGRESSIVE
                                for full, residue in steps]

    def plan_steps(self, branches: Sequence, num_steps: int) -> list[Plan]:
        depths = stack_depths(branches)
        offset = 0 if self.full_schedule == "opensora" else self.warmup
        rows = []
        for s, kind in enumerate(self.step_kinds(num_steps)):
            if kind != PARTIAL:
                rows.append(full_row(branches) if kind == FULL else
                            (AGGRESSIVE,) + (0,) * len(branches))
                continue
            rows.append((PARTIAL,) + tuple(
                self._opensora_tokens(b, depths[b.block], s, num_steps)
                if self.full_schedule == "opensora" else
                self.tokens(b, depths[b.block], s - offset, num_steps - offset)
                for b in branches))
        return rows

    def _opensora_tokens(self, branch, depth: tuple[int, int], step: int, num_steps: int) -> int:
        letter = _OPENSORA_PATTERN[branch.kind][step % 6]
        return branch.num_tokens if letter == "F" else 0 if letter == "R" else \
            self.tokens(branch, depth, step, num_steps)

    def token_selection(self, grid: tuple[int, int] | None) -> TokenSelection:
        base = super().token_selection(grid)
        noise = {"random": "random", "similarity": "similarity"}.get(self.selection, "none")
        return TokenSelection(**{**base.__dict__, "noise": noise,
                                 "similarity_base": self.similarity_base,
                                 "score_weight": base.score_weight})

    def score_source(self, branches: Sequence, branch) -> tuple[object, str] | None:
        if self.selection == "attention":
            return super().score_source(branches, branch)
        if self.selection != "vnorm":
            return None
        source = next((b for b in branches if b.block == branch.block and b.attention is not None
                       and b.kind in ("self_attention", "attention_mlp")), None)
        return (source, "vnorm") if source else None
