"""Whole-branch reuse: `NoCache`, `FORA` and `TaylorSeer` (methods.md §5).

Example:
    >>> [row[0] for row in FORA(interval=3).plan_steps(branches, 7)]   # doctest: +SKIP
    [0, 1, 1, 0, 1, 1, 0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import FULL, PARTIAL, Forecast, Plan, Policy, check_int, full_row

__all__ = ["NoCache", "FORA", "TaylorSeer"]


@dataclass(frozen=True)
class NoCache(Policy):
    """Compute every branch at every step: the rewritten model equals the original."""


@dataclass(frozen=True)
class FORA(Policy):
    """FULL every `interval` steps, every attention and MLP branch reused in between:
    the FORA paper's rule, FULL at steps 0, N, 2N, ... (the ToCa repository's FORA mode
    counts its steps down, FULL where `(T - 1 - s) % N == 0` and at s = 0: that is
    `ToCa(interval=N, cache_ratio=1.0)`). The first `warmup` steps all run FULL and the
    cycle starts after them.

    Example:
        >>> FORA(interval=3)
        FORA(interval=3, num_steps=None, warmup=0)
    """

    interval: int = 3
    num_steps: int | None = None
    warmup: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("interval", self.interval, 1)
        check_int("warmup", self.warmup, 0)

    def plan_steps(self, branches: Sequence, num_steps: int) -> list[Plan]:
        reuse = (PARTIAL,) + (0,) * len(branches)
        return [full_row(branches) if step < self.warmup or (step - self.warmup) % self.interval == 0
                else reuse for step in range(num_steps)]


@dataclass(frozen=True)
class TaylorSeer(FORA):
    """FORA's steps, but a cached branch is forecast instead of reused (Liu et al.,
    methods.md §5): every FULL step updates finite differences of each branch output
    over the FULL steps so far, and a step `a` steps after the last FULL one uses the
    Taylor series `f + a * Δf + a² / 2 * Δ²f` up to `order` (1 or 2). The forecast is a
    few fused element-wise ops per branch; each difference is one more cache slot.

    Example:
        >>> TaylorSeer(interval=2, warmup=4)
        TaylorSeer(interval=2, num_steps=None, warmup=4, order=1)
    """

    order: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("order", self.order, 1, 2)

    def forecast(self, rows: Sequence[Plan]) -> tuple[Forecast, ...]:
        """Per step `(terms, distance)`: differences need earlier FULL steps, so the first
        FULL step updates none and a step after one FULL step forecasts with none."""
        forecast, last_full, fulls = [], None, 0
        for step, row in enumerate(rows):
            distance = step - last_full if last_full is not None else 0
            if row[0] == FULL:
                forecast.append((min(self.order, fulls), distance))
                last_full, fulls = step, fulls + 1
            else:
                forecast.append((max(0, min(self.order, fulls - 1)), distance))
        return tuple(forecast)
