"""DDIM sampling with classifier-free guidance for the shipped digits DiT.

The sampler calls the transformer exactly once per denoising step, on the batch
``cat([uncond, cond])``, so a caching wrapper sees one forward per step with a
fixed ``2B`` batch. Example::

    >>> import torch
    >>> from tocache_fx.sampling import load_dit_digits, sample_digits
    >>> model = load_dit_digits()
    >>> images = sample_digits(model, torch.arange(10), num_steps=50, seed=0)
    >>> images.shape
    torch.Size([10, 1, 32, 32])
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

MODEL_DIR = Path(__file__).resolve().parent / "models" / "dit-digits"
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
