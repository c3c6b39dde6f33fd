"""The policy protocol: what to compute at each denoising step.

A policy is a small frozen dataclass, validated on construction, round-trippable with
`to_dict` / `policy_from_dict`. It implements the whole of its method in one place:

* `plan_steps(branches, num_steps)` -> one row per step `(kind, k_0, ..., k_{B-1})`
  (`tocache_fx.schedule` wraps it into the schedule tensor);
* `token_selection(grid)` -> how PARTIAL steps pick tokens (scores, staleness, noise);
* `score_source(branches, branch)` -> which attention's FULL-step map scores a branch;
* `forecast(rows)` -> per step Taylor terms and distance (forecasting policies only);
* `listed_tokens(branches, num_steps)` -> the tokens each PARTIAL step recomputes, for
  a policy that decides them ahead (TokenCache); `check(model_name, branches)`.

Example:
    >>> policy_from_dict(FORA(interval=2).to_dict())
    FORA(interval=2, num_steps=None, warmup=0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tocache_fx.layout import TokenSelection

__all__ = ["Policy", "policy_from_dict", "check_int", "check_float", "check_choice", "Plan",
           "Forecast", "FULL", "PARTIAL", "AGGRESSIVE", "full_row"]

Plan = tuple[int, ...]
Forecast = tuple[int, int]  # (terms, distance in steps); (0, 0) when nothing is forecast
FULL, PARTIAL, AGGRESSIVE = 0, 1, 2  # values of `tocache_fx.schedule.StepKind`

_REGISTRY: dict[str, type[Policy]] = {}


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def check_float(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def full_row(branches: Sequence) -> Plan:
    """Every branch computes every token."""
    return (FULL,) + tuple(b.num_tokens for b in branches)


@dataclass(frozen=True)
class Policy:
    """Base class of all policies: validation, dict round-tripping, default hooks."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __post_init__(self) -> None:
        num_steps = getattr(self, "num_steps", None)
        if num_steps is not None:
            check_int("num_steps", num_steps, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `policy_from_dict` inverts it."""
        return {"policy": type(self).__name__, **dataclasses.asdict(self)}

    @property
    def caches(self) -> bool:
        """Whether this policy ever reuses a cached value."""
        return getattr(self, "interval", 1) > 1

    # -- what subclasses implement ---------------------------------------------------
    def plan_steps(self, branches: Sequence, num_steps: int) -> list[Plan]:
        """One row `(kind, k_0, ..., k_{B-1})` per step."""
        return [full_row(branches)] * num_steps

    def forecast(self, rows: Sequence[Plan]) -> tuple[Forecast, ...]:
        """Per step `(terms, distance)`; empty for policies that do not forecast."""
        return ()

    def token_selection(self, grid: tuple[int, int] | None) -> TokenSelection:
        """How PARTIAL steps pick their tokens."""
        return TokenSelection()

    def score_source(self, branches: Sequence, branch) -> tuple[object, str] | None:
        """The attention branch whose FULL-step map scores `branch`, and the score kind
        ("influence", "entropy", "vnorm"); None: no attention score."""
        return None

    def listed_tokens(self, branches: Sequence, num_steps: int) -> dict[tuple[int, int], Any]:
        """Per (step, branch), the tokens a PARTIAL step recomputes, for a policy that
        lists them (`TokenSelection.listed`); empty for policies that select them."""
        return {}

    def check(self, model_name: str, branches: Sequence) -> None:
        """Raise a clear error if the policy cannot serve this model (default: it can)."""


def policy_from_dict(data: dict[str, Any]) -> Policy:
    """Rebuild a policy from `Policy.to_dict()` output."""
    data = dict(data)
    name = data.pop("policy", None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**data)
