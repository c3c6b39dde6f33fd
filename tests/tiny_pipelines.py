"""Tiny, random, in-code diffusers pipelines for the test suite.

Each builder makes a pipeline from seeded random components (two builds are identical): a
two-block transformer of width 32 (2 heads x 16), a tiny VAE of the class the pipeline expects,
the scheduler of the released model, and `None` for every tokenizer and text encoder. Each `run`
passes precomputed random prompt embeddings (`TEXT_LEN` = 6 tokens, fixed generators), so
nothing is downloaded. A 2-step run takes 10-40 ms on an idle 2-core CPU (well under a second
under load) and repeats bit for bit, on the same or a rebuilt pipeline.

    from tiny_pipelines import PIPELINES
    case = PIPELINES["flux_true_cfg"]
    pipe = case.build()
    latents = case.run(pipe, steps=2, seed=0)                    # output_type="latent"
    images = case.run(pipe, steps=2, seed=0, output_type="np")   # overrides any call keyword

What each pipeline passes to `pipe.transformer`, recorded with a forward pre-hook
(`with_kwargs=True`) during `case.run(pipe, steps=2, seed=0)`. B is the number of prompts; a
batched CFG call has 2B rows. timestep: its dtype, and "view" if it shares storage with
`scheduler.timesteps` (`t.expand(...)`), "new" if it is a fresh tensor. t: the value passed at
step 0 / step 1. step_index: `scheduler.step_index` during the call at step 0 / step 1 (None until
the first `scheduler.step`; "-": the scheduler has none).

    case                calls/step  cache_context  CFG batch       timestep  t           step_index
    ------------------  ----------  -------------  --------------  --------  ----------  ----------
    flux                1           cond           -               f32 new   1.0/0.6129  None, 1
    flux_true_cfg       2           cond, uncond   -               f32 new   1.0/0.6129  None, 1
    flux_batch2         1           cond           -               f32 new   1.0/0.6129  None, 1
    flux_bf16           1           cond           -               bf16 new  1.0/0.6133  None, 1
    sd3                 1           -              [uncond; cond]  f32 view  1000/8.929  None, 1
    pixart              1           -              [uncond; cond]  i64 view  999/500     None, 1
    pixart_batch2       1           -              [uncond; cond]  i64 view  999/500     None, 1
    dit                 1           -              [cond; uncond]  i64 view  500/0       -, -
    wan                 1           cond           -               i64 view  999/750     None, 1
    wan_cfg             2           cond, uncond   -               i64 view  999/750     None, 1
    sana                1           -              [uncond; cond]  f32 new   999.0/749.0 None, 1
    qwenimage           1           cond           -               f32 new   1.0/0.02    None, 1
    qwenimage_true_cfg  2           cond, uncond   -               f32 new   1.0/0.02    None, 1
    cogview4            2           cond, uncond   -               f32 view  1000/1.0    None, 1

Arguments of the first call, in the order passed (args[0]: hidden_states passed positionally).
Every call also passes `return_dict=False`, except DiT's (it reads `.sample`). The uncond call of
a two-call step has the same arguments with the negative embeddings.

    flux: hidden_states=[1, 16, 16] f32, timestep=[1] f32, guidance=[1] f32,
        pooled_projections=[1, 16] f32, encoder_hidden_states=[1, 6, 32] f32,
        txt_ids=[6, 3] f32, img_ids=[16, 3] f32, joint_attention_kwargs={}
    flux_true_cfg: as flux (uncond call: negative pooled_projections, encoder_hidden_states)
    flux_batch2: as flux with B=2 (txt_ids, img_ids stay [6, 3], [16, 3])
    flux_bf16: as flux, every tensor bf16 except guidance (f32)
    sd3: hidden_states=[2, 4, 8, 8] f32, timestep=[2] f32, encoder_hidden_states=[2, 6, 32] f32,
        pooled_projections=[2, 16] f32, joint_attention_kwargs=None
    pixart: args[0]=[2, 4, 8, 8] f32, encoder_hidden_states=[2, 6, 24] f32,
        encoder_attention_mask=[2, 6] f32, timestep=[2] i64,
        added_cond_kwargs={resolution: None, aspect_ratio: None}
    pixart_batch2: as pixart with 2B=4 rows
    dit: args[0]=[4, 4, 8, 8] f32, timestep=[4] i64, class_labels=[4] i64 ([1, 2, 1000, 1000])
    wan: hidden_states=[1, 4, 2, 8, 8] f32, timestep=[1] i64,
        encoder_hidden_states=[1, 6, 24] f32, attention_kwargs=None
    wan_cfg: as wan
    sana: args[0]=[2, 4, 8, 8] f32, encoder_hidden_states=[2, 6, 24] f32,
        encoder_attention_mask=[2, 6] f32, timestep=[2] f32, attention_kwargs=None
    qwenimage: hidden_states=[1, 16, 16] f32, timestep=[1] f32, guidance=None,
        encoder_hidden_states_mask=None, encoder_hidden_states=[1, 6, 24] f32,
        img_shapes=[[(1, 4, 4)]], attention_kwargs={}
    qwenimage_true_cfg: as qwenimage
    cogview4: hidden_states=[1, 4, 16, 16] f32, encoder_hidden_states=[1, 6, 24] f32,
        timestep=[1] f32, original_size=[1, 2] f32, target_size=[1, 2] f32,
        crop_coords=[1, 2] f32, attention_kwargs=None

`python tests/tiny_pipelines.py` runs every case twice (and once more on a rebuilt pipeline) and
prints the timings and whether the outputs repeat.
"""

from __future__ import annotations

import functools
from dataclasses import replace
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (AutoencoderDC, AutoencoderKL, AutoencoderKLQwenImage, AutoencoderKLWan,
                       CogView4Pipeline, CogView4Transformer2DModel, DDIMScheduler,
                       DiffusionPipeline, DiTPipeline, DiTTransformer2DModel,
                       DPMSolverMultistepScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       PixArtAlphaPipeline, PixArtTransformer2DModel, QwenImagePipeline,
                       QwenImageTransformer2DModel, SanaPipeline, SanaTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, UniPCMultistepScheduler,
                       WanPipeline, WanTransformer3DModel)

Output = torch.Tensor | np.ndarray
RunFn = Callable[..., Output]

TEXT_LEN = 6        # text tokens of every precomputed prompt embedding
WIDTH = 32          # hidden size of every transformer: 2 heads x 16


@dataclass(frozen=True)
class PipelineCase:
    """One way of running one tiny pipeline, and how that pipeline drives its transformer.

    The fields after `run` describe the pipeline's denoising loop (read from its `__call__`
    and checked with a forward pre-hook, see the table above).
    """

    name: str                               # registry key
    pipeline: str                           # the diffusers pipeline class
    build: Callable[[], DiffusionPipeline]  # seeded: two builds are identical
    run: RunFn                              # run(pipe, *, steps, seed, **call_overrides)
    calls_per_step: int                     # transformer calls per denoising step
    cfg_batched: str | None                 # "[uncond; cond]" / "[cond; uncond]" in one call
    cache_context: tuple[str, ...]          # `transformer.cache_context(name)` names, in order
    timestep: str                           # what the pipeline passes as `timestep`
    timestep_dtype: torch.dtype             # dtype of that tensor (float32 runs)
    timestep_is_view: bool                  # it shares storage with `scheduler.timesteps`
    hidden_states_positional: bool          # latents passed as args[0], not a keyword
    has_do_cfg_property: bool               # `pipe.do_classifier_free_guidance` exists
    scheduler_step_index: bool              # the scheduler has `step_index`
    output: str = "latent"                  # the default `output_type` of `run`
    notes: str = ""


# ---------------------------------------------------------------------------- helpers

def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal tensor from its own generator (independent of the global RNG)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _text(batch: int, dim: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Precomputed text-encoder hidden states [batch, TEXT_LEN, dim]; rows differ."""
    return _randn(batch, TEXT_LEN, dim, seed=seed, dtype=dtype)


def _call(pipe: DiffusionPipeline, steps: int, seed: int, defaults: dict[str, Any],
          overrides: dict[str, Any]) -> Output:
    """Calls the pipeline with `defaults` updated by `overrides`; returns the images / latents."""
    kwargs = {**defaults, **overrides}
    out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               return_dict=False, **kwargs)
    return out[0]


def _seeded(build: Callable[[], DiffusionPipeline]) -> Callable[[], DiffusionPipeline]:
    """`build` after `torch.manual_seed(0)`; the caller's global RNG state is left as it was."""
    @functools.wraps(build)
    def seeded() -> DiffusionPipeline:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build()
    return seeded


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Eval mode for every module component, no progress bars."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae_kl(latent_channels: int = 4, **config: Any) -> AutoencoderKL:
    """Two-level AutoencoderKL: spatial factor 2, `latent_channels` latent channels."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         layers_per_block=1, norm_num_groups=4, **config)


# ---------------------------------------------------------------------------- FLUX

@_seeded
def build_flux() -> FluxPipeline:
    """FLUX.1-dev-like (guidance-distilled), 2 double + 2 single blocks; 16 px -> 4x4 tokens."""
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=WIDTH, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = _vae_kl(4, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return _finish(FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                                text_encoder=None, tokenizer=None, text_encoder_2=None,
                                tokenizer_2=None))


def run_flux(pipe: FluxPipeline, *, steps: int, seed: int, batch: int = 1, true_cfg: bool = False,
             **overrides: Any) -> Output:
    """`true_cfg=True`: `true_cfg_scale=4` with negative embeddings (cond + uncond calls)."""
    dtype = pipe.transformer.dtype
    kwargs: dict[str, Any] = dict(
        prompt_embeds=_text(batch, WIDTH, 1, dtype),
        pooled_prompt_embeds=_randn(batch, 16, seed=2, dtype=dtype),
        height=16, width=16, guidance_scale=3.5, output_type="latent")
    if true_cfg:
        kwargs.update(true_cfg_scale=4.0, negative_prompt_embeds=_text(batch, WIDTH, 3, dtype),
                      negative_pooled_prompt_embeds=_randn(batch, 16, seed=4, dtype=dtype))
    return _call(pipe, steps, seed, kwargs, overrides)


def build_flux_bf16() -> FluxPipeline:
    """`build_flux` in bfloat16, like `from_pretrained(..., torch_dtype=torch.bfloat16)`.

    The VAE is cast too: FluxPipeline hands the transformer-dtype latents to the VAE as they are.
    `nn.Module.bfloat16` avoids the warning of diffusers' `to(dtype)`.
    """
    pipe = build_flux()
    pipe.transformer.bfloat16()
    pipe.vae.bfloat16()
    return pipe


# ---------------------------------------------------------------------------- SD3

@_seeded
def build_sd3() -> StableDiffusion3Pipeline:
    """SD3-medium-like: 2 joint blocks; 16 px -> 8x8 latents -> 4x4 patches."""
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=WIDTH, caption_projection_dim=WIDTH,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    vae = _vae_kl(4, scaling_factor=1.5305, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return _finish(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None))


def run_sd3(pipe: StableDiffusion3Pipeline, *, steps: int, seed: int, batch: int = 1,
            **overrides: Any) -> Output:
    """CFG (`guidance_scale=7`, the default) with negative embeddings."""
    dtype = pipe.transformer.dtype
    kwargs: dict[str, Any] = dict(
        prompt_embeds=_text(batch, WIDTH, 1, dtype),
        pooled_prompt_embeds=_randn(batch, 16, seed=2, dtype=dtype),
        negative_prompt_embeds=_text(batch, WIDTH, 3, dtype),
        negative_pooled_prompt_embeds=_randn(batch, 16, seed=4, dtype=dtype),
        height=16, width=16, guidance_scale=7.0, output_type="latent")
    return _call(pipe, steps, seed, kwargs, overrides)


# ---------------------------------------------------------------------------- PixArt-α

@_seeded
def build_pixart() -> PixArtAlphaPipeline:
    """PixArt-α-like: 2 blocks, learned sigma (8 output channels); 16 px -> 4x4 patches."""
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=WIDTH, caption_channels=24,
        norm_type="ada_norm_single", use_additional_conditions=False)
    vae = _vae_kl(4)
    scheduler = DPMSolverMultistepScheduler()
    return _finish(PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                       transformer=transformer, scheduler=scheduler))


def run_pixart(pipe: PixArtAlphaPipeline, *, steps: int, seed: int, batch: int = 1,
               **overrides: Any) -> Output:
    """CFG (`guidance_scale=4.5`, the default); resolution binning off (needs sample_size 32+)."""
    dtype = pipe.transformer.dtype
    kwargs: dict[str, Any] = dict(
        prompt_embeds=_text(batch, 24, 1, dtype),
        prompt_attention_mask=torch.ones(batch, TEXT_LEN), negative_prompt=None,
        negative_prompt_embeds=_text(batch, 24, 3, dtype),
        negative_prompt_attention_mask=torch.ones(batch, TEXT_LEN), height=16, width=16,
        guidance_scale=4.5, use_resolution_binning=False, output_type="latent")
    return _call(pipe, steps, seed, kwargs, overrides)


# ---------------------------------------------------------------------------- DiT

@_seeded
def build_dit() -> DiTPipeline:
    """DiT-XL/2-like (class-conditional, learned sigma): 2 blocks; 8x8 latents -> 4x4 patches."""
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = _vae_kl(4)
    return _finish(DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()))


def run_dit(pipe: DiTPipeline, *, steps: int, seed: int, batch: int = 2,
            **overrides: Any) -> Output:
    """Class labels 1..batch, CFG (`guidance_scale=4`); always decodes (no latent output)."""
    kwargs: dict[str, Any] = dict(class_labels=list(range(1, batch + 1)), guidance_scale=4.0,
                                  output_type="np")
    return _call(pipe, steps, seed, kwargs, overrides)


# ---------------------------------------------------------------------------- Wan

@_seeded
def build_wan() -> WanPipeline:
    """Wan2.1-T2V-like, 2 blocks; VAE factors 4 (space), 2 (time): 3 frames of 32 px -> 2x4x4 tokens.

    The scheduler is the one of the released Wan2.1 checkpoints (UniPC, flow prediction), not
    the `FlowMatchEulerDiscreteScheduler` of the constructor's annotation.
    """
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4, scale_factor_spatial=4, scale_factor_temporal=2)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0, num_train_timesteps=1000)
    return _finish(WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                               transformer=transformer))


def run_wan(pipe: WanPipeline, *, steps: int, seed: int, batch: int = 1, cfg: bool = False,
            **overrides: Any) -> Output:
    """`cfg=True`: `guidance_scale=5` with negative embeddings (cond + uncond calls)."""
    dtype = pipe.transformer.dtype
    kwargs: dict[str, Any] = dict(prompt_embeds=_text(batch, 24, 1, dtype), height=32, width=32,
                                  num_frames=3, guidance_scale=1.0, output_type="latent")
    if cfg:
        kwargs.update(guidance_scale=5.0, negative_prompt_embeds=_text(batch, 24, 3, dtype))
    return _call(pipe, steps, seed, kwargs, overrides)


# ---------------------------------------------------------------------------- Sana

@_seeded
def build_sana() -> SanaPipeline:
    """Sana-like (linear self-attention), 2 blocks, patch 1; DC-AE factor 4: 32 px -> 8x8 tokens."""
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=WIDTH,
        caption_channels=24, mlp_ratio=2.0, sample_size=8, patch_size=1)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
    return _finish(SanaPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                transformer=transformer, scheduler=scheduler))


def run_sana(pipe: SanaPipeline, *, steps: int, seed: int, batch: int = 1,
             **overrides: Any) -> Output:
    """CFG (`guidance_scale=4.5`, the default); resolution binning off; 32 px (multiple of 32)."""
    dtype = pipe.transformer.dtype
    kwargs: dict[str, Any] = dict(
        prompt_embeds=_text(batch, 24, 1, dtype),
        prompt_attention_mask=torch.ones(batch, TEXT_LEN), negative_prompt=None,
        negative_prompt_embeds=_text(batch, 24, 3, dtype),
        negative_prompt_attention_mask=torch.ones(batch, TEXT_LEN), height=32, width=32,
        guidance_scale=4.5, use_resolution_binning=False, output_type="latent")
    return _call(pipe, steps, seed, kwargs, overrides)


# ---------------------------------------------------------------------------- QwenImage

@_seeded
def build_qwenimage() -> QwenImagePipeline:
    """Qwen-Image-like, 2 blocks; VAE factor 4: 32 px -> 8x8 latents -> 4x4 packed tokens."""
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
        time_shift_type="exponential")
    return _finish(QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None,
                                     tokenizer=None, transformer=transformer))


def run_qwenimage(pipe: QwenImagePipeline, *, steps: int, seed: int, batch: int = 1,
                  true_cfg: bool = False, **overrides: Any) -> Output:
    """`true_cfg=True`: `true_cfg_scale=4` with negative embeddings (cond + uncond calls)."""
    dtype = pipe.transformer.dtype
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)  # all ones: the pipeline makes it None
    kwargs: dict[str, Any] = dict(prompt_embeds=_text(batch, 24, 1, dtype),
                                  prompt_embeds_mask=mask, height=32, width=32,
                                  true_cfg_scale=1.0, output_type="latent")
    if true_cfg:
        kwargs.update(true_cfg_scale=4.0, negative_prompt_embeds=_text(batch, 24, 3, dtype),
                      negative_prompt_embeds_mask=mask)
    return _call(pipe, steps, seed, kwargs, overrides)


# ---------------------------------------------------------------------------- CogView4

@_seeded
def build_cogview4() -> CogView4Pipeline:
    """CogView4-like, 2 blocks; VAE factor 2: 32 px (a multiple of 16) -> 8x8 patch tokens."""
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, text_embed_dim=24, time_embed_dim=16, condition_dim=4,
        pos_embed_max_size=16, sample_size=16, rope_axes_dim=(32, 32))
    vae = _vae_kl(4)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
        base_image_seq_len=256, time_shift_type="linear")
    return _finish(CogView4Pipeline(tokenizer=None, text_encoder=None, vae=vae,
                                    transformer=transformer, scheduler=scheduler))


def run_cogview4(pipe: CogView4Pipeline, *, steps: int, seed: int, batch: int = 1,
                 **overrides: Any) -> Output:
    """CFG (`guidance_scale=5`, the default) with negative embeddings (cond + uncond calls)."""
    dtype = pipe.transformer.dtype
    kwargs: dict[str, Any] = dict(prompt_embeds=_text(batch, 24, 1, dtype),
                                  negative_prompt_embeds=_text(batch, 24, 3, dtype), height=32,
                                  width=32, guidance_scale=5.0, output_type="latent")
    return _call(pipe, steps, seed, kwargs, overrides)


# ---------------------------------------------------------------------------- registry

_TWO_CALLS: dict[str, Any] = dict(calls_per_step=2, cache_context=("cond", "uncond"))

FLUX = PipelineCase(
    "flux", "FluxPipeline", build_flux, run_flux, calls_per_step=1, cfg_batched=None,
    cache_context=("cond",), timestep="t.expand(B).to(latents.dtype) / 1000",
    timestep_dtype=torch.float32, timestep_is_view=False, hidden_states_positional=False,
    has_do_cfg_property=False, scheduler_step_index=True,
    notes="guidance_embeds=True: `guidance` is a fresh [B] float32 tensor (3.5)")
SD3 = PipelineCase(
    "sd3", "StableDiffusion3Pipeline", build_sd3, run_sd3, calls_per_step=1,
    cfg_batched="[uncond; cond]", cache_context=(), timestep="t.expand(2B)",
    timestep_dtype=torch.float32, timestep_is_view=True, hidden_states_positional=False,
    has_do_cfg_property=True, scheduler_step_index=True,
    notes="guidance_scale=7; the transformer has no `cache_context` (no CacheMixin)")
PIXART = PipelineCase(
    "pixart", "PixArtAlphaPipeline", build_pixart, run_pixart, calls_per_step=1,
    cfg_batched="[uncond; cond]", cache_context=(), timestep="t[None].expand(2B)",
    timestep_dtype=torch.int64, timestep_is_view=True, hidden_states_positional=True,
    has_do_cfg_property=False, scheduler_step_index=True,
    notes="guidance_scale=4.5; `do_classifier_free_guidance` is a local variable")
DIT = PipelineCase(
    "dit", "DiTPipeline", build_dit, run_dit, calls_per_step=1, cfg_batched="[cond; uncond]",
    cache_context=(), timestep="t[None].expand(2B)", timestep_dtype=torch.int64,
    timestep_is_view=True, hidden_states_positional=True, has_do_cfg_property=False,
    scheduler_step_index=False, output="np",
    notes="class labels [1, 2] + null class 1000; guidance_scale=4; DDIM has no step_index")
WAN = PipelineCase(
    "wan", "WanPipeline", build_wan, run_wan, calls_per_step=1, cfg_batched=None,
    cache_context=("cond",), timestep="t.expand(B)", timestep_dtype=torch.int64,
    timestep_is_view=True, hidden_states_positional=False, has_do_cfg_property=True,
    scheduler_step_index=True,
    notes="guidance_scale=1; cache_context also gets step_index, sigma, num_inference_steps")
SANA = PipelineCase(
    "sana", "SanaPipeline", build_sana, run_sana, calls_per_step=1,
    cfg_batched="[uncond; cond]", cache_context=(),
    timestep="t.expand(2B) * transformer.config.timestep_scale", timestep_dtype=torch.float32,
    timestep_is_view=False, hidden_states_positional=True, has_do_cfg_property=True,
    scheduler_step_index=True,
    notes="guidance_scale=4.5; int64 scheduler timesteps, a float32 copy is passed")
QWENIMAGE = PipelineCase(
    "qwenimage", "QwenImagePipeline", build_qwenimage, run_qwenimage, calls_per_step=1,
    cfg_batched=None, cache_context=("cond",), timestep="t.expand(B).to(latents.dtype) / 1000",
    timestep_dtype=torch.float32, timestep_is_view=False, hidden_states_positional=False,
    has_do_cfg_property=False, scheduler_step_index=True,
    notes="true_cfg_scale=1; an all-ones prompt mask is passed as None")
COGVIEW4 = PipelineCase(
    "cogview4", "CogView4Pipeline", build_cogview4, run_cogview4, cfg_batched=None,
    timestep="t.expand(B)", timestep_dtype=torch.float32, timestep_is_view=True,
    hidden_states_positional=False, has_do_cfg_property=True, scheduler_step_index=True,
    notes="guidance_scale=5: a cond call, then an uncond call", **_TWO_CALLS)

CASES: list[PipelineCase] = [
    FLUX,
    replace(FLUX, name="flux_true_cfg", run=functools.partial(run_flux, true_cfg=True),
            notes="true_cfg_scale=4: a cond call, then an uncond call", **_TWO_CALLS),
    replace(FLUX, name="flux_batch2", run=functools.partial(run_flux, batch=2),
            notes="2 different prompts"),
    replace(FLUX, name="flux_bf16", build=build_flux_bf16, timestep_dtype=torch.bfloat16,
            notes="transformer, VAE, embeddings, latents in bfloat16; `guidance` stays float32"),
    SD3,
    PIXART,
    replace(PIXART, name="pixart_batch2", run=functools.partial(run_pixart, batch=2),
            notes="2 different prompts"),
    DIT,
    WAN,
    replace(WAN, name="wan_cfg", run=functools.partial(run_wan, cfg=True),
            notes="guidance_scale=5: a cond call, then an uncond call", **_TWO_CALLS),
    SANA,
    QWENIMAGE,
    replace(QWENIMAGE, name="qwenimage_true_cfg",
            run=functools.partial(run_qwenimage, true_cfg=True),
            notes="true_cfg_scale=4: a cond call, then an uncond call (norm-rescaled)",
            **_TWO_CALLS),
    COGVIEW4,
]

PIPELINES: dict[str, PipelineCase] = {case.name: case for case in CASES}


def as_tensor(output: Output) -> torch.Tensor:
    """The output of a `run` as a torch tensor."""
    return output if isinstance(output, torch.Tensor) else torch.from_numpy(np.asarray(output))


def main() -> int:
    """Runs every case twice (and once on a rebuilt pipeline); 1 if any output does not repeat."""
    print(f"{'case':20s} {'output':28s} {'1st run':>9s} {'2nd run':>9s}  repeats  rebuilt")
    failed = False
    for case in CASES:
        pipe = case.build()
        outputs, times = [], []
        for _ in range(2):
            start = time.perf_counter()
            outputs.append(as_tensor(case.run(pipe, steps=2, seed=0)))
            times.append(time.perf_counter() - start)
        repeats = torch.equal(outputs[0], outputs[1])
        rebuilt = torch.equal(outputs[0], as_tensor(case.run(case.build(), steps=2, seed=0)))
        failed |= not (repeats and rebuilt)
        out = f"{list(outputs[0].shape)} {str(outputs[0].dtype).removeprefix('torch.')}"
        print(f"{case.name:20s} {out:28s} {times[0] * 1e3:6.1f} ms {times[1] * 1e3:6.1f} ms  "
              f"{str(repeats):7s}  {rebuilt}")
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
