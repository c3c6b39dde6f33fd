"""Train the tiny FLUX-style model shipped in ``tocache_fx/models/flux-digits``.

A diffusers ``FluxTransformer2DModel`` (2 double-stream + 4 single-stream blocks,
hidden size 128) learns rectified flow on ``sklearn.datasets.load_digits``
upsampled to 32x32x1 in [-1, 1] (the same data as the shipped DiT). Nothing is
downloaded.

* Latents: the 32x32x1 image is packed 2x2 into 256 tokens of 4 channels, like
  FLUX packs its VAE latents; ``img_ids`` are ``(0, row, col)``, ``txt_ids`` zeros.
* Conditioning: a FIXED, not learned, "prompt" per class: for classes 0..9 and a
  null class 10, an ``encoder_hidden_states`` sequence ``[8, 64]`` and
  ``pooled_projections`` ``[64]``, standard normal draws from a torch.Generator
  seeded with ``--prompt-seed``, saved as ``prompts.safetensors``. Labels are
  replaced by the null class with probability ``--label-dropout`` (0.1) for
  classifier-free guidance.
* Objective: ``x_s = (1 - s) x0 + s noise``, the model predicts ``v = noise - x0``
  (MSE), ``s`` drawn logit-normal (``sigmoid(N(0, 1))``, as in SD3) and passed as
  the ``timestep`` (the transformer multiplies it by 1000 itself, as FluxPipeline
  passes ``timestep / 1000``).

The EMA weights are saved (config.json + diffusion_pytorch_model.safetensors) every
``--checkpoint-minutes``, at the end, and when ``--max-minutes`` runs out, with a
``training.json`` record.

Example::

    python examples/train_flux_digits.py --steps 20000 --threads 1 --max-minutes 55 \\
        --out tocache_fx/models/flux-digits
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_dit_digits import load_dataset, log_progress, optimizer_step  # noqa: E402

from tocache_fx.harness.sampling import (  # noqa: E402
    FLUX_PROMPTS_FILE,
    FLUX_TEXT_TOKENS,
    NULL_LABEL,
    flux_image_ids,
    flux_text_ids,
    pack_latents,
)

NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("tocache_fx/models/flux-digits"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-seed", type=int, default=1234, help="seed of the fixed class prompts")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=100, help="linear LR warmup")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, 0 = off")
    p.add_argument("--ema-decay", type=float, default=0.999, help="max EMA decay (warmed up)")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--num-layers", type=int, default=2, help="double-stream blocks")
    p.add_argument("--num-single-layers", type=int, default=4, help="single-stream blocks")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=64, help="joint_attention_dim = pooled dim")
    p.add_argument("--sample-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--max-minutes", type=float, default=0.0, help="time budget, 0 = none")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--log-every", type=int, default=20)
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=args.num_layers,
        num_single_layers=args.num_single_layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.num_heads,
        joint_attention_dim=args.text_dim,
        pooled_projection_dim=args.text_dim,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def make_prompts(seed: int, text_dim: int) -> dict[str, torch.Tensor]:
    """Fixed class prompts: ``encoder_hidden_states [11, 8, D]``, ``pooled_projections [11, D]``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(NUM_CLASSES + 1, FLUX_TEXT_TOKENS, text_dim, generator=gen),
        "pooled_projections": torch.randn(NUM_CLASSES + 1, text_dim, generator=gen),
    }


def save(ema: FluxTransformer2DModel, prompts: dict, args: argparse.Namespace, record: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(args.out, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in prompts.items()}, str(args.out / FLUX_PROMPTS_FILE))
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    images, labels = load_dataset(args.sample_size)
    tokens = pack_latents(images)  # [N, 256, 4]
    prompts = make_prompts(args.prompt_seed, args.text_dim)
    img_ids = flux_image_ids(args.sample_size, args.sample_size)
    txt_ids = flux_text_ids()
    model = build_model(args).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps))
    )
    data_gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(images)} images, {n_params / 1e6:.2f}M params, {args.threads} thread(s)", flush=True)

    losses: list[float] = []
    start = last_ckpt = time.monotonic()
    stopped_early = False

    def record() -> dict:
        tail = losses[-100:]
        return {
            "seed": args.seed,
            "prompt_seed": args.prompt_seed,
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in ema.config.items()},
            "objective": "rectified flow: x_s = (1 - s) x0 + s noise, target v = noise - x0, "
            "s ~ sigmoid(N(0, 1)) (logit-normal), timestep = s",
            "conditioning": "fixed seeded randn class prompts (prompts.safetensors), null class 10, "
            f"label dropout {args.label_dropout}",
            "steps_done": len(losses),
            "stopped_early": stopped_early,
            "wall_time_s": round(time.monotonic() - start, 1),
            "final_loss": sum(tail) / len(tail) if tail else math.nan,
            "loss_curve": [
                round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 4)
                for i in range(0, len(losses), 100)
            ],
            "weights": "EMA",
            "dataset": "sklearn.datasets.load_digits, bilinear 8x8 -> 32x32, [-1, 1], no augmentation, "
            "packed 2x2 -> 256 tokens x 4 channels",
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
        }

    for step in range(args.steps):
        idx = torch.randint(len(tokens), (args.batch_size,), generator=data_gen)
        x0, y = tokens[idx], labels[idx].clone()
        drop = torch.rand(args.batch_size, generator=data_gen) < args.label_dropout
        y[drop] = NULL_LABEL
        noise = torch.randn(x0.shape, generator=data_gen)
        s = torch.sigmoid(torch.randn(args.batch_size, generator=data_gen))
        xs = (1.0 - s[:, None, None]) * x0 + s[:, None, None] * noise

        pred = model(
            hidden_states=xs,
            encoder_hidden_states=prompts["encoder_hidden_states"][y],
            pooled_projections=prompts["pooled_projections"][y],
            timestep=s,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer_step(model, ema, opt, warmup, loss, step, args)
        losses.append(loss.item())

        elapsed = time.monotonic() - start
        log_progress(losses, step, elapsed, args)
        if args.max_minutes and elapsed > args.max_minutes * 60:
            stopped_early = step + 1 < args.steps
            print(f"time budget of {args.max_minutes} min reached at step {step + 1}", flush=True)
            break
        if time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
            save(ema, prompts, args, record())
            last_ckpt = time.monotonic()
            print(f"checkpoint saved to {args.out} at step {step + 1}", flush=True)

    rec = record()
    save(ema, prompts, args, rec)
    print(
        f"done: {rec['steps_done']} steps, final loss {rec['final_loss']:.4f}, "
        f"{rec['wall_time_s'] / 60:.1f} min, saved to {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
