"""A zoo of tiny, random-weight configs of the diffusers transformer classes.

Every entry builds a seeded, eval-mode model with two blocks of each block kind and a
width of at most 64, plus a function giving the keyword arguments of one denoising
step (``inputs(batch, t)``, ``t`` in [0, 1] with 1 = pure noise), in the timestep
scale that model's pipeline passes. Inputs are deterministic (fixed generators).

``python tests/zoo.py`` builds every entry, runs it twice and prints the timings;
``python tests/zoo_probe.py`` also tries ``torch.export`` on each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import diffusers


@dataclass(frozen=True)
class ZooModel:
    name: str                                   # the class name
    build: Callable[[], torch.nn.Module]        # seeded, eval, tiny
    inputs: Callable[[int, float], dict]        # (batch, t in [0, 1]) -> forward kwargs
    note: str = ""                              # anything unusual
    variant: str = ""                           # a second config of one class: what differs

    @property
    def label(self) -> str:
        """The class name, plus the variant where one class has several entries."""
        return f"{self.name} ({self.variant})" if self.variant else self.name


ZOO: list[ZooModel] = []
ZOO_SKIPPED: dict[str, str] = {}


# ---------------------------------------------------------------------------- helpers

def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ints(t: float, batch: int) -> torch.Tensor:
    """DDPM-style integer timesteps 0..999."""
    return torch.full((batch,), int(round(t * 999)), dtype=torch.long)


def _floats(t: float, batch: int, scale: float = 1000.0) -> torch.Tensor:
    """Flow-matching style float timesteps t * scale."""
    return torch.full((batch,), t * scale, dtype=torch.float32)


def _builder(cls_name: str, **config) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            import diffusers.models.transformers as transformers
            cls = getattr(transformers, cls_name)
        torch.manual_seed(0)
        return cls(**config).eval()
    return build


def _add(name: str, config: dict, inputs: Callable[[int, float], dict], note: str = "",
         variant: str = "") -> None:
    ZOO.append(ZooModel(name, _builder(name, **config), inputs, note, variant))


def _flux_ids(h: int, w: int, txt: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return img.reshape(h * w, 3), torch.zeros(txt, 3)


# ------------------------------------------------------------------------ image DiTs

_add("DiTTransformer2DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
          num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=1000),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16), "timestep": _ints(t, b),
                   "class_labels": torch.arange(b) % 10})

_add("PixArtTransformer2DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
          num_layers=2, sample_size=16, patch_size=2, cross_attention_dim=32,
          caption_channels=24, norm_type="ada_norm_single", use_additional_conditions=False),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16), "timestep": _ints(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}})

_add("Transformer2DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, norm_num_groups=4,
          num_layers=2, cross_attention_dim=24),
     lambda b, t: {"hidden_states": _randn(b, 8, 8, 8),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)},
     note="continuous (UNet-style) input, no timestep conditioning (layer_norm); "
          "tokens are the 8x8 pixels")


def _flux_inputs(b: int, t: float, guidance: bool = False, pooled: int | None = 16) -> dict:
    img_ids, txt_ids = _flux_ids(8, 8, 6)
    out = {"hidden_states": _randn(b, 64, 16), "encoder_hidden_states": _randn(b, 6, 32, seed=1),
           "timestep": _floats(t, b, 1.0), "img_ids": img_ids, "txt_ids": txt_ids}
    if pooled:
        out["pooled_projections"] = _randn(b, pooled, seed=2)
    if guidance:
        out["guidance"] = torch.full((b,), 3.5)
    return out


_add("FluxTransformer2DModel",
     dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
          axes_dims_rope=(4, 6, 6)),
     _flux_inputs, note="packed 2x2 latents [B, 64, 16]; timestep = sigma in [0, 1]")

_add("ChromaTransformer2DModel",
     dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
          approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1),
     lambda b, t: _flux_inputs(b, t, pooled=None),
     note="Flux-like; timestep = sigma in [0, 1]")

_add("SD3Transformer2DModel",
     dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
          pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16),
                   "encoder_hidden_states": _randn(b, 6, 32, seed=1),
                   "pooled_projections": _randn(b, 16, seed=2), "timestep": _floats(t, b)})

_add("AuraFlowTransformer2DModel",
     dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
          caption_projection_dim=32, out_channels=4, pos_embed_max_size=64),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "timestep": _floats(t, b, 1.0)},
     note="timestep = sigma in [0, 1]; 8 register tokens prepended")

_add("SanaTransformer2DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
          num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
          caption_channels=24, mlp_ratio=2.0, sample_size=8, patch_size=1),
     lambda b, t: {"hidden_states": _randn(b, 4, 8, 8),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1), "timestep": _floats(t, b)},
     note="linear attention (ReLU kernel) for self-attention")

_add("Lumina2Transformer2DModel",
     dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
          num_refiner_layers=2, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
          axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32), cap_feat_dim=24),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16), "timestep": _floats(1 - t, b, 1.0),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "encoder_attention_mask": torch.ones(b, 6, dtype=torch.bool)},
     note="timestep = 1 - sigma in [0, 1] (Lumina's reversed convention)")

_add("CogView3PlusTransformer2DModel",
     dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
          out_channels=4, text_embed_dim=24, time_embed_dim=16, condition_dim=4,
          pos_embed_max_size=16, sample_size=16),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1), "timestep": _ints(t, b),
                   "original_size": torch.tensor([[128.0, 128.0]] * b),
                   "target_size": torch.tensor([[128.0, 128.0]] * b),
                   "crop_coords": torch.zeros(b, 2)})

_add("CogView4Transformer2DModel",
     dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
          num_attention_heads=2, text_embed_dim=24, time_embed_dim=16, condition_dim=4,
          pos_embed_max_size=16, sample_size=16, rope_axes_dim=(32, 32)),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1), "timestep": _floats(t, b),
                   "original_size": torch.tensor([[128.0, 128.0]] * b),
                   "target_size": torch.tensor([[128.0, 128.0]] * b),
                   "crop_coords": torch.zeros(b, 2)})


def _hunyuandit_inputs(b: int, t: float) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (8, 8)), (8, 8), use_real=True)
    return {"hidden_states": _randn(b, 4, 16, 16), "timestep": _ints(t, b).float(),
            "encoder_hidden_states": _randn(b, 6, 24, seed=1),
            "text_embedding_mask": torch.ones(b, 6, dtype=torch.long),
            "encoder_hidden_states_t5": _randn(b, 8, 16, seed=2),
            "text_embedding_mask_t5": torch.ones(b, 8, dtype=torch.long),
            "image_meta_size": torch.tensor([[128, 128, 128, 128, 0, 0]] * b, dtype=torch.float32),
            "style": torch.zeros(b, dtype=torch.long), "image_rotary_emb": rope}


_add("HunyuanDiT2DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=16,
          hidden_size=32, num_layers=4, mlp_ratio=2.0, cross_attention_dim=24,
          cross_attention_dim_t5=16, pooled_projection_dim=16, text_len=6, text_len_t5=8),
     _hunyuandit_inputs,
     note="4 blocks (U-shaped long skips: the second half concatenates the first's outputs); "
          "rotary embedding passed in; timestep is an integer 0..999 as a float tensor")


def _hidream_inputs(b: int, t: float) -> dict:
    return {"hidden_states": _randn(b, 4, 16, 16), "timesteps": _floats(t, b),
            "encoder_hidden_states_t5": _randn(b, 6, 16, seed=1),
            "encoder_hidden_states_llama3": _randn(4, b, 6, 8, seed=2),
            "pooled_embeds": _randn(b, 16, seed=3)}


_add("HiDreamImageTransformer2DModel",
     dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
          attention_head_dim=16, num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=16,
          num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 6, 6),
          max_resolution=(32, 32), llama_layers=[0, 1, 2, 3]),
     _hidream_inputs, note="MoE feed-forward (4 routed experts, top-2); one llama3 layer per block")


def _qwen_inputs(b: int, t: float) -> dict:
    return {"hidden_states": _randn(b, 64, 16), "encoder_hidden_states": _randn(b, 6, 24, seed=1),
            "encoder_hidden_states_mask": torch.ones(b, 6, dtype=torch.long),
            "timestep": _floats(t, b, 1.0), "img_shapes": [[(1, 8, 8)]] * b}


_add("QwenImageTransformer2DModel",
     dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6)),
     _qwen_inputs, note="packed latents [B, 64, 16]; timestep = sigma in [0, 1]")

# ------------------------------------------------------------------------ video DiTs

_add("LatteTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
          cross_attention_dim=32, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
          norm_type="ada_norm_single", caption_channels=24, video_length=2),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _ints(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)},
     note="spatial and temporal blocks alternate; 2 frames x 16 tokens")

_add("WanTransformer3DModel",
     dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
          out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)},
     note="2 frames x 16 tokens")

_add("SkyReelsV2Transformer3DModel",
     dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
          out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)},
     note="Wan-like; 2 frames x 16 tokens")

_add("CogVideoXTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
          time_embed_dim=16, text_embed_dim=24, num_layers=2, sample_width=8, sample_height=8,
          sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6),
     lambda b, t: {"hidden_states": _randn(b, 2, 4, 8, 8),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1), "timestep": _ints(t, b)},
     note="hidden_states is [B, F, C, H, W]; text tokens are concatenated to the stream")

_COGVIDEOX = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                  time_embed_dim=16, text_embed_dim=24, num_layers=2, sample_width=8,
                  sample_height=8, patch_size=2, temporal_compression_ratio=4,
                  max_text_seq_length=6)


def _cogvideox_inputs(b: int, t: float, frames: int = 2) -> dict:
    return {"hidden_states": _randn(b, frames, 4, 8, 8),
            "encoder_hidden_states": _randn(b, 6, 24, seed=1), "timestep": _ints(t, b)}


def _cogvideox_15_inputs(b: int, t: float) -> dict:
    """4 latent frames in 2 temporal patches, with the rotary table CogVideoX 1.5's pipeline
    builds (`get_3d_rotary_pos_embed`, grid_type="slice")."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cos, sin = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=None, grid_size=(4, 4),
                                       temporal_size=2, grid_type="slice", max_size=(4, 4),
                                       device="cpu")
    return {**_cogvideox_inputs(b, t, frames=4), "image_rotary_emb": (cos, sin)}


_add("CogVideoXTransformer3DModel", dict(_COGVIDEOX, sample_frames=13), _cogvideox_inputs,
     variant="fewer frames",
     note="called with 2 latent frames where sample_frames gives 4: the positional "
          "embedding is built at call time")

_add("CogVideoXTransformer3DModel",
     dict(_COGVIDEOX, sample_frames=9, patch_size_t=2, use_rotary_positional_embeddings=True,
          use_learned_positional_embeddings=False),
     _cogvideox_15_inputs, variant="1.5, rotary",
     note="CogVideoX 1.5: temporal patches of 2 frames, rotary table passed by the pipeline")


def _hunyuan_video_inputs(b: int, t: float) -> dict:
    return {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b),
            "encoder_hidden_states": _randn(b, 6, 24, seed=1),
            "encoder_attention_mask": torch.ones(b, 6, dtype=torch.long),
            "pooled_projections": _randn(b, 16, seed=2), "guidance": torch.full((b,), 6000.0)}


_add("HunyuanVideoTransformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
          num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
          text_embed_dim=24, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)),
     _hunyuan_video_inputs, note="guidance embedded (guidance * 1000)")

_add("MochiTransformer3DModel",
     dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
          pooled_projection_dim=16, in_channels=4, text_embed_dim=24, time_embed_dim=8,
          max_sequence_length=6),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "timestep": _floats(1 - t, b),
                   "encoder_attention_mask": torch.ones(b, 6, dtype=torch.long)},
     note="timestep = (1 - sigma) * 1000 (Mochi's reversed convention)")

_add("LTXVideoTransformer3DModel",
     dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
          attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=24),
     lambda b, t: {"hidden_states": _randn(b, 2 * 4 * 8, 8),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1), "timestep": _floats(t, b),
                   "encoder_attention_mask": torch.ones(b, 6, dtype=torch.long),
                   "num_frames": 2, "height": 4, "width": 8},
     note="packed latents [B, F*H*W, C] with num_frames/height/width ints")

_add("AllegroTransformer3DModel",
     dict(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16, in_channels=4,
          out_channels=4, num_layers=2, cross_attention_dim=32, sample_height=8, sample_width=8,
          sample_frames=2, caption_channels=24),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1), "timestep": _ints(t, b)})

_add("CosmosTransformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
          mlp_ratio=2.0, text_embed_dim=24, adaln_lora_dim=4, max_size=(4, 16, 16),
          patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False,
          extra_pos_embed_type="learnable"),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b, 1.0),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "fps": 30},
     note="timestep = sigma-like float (EDM preconditioning is in the pipeline); "
          "concat_padding_mask=False because that path needs torchvision")


# ------------------------------------------------------------------------ audio / other

def _stable_audio_inputs(b: int, t: float) -> dict:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    rope = get_1d_rotary_pos_embed(8, 32 + 1, use_real=True, repeat_interleave_real=False)
    return {"hidden_states": _randn(b, 4, 32), "timestep": _floats(t, b, 1.0),
            "encoder_hidden_states": _randn(b, 6, 8, seed=1),
            "global_hidden_states": _randn(b, 1, 16, seed=2), "rotary_embedding": rope}


_add("StableAudioDiTModel",
     dict(sample_size=32, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
          num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=8,
          time_proj_dim=8, global_states_input_dim=16, cross_attention_input_dim=8),
     _stable_audio_inputs,
     note="1-D audio latents [B, C, 32]; global token prepended; rotary embedding passed in")



# ------------------------------------------------------------------- more image DiTs

def _flux_like(b: int, t: float, cin: int = 16, ctx: int = 32, ids: int = 3, timestep=None) -> dict:
    img_ids, txt_ids = _flux_ids(8, 8, 6)
    if ids == 4:
        img_ids = torch.cat([torch.zeros(64, 1), img_ids], dim=1)[:, :4]
        img_ids = torch.stack([torch.zeros(64), img_ids[:, 2], img_ids[:, 3], torch.zeros(64)], 1)
        txt_ids = torch.zeros(6, 4)
    return {"hidden_states": _randn(b, 64, cin), "encoder_hidden_states": _randn(b, 6, ctx, seed=1),
            "timestep": timestep if timestep is not None else _floats(t, b, 1.0),
            "img_ids": img_ids, "txt_ids": txt_ids}


_add("BriaTransformer2DModel",
     dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
     lambda b, t: _flux_like(b, t, timestep=_floats(t, b)),
     note="Flux-like; timestep in 0..1000")

_add("LongCatImageTransformer2DModel",
     dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
          axes_dims_rope=(4, 6, 6)),
     _flux_like, note="Flux-like; timestep = sigma in [0, 1]")

_add("OvisImageTransformer2DModel",
     dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
          axes_dims_rope=(4, 6, 6)),
     _flux_like, note="Flux-like; timestep = sigma in [0, 1]")

_add("Flux2Transformer2DModel",
     dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16,
          mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
     lambda b, t: _flux_like(b, t, ids=4), note="4-axis position ids; timestep = sigma in [0, 1]")

_add("Flux3Transformer2DModel",
     dict(in_channels=16, cond_in_channels=16, num_layers=2, num_single_layers=2,
          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
          timestep_channels=16, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4)),
     lambda b, t: _flux_like(b, t, ids=4), note="4-axis position ids; timestep = sigma in [0, 1]")

_add("PRXTransformer2DModel",
     dict(in_channels=4, patch_size=2, context_in_dim=24, hidden_size=32, mlp_ratio=2.0,
          num_heads=2, depth=2, axes_dim=[8, 8]),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16), "timestep": _floats(t, b, 1.0),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)},
     note="timestep = sigma in [0, 1]")

_add("ErnieImageTransformer2DModel",
     dict(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=4,
          out_channels=4, patch_size=2, text_in_dim=24, rope_axes_dim=(4, 6, 6)),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16), "timestep": _floats(t, b),
                   "text_bth": _randn(b, 6, 24, seed=1),
                   "text_lens": torch.full((b,), 6, dtype=torch.long)})

_add("NucleusMoEImageTransformer2DModel",
     dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), mlp_ratio=2.0,
          num_experts=4, moe_intermediate_dim=16, capacity_factors=8.0),
     lambda b, t: {"hidden_states": _randn(b, 64, 16), "img_shapes": [(1, 8, 8)] * b,
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "encoder_hidden_states_mask": torch.ones(b, 6, dtype=torch.long),
                   "timestep": _floats(t, b, 1.0)},
     note="MoE MLP; packed latents [B, 64, 16]")

_add("HunyuanImageTransformer2DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
          num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=(2, 2),
          text_embed_dim=24, rope_axes_dim=(8, 8)),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "encoder_attention_mask": torch.ones(b, 6, dtype=torch.long)})


def _lumina_next_inputs(b: int, t: float) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    rope = get_2d_rotary_pos_embed_lumina(16, 384, 384, linear_factor=1.0, ntk_factor=1.0)
    return {"hidden_states": _randn(b, 4, 16, 16), "timestep": _floats(1 - t, b, 1.0),
            "encoder_hidden_states": _randn(b, 6, 24, seed=1),
            "encoder_mask": torch.ones(b, 6, dtype=torch.long), "image_rotary_emb": rope,
            "cross_attention_kwargs": {}}


_add("LuminaNextDiT2DModel",
     dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
          num_attention_heads=2, num_kv_heads=1, multiple_of=16, cross_attention_dim=24,
          learn_sigma=True, qk_norm=True),
     _lumina_next_inputs, note="rotary embedding passed in; timestep = 1 - sigma in [0, 1]")

_add("PriorTransformer",
     dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=32,
          num_embeddings=16, additional_embeddings=4),
     lambda b, t: {"hidden_states": _randn(b, 32), "timestep": _ints(t, b),
                   "proj_embedding": _randn(b, 32, seed=1),
                   "encoder_hidden_states": _randn(b, 16, 32, seed=2),
                   "attention_mask": torch.ones(b, 16, dtype=torch.bool)},
     note="unCLIP prior: tokens are 16 text + 4 extra embeddings, not image tokens")

_add("TransformerTemporalModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, norm_num_groups=4,
          num_layers=2),
     lambda b, t: {"hidden_states": _randn(b * 4, 8, 8, 8), "num_frames": 4},
     note="temporal attention only: the token axis is frames (4), batch is B*F; no timestep")

# ------------------------------------------------------------------- more video DiTs

_add("WanVACETransformer3DModel",
     dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
          out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
          vace_layers=[0, 1], vace_in_channels=8),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "control_hidden_states": _randn(b, 8, 2, 8, 8, seed=2)},
     note="2 main blocks + 2 VACE blocks whose hints are added to the main stream")

_add("ChronoEditTransformer3DModel",
     dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
          out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)},
     note="Wan-like; 2 frames x 16 tokens")

_add("HeliosTransformer3DModel",
     dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
          out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6)),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)},
     note="Wan-like; no history latents")

_add("ConsisIDTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
          time_embed_dim=16, text_embed_dim=24, num_layers=2, sample_width=8, sample_height=8,
          sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6,
          is_train_face=False),
     lambda b, t: {"hidden_states": _randn(b, 2, 4, 8, 8),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1), "timestep": _ints(t, b)},
     note="CogVideoX-like, face branch disabled (is_train_face=False)")

_add("ConsisIDTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
          time_embed_dim=16, text_embed_dim=24, num_layers=2, sample_width=8, sample_height=8,
          sample_frames=13, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6,
          is_train_face=False),
     _cogvideox_inputs, variant="fewer frames",
     note="called with 2 latent frames where sample_frames gives 4")

_add("SanaVideoTransformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
          num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
          caption_channels=24, mlp_ratio=2.0, sample_size=8, patch_size=(1, 2, 2),
          rope_max_seq_len=32),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1), "timestep": _floats(t, b)})


def _framepack_inputs(b: int, t: float) -> dict:
    out = _hunyuan_video_inputs(b, t)
    out["image_embeds"] = _randn(b, 4, 16, seed=3)
    out["indices_latents"] = torch.arange(1, 3)
    out["latents_clean"] = _randn(b, 4, 1, 8, 8, seed=4)
    out["indices_latents_clean"] = torch.arange(0, 1)
    out["latents_history_2x"] = _randn(b, 4, 2, 8, 8, seed=5)
    out["indices_latents_history_2x"] = torch.arange(3, 5)
    out["latents_history_4x"] = _randn(b, 4, 4, 8, 8, seed=6)
    out["indices_latents_history_4x"] = torch.arange(5, 9)
    return out


_add("HunyuanVideoFramepackTransformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
          num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
          text_embed_dim=24, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
          image_condition_type=None, has_image_proj=True, image_proj_dim=16,
          has_clean_x_embedder=True),
     _framepack_inputs, note="clean + 2x/4x history latents are prepended to the stream (extra tokens); "
          "indices_* are 1-D frame indices")

_add("HunyuanVideo15Transformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
          num_refiner_layers=2, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=24,
          text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(4, 6, 6), task_type="t2v"),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 4, 4), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "encoder_attention_mask": torch.ones(b, 6, dtype=torch.long),
                   "encoder_hidden_states_2": _randn(b, 5, 16, seed=2),
                   "encoder_attention_mask_2": torch.ones(b, 5, dtype=torch.long),
                   "image_embeds": _randn(b, 4, 16, seed=3)},
     note="the ByT5 text projection has a hard-coded 2048 hidden width (4.3M of the params)")

_add("MotifVideoTransformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
          num_single_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=24,
          rope_axes_dim=(4, 6, 6)),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "encoder_attention_mask": torch.ones(b, 6, dtype=torch.long)})

_add("EasyAnimateTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
          sample_width=8, sample_height=8, num_layers=2, mmdit_layers=2, time_embed_dim=16,
          text_embed_dim=24),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)})

_add("AnyFlowTransformer3DModel",
     dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
          out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32),
     lambda b, t: {"hidden_states": _randn(b, 2, 4, 8, 8),
                   "timestep": _floats(t, b)[:, None].repeat(1, 2),
                   "r_timestep": _floats(t, b)[:, None].repeat(1, 2), "encoder_hidden_states": _randn(b, 6, 24, seed=1)},
     note="Wan-like flow-map model, hidden_states is [B, F, C, H, W]; per-frame timesteps [B, F]; r_timestep = timestep")

_add("JoyImageEditTransformer3DModel",
     dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=24,
          mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6]),
     lambda b, t: {"hidden_states": _randn(b, 4, 2, 8, 8), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)})

_add("JoyImageEditPlusTransformer3DModel",
     dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=24,
          mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6]),
     lambda b, t: {"hidden_states": _randn(b, 32, 4, 1, 2, 2), "timestep": _floats(t, b),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "encoder_hidden_states_mask": torch.ones(b, 6, dtype=torch.long),
                   "shape_list": [[(2, 4, 4)]] * b},
     note="pre-patchified input [B, patches, C, 1, 2, 2] with per-sample shape_list")

# ------------------------------------------------------------------- more audio

_add("StableAudio3DiTModel",
     dict(io_channels=4, patch_size=1, embed_dim=32, depth=2, num_heads=2, cond_token_dim=8,
          global_cond_dim=16, local_add_cond_dim=4, timestep_features_dim=16, ff_mult=2.0,
          num_memory_tokens=4),
     lambda b, t: {"hidden_states": _randn(b, 4, 32), "timestep": _floats(t, b, 1.0),
                   "encoder_hidden_states": _randn(b, 6, 8, seed=1),
                   "global_hidden_states": _randn(b, 16, seed=2)},
     note="1-D audio latents [B, C, 32]; timestep in [0, 1]")

_add("MiniMaxMusic3Transformer1DModel",
     dict(in_channels=4, condition_dim=16, num_layers=2, num_attention_heads=2, attention_head_dim=16,
          ff_inner_dim=64, rotary_dim=8, fourier_embedding_dim=16),
     lambda b, t: {"hidden_states": _randn(b, 4, 32), "timestep": _floats(t, b, 1.0),
                   "encoder_hidden_states": _randn(b, 32, 16, seed=1)},
     note="1-D audio latents [B, C, 32]; condition is frame-aligned")



# ------------------------------------------------------------------- batch 3

def _bria_fibo_inputs(b: int, t: float) -> dict:
    out = _flux_like(b, t, timestep=_floats(t, b))
    out["text_encoder_layers"] = [_randn(b, 6, 16, seed=10 + i) for i in range(4)]
    return out


_add("BriaFiboTransformer2DModel",
     dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
          text_encoder_dim=16),
     _bria_fibo_inputs, note="Flux-like; one text-encoder layer per block (text_encoder_layers)")


def _kandinsky5_inputs(b: int, t: float) -> dict:
    return {"hidden_states": _randn(b, 2, 8, 8, 4), "encoder_hidden_states": _randn(b, 6, 24, seed=1),
            "timestep": _floats(t, b), "pooled_projections": _randn(b, 16, seed=2),
            "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)],
            "text_rope_pos": torch.arange(6)}


_add("Kandinsky5Transformer3DModel",
     dict(in_visual_dim=4, in_text_dim=24, in_text_dim2=16, time_dim=16, out_visual_dim=4,
          patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=2, num_visual_blocks=2,
          axes_dims=(4, 6, 6)),
     _kandinsky5_inputs, note="channels-last latents [B, F, H, W, C]; rope positions passed in")

_add("AceStepTransformer1DModel",
     dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
          num_key_value_heads=1, head_dim=16, in_channels=8, audio_acoustic_hidden_dim=4,
          patch_size=2, sliding_window=8, encoder_hidden_size=24),
     lambda b, t: {"hidden_states": _randn(b, 64, 4), "timestep": _floats(t, b, 1.0),
                   "timestep_r": _floats(t, b, 1.0),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "context_latents": _randn(b, 64, 4, seed=2)},
     note="1-D audio [B, 64, C], patch 2 -> 32 tokens; context latents concatenated on channels")

_add("LongCatAudioDiTTransformer",
     dict(dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=24, latent_dim=4, ff_mult=2.0),
     lambda b, t: {"hidden_states": _randn(b, 32, 4), "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "encoder_attention_mask": torch.ones(b, 6, dtype=torch.bool),
                   "timestep": _floats(t, b, 1.0)},
     note="1-D audio latents [B, 32, C]; timestep in [0, 1]")

_add("DreamLiteTransformer2DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, norm_num_groups=4,
          num_layers=2, cross_attention_dim=24),
     lambda b, t: {"hidden_states": _randn(b, 8, 8, 8),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1)},
     note="UNet-internal transformer (continuous input), no timestep conditioning")

_add("DualTransformer2DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, norm_num_groups=4,
          num_layers=2, cross_attention_dim=24),
     lambda b, t: {"hidden_states": _randn(b, 8, 8, 8),
                   "encoder_hidden_states": _randn(b, 77 + 257, 24, seed=1)},
     note="two Transformer2DModels mixed; text is split at the fixed lengths 77 + 257")


def _t5film_inputs(b: int, t: float) -> dict:
    enc = _randn(b, 8, 32, seed=1)
    mask = torch.ones(b, 8, dtype=torch.bool)
    return {"encodings_and_masks": [(enc, mask)], "decoder_input_tokens": _randn(b, 32, 8),
            "decoder_noise_time": torch.full((b,), t)}


_add("T5FilmDecoder",
     dict(input_dims=8, targets_length=32, d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64,
          dropout_rate=0.0),
     _t5film_inputs, note="spectrogram diffusion decoder; noise time in [0, 1]; no return_dict")


def _krea2_inputs(b: int, t: float) -> dict:
    pos = torch.zeros(6 + 64, 3)
    pos[6:, 1] = torch.arange(8).repeat_interleave(8).float()
    pos[6:, 2] = torch.arange(8).repeat(8).float()
    return {"hidden_states": _randn(b, 64, 16), "encoder_hidden_states": _randn(b, 6, 2, 24, seed=1),
            "timestep": _floats(t, b, 1.0), "position_ids": pos}


_add("Krea2Transformer2DModel",
     dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
          num_key_value_heads=1, intermediate_size=64, timestep_embed_dim=16, text_hidden_dim=24,
          num_text_layers=2, text_num_attention_heads=2, text_num_key_value_heads=2,
          text_intermediate_size=48, num_layerwise_text_blocks=2, num_refiner_text_blocks=2,
          axes_dims_rope=(4, 6, 6)),
     _krea2_inputs, note="packed latents [B, 64, 16]; text is [B, T, layers, dim]")



# ------------------------------------------------------------------- batch 4

_add("GlmImageTransformer2DModel",
     dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
          num_attention_heads=2, text_embed_dim=24, time_embed_dim=16, condition_dim=4,
          prior_vq_quantizer_codebook_size=16),
     lambda b, t: {"hidden_states": _randn(b, 4, 16, 16), "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "prior_token_id": torch.arange(b * 64).reshape(b, 64) % 16,
                   "prior_token_drop": torch.zeros(b, 64, dtype=torch.bool),
                   "timestep": _floats(t, b), "target_size": torch.tensor([[128.0, 128.0]] * b),
                   "crop_coords": torch.zeros(b, 2)},
     note="prior (AR) token ids per image token added to the stream")


def _zimage_inputs(b: int, t: float) -> dict:
    return {"x": [_randn(4, 1, 16, 16, seed=i) for i in range(b)], "t": _floats(t, b, 1.0),
            "cap_feats": [_randn(6, 24, seed=10 + i) for i in range(b)]}


_add("ZImageTransformer2DModel",
     dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
          n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[4, 6, 6],
          axes_lens=[64, 32, 32]),
     _zimage_inputs, note="inputs are per-sample lists ([C, F, H, W] latents, [T, D] captions); "
                          "output is a list; t in [0, 1]")



# ------------------------------------------------------------------- joint audio-video

_add("LTX2VideoTransformer3DModel",
     dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
          attention_head_dim=16, cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4,
          audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
          num_layers=2, caption_channels=24, rope_double_precision=False),
     lambda b, t: {"hidden_states": _randn(b, 2 * 4 * 8, 8), "audio_hidden_states": _randn(b, 9, 4, seed=3),
                   "encoder_hidden_states": _randn(b, 6, 24, seed=1),
                   "audio_encoder_hidden_states": _randn(b, 6, 24, seed=2), "timestep": _floats(t, b),
                   "encoder_attention_mask": torch.ones(b, 6, dtype=torch.long),
                   "num_frames": 2, "height": 4, "width": 8, "audio_num_frames": 9, "fps": 25.0},
     note="video [B, F*H*W, C] and audio [B, frames, C] streams; returns both")


def _minimax_h3_inputs(b: int, t: float, video: int = 16, text: int = 4, audio: int = 6) -> dict:
    """A packed text | audio | video sequence, the layout MiniMax-H3's pipeline builds."""
    total = text + audio + video
    text_ids, audio_ids = torch.arange(text), torch.arange(text, text + audio)
    video_ids = torch.arange(text + audio, total)
    tags = torch.empty(total, dtype=torch.long)
    tags[text_ids], tags[audio_ids], tags[video_ids] = 1, 2, 0     # 0 video, 1 text, 2 audio
    timestep_ids = torch.zeros(total, dtype=torch.long)
    timestep_ids[audio_ids] = 1                                     # audio has its own noise level
    positions = torch.zeros(total, 3)
    positions[:, 0] = torch.arange(total).float()
    positions[video_ids, 1] = (torch.arange(video) // 4).float()
    positions[video_ids, 2] = (torch.arange(video) % 4).float()
    return {"hidden_states": _randn(b, video, 16), "audio_hidden_states": _randn(b, audio, 6, seed=3),
            "encoder_hidden_states": _randn(b, text, 8, seed=1),
            "timestep": torch.tensor([t, t]), "timestep_indices": timestep_ids, "token_tags": tags,
            "position_ids": positions, "video_indices": video_ids, "audio_indices": audio_ids,
            "text_indices": text_ids}


_add("Kandinsky6SRTransformer3DModel",
     dict(in_visual_dim=4, out_visual_dim=4, time_dim=16, model_dim=32, ff_dim=64,
          num_visual_blocks=2, axes_dims=(4, 6, 6)),
     lambda b, t: {"hidden_states": _randn(b, 1, 8, 8, 9), "timestep": _floats(t, b)},
     note="latent tile [B, T, H, W, 2C+1] (noisy, anchor, mask); NABLA sparse self-attention "
          "on eager flex attention")

_add("MiniMaxH3Transformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2,
          num_refiner_layers=2, ffn_dim=64, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2),
          text_dim=8, freq_dim=8, time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2),
     _minimax_h3_inputs,
     note="one packed text/audio/video sequence with per-row tags; timestep is a table of "
          "noise levels (video, audio) indexed per row")


# ------------------------------------------------------------------- not in the zoo

ZOO_SKIPPED.update({
    "AnyFlowFARTransformer3DModel":
        "frame-autoregressive variant: needs chunk_partition / KV-cache flags and a flex-attention "
        "BlockMask; not built (time)",
    "BriaFibo2Transformer2DModel":
        "not built (time): perceiver 'gist' text tokens with min 256 tokens and injection layer ids "
        "would need a non-tiny text sequence",
    "Cosmos3OmniTransformer":
        "an LLM-style omni model (input_ids, vision token lists, index tensors, vocab 151936), "
        "not a single-step latent denoiser call; not built",
    "Ideogram4Transformer2DModel":
        "needs packed position_ids / segment_ids / indicator sequences; not built (time)",
    "Kandinsky6Transformer3DModel":
        "joint audio-video model with visual conditioning; not built (time)",
    "SanaWMLTX2RefinerTransformer3DModel":
        "LTX2-derived refiner needing precomputed video_rotary_emb and KV cache; not built (time)",
    "SanaWMTransformer3DModel":
        "world model needing camera / plucker conditioning and chunked inputs; not built (time)",
    "MiniMaxMusic3RVQDepthDecoder":
        "autoregressive RVQ depth decoder (inputs_embeds only), not a diffusion transformer",
    "OmniGenTransformer2DModel":
        "needs tokenized multimodal prompt (input_ids, image latents list, 2-D attention mask, "
        "position ids) from OmniGen's processor; not built (time)",
    "QwenImage21Transformer2DModel":
        "needs a VLM sequence with image slots (img_mask over vlm tokens) and KV-cache modes; "
        "not built (time)",
    "RFD4ProteinaTransformer":
        "protein structure model (pair representations, atom features), not an image/video DiT",
    "WanAnimateTransformer3DModel":
        "needs pose latents and face pixel values through a motion encoder; not built (time)",
    "WanAnimate2Transformer3DModel":
        "list inputs with a mandatory KV cache object and kv_cache_mode; not built (time)",
})


# ---------------------------------------------------------------------------- checking

def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return _first(out[0])
    if isinstance(out, dict):
        return _first(next(iter(out.values())))
    raise TypeError(type(out))


def check(entry: ZooModel, batch: int = 2, t: float = 0.5) -> dict:
    """Build, run twice, compare: {'params', 'build_s', 'forward_s', 'shape'}; raises on failure."""
    import time
    start = time.perf_counter()
    model = entry.build()
    built = time.perf_counter()
    with torch.no_grad():
        out1 = _first(model(**entry.inputs(batch, t)))
        ran = time.perf_counter()
        out2 = _first(model(**entry.inputs(batch, t)))
    if not torch.isfinite(out1).all():
        raise AssertionError("non-finite output")
    if not torch.equal(out1, out2):
        raise AssertionError("two calls differ")
    return {"params": sum(p.numel() for p in model.parameters()), "build_s": built - start,
            "forward_s": ran - built, "shape": tuple(out1.shape)}


if __name__ == "__main__":
    import sys
    import time
    import traceback
    torch.set_num_threads(1)
    wanted = set(sys.argv[1:])
    total = time.perf_counter()
    for entry in ZOO:
        if wanted and not {entry.name, entry.label} & wanted:
            continue
        try:
            r = check(entry)
            print(f"ok   {entry.label:42s} {r['params']:>9,d} build {r['build_s']:.2f}s "
                  f"fwd {r['forward_s']:.2f}s out {r['shape']}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {entry.label:42s} {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if wanted:
                traceback.print_exc()
    print(f"total {time.perf_counter() - total:.1f}s, {len(ZOO)} entries, {len(ZOO_SKIPPED)} skipped")
