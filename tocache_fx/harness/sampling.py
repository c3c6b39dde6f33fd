"""DDIM sampling with classifier-free guidance for the shipped digits DiT.

The sampler calls the transformer exactly once per denoising step, on the batch
``cat([uncond, cond])``, so a caching wrapper sees one forward per step with a
fixed ``2B`` batch. Example::

    >>> import torch
    >>> from tocache_fx.harness.sampling import load_dit_digits, sample_digits
    >>> model = load_dit_digits()
    >>> images = sample_digits(model, torch.arange(10), num_steps=50, seed=0)
    >>> images.shape
    torch.Size([10, 1, 32, 32])
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, FluxTransformer2DModel

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "dit-digits"
NOISE_SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      prediction_type="epsilon", clip_sample=False)
"""The DiT noise schedule the digits model was trained with (linear betas, epsilon)."""
NULL_LABEL = 10
"""Class index of the unconditional ("dropped label") embedding of the digits DiT."""

DiTCallable = Callable[..., tuple[torch.Tensor, ...]]
"""Anything called like ``DiTTransformer2DModel(x, timestep=t, class_labels=y, return_dict=False)``."""


def load_dit_digits(device: torch.device | str = "cpu") -> DiTTransformer2DModel:
    """Load the shipped class-conditional digits DiT (EMA weights) in eval mode.

    >>> model = load_dit_digits()
    >>> model.config.num_embeds_ada_norm
    10
    """
    return DiTTransformer2DModel.from_pretrained(MODEL_DIR, low_cpu_mem_usage=False).to(device).eval()


def ddim_scheduler(num_train_timesteps: int = 1000) -> DDIMScheduler:
    """A DDIM scheduler matching the training DDPM one (linear betas 1e-4..0.02, epsilon).

    >>> ddim_scheduler().config.beta_schedule
    'linear'
    """
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, **NOISE_SCHEDULE)


@torch.no_grad()
def sample_digits(
    transformer: DiTCallable,
    labels: torch.Tensor,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    seed: int = 0,
    generator: torch.Generator | None = None,
    sample_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Generate digits of the given classes with deterministic DDIM (eta = 0).

    Args:
        transformer: the DiT, or any callable with its call signature (e.g. a cached one).
        labels: ``[B]`` integer class labels in 0..9.
        num_steps: DDIM steps; the transformer is called once per step.
        guidance_scale: classifier-free guidance scale ``s``; the prediction is
            ``eps_uncond + s * (eps_cond - eps_uncond)``, so ``s = 1`` is unguided.
        seed: seeds a CPU generator for the initial noise (ignored if ``generator`` is given),
            so equal seeds give identical starting noise on any device.
        generator: a CPU ``torch.Generator`` to draw the initial noise from.
        sample_size: image side in pixels.
        device: where the latents and the transformer run.

    Returns:
        ``[B, 1, sample_size, sample_size]`` float32 images clamped to [-1, 1].

    >>> images = sample_digits(load_dit_digits(), torch.tensor([3, 7]), num_steps=20, seed=1)
    >>> images.shape, bool(images.abs().max() <= 1)
    (torch.Size([2, 1, 32, 32]), True)
    """
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed)
    labels = labels.to(device=device, dtype=torch.long)
    batch = labels.shape[0]
    scheduler = ddim_scheduler()
    scheduler.set_timesteps(num_steps)

    shape = (batch, 1, sample_size, sample_size)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    class_labels = torch.cat([torch.full_like(labels, NULL_LABEL), labels])
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents])
        timestep = torch.full((2 * batch,), int(t), device=device, dtype=torch.long)
        eps = transformer(model_input, timestep=timestep, class_labels=class_labels, return_dict=False)[0]
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------
# The tiny FLUX-style digits model (``tocache_fx/models/flux-digits``): rectified flow,
# 32x32x1 images packed 2x2 into 256 tokens of 4 channels, fixed per-class "prompts".
# --------------------------------------------------------------------------------------

FLUX_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "flux-digits"
FLUX_PROMPTS_FILE = "prompts.safetensors"
FLUX_TEXT_TOKENS = 8
"""Length of the fixed per-class ``encoder_hidden_states`` sequence."""
FLUX_SHIFT = 1.0
"""``FlowMatchEulerDiscreteScheduler`` shift used for sampling the flux digits model."""
FLUX_GUIDANCE_SCALE = 2.0
"""Default classifier-free guidance scale of :func:`sample_flux_digits` (best judge accuracy/FD
of 1.5, 2, 3 and 5 in a 100-sample probe: see the flux-digits model card)."""


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]`` tokens, as FluxPipeline packs latents.

    >>> pack_latents(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 256, 4])
    """
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int = 32, width: int = 32) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (H/2)(W/2), 4C]`` -> ``[B, C, H, W]``.

    >>> x = torch.randn(2, 1, 32, 32)
    >>> bool((unpack_latents(pack_latents(x)) == x).all())
    True
    """
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def flux_image_ids(height: int = 32, width: int = 32) -> torch.Tensor:
    """``[(H/2)(W/2), 3]`` position ids ``(0, row, col)`` of the packed image tokens.

    >>> flux_image_ids()[17].tolist()
    [0.0, 1.0, 1.0]
    """
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def flux_text_ids(num_tokens: int = FLUX_TEXT_TOKENS) -> torch.Tensor:
    """``[num_tokens, 3]`` zero position ids of the prompt tokens, as FluxPipeline uses."""
    return torch.zeros(num_tokens, 3)


FluxCallable = Callable[..., tuple[torch.Tensor, ...]]
"""Anything called like ``FluxTransformer2DModel(hidden_states=..., encoder_hidden_states=...,
pooled_projections=..., timestep=..., img_ids=..., txt_ids=..., return_dict=False)``."""


def load_flux_digits(device: torch.device | str = "cpu") -> FluxTransformer2DModel:
    """Load the shipped tiny FLUX-style digits transformer (EMA weights) in eval mode.

    >>> model = load_flux_digits()
    >>> model.config.in_channels, model.config.num_layers, model.config.num_single_layers
    (4, 2, 4)
    """
    return FluxTransformer2DModel.from_pretrained(FLUX_MODEL_DIR, low_cpu_mem_usage=False).to(device).eval()


def flux_prompts(
    labels: torch.Tensor, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed class "prompts" of the flux digits model for ``labels`` (0..9, 10 = null).

    Returns ``(encoder_hidden_states [B, 8, 64], pooled_projections [B, 64])``, read
    from ``prompts.safetensors`` next to the weights.

    >>> ehs, pooled = flux_prompts(torch.tensor([3, 10]))
    >>> tuple(ehs.shape), tuple(pooled.shape)
    ((2, 8, 64), (2, 64))
    """
    from safetensors.torch import load_file

    prompts = load_file(str(FLUX_MODEL_DIR / FLUX_PROMPTS_FILE))
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    return (
        prompts["encoder_hidden_states"][labels].to(device),
        prompts["pooled_projections"][labels].to(device),
    )


@torch.no_grad()
def sample_flux_digits(
    transformer: FluxCallable,
    labels: torch.Tensor,
    num_steps: int = 28,
    guidance_scale: float = FLUX_GUIDANCE_SCALE,
    seed: int = 0,
    generator: torch.Generator | None = None,
    sample_size: int = 32,
    device: torch.device | str = "cpu",
    shift: float = FLUX_SHIFT,
) -> torch.Tensor:
    """Generate digits with the flux digits model: Euler on the rectified flow, with CFG.

    ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)`` gives
    sigmas from 1 down to 0; each step calls the transformer exactly once, on the
    batch ``cat([uncond, cond])`` (null-class prompt first) with ``timestep`` the
    scheduler's timestep / 1000 (= sigma) expanded to ``2B``, as FluxPipeline does.

    Args:
        transformer: the ``FluxTransformer2DModel``, or any callable with its keyword
            call signature (e.g. a cached one).
        labels: ``[B]`` integer class labels in 0..9.
        num_steps: Euler steps; the transformer is called once per step.
        guidance_scale: ``v = v_uncond + s * (v_cond - v_uncond)``; ``s = 1`` is unguided.
        seed: seeds a CPU generator for the initial noise (ignored if ``generator`` is given).
        generator: a CPU ``torch.Generator`` to draw the initial noise from.
        sample_size: image side in pixels.
        device: where the latents and the transformer run.
        shift: the scheduler's timestep shift.

    Returns:
        ``[B, 1, sample_size, sample_size]`` float32 images clamped to [-1, 1].

    >>> images = sample_flux_digits(load_flux_digits(), torch.tensor([3, 7]), num_steps=4)
    >>> images.shape, bool(images.abs().max() <= 1)
    (torch.Size([2, 1, 32, 32]), True)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed)
    labels = torch.as_tensor(labels, dtype=torch.long)
    batch = labels.shape[0]
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps, device=device)

    noise = torch.randn((batch, 1, sample_size, sample_size), generator=generator, dtype=torch.float32)
    latents = pack_latents(noise).to(device)
    encoder_hidden_states, pooled_projections = flux_prompts(
        torch.cat([torch.full_like(labels.cpu(), NULL_LABEL), labels.cpu()]), device=device
    )
    img_ids = flux_image_ids(sample_size, sample_size).to(device)
    txt_ids = flux_text_ids(encoder_hidden_states.shape[1]).to(device)
    for t in scheduler.timesteps:
        v = transformer(
            hidden_states=torch.cat([latents, latents]),
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=(t / 1000).expand(2 * batch),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
        latents = scheduler.step(v, t, latents).prev_sample
    return unpack_latents(latents, sample_size, sample_size).clamp(-1.0, 1.0)
