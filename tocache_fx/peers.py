"""diffusers' own caches (`diffusers.hooks`) set up on a DiT, as benchmark baselines.

Each peer is applied to its own copy of the model (hooks patch modules in place) and
called through `HookedDenoiser`, which gives the hooks what diffusers pipelines give
them: the current timestep for PAB/FasterCache and a cache context for the hooks that
keep state per CFG branch (one context: CFG is batched in one call). Their decisions
run in eager Python, so they are measured uncompiled.

Example:
    >>> denoiser = build_peer("PAB", load_dit_digits, num_steps=50)   # doctest: +SKIP
    >>> images = sample_digits(denoiser, labels)
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable
from typing import Any

import torch
from diffusers import hooks
from diffusers.hooks.hooks import CacheContext, _set_cache_context

__all__ = ["PEERS", "HookedDenoiser", "build_peer"]

_BLOCKS = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


class HookedDenoiser(torch.nn.Module):
    """Calls a hooked model inside a cache context and records the current timestep."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.timestep = 1000

    def current_timestep(self) -> int:
        return self.timestep

    def reset(self) -> None:
        """Clear the hooks' state before a new generation (pipelines do this per call)."""
        hooks.HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(
            recurse=True)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        self.timestep = int(timestep.reshape(-1)[0])
        _set_cache_context(self.model, CacheContext("cond"))
        try:
            return self.model(hidden_states, timestep=timestep, **kwargs)
        finally:
            _set_cache_context(self.model, None)


def _pab(denoiser: HookedDenoiser, num_steps: int) -> None:
    hooks.apply_pyramid_attention_broadcast(denoiser.model, hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=denoiser.current_timestep))


def _faster_cache(denoiser: HookedDenoiser, num_steps: int) -> None:
    hooks.apply_faster_cache(denoiser.model, hooks.FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=denoiser.current_timestep,
        attention_weight_callback=lambda _: 0.5, is_guidance_distilled=False))


def _first_block(denoiser: HookedDenoiser, num_steps: int) -> None:
    hooks.apply_first_block_cache(denoiser.model, hooks.FirstBlockCacheConfig(threshold=0.1))


def _taylorseer(denoiser: HookedDenoiser, num_steps: int) -> None:
    hooks.apply_taylorseer_cache(denoiser.model, hooks.TaylorSeerCacheConfig(
        cache_interval=3, max_order=1, disable_cache_before_step=3, cache_identifiers=_BLOCKS))


def _mag_cache(denoiser: HookedDenoiser, num_steps: int, calibrate: Callable | None = None) -> None:
    """MagCache needs per-model magnitude ratios: one calibration generation first."""
    hooks.apply_mag_cache(denoiser.model, hooks.MagCacheConfig(
        calibrate=True, num_inference_steps=num_steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        calibrate(denoiser)
    ratios = ast.literal_eval(printed.getvalue().strip().splitlines()[-1])
    for module in denoiser.model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for name in list(registry.hooks):
                if "mag" in name:
                    registry.remove_hook(name, recurse=False)
    hooks.apply_mag_cache(denoiser.model, hooks.MagCacheConfig(
        threshold=0.06, num_inference_steps=num_steps, mag_ratios=ratios))


PEERS: dict[str, Callable] = {
    "diffusers PAB": _pab,
    "diffusers FasterCache": _faster_cache,
    "diffusers FirstBlockCache": _first_block,
    "diffusers TaylorSeer": _taylorseer,
    "diffusers MagCache": _mag_cache,
}


def build_peer(name: str, load_model: Callable[[], torch.nn.Module], num_steps: int,
               calibrate: Callable[[torch.nn.Module], Any] | None = None) -> HookedDenoiser:
    """A fresh model with peer `name` applied; `calibrate` runs one generation (MagCache)."""
    denoiser = HookedDenoiser(load_model())
    setup = PEERS[name]
    if setup is _mag_cache:
        setup(denoiser, num_steps, calibrate)
    else:
        setup(denoiser, num_steps)
    return denoiser
