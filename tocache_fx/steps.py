"""Which denoising step a call is, worked out from its `timestep` argument.

Two sources, in order of preference:

* Metadata, free on every device: diffusers pipelines iterate over the scheduler's
  timestep array and pass `t` (or `t.expand(batch)`), a view into that array. Its
  storage offset is the step's index and the array's length the generation's length,
  read without touching the data (no device sync).
* The value, for any other timestep (a fresh tensor, a Python number): free for CPU
  tensors, one scalar device-to-host copy for accelerator tensors.

A generation restarts at the first call, when the call signature changes, when the
view moves to another array or back to an earlier index, or when the value repeats or
moves against the direction of the generation's first two steps (so falling DDPM
timesteps and rising 1 - sigma ones both work).

Example:
    >>> tracker = StepTracker()
    >>> timesteps = torch.arange(999, 0, -100)
    >>> [tracker.advance("sig", t.expand(2)) for t in timesteps[:3]], tracker.step
    ([True, False, False], 2)
    >>> tracker.length_hint
    10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TimestepView", "timestep_view", "timestep_value", "StepTracker"]


@dataclass(frozen=True)
class TimestepView:
    """Where a timestep sits in its scheduler's timestep array."""

    storage: int
    index: int
    length: int


def timestep_view(timestep: Any) -> TimestepView | None:
    """The view position of a broadcast single timestep into a longer 1-d array, if any."""
    if not isinstance(timestep, torch.Tensor) or timestep.numel() == 0:
        return None
    if timestep.numel() > 1 and any(stride != 0 for stride in timestep.stride()):
        return None
    storage = timestep.untyped_storage()
    length = storage.nbytes() // timestep.element_size()
    if length < 2:
        return None
    return TimestepView(storage.data_ptr(), timestep.storage_offset(), length)


def timestep_value(timestep: Any) -> float | None:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    return float(timestep) if isinstance(timestep, (int, float)) else None


@dataclass
class StepTracker:
    """Step counter of one cache context (see the module docstring)."""

    signature: Any = None
    step: int = -1
    length_hint: int | None = None  # steps in this generation, when the array tells
    last_length: int | None = None  # steps the previous generation ran
    _first_view: TimestepView | None = None
    _last_view: TimestepView | None = None
    _first_value: float | None = None
    _last_value: float | None = None
    _direction: int = 0

    def _restarts(self, view: TimestepView | None, value: float | None) -> bool:
        if view is not None or self._last_view is not None:
            last = self._last_view
            return (view is None or last is None or view.storage != last.storage
                    or view.length != last.length or view.index <= last.index)
        if value is None or self._last_value is None:
            return False
        moved = (value > self._last_value) - (value < self._last_value)
        return moved == 0 or (self._direction != 0 and moved != self._direction)

    def advance(self, signature: Any, timestep: Any) -> bool:
        """Count one call; returns True when it starts a new generation."""
        view = timestep_view(timestep)
        value = None if view is not None else timestep_value(timestep)
        restart = self.step < 0 or signature != self.signature or self._restarts(view, value)
        if restart:
            if self.step >= 0:
                self.last_length = self.step + 1
            self.signature, self.step, self._direction = signature, 0, 0
            self._first_view, self._first_value = view, value
            self.length_hint = view.length - view.index if view is not None else None
        elif view is not None:
            self.step = view.index - self._first_view.index
        else:
            self.step += 1
            if self.step == 1 and value is not None:
                self._direction = (value > self._first_value) - (value < self._first_value)
        self._last_view, self._last_value = view, value
        return restart
