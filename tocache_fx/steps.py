"""Which denoising step a call is, and how long its generation is.

Sources, most reliable first (`Observation` carries what a call tells):

* The pipeline says: diffusers' `cache_context(name, step_index=..., num_inference_steps=...)`
  (Wan, LTX), or a pipeline bound by `tocache_fx.transform(pipe, ...)`, whose
  `scheduler.set_timesteps` marks a new generation and whose timestep array gives its
  length; the step is then the number of calls since, in this cache context.
* Metadata, free on every device: most pipelines pass `t` (or `t.expand(batch)`), a
  view into the scheduler's timestep array; its storage offset is the step's index
  and the array's length the generation's length.
* The value, for any other timestep (a fresh tensor, a Python number), without a
  length: the generation restarts when the value moves against the direction of its
  first two steps, or repeats exactly in a dtype where distinct steps cannot collide
  (a repeat in bfloat16 / float16 is taken as the next step: a 100-step schedule has
  neighbouring steps that round to one bfloat16 value).

No source ever depends on an earlier generation: a generation whose length nobody
tells is planned for the same default every time.

Example:
    >>> tracker = StepTracker()
    >>> timesteps = torch.arange(999, 0, -100)
    >>> [tracker.advance("sig", observe(t.expand(2))) for t in timesteps[:3]], tracker.step
    ([True, False, False], 2)
    >>> tracker.length
    10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import CacheStateError

__all__ = ["TimestepView", "Observation", "observe", "StepTracker"]

_COLLIDING = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TimestepView:
    """Where a timestep sits in its scheduler's timestep array."""

    storage: int
    index: int
    length: int


@dataclass(frozen=True)
class Observation:
    """What one call tells about its place in a generation."""

    step_index: int | None = None  # stated by the pipeline
    length: int | None = None  # stated by the pipeline
    generation: int | None = None  # a bound pipeline's count of `set_timesteps` calls
    view: TimestepView | None = None
    value: float | None = None
    exact: bool = True  # distinct steps cannot share `value`
    scheduler_step: int | None = None  # a bound pipeline's scheduler position, to check


def _view(timestep: Any) -> TimestepView | None:
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


def observe(timestep: Any, step_index: int | None = None, length: int | None = None,
            generation: int | None = None, scheduler_step: int | None = None) -> Observation:
    """What a call with this `timestep` (and what the pipeline stated) tells. The value
    of a timestep tensor (a device-to-host copy on an accelerator) is read only when
    nothing else tells the step."""
    view = _view(timestep)
    value, exact = None, True
    if view is None and step_index is None and generation is None:
        if isinstance(timestep, torch.Tensor) and timestep.numel():
            value, exact = float(timestep.reshape(-1)[0]), timestep.dtype not in _COLLIDING
        elif isinstance(timestep, (int, float)):
            value = float(timestep)
    return Observation(step_index, length, generation, view, value, exact, scheduler_step)


@dataclass
class StepTracker:
    """Step counter of one cache context (see the module docstring)."""

    signature: Any = None
    step: int = -1
    length: int | None = None  # steps in this generation, when a source tells
    _generation: int | None = None
    _first_view: TimestepView | None = None
    _last: Observation | None = None
    _direction: int = 0
    _scheduler_offset: int | None = None

    def _restarts(self, obs: Observation) -> bool:
        last = self._last
        if obs.step_index is not None:
            return last.step_index is None or obs.step_index <= last.step_index
        if obs.generation is not None:
            return obs.generation != self._generation
        if obs.view is not None or last.view is not None:
            view, previous = obs.view, last.view
            return (view is None or previous is None or view.storage != previous.storage
                    or view.length != previous.length or view.index <= previous.index)
        if obs.value is None or last.value is None:
            return False
        moved = (obs.value > last.value) - (obs.value < last.value)
        if moved == 0:
            return obs.exact
        return self._direction != 0 and moved != self._direction

    def advance(self, signature: Any, obs: Observation) -> bool:
        """Count one call; returns True when it starts a new generation."""
        restart = self.step < 0 or signature != self.signature or self._restarts(obs)
        if restart:
            self.signature, self._direction, self._generation = signature, 0, obs.generation
            self._first_view = obs.view
            self.step = obs.step_index if obs.step_index is not None else 0
            if obs.step_index is None and obs.view is not None:
                self.length = obs.view.length - obs.view.index
            else:
                self.length = obs.length
        elif obs.step_index is not None:
            self.step = obs.step_index
            self.length = obs.length or self.length
        elif obs.view is not None and obs.generation is None:
            self.step = obs.view.index - self._first_view.index
        else:
            self.step += 1
            if self.step == 1 and obs.value is not None and self._last.value is not None:
                self._direction = (obs.value > self._last.value) - (obs.value < self._last.value)
        if restart:
            self._scheduler_offset = None
        if obs.scheduler_step is not None:
            offset = obs.scheduler_step - self.step
            if self._scheduler_offset is None:
                self._scheduler_offset = offset
            elif offset != self._scheduler_offset:
                raise CacheStateError(
                    f"call {self.step} of this generation came at scheduler step "
                    f"{obs.scheduler_step}: the pipeline calls the transformer more than once "
                    "per step in one cache context. Wrap each call in "
                    "`transformer.cache_context(name)` (diffusers pipelines do)")
        self._last = obs
        return restart
