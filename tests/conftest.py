"""Tiny random diffusers models built in code, and a minimal denoising loop."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel


def make_dit(num_layers: int = 3, sample_size: int = 8) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=sample_size, patch_size=2,
        num_embeds_ada_norm=1000).eval()


def make_pixart(num_layers: int = 3) -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=8, patch_size=2, cross_attention_dim=32,
        caption_channels=24, norm_type="ada_norm_single",
        use_additional_conditions=False).eval()


def dit_inputs(latents: torch.Tensor, timestep: int) -> dict:
    batch = latents.shape[0]
    return {"hidden_states": latents, "timestep": torch.full((batch,), timestep),
            "class_labels": torch.arange(batch) % 10}


def pixart_inputs(latents: torch.Tensor, timestep: int) -> dict:
    batch = latents.shape[0]
    text = torch.linspace(-1, 1, batch * 5 * 24).view(batch, 5, 24)
    return {"hidden_states": latents, "timestep": torch.full((batch,), timestep),
            "encoder_hidden_states": text,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def denoise(model: Callable, make_inputs: Callable, steps: int = 10, batch: int = 2,
            size: int = 8, seed: int = 1) -> torch.Tensor:
    """Every step's model output of a toy Euler-like loop, stacked: [steps, B, C, H, W]."""
    latents = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))
    outputs = []
    for i in range(steps):
        out = model(**make_inputs(latents, 999 - i * (999 // steps))).sample
        outputs.append(out)
        latents = latents - 0.05 * out[:, :4]
    return torch.stack(outputs)


@pytest.fixture(scope="session")
def dit() -> DiTTransformer2DModel:
    return make_dit()


@pytest.fixture(scope="session")
def pixart() -> PixArtTransformer2DModel:
    return make_pixart()
