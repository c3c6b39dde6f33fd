"""ToCa: token-wise caching (Zou et al., ICLR 2025), as the authors' code computes it.

Everything here follows the authors' public code for each model (docs/methods.md §2):

* FULL steps come from a rule on the step index, decided once per step:
  - "dit": the authors count steps down, `i = T - 1 - s`. The first step is FULL and
    so is every step with `i % n == 0`, where `n` starts at `interval` and is
    recomputed at each FULL step as `round(interval / (1.4 - 0.8 i / T))`, forced to 2
    while `int(0.2 T) <= i < int(0.4 T)` (60-80% of the way through denoising);
  - "pixart": counting up (`i = s`), `n = round(interval / (0.8 + 0.4 i / T))`;
  - "flux": steps 0-2 FULL, then every `interval`;
  - "opensora": steps 0-2 FULL, then each branch kind on its own absolute cycle
    (`module_intervals`), the step FULL when every kind is due;
  - "fixed": every `interval` steps.
* In between, each PARTIAL-able branch recomputes `k = int(r N_b)` tokens, with
  `r = clip(r0 f_T f_L f_M, 0, 1)`, `r0 = 1 - cache_ratio`, time term
  `f_T = 1 + a - 2 a i / T` (countdown clock, DiT) or `1 - a + 2 a i / T` (count-up),
  depth term `f_L = 1 + b - 2 b l / (L - 1)` over the blocks of the branch's stack, and
  `f_M` the factor of the branch kind. k is exact per step and block (no phases, no
  buckets, unless `time_phases` / `token_bucket` ask for them): the token count is a
  dynamic size of the PARTIAL step graph, so exact k costs no extra graphs.
* Selection: s1 attention influence or s2 cross-attention entropy, + s3 staleness
  `staleness_weight * age / interval`, then the s4 grid bonus; per sample, or shared
  by the CFG halves (`share_cfg_selection`) when the batch is `[uncond; cond]`.

Example:
    >>> ToCa.pixart()
    ToCa(interval=3, cache_ratio=0.7, ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tocache_fx.layout import TokenSelection

from .base import FULL, PARTIAL, Plan, Policy, check_choice, check_float, check_int, full_row

__all__ = ["ToCa", "FullSchedule", "BRANCH_KINDS", "interval_steps", "stack_depths"]

FullSchedule = Literal["dit", "pixart", "flux", "opensora", "fixed"]
FULL_SCHEDULES = ("dit", "pixart", "flux", "opensora", "fixed")
BranchKind = Literal["self_attention", "cross_attention", "mlp", "attention_mlp"]
BRANCH_KINDS = ("self_attention", "cross_attention", "mlp", "attention_mlp")
ScoreSource = Literal["auto", "self", "cross", "none"]

# f_M = 1 + rho * w_M for MLPs, 1 - (1 - rho) * w_M for attention; DiT: rho 0.6, w_M 2.5
DIT_KIND_FACTORS = (("mlp", 2.5), ("attention_mlp", 2.5), ("cross_attention", 0.0),
                    ("self_attention", 0.0))


def _round_half_even(value: float) -> int:
    """`torch.round` of a float32, as the authors' schedulers compute the interval."""
    return int(torch.round(torch.tensor(value, dtype=torch.float32)))


def interval_steps(rule: str, interval: int, num_steps: int, adaptive: bool = True
                   ) -> list[tuple[bool, int]]:
    """Per step `(full, residue)` of a FULL-step rule (see the module docstring); the
    residue is the authors' `i % n` (DuCa classifies non-FULL steps by it)."""
    out = []
    if rule in ("dit", "pixart"):
        n = interval
        for s in range(num_steps):
            i = num_steps - 1 - s if rule == "dit" else s
            residue = i % n
            full = s == 0 or residue == 0
            out.append((full, residue))
            if full and adaptive:
                if rule == "dit":
                    n = _round_half_even(interval / (1.4 - 0.8 * i / num_steps))
                    if int(0.2 * num_steps) <= i < int(0.4 * num_steps):
                        n = 2
                else:
                    n = _round_half_even(interval / (0.8 + 0.4 * i / num_steps))
                n = max(1, n)
    elif rule == "flux":
        counter = 0
        for s in range(num_steps):
            full = s <= 2 or counter == interval - 1
            counter = 0 if full else counter + 1
            out.append((full, counter))
    else:  # "fixed" (and "opensora", whose per-kind cycles are applied on top)
        out = [(s % interval == 0, s % interval) for s in range(num_steps)]
    return out


def stack_depths(branches: Sequence) -> dict[int, tuple[int, int]]:
    """Per block, `(l, L)`: its position in its stack (the blocks sharing the path
    prefix, e.g. FLUX's double and single stacks) and the stack's depth."""
    stacks: dict[str, list[int]] = {}
    for branch in branches:
        prefix, _, last = branch.block_path.rpartition(".")
        stack = prefix if last.isdigit() else ""
        blocks = stacks.setdefault(stack, [])
        if branch.block not in blocks:
            blocks.append(branch.block)
    return {block: (position, len(blocks)) for blocks in stacks.values()
            for position, block in enumerate(blocks)}


@dataclass(frozen=True)
class ToCa(Policy):
    """Token-wise caching; the defaults are the authors' DiT-XL/2 DDIM-50 setting.

    Important arguments:
        interval: N, the FULL-step cycle (recomputed over time by `full_schedule`).
        cache_ratio: R, fraction of tokens reused in a partial step (r0 = 1 - R).
        num_steps: generation length the time terms are planned for; None takes it
            from the pipeline or the scheduler's timestep array (50 if neither tells).

    Arguments to tinker with (docs/methods.md §2): `time_weight` a and `step_clock`
    ("countdown": the authors' DiT index i = T-1-s; "countup": i = s), `depth_weight` b,
    `kind_factors` f_M per branch kind, `attention_score` (s1 "self", s2 "cross",
    "auto" = cross if the block has one), `attention_weight` lambda1/2,
    `staleness_weight` lambda3, `grid_size` / `grid_bonus` (s4, 0 disables),
    `share_cfg_selection` (when the pipeline batches CFG as [uncond; cond], both halves
    recompute the same tokens), `query_chunk` (queries per chunk when scoring),
    `module_intervals` (per branch kind, its own FULL cycle), `warmup` (the first
    steps all FULL; the rule runs on the steps after them), `time_phases` and
    `token_bucket` (opt-in: evaluate the time term per phase and round k to a
    multiple, for fewer distinct token counts).

    Example:
        >>> ToCa(interval=3, cache_ratio=0.93)
        ToCa(interval=3, cache_ratio=0.93, ...)
    """

    interval: int = 3
    cache_ratio: float = 0.93
    num_steps: int | None = None
    full_schedule: FullSchedule = "dit"
    time_weight: float = 2.0
    step_clock: Literal["countdown", "countup"] = "countdown"
    depth_weight: float = -0.2
    kind_factors: tuple[tuple[BranchKind, float], ...] = DIT_KIND_FACTORS
    attention_score: ScoreSource = "auto"
    attention_weight: float = 1.0
    staleness_weight: float = 0.25
    grid_size: int = 2
    grid_bonus: float = 0.6
    share_cfg_selection: bool = False
    query_chunk: int = 256
    module_intervals: tuple[tuple[BranchKind, int], ...] = ()
    warmup: int = 0
    time_phases: int | None = None
    token_bucket: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "module_intervals",
                           tuple(tuple(pair) for pair in self.module_intervals))
        object.__setattr__(self, "kind_factors", tuple(tuple(pair) for pair in self.kind_factors))
        check_int("interval", self.interval, 1)
        check_int("warmup", self.warmup, 0)
        check_float("cache_ratio", self.cache_ratio, 0.0, 1.0)
        check_choice("full_schedule", self.full_schedule, FULL_SCHEDULES)
        check_choice("step_clock", self.step_clock, ("countdown", "countup"))
        for name in ("depth_weight", "time_weight", "attention_weight", "staleness_weight",
                     "grid_bonus"):
            check_float(name, getattr(self, name))
        for kind, factor in self.kind_factors:
            check_choice("kind_factors kind", kind, BRANCH_KINDS)
            check_float(f"kind_factors[{kind!r}]", factor)
        for kind, interval in self.module_intervals:
            check_choice("module_intervals kind", kind, BRANCH_KINDS)
            check_int(f"module_intervals[{kind!r}]", interval, 1)
        check_choice("attention_score", self.attention_score, ("auto", "self", "cross", "none"))
        check_int("grid_size", self.grid_size, 1)
        check_int("query_chunk", self.query_chunk, 1)
        check_int("token_bucket", self.token_bucket, 1)
        if self.time_phases is not None:
            check_int("time_phases", self.time_phases, 1)

    # -- presets (the authors' settings) ------------------------------------------------
    @classmethod
    def dit_ddim50(cls, **overrides: Any) -> ToCa:
        """DiT-XL/2, DDIM-50: N=3, R=93%, a=2.0, b=-0.2, s1 + s3 + s4 (2x2, 0.6), per sample."""
        return cls(**overrides)

    @classmethod
    def dit_ddpm250(cls, **overrides: Any) -> ToCa:
        """DiT-XL/2, DDPM-250: N=4, R=93%, a=0.4, b=0.8."""
        return cls(**{"interval": 4, "time_weight": 0.4, "depth_weight": 0.8, **overrides})

    @classmethod
    def pixart(cls, **overrides: Any) -> ToCa:
        """PixArt-alpha, DPM-Solver++ 20: N=3, R=70%, count-up clock, a=-0.9, b=0.6,
        f_M 0.6 (cross-attention) / 1.6 (MLP), s2 + s3 + s4 (4x4, 0.4), CFG halves shared."""
        return cls(**{"interval": 3, "cache_ratio": 0.7, "full_schedule": "pixart",
                      "step_clock": "countup", "time_weight": -0.9, "depth_weight": 0.6,
                      "kind_factors": (("mlp", 1.6), ("attention_mlp", 1.6),
                                       ("cross_attention", 0.6), ("self_attention", 0.0)),
                      "attention_score": "cross", "grid_size": 4, "grid_bonus": 0.4,
                      "share_cfg_selection": True, **overrides})

    @classmethod
    def flux(cls, **overrides: Any) -> ToCa:
        """FLUX.1-dev, 50 steps: N=4, R=90%, steps 0-2 FULL, b=0.5, f_M 0.4 (double-stream
        MLPs) / 1.6 (single-stream), attention scores + s3, no grid bonus."""
        return cls(**{"interval": 4, "cache_ratio": 0.9, "full_schedule": "flux",
                      "step_clock": "countup", "time_weight": 0.0, "depth_weight": 0.5,
                      "kind_factors": (("mlp", 0.4), ("attention_mlp", 1.6),
                                       ("cross_attention", 0.0), ("self_attention", 0.0)),
                      "grid_bonus": 0.0, **overrides})

    @classmethod
    def opensora(cls, **overrides: Any) -> ToCa:
        """OpenSora rflow-30: steps 0-2 FULL, then cycles attention 3, cross-attention 6,
        MLP 3; MLPs recompute 14.95% (r0 = 0.1, f_M 1.495), cross-attention is reused
        until its cycle (f_M clips to 0); s2 + s3, CFG halves shared, no grid bonus."""
        return cls(**{"interval": 3, "cache_ratio": 0.9, "full_schedule": "opensora",
                      "step_clock": "countup", "time_weight": 0.0, "depth_weight": 0.0,
                      "kind_factors": (("mlp", 1.495), ("attention_mlp", 1.495),
                                       ("cross_attention", 0.0), ("self_attention", 0.0)),
                      "attention_score": "cross", "grid_bonus": 0.0, "share_cfg_selection": True,
                      "module_intervals": (("self_attention", 3), ("cross_attention", 6),
                                           ("mlp", 3)), **overrides})

    # -- the schedule ----------------------------------------------------------------
    def fraction(self, branch, depth: tuple[int, int], step: int, num_steps: int) -> float:
        """r(l, t, m) = clip(r0 f_T f_L f_M, 0, 1); 0 where the branch is not PARTIAL-able."""
        if not branch.partial_ok:
            return 0.0
        if self.time_phases:  # opt-in: one time value per phase, at its middle
            phase = min(self.time_phases - 1, step * self.time_phases // num_steps)
            step = round((phase + 0.5) * num_steps / self.time_phases - 0.5)
        a, b = self.time_weight, self.depth_weight
        if self.step_clock == "countdown":
            i = num_steps - 1 - step
            time = 1 + a - 2 * a * i / num_steps
        else:
            time = 1 - a + 2 * a * step / num_steps
        layer, layers = depth
        depth_term = 1 + b - 2 * b * layer / (layers - 1) if layers > 1 else 1.0
        kind = dict(self.kind_factors).get(branch.kind, 0.0)
        return min(1.0, max(0.0, (1 - self.cache_ratio) * time * depth_term * kind))

    def tokens(self, branch, depth: tuple[int, int], step: int, num_steps: int) -> int:
        k = int(self.fraction(branch, depth, step, num_steps) * branch.num_tokens)
        if self.token_bucket > 1:
            k = round(k / self.token_bucket) * self.token_bucket
        return max(0, min(branch.num_tokens, k))

    def step_kinds(self, num_steps: int) -> list[int]:
        """FULL or PARTIAL per step (after `warmup` FULL steps, the rule restarts);
        `interval=1` caches nothing (the authors' "original" mode)."""
        if self.interval == 1:
            return [FULL] * num_steps
        rule = "fixed" if self.full_schedule == "opensora" else self.full_schedule
        steps = interval_steps(rule, self.interval, num_steps - min(self.warmup, num_steps),
                               adaptive=self.cache_ratio < 1)
        return [FULL] * min(self.warmup, num_steps) + [FULL if full else PARTIAL
                                                       for full, _ in steps]

    def _due(self, branch, step: int) -> bool:
        """Whether `branch` runs FULL at a non-FULL `step` by its kind's own cycle."""
        cycles = dict(self.module_intervals)
        if branch.kind not in cycles:
            return False
        if self.full_schedule == "opensora":
            return step < 3 or step % cycles[branch.kind] == 0
        return (step - self.warmup) % cycles[branch.kind] == 0

    def plan_steps(self, branches: Sequence, num_steps: int) -> list[Plan]:
        kinds = self.step_kinds(num_steps)
        if self.full_schedule == "opensora" and self.interval > 1:
            kinds = [FULL if s < 3 or all(self._due(b, s) for b in branches) else PARTIAL
                     for s in range(num_steps)]
        depths = stack_depths(branches)
        rows = []
        for step, kind in enumerate(kinds):
            if kind == FULL:
                rows.append(full_row(branches))
                continue
            rows.append((PARTIAL,) + tuple(
                b.num_tokens if self._due(b, step) else
                self.tokens(b, depths[b.block], step - self.warmup, num_steps - self.warmup)
                for b in branches))
        return rows

    def token_selection(self, grid: tuple[int, int] | None) -> TokenSelection:
        use_grid = grid is not None and self.grid_bonus and all(
            size % self.grid_size == 0 for size in grid)
        return TokenSelection(
            score_weight=self.attention_weight, staleness_weight=self.staleness_weight,
            interval=self.interval, grid=grid if use_grid else None, grid_size=self.grid_size,
            grid_bonus=self.grid_bonus, share_halves=self.share_cfg_selection,
            query_chunk=self.query_chunk)

    def score_source(self, branches: Sequence, branch) -> tuple[object, str] | None:
        if self.attention_score == "none":
            return None
        cross = _block_branch(branches, branch.block, "cross_attention")
        self_ = _block_branch(branches, branch.block, "self_attention", "attention_mlp")
        wanted = self.attention_score
        if wanted == "cross" or (wanted == "auto" and cross is not None):
            return (cross, "entropy") if cross else None
        return (self_, "influence") if self_ else None


def _block_branch(branches: Sequence, block: int, *kinds: str):
    return next((b for b in branches if b.block == block and b.kind in kinds
                 and b.attention is not None), None)
