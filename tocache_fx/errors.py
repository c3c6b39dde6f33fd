"""Errors raised by tocache-fx."""

__all__ = ["UnsupportedModelError", "CacheStateError"]


class UnsupportedModelError(ValueError):
    """The pass found no residual branch it can cache in the model's graph."""


class CacheStateError(RuntimeError):
    """The model was called in a way the cache cannot serve (training mode, bad state)."""
