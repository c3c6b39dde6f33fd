"""Policies to schedule tensors: for each denoising step, the step kind and, for each
branch, how many tokens it recomputes.

`table[step] = [kind, k_0, ..., k_{B-1}]` with `kind` a `StepKind` and `k_b = N_b` (all
of branch b's tokens: compute and store), `0` (reuse the cache) or anything in between
(PARTIAL: gather, compute and scatter `k_b` tokens). Branches may see different token
counts `N_b` (the text and image streams of joint attention, the spatial and temporal
blocks of a video DiT). Each distinct row is one compiled graph.

A forecasting policy (`TaylorSeer`) also gets `forecast[step] = (terms, distance)`: at
a FULL step, how many finite differences to update and the steps since the previous
FULL step; at a reusing step, how many Taylor terms to add and the steps since the
last FULL step. Each distinct (row, forecast) pair is one compiled graph.

Example:
    >>> schedule = build_schedule(FORA(interval=2), branches, num_steps=4)  # doctest: +SKIP
    >>> schedule.table
    tensor([[ 0, 16, 16],
            [ 1,  0,  0],
            [ 0, 16, 16],
            [ 1,  0,  0]], dtype=torch.int32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

from .policies import FORA, DuCa, NoCache, Policy, TaylorSeer, ToCa

__all__ = ["StepKind", "Schedule", "build_schedule"]

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
        return tuple(self.table[step].tolist())

    def forecast_at(self, step: int) -> Forecast:
        """`(terms, distance)` of `step`; (0, 0) without forecasting or past the plan."""
        return self.forecast[step] if step < len(self.forecast) else (0, 0)

    def plans(self) -> list[Plan]:
        """Distinct rows in order of first use."""
        return list(dict.fromkeys(tuple(row) for row in self.table.tolist()))

    def variants(self) -> list[tuple[Plan, Forecast]]:
        """Distinct (row, forecast) pairs in order of first use: one compiled graph each."""
        return list(dict.fromkeys((self.plan(step), self.forecast_at(step))
                                  for step in range(self.num_steps)))


_BUILDERS: dict[type[Policy], Callable[..., list[Plan]]] = {}


def _builder(policy_type: type[Policy]) -> Callable:
    def register(fn: Callable[..., list[Plan]]) -> Callable[..., list[Plan]]:
        _BUILDERS[policy_type] = fn
        return fn
    return register


def build_schedule(policy: Policy, branches: Sequence, num_steps: int) -> Schedule:
    """The schedule tensor of `policy` for a generation of `num_steps` steps."""
    rows = _BUILDERS[type(policy)](policy, branches, num_steps)
    forecast = _forecast(rows, policy.order) if isinstance(policy, TaylorSeer) else ()
    return Schedule(torch.tensor(rows, dtype=torch.int32).view(num_steps, 1 + len(branches)),
                    tuple(b.num_tokens for b in branches), forecast)


def _forecast(rows: Sequence[Plan], order: int) -> tuple[Forecast, ...]:
    """Per step `(terms, distance)`: differences need earlier FULL steps, so the first
    FULL step updates none and a step after one FULL step forecasts with none."""
    forecast, last_full, fulls = [], None, 0
    for step, row in enumerate(rows):
        distance = step - last_full if last_full is not None else 0
        if row[0] == StepKind.FULL:
            forecast.append((min(order, fulls), distance))
            last_full, fulls = step, fulls + 1
        else:
            forecast.append((max(0, min(order, fulls - 1)), distance))
    return tuple(forecast)


def _full(branches: Sequence) -> Plan:
    return (int(StepKind.FULL),) + tuple(b.num_tokens for b in branches)


def _bucket(fraction: float, num_tokens: int, bucket: int) -> int:
    k = round(fraction * num_tokens / bucket) * bucket
    return max(0, min(num_tokens, k))


@_builder(NoCache)
def _no_cache(policy: NoCache, branches: Sequence, num_steps: int) -> list[Plan]:
    return [_full(branches)] * num_steps


@_builder(TaylorSeer)
@_builder(FORA)
def _fora(policy: FORA, branches: Sequence, num_steps: int) -> list[Plan]:
    reuse = (int(StepKind.PARTIAL),) + (0,) * len(branches)
    return [_full(branches) if step < policy.warmup or (step - policy.warmup) % policy.interval == 0
            else reuse for step in range(num_steps)]


def _toca_full_steps(policy: ToCa, num_steps: int) -> list[bool]:
    """FULL steps of ToCa: a static function of the step index (methods.md §2)."""
    full = [policy.interval == 1 or step < policy.warmup for step in range(num_steps)]
    step = min(policy.warmup, num_steps)
    while step < num_steps:
        full[step] = True
        progress = step / num_steps
        remaining = 1 - progress  # t / T, the timestep fraction still to denoise
        if policy.full_schedule == "dit":
            gap = 2 if 0.2 <= progress < 0.4 else round(policy.interval / (1.4 - 0.8 * remaining))
        elif policy.full_schedule == "pixart":
            gap = round(policy.interval / (0.8 + 0.4 * remaining))
        elif policy.full_schedule == "flux":
            gap = 1 if step < 2 else policy.interval
        else:
            gap = policy.interval
        step += max(1, gap)
    return full


def toca_fraction(policy: ToCa, branch, num_blocks: int, remaining: float) -> float:
    """r(l, t, m) = clip(r0 * f_L(l) * f_T(t) * f_M(m), 0, 1); 0 where not PARTIAL-able."""
    if not branch.partial_ok:
        return 0.0
    depth = 1 + policy.depth_weight * (1 - 2 * branch.block / (num_blocks - 1)) \
        if num_blocks > 1 else 1.0
    time = 1 + policy.time_weight * (1 - 2 * remaining)
    if branch.kind in ("mlp", "attention_mlp"):
        kind = 1 + policy.mlp_share * policy.type_weight
    else:
        kind = 1 - (1 - policy.mlp_share) * policy.type_weight
    return min(1.0, max(0.0, (1 - policy.cache_ratio) * depth * time * kind))


@_builder(ToCa)
def _toca(policy: ToCa, branches: Sequence, num_steps: int) -> list[Plan]:
    num_blocks = max(b.block for b in branches) + 1
    phases = policy.time_phases
    phase_rows = []
    for phase in range(phases):
        remaining = 1 - (phase + 0.5) / phases
        phase_rows.append((int(StepKind.PARTIAL),) + tuple(
            _bucket(toca_fraction(policy, b, num_blocks, remaining), b.num_tokens,
                    policy.token_bucket) for b in branches))
    full = _toca_full_steps(policy, num_steps)
    own_cycle = dict(policy.module_intervals)
    rows = []
    for step in range(num_steps):
        if full[step]:
            rows.append(_full(branches))
            continue
        row = phase_rows[min(phases - 1, step * phases // num_steps)]
        rows.append(row[:1] + tuple(
            b.num_tokens if b.kind in own_cycle and step % own_cycle[b.kind] == 0 else k
            for b, k in zip(branches, row[1:])))
    return rows


@_builder(DuCa)
def _duca(policy: DuCa, branches: Sequence, num_steps: int) -> list[Plan]:
    conservative = (int(StepKind.PARTIAL),) + tuple(
        _bucket(1 - policy.cache_ratio, b.num_tokens, policy.token_bucket) if b.partial_ok else 0
        for b in branches)
    aggressive = (int(StepKind.AGGRESSIVE),) + (0,) * len(branches)
    rows = []
    for step in range(num_steps):
        offset = (step - policy.warmup) % policy.interval
        rows.append(_full(branches) if offset == 0 or step < policy.warmup
                    else conservative if offset % 2 == 1 else aggressive)
    return rows
