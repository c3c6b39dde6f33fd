"""Other projects' caches set up on a DiT or a FLUX transformer, as benchmark baselines.

Peers: diffusers' own caches (`diffusers.hooks`: PAB, FasterCache, FirstBlockCache,
TaylorSeer, MagCache) and, on FLUX, cache-dit's DBCache with and without its TaylorSeer
calibrator (PyPI `cache-dit`, optional: installed with `--no-deps` so it cannot pull a
torch; without it those peers raise `ImportError` when built).

Each peer is applied to its own copy of the model (hooks patch modules in place) and
called through a wrapper that takes the transformer's own arguments, has `reset()` to
start a new generation, and gives the caches what a diffusers pipeline gives them: the
current timestep for PAB/FasterCache (on the 0..1000 scale: FLUX's 0..1 timestep is
scaled by 1000, as FluxPipeline does) and a cache context for the hooks that keep state
per CFG branch (one context: CFG is batched in one call, ``cat([uncond, cond])``).
Their decisions run in eager Python, so they are measured uncompiled.

`build_peer` picks the setup by the model's class: `PEERS` for the DiT, `FLUX_PEERS`
for `FluxTransformer2DModel`; `flux_peers` builds every FLUX peer at once.

Example:
    >>> denoiser = build_peer("diffusers PAB", load_dit_digits, num_steps=50)  # doctest: +SKIP
    >>> images = sample_digits(denoiser, labels)
    >>> for name, peer in flux_peers(transformer, num_steps=28):              # doctest: +SKIP
    ...     peer.reset(); noise_pred = peer(hidden_states=x, timestep=t, ...)[0]
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import hooks
from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context
from diffusers.models.modeling_outputs import Transformer2DModelOutput

__all__ = ["PEERS", "FLUX_PEERS", "HookedDenoiser", "CacheDiTDenoiser", "build_peer",
           "flux_peers", "is_flux", "peers_for"]

_BLOCKS = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]

# FLUX's residual branches for TaylorSeer: the double blocks' attention (image and text
# streams in one module) and MLPs are forecast; in a single block attention and MLP feed
# one `proj_out`, so `proj_out` is forecast and its inputs skipped (zeros of the shape
# recorded at the last full step) instead of computed and thrown away.
_FLUX_TAYLOR_CACHE = [r"transformer_blocks\.\d+\.(attn|ff|ff_context)",
                      r"single_transformer_blocks\.\d+\.proj_out"]
_FLUX_TAYLOR_SKIP = [r"single_transformer_blocks\.\d+\.(attn|proj_mlp)"]


def is_flux(model: torch.nn.Module) -> bool:
    """Whether `model` is a diffusers `FluxTransformer2DModel` (the FLUX peer setups apply)."""
    from diffusers import FluxTransformer2DModel

    return isinstance(model, FluxTransformer2DModel)


class HookedDenoiser(torch.nn.Module):
    """Calls a hooked model inside a cache context and records the current timestep.

    `timestep_scale` maps the model's timestep to the 0..1000 scale the hooks' timestep
    ranges use (1000 for FLUX, whose timestep is in 0..1).
    """

    def __init__(self, model: torch.nn.Module, timestep_scale: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.timestep_scale = timestep_scale
        self.timestep = 1000

    def current_timestep(self) -> float:
        return self.timestep

    def reset(self) -> None:
        """Clear the hooks' state before a new generation (pipelines do this per call)."""
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        step = timestep.reshape(-1)[0]
        self.timestep = (int(step) if self.timestep_scale == 1.0
                         else float(step) * self.timestep_scale)
        _set_cache_context(self.model, CacheContext("cond"))
        try:
            return self._call(hidden_states, timestep, **kwargs)
        finally:
            _set_cache_context(self.model, None)

    def _call(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(hidden_states, timestep=timestep, **kwargs)


# ---------------------------------------------------------------- diffusers hooks ----

def _pab(denoiser: HookedDenoiser, num_steps: int, block_skip_range: int = 2) -> None:
    hooks.apply_pyramid_attention_broadcast(denoiser.model, hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=block_skip_range,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=denoiser.current_timestep))


def _faster_cache_config(denoiser: HookedDenoiser, **options: Any) -> hooks.FasterCacheConfig:
    return hooks.FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=denoiser.current_timestep,
        attention_weight_callback=lambda _: 0.5, is_guidance_distilled=False, **options)


def _faster_cache(denoiser: HookedDenoiser, num_steps: int) -> None:
    # FasterCache defaults to video (tensor_format BCFHW: on this image DiT it raised in
    # `permute`, "input.dim() = 4 is not equal to len(dims) = 5") and splits the CFG batch
    # only in the keywords it names, which lack the DiT's `class_labels`.
    hooks.apply_faster_cache(denoiser.model, _faster_cache_config(
        denoiser, tensor_format="BCHW",
        _unconditional_conditional_input_kwargs_identifiers=(
            "hidden_states", "timestep", "class_labels")))


def _first_block(denoiser: HookedDenoiser, num_steps: int, threshold: float = 0.1) -> None:
    hooks.apply_first_block_cache(denoiser.model, hooks.FirstBlockCacheConfig(threshold=threshold))


def _taylorseer(denoiser: HookedDenoiser, num_steps: int, cache_interval: int = 3) -> None:
    hooks.apply_taylorseer_cache(denoiser.model, hooks.TaylorSeerCacheConfig(
        cache_interval=cache_interval, max_order=1, disable_cache_before_step=3,
        cache_identifiers=_BLOCKS))


def _mag_cache(denoiser: HookedDenoiser, num_steps: int, calibrate: Callable | None = None,
               threshold: float = 0.06) -> None:
    """MagCache needs per-model magnitude ratios: one calibration generation first."""
    if calibrate is None:
        raise ValueError("MagCache needs `calibrate`: a function that runs one generation")
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
        threshold=threshold, num_inference_steps=num_steps, mag_ratios=ratios))


def _flux_taylorseer(denoiser: HookedDenoiser, num_steps: int, cache_interval: int = 3) -> None:
    hooks.apply_taylorseer_cache(denoiser.model, hooks.TaylorSeerCacheConfig(
        cache_interval=cache_interval, max_order=1, disable_cache_before_step=3,
        cache_identifiers=_FLUX_TAYLOR_CACHE, skip_predict_identifiers=_FLUX_TAYLOR_SKIP))


class _ImageGrid(torch.nn.Module):
    """A FLUX transformer whose output is laid out as ``[B, C, H, W]`` (H, W from img_ids).

    FasterCache estimates the unconditional output from the conditional one in the
    frequency domain of the last two axes: on FLUX's packed ``[B, tokens, C]`` output
    those are tokens x channels, so its denoiser hook is moved onto this module.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor, img_ids: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        kwargs["return_dict"] = False
        tokens = self.model(hidden_states=hidden_states, img_ids=img_ids, **kwargs)[0]
        ids = img_ids.reshape(-1, 3)
        height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


class _FluxFasterCacheDenoiser(HookedDenoiser):
    """FasterCache on FLUX: attention hooks on the transformer, its CFG hook on `_ImageGrid`."""

    def _call(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        grid = self.model(hidden_states=hidden_states, timestep=timestep, **kwargs)
        tokens = grid.flatten(2).transpose(1, 2)
        return Transformer2DModelOutput(sample=tokens) if return_dict else (tokens,)


def _flux_faster_cache(denoiser: HookedDenoiser, num_steps: int) -> None:
    # The CFG batch is split by keyword: FLUX's pooled text embedding and guidance are
    # batched too, so they are named besides diffusers' default keys.
    names = ("hidden_states", "encoder_hidden_states", "timestep", "pooled_projections",
             "guidance", "attention_mask", "encoder_attention_mask")
    flux = denoiser.model.model
    hooks.apply_faster_cache(flux, _faster_cache_config(
        denoiser, tensor_format="BCHW", _unconditional_conditional_input_kwargs_identifiers=names))
    registry = HookRegistry.check_if_exists_or_initialize(flux)
    hook = registry.get_hook("faster_cache_denoiser")
    registry.remove_hook("faster_cache_denoiser", recurse=False)
    HookRegistry.check_if_exists_or_initialize(denoiser.model).register_hook(
        hook, "faster_cache_denoiser")


# ----------------------------------------------------------------------- cache-dit ----

class CacheDiTDenoiser(torch.nn.Module):
    """A transformer with cache-dit's hooks, driven without a pipeline.

    `cache_dit.enable_cache(transformer, ...)` on a bare transformer wraps it in cache-dit's
    `FakeDiffusionPipeline` with its registered block adapter (FLUX: both block lists
    fused into one Pattern_1 list by `FluxPatchFunctor`) and a persistent cache context.
    That context only restarts itself one call after `num_inference_steps`, so `reset()`
    rebuilds it from the configs (`cache_dit.refresh_context`) before every generation.
    """

    def __init__(self, model: torch.nn.Module, cache_config: Any,
                 calibrator_config: Any = None) -> None:
        super().__init__()
        import cache_dit

        self.model = model
        self.cache_config = cache_config
        self.calibrator_config = calibrator_config
        with _quiet_cache_dit():
            cache_dit.enable_cache(model, cache_config=copy.deepcopy(cache_config),
                                   calibrator_config=copy.deepcopy(calibrator_config))

    def reset(self) -> None:
        import cache_dit

        with _quiet_cache_dit():
            cache_dit.refresh_context(self.model, cache_config=copy.deepcopy(self.cache_config),
                                      calibrator_config=copy.deepcopy(self.calibrator_config))

    def cached_steps(self) -> list[int]:
        """Steps of the current generation whose blocks after the first Fn came from the cache."""
        manager = self.model._context_manager
        return sorted({step for name in self.model._context_names
                       for step in manager.get_context(name).get_cached_steps()})

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(hidden_states=hidden_states, **kwargs)


@contextlib.contextmanager
def _quiet_cache_dit():
    """cache-dit logs its adapter matching at INFO on loggers that do not propagate."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("cache_dit")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _dbcache_config(num_steps: int, threshold: float, warmup: int | None) -> Any:
    from cache_dit import DBCacheConfig

    # F1B0: the first fused block decides, the rest come from the cache; cache-dit's
    # FLUX default F8B0 would leave nothing to cache on a model with fewer blocks.
    # Warm-up: its default 8 of FLUX.1's 28 steps, scaled to this generation's length.
    return DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                         residual_diff_threshold=threshold,
                         max_warmup_steps=warmup if warmup is not None
                         else max(1, round(num_steps * 8 / 28)),
                         num_inference_steps=num_steps)


def _dbcache(model: torch.nn.Module, num_steps: int, threshold: float = 0.08,
             warmup: int | None = None) -> CacheDiTDenoiser:
    return CacheDiTDenoiser(model, _dbcache_config(num_steps, threshold, warmup))


def _dbcache_taylorseer(model: torch.nn.Module, num_steps: int, threshold: float = 0.12,
                        warmup: int | None = None) -> CacheDiTDenoiser:
    from cache_dit import TaylorSeerCalibratorConfig

    # cache-dit's recommended pairing: TaylorSeer forecasts the cached residual, which
    # allows a higher threshold than plain DBCache.
    return CacheDiTDenoiser(model, _dbcache_config(num_steps, threshold, warmup),
                            TaylorSeerCalibratorConfig(taylorseer_order=1))


# ---------------------------------------------------------------------- registries ----

PEERS: dict[str, Callable] = {
    "diffusers PAB": _pab,
    "diffusers FasterCache": _faster_cache,
    "diffusers FirstBlockCache": _first_block,
    "diffusers TaylorSeer": _taylorseer,
    "diffusers MagCache": _mag_cache,
}
"""Peers of the DiT: name -> setup(denoiser, num_steps, **options) on a `HookedDenoiser`."""

FLUX_PEERS: dict[str, Callable] = {
    "diffusers PAB": _pab,
    "diffusers FasterCache": _flux_faster_cache,
    "diffusers FirstBlockCache": _first_block,
    "diffusers TaylorSeer": _flux_taylorseer,
    "diffusers MagCache": _mag_cache,
    "cache-dit DBCache": _dbcache,
    "cache-dit DBCache+TaylorSeer": _dbcache_taylorseer,
}
"""Peers of `FluxTransformer2DModel`; the cache-dit setups return their own wrapper."""

_OWN_WRAPPER = {_dbcache, _dbcache_taylorseer}


def peers_for(model: torch.nn.Module) -> dict[str, Callable]:
    """The peer registry that applies to `model`: `FLUX_PEERS` or `PEERS`."""
    return FLUX_PEERS if is_flux(model) else PEERS


def build_peer(name: str, load_model: Callable[[], torch.nn.Module], num_steps: int,
               calibrate: Callable[[torch.nn.Module], Any] | None = None,
               **options: Any) -> torch.nn.Module:
    """A fresh model from `load_model()` with peer `name` applied, as a resettable wrapper.

    `calibrate(wrapper)` runs one generation (MagCache only). `options` go to the setup
    (e.g. `threshold=` for FirstBlockCache, MagCache and the cache-dit peers).
    """
    model = load_model()
    setup = peers_for(model)[name]
    if setup in _OWN_WRAPPER:
        return setup(model, num_steps, **options)
    flux = is_flux(model)
    if setup is _flux_faster_cache:
        denoiser = _FluxFasterCacheDenoiser(_ImageGrid(model), timestep_scale=1000.0)
    else:
        denoiser = HookedDenoiser(model, timestep_scale=1000.0 if flux else 1.0)
    if setup is _mag_cache:
        setup(denoiser, num_steps, calibrate, **options)
    else:
        setup(denoiser, num_steps, **options)
    return denoiser


def flux_peers(transformer: torch.nn.Module, num_steps: int,
               calibrate: Callable[[torch.nn.Module], Any] | None = None,
               names: list[str] | None = None,
               on_error: Callable[[str, Exception], None] | None = None,
               ) -> list[tuple[str, torch.nn.Module]]:
    """Every FLUX peer (or those in `names`) on its own deep copy of `transformer`.

    Returns ``[(name, wrapper)]`` in `FLUX_PEERS` order; each wrapper is called like the
    transformer and has `reset()`. A peer whose setup raises (e.g. cache-dit not
    installed) is passed to `on_error(name, error)` and left out, or re-raised if
    `on_error` is None. Some fail only when first called: run one generation to know.
    """
    built = []
    for name in names or list(FLUX_PEERS):
        try:
            built.append((name, build_peer(name, lambda: copy.deepcopy(transformer), num_steps,
                                           calibrate=calibrate)))
        except Exception as error:
            if on_error is None:
                raise
            on_error(name, error)
    return built
