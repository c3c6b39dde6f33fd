"""Caching policies: what to compute at each denoising step (see `base.Policy`).

Example:
    >>> ToCa(interval=3, cache_ratio=0.93)
    ToCa(interval=3, cache_ratio=0.93, ...)
    >>> policy_from_dict(FORA(interval=2).to_dict())
    FORA(interval=2, num_steps=None, warmup=0)
"""

from .base import Policy, policy_from_dict
from .duca import DuCa
from .fora import FORA, NoCache, TaylorSeer
from .toca import ToCa
from .token_cache import TokenCache

__all__ = ["Policy", "NoCache", "FORA", "TaylorSeer", "ToCa", "DuCa", "TokenCache",
           "policy_from_dict"]
