"""Policies to schedule tensors: for each denoising step, the step kind and, for each
branch, how many tokens it recomputes.

`table[step] = [kind, k_0, ..., k_{B-1}]` with `kind` a `StepKind` and `k_b = N_b` (all
of branch b's tokens: compute and store), `0` (reuse the cache) or anything in between
(PARTIAL: gather, compute and scatter `k_b` tokens). Branches may see different token
counts `N_b` (the text and image streams of joint attention, the spatial and temporal
blocks of a video DiT). The rows come from the policy (`Policy.plan_steps`).

A forecasting policy (`TaylorSeer`) also gets `forecast[step] = (terms, distance)`: at
a FULL step, how many finite differences to update and the steps since the previous
FULL step; at a reusing step, how many Taylor terms to add and the steps since the
last FULL step.

Example:
    >>> schedule = build_schedule(FORA(interval=2), branches, num_steps=4)  # doctest: +SKIP
    >>> schedule.table
    tensor([[ 0, 16, 16],
            [ 1,  0,  0],
            [ 0, 16, 16],
            [ 1,  0,  0]], dtype=torch.int32)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

__all__ = ["StepKind", "Schedule", "build_schedule", "Plan", "Forecast"]

Plan = tuple[int, ...]
Forecast = tuple[int, int]  # (terms, distance in steps); (0, 0) when nothing is forecast


class StepKind(IntEnum):
    FULL = 0  # every branch computes every token
    PARTIAL = 1  # branches reuse (k=0), recompute k tokens, or all of them (k=N)
    AGGRESSIVE = 2  # DuCa: all blocks skipped, the last block's cached output is used


@dataclass(frozen=True)
class Schedule:
    """The per-step plan of one generation (see the module docstring)."""

    table: torch.Tensor
    branch_tokens: tuple[int, ...]  # N_b, the tokens branch b computes at a FULL step
    forecast: tuple[Forecast, ...] = ()  # per step, for forecasting policies only

    @property
    def num_steps(self) -> int:
        return self.table.shape[0]

    def full_plan(self) -> Plan:
        return (int(StepKind.FULL),) + self.branch_tokens

    def plan(self, step: int) -> Plan:
        """The row for `step`; steps past the planned length are FULL (uncached)."""
        if step >= self.num_steps:
            return self.full_plan()
        return self._rows[step]

    @property
    def _rows(self) -> list[Plan]:
        rows = self.__dict__.get("_row_cache")
        if rows is None:
            rows = [tuple(row) for row in self.table.tolist()]
            object.__setattr__(self, "_row_cache", rows)
        return rows

    def forecast_at(self, step: int) -> Forecast:
        """`(terms, distance)` of `step`; (0, 0) without forecasting or past the plan."""
        return self.forecast[step] if step < len(self.forecast) else (0, 0)

    def plans(self) -> list[Plan]:
        """Distinct rows in order of first use."""
        return list(dict.fromkeys(self._rows))


def build_schedule(policy, branches: Sequence, num_steps: int) -> Schedule:
    """The schedule tensor of `policy` for a generation of `num_steps` steps."""
    rows = policy.plan_steps(branches, num_steps)
    table = torch.tensor(rows, dtype=torch.int32).view(num_steps, 1 + len(branches))
    return Schedule(table, tuple(b.num_tokens for b in branches), policy.forecast(rows))
