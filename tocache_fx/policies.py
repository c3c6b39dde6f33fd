"""Caching policies: what to compute at each denoising step.

A policy is a small validated dataclass. `tocache_fx.schedule.build_schedule` turns it,
together with the branches the pass found, into the per-step schedule tensor that
drives the rewritten model.

Example:
    >>> ToCa(interval=3, cache_ratio=0.93)
    ToCa(interval=3, cache_ratio=0.93, ...)
    >>> policy_from_dict(FORA(interval=2).to_dict())
    FORA(interval=2, num_steps=None)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

__all__ = ["Policy", "NoCache", "FORA", "TaylorSeer", "ToCa", "DuCa", "policy_from_dict"]

_REGISTRY: dict[str, type[Policy]] = {}


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def _check_float(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class Policy:
    """Base class of all policies: validation hooks and dict round-tripping."""

    name: ClassVar[str] = "policy"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __post_init__(self) -> None:
        num_steps = getattr(self, "num_steps", None)
        if num_steps is not None:
            _check_int("num_steps", num_steps, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `policy_from_dict` inverts it."""
        return {"policy": type(self).__name__, **dataclasses.asdict(self)}

    @property
    def caches(self) -> bool:
        """Whether this policy ever reuses a cached value."""
        return getattr(self, "interval", 1) > 1


def policy_from_dict(data: dict[str, Any]) -> Policy:
    """Rebuild a policy from `Policy.to_dict()` output."""
    data = dict(data)
    name = data.pop("policy", None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**data)


@dataclass(frozen=True)
class NoCache(Policy):
    """Compute every branch at every step: the rewritten model equals the original."""


@dataclass(frozen=True)
class FORA(Policy):
    """FULL every `interval` steps; every attention and MLP branch reused in between.
    The first `warmup` steps all run FULL (the cycle starts after them)."""

    interval: int = 3
    num_steps: int | None = None
    warmup: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("interval", self.interval, 1)
        _check_int("warmup", self.warmup, 0)


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
        _check_int("order", self.order, 1, 2)


FullSchedule = Literal["dit", "pixart", "flux", "fixed"]
BranchKind = Literal["self_attention", "cross_attention", "mlp"]
BRANCH_KINDS = ("self_attention", "cross_attention", "mlp")
ScoreSource = Literal["auto", "self", "cross", "none"]


@dataclass(frozen=True)
class ToCa(Policy):
    """Token-wise caching (Zou et al., ICLR 2025), defaults for DiT with DDIM-50.

    Important arguments:
        interval: N, one FULL step every N steps (modulated by `full_schedule`).
        cache_ratio: R, fraction of tokens reused in a partial step (r0 = 1 - R).
        num_steps: generation length the time terms are planned for; None infers it
            from the previous generation (50 for the first one).

    Arguments to tinker with (methods.md §2): `depth_weight` w_L, `time_weight` w_T,
    `type_weight` w_M, `mlp_share` rho, `attention_score` (s1 "self", s2 "cross",
    "auto" = cross if the block has one), `attention_weight` lambda1/2,
    `staleness_weight` lambda3, `grid_size`/`grid_bonus` (s4, 0 disables),
    `time_phases` (partial steps are grouped in this many phases of constant k, which
    bounds the number of compiled graphs), `token_bucket` (k rounded to a multiple),
    `share_cfg_selection` (an even batch is [uncond; cond]: both halves recompute the
    same tokens), `query_chunk` (queries per chunk when scoring attention),
    `module_intervals` (per branch kind, its own FULL cycle inside partial steps, e.g.
    `(("cross_attention", 6),)`, as the OpenSora configuration uses), `warmup` (the
    first steps all run FULL; the schedule starts after them).

    Example:
        >>> ToCa.pixart()
        ToCa(interval=3, cache_ratio=0.7, ...)
    """

    interval: int = 3
    cache_ratio: float = 0.93
    num_steps: int | None = None
    depth_weight: float = -0.2
    time_weight: float = 2.0
    type_weight: float = 2.5
    mlp_share: float = 0.6
    full_schedule: FullSchedule = "dit"
    attention_score: ScoreSource = "auto"
    attention_weight: float = 1.0
    staleness_weight: float = 0.25
    grid_size: int = 2
    grid_bonus: float = 0.6
    time_phases: int = 4
    token_bucket: int = 8
    share_cfg_selection: bool = True
    query_chunk: int = 256
    module_intervals: tuple[tuple[BranchKind, int], ...] = ()
    warmup: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("warmup", self.warmup, 0)
        object.__setattr__(self, "module_intervals",
                           tuple(tuple(pair) for pair in self.module_intervals))
        for kind, interval in self.module_intervals:
            _check_choice("module_intervals kind", kind, BRANCH_KINDS)
            _check_int(f"module_intervals[{kind!r}]", interval, 1)
        _check_int("interval", self.interval, 1)
        _check_float("cache_ratio", self.cache_ratio, 0.0, 1.0)
        for name in ("depth_weight", "time_weight", "type_weight", "attention_weight",
                     "staleness_weight", "grid_bonus"):
            _check_float(name, getattr(self, name))
        _check_float("mlp_share", self.mlp_share, 0.0, 1.0)
        _check_choice("full_schedule", self.full_schedule, ("dit", "pixart", "flux", "fixed"))
        _check_choice("attention_score", self.attention_score, ("auto", "self", "cross", "none"))
        _check_int("grid_size", self.grid_size, 1)
        _check_int("time_phases", self.time_phases, 1, 4)
        _check_int("token_bucket", self.token_bucket, 1)
        _check_int("query_chunk", self.query_chunk, 1)

    @classmethod
    def dit_ddim50(cls, **overrides: Any) -> ToCa:
        """DiT-XL/2, DDIM-50: N=3, R=93%, w_L=-0.2, w_T=2.0 (the dataclass defaults)."""
        return cls(**overrides)

    @classmethod
    def dit_ddpm250(cls, **overrides: Any) -> ToCa:
        """DiT-XL/2, DDPM-250: N=4, R=93%, w_L=0.8, w_T=0.4."""
        return cls(**{"interval": 4, "depth_weight": 0.8, "time_weight": 0.4, **overrides})

    @classmethod
    def pixart(cls, **overrides: Any) -> ToCa:
        """PixArt-alpha, DPM-Solver++ 20: N=3, R=70%, w_L=0.6, w_T=-0.9, s2, grid 4 / 0.4."""
        return cls(**{"interval": 3, "cache_ratio": 0.7, "depth_weight": 0.6,
                      "time_weight": -0.9, "full_schedule": "pixart", "attention_score": "cross",
                      "grid_size": 4, "grid_bonus": 0.4, **overrides})

    @classmethod
    def flux(cls, **overrides: Any) -> ToCa:
        """FLUX, 50 steps: N=5, R=90% (MLPs recompute 15% of tokens in the first block
        down to 5% in the last), w_L=0.5, w_T=0, steps 0-2 FULL, no grid bonus."""
        return cls(**{"interval": 5, "cache_ratio": 0.9, "depth_weight": 0.5,
                      "time_weight": 0.0, "type_weight": 0.0, "full_schedule": "flux", "grid_bonus": 0.0,
                      **overrides})

    @classmethod
    def opensora(cls, **overrides: Any) -> ToCa:
        """OpenSora rflow-30: r0=0.1 and MLPs recompute 15% (R=85%), cycles attention 3,
        cross-attention 6, MLP 3, s2 scores, no grid bonus."""
        return cls(**{"interval": 6, "cache_ratio": 0.9, "depth_weight": 0.0,
                      "time_weight": 0.0, "type_weight": 0.5 / 0.6, "full_schedule": "fixed", "attention_score": "cross",
                      "grid_bonus": 0.0, "module_intervals": (
                          ("self_attention", 3), ("cross_attention", 6), ("mlp", 3)),
                      **overrides})


Selection = Literal["random", "vnorm", "similarity"]


@dataclass(frozen=True)
class DuCa(Policy):
    """Dual caching (Zou et al.): per cycle of `interval` steps, offset 0 FULL, odd
    offsets conservative (ToCa-like partial), even offsets aggressive (whole stack reused).

    `selection` picks the recomputed tokens: "random" (shared by the CFG halves),
    "vnorm" (small value norms of the block's self-attention at the last FULL step) or
    "similarity" (least similar to a random `similarity_base` fraction of tokens).
    The first `warmup` steps all run FULL (the cycle starts after them).

    Example:
        >>> DuCa(interval=3, cache_ratio=0.95, selection="random")
        DuCa(interval=3, cache_ratio=0.95, ...)
    """

    interval: int = 3
    cache_ratio: float = 0.95
    selection: Selection = "random"
    num_steps: int | None = None
    similarity_base: float = 0.01
    token_bucket: int = 8
    share_cfg_selection: bool = True
    seed: int = 0
    warmup: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("warmup", self.warmup, 0)
        _check_int("interval", self.interval, 1)
        _check_float("cache_ratio", self.cache_ratio, 0.0, 1.0)
        _check_choice("selection", self.selection, ("random", "vnorm", "similarity"))
        _check_float("similarity_base", self.similarity_base, 0.0, 1.0)
        _check_int("token_bucket", self.token_bucket, 1)
        _check_int("seed", self.seed, 0)
