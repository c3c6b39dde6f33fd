"""The transformed model as `pipe.transformer` in diffusers pipelines (tiny, local)."""

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler,
                       PixArtAlphaPipeline)

from conftest import make_dit, make_pixart
import tocache_fx
from tocache_fx import NoCache, ToCa


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4).eval()


def run_dit(pipe, steps=6):
    return pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def dit_pipe():
    return DiTPipeline(transformer=make_dit(), vae=tiny_vae(), scheduler=DDIMScheduler())


def test_dit_pipeline_no_cache_equals_original(dit_pipe):
    original = dit_pipe.transformer
    reference = run_dit(dit_pipe)
    dit_pipe.transformer = tocache_fx.transform(original, NoCache(), compile=False)
    try:
        assert (run_dit(dit_pipe) == reference).all()
        dit_pipe.transformer = tocache_fx.transform(original, ToCa(), compile=False)
        images = run_dit(dit_pipe)
        assert images.shape == reference.shape and not (images == reference).all()
        # the length came from the scheduler's timestep array, not a default
        assert dit_pipe.transformer._generations["default"].num_steps == 6
        # CFG: the batch is [cond; uncond] in one call: 4 rows of 16 tokens
        assert dit_pipe.transformer.last_prepared().batch == 4
    finally:
        dit_pipe.transformer = original


def run_pixart(pipe, steps=4):
    embeds = torch.linspace(-1, 1, 5 * 24).view(1, 5, 24)
    return pipe(prompt_embeds=embeds, prompt_attention_mask=torch.ones(1, 5), negative_prompt=None,
                negative_prompt_embeds=torch.zeros(1, 5, 24),
                negative_prompt_attention_mask=torch.ones(1, 5), num_inference_steps=steps,
                height=16, width=16, use_resolution_binning=False,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_pixart_pipeline_no_cache_equals_original():
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                               transformer=make_pixart(), scheduler=DPMSolverMultistepScheduler())
    reference = run_pixart(pipe)
    original = pipe.transformer
    pipe.transformer = tocache_fx.transform(original, NoCache(), compile=False)
    assert (run_pixart(pipe) == reference).all()
    pipe.transformer = tocache_fx.transform(original, ToCa.pixart(num_steps=4), compile=False)
    assert run_pixart(pipe).shape == reference.shape
