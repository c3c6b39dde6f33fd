"""What a diffusers pipeline tells its (cached) transformer about the generation.

`tocache_fx.transform(pipe, policy)` binds the pipeline: its scheduler's `set_timesteps`
is wrapped to count generations (every pipeline call sets the timesteps once), so the
transformer knows when a generation starts, how many calls it will make (the timestep
array's length past the scheduler's begin index) and, where the scheduler tracks it,
which step it is at (to catch a pipeline calling twice per step in one cache context).
Whether a batch is classifier-free guidance halves is left to the pipeline too:
`do_classifier_free_guidance`, where the pipeline has it, can rule sharing out.

Example:
    >>> binding = PipelineBinding(pipe)          # doctest: +SKIP
    >>> pipe(prompt_embeds=..., num_inference_steps=28)
    >>> binding.generation, binding.length()
    (1, 28)
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

__all__ = ["PipelineBinding", "is_pipeline"]


def is_pipeline(obj: Any) -> bool:
    """A diffusers pipeline: components, a scheduler and a transformer to cache."""
    return hasattr(obj, "components") and hasattr(obj, "scheduler") and \
        getattr(obj, "transformer", None) is not None


class PipelineBinding:
    """Generation count, length and CFG layout read from a bound pipeline."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = weakref.ref(pipe)
        self.generation = 0
        self._scheduler = None
        self._wrap()

    def _wrap(self) -> None:
        """Count `set_timesteps` calls of the pipeline's current scheduler."""
        scheduler = self._pipe().scheduler
        if scheduler is self._scheduler:
            return
        original = type(scheduler).set_timesteps.__get__(scheduler)

        @functools.wraps(original)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            self.generation += 1
            return original(*args, **kwargs)

        scheduler.set_timesteps = set_timesteps
        self._scheduler = scheduler

    def unbind(self) -> None:
        if self._scheduler is not None:
            self._scheduler.__dict__.pop("set_timesteps", None)
            self._scheduler = None

    def _begin(self) -> int:
        begin = getattr(self._scheduler, "begin_index", None)
        return begin if isinstance(begin, int) else 0

    def length(self) -> int | None:
        """Calls this generation will make per cache context."""
        self._wrap()
        timesteps = getattr(self._scheduler, "timesteps", None)
        return len(timesteps) - self._begin() if timesteps is not None else None

    def scheduler_step(self) -> int | None:
        """The scheduler's own step position, where it keeps one (None before step 0)."""
        index = getattr(self._scheduler, "step_index", None)
        return index if isinstance(index, int) else None

    def allows_cfg_halves(self) -> bool:
        """False where the pipeline says it runs without classifier-free guidance."""
        return getattr(self._pipe(), "do_classifier_free_guidance", True) is not False
