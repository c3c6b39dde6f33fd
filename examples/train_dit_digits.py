"""Train the small class-conditional DiT shipped in ``tocache_fx/models/dit-digits``.

A diffusers ``DiTTransformer2DModel`` learns the DDPM epsilon objective on
``sklearn.datasets.load_digits`` (1,797 8x8 images, 10 classes) upsampled to
32x32x1 and scaled to [-1, 1]. Nothing is downloaded.

Classifier-free guidance comes from diffusers itself: with ``num_embeds_ada_norm=10``
the ``LabelEmbedding`` holds a null class at index 10 and, in train mode, replaces
each label with it with probability 0.1 (drawn from the global torch RNG, so the
run stays reproducible from ``--seed``).

The EMA weights are saved (config.json + diffusion_pytorch_model.safetensors) every
``--checkpoint-minutes``, at the end, and when ``--max-minutes`` runs out, together
with a ``training.json`` record.

Example::

    python examples/train_dit_digits.py --steps 1900 --threads 1 --max-minutes 95 \\
        --out tocache_fx/models/dit-digits
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
from diffusers import DDPMScheduler, DiTTransformer2DModel
from sklearn.datasets import load_digits

from tocache_fx.harness.sampling import NOISE_SCHEDULE

NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("tocache_fx/models/dit-digits"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1900, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=100, help="linear LR warmup")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, 0 = off")
    p.add_argument("--ema-decay", type=float, default=0.999, help="max EMA decay (warmed up)")
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--sample-size", type=int, default=32)
    p.add_argument("--train-timesteps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--max-minutes", type=float, default=0.0, help="time budget, 0 = none")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def load_dataset(sample_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as ``[N, 1, S, S]`` float32 in [-1, 1] (bilinear upsampling) and labels."""
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(sample_size, sample_size), mode="bilinear", align_corners=False)
    return x * 2.0 - 1.0, torch.from_numpy(digits.target).long()


def optimizer_step(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                   warmup: torch.optim.lr_scheduler.LRScheduler, loss: torch.Tensor, step: int,
                   args: argparse.Namespace) -> None:
    """Backward, clipped AdamW step, LR warmup and the EMA update (warmed up like
    diffusers' EMAModel)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    warmup.step()
    decay = min(args.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def log_progress(losses: list[float], step: int, elapsed: float, args: argparse.Namespace) -> None:
    """Print the mean loss of the last `--log-every` steps and the pace."""
    if (step + 1) % args.log_every == 0 or step == 0:
        recent = losses[-args.log_every:]
        print(f"step {step + 1}/{args.steps} loss {sum(recent) / len(recent):.4f} "
              f"{elapsed / (step + 1):.2f}s/step {elapsed / 60:.1f}min", flush=True)


def build_model(args: argparse.Namespace) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        sample_size=args.sample_size,
        patch_size=args.patch_size,
        in_channels=1,
        out_channels=1,
        num_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        attention_head_dim=args.head_dim,
        num_embeds_ada_norm=NUM_CLASSES,
    )


def build_scheduler(train_timesteps: int) -> DDPMScheduler:
    """The DiT training scheduler: linear betas 1e-4..0.02, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=train_timesteps, **NOISE_SCHEDULE)


def save(ema: DiTTransformer2DModel, args: argparse.Namespace, record: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(args.out, safe_serialization=True)
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    images, labels = load_dataset(args.sample_size)
    model = build_model(args).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = build_scheduler(args.train_timesteps)
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
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model_config": dict(ema.config),
            "scheduler_config": dict(scheduler.config),
            "steps_done": len(losses),
            "stopped_early": stopped_early,
            "wall_time_s": round(time.monotonic() - start, 1),
            "final_loss": sum(tail) / len(tail) if tail else math.nan,
            "weights": "EMA",
            "dataset": "sklearn.datasets.load_digits, bilinear 8x8 -> 32x32, [-1, 1], no augmentation",
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
        }

    for step in range(args.steps):
        idx = torch.randint(len(images), (args.batch_size,), generator=data_gen)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=data_gen)
        t = torch.randint(args.train_timesteps, (args.batch_size,), generator=data_gen)
        xt = scheduler.add_noise(x0, noise, t)

        pred = model(xt, timestep=t, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        optimizer_step(model, ema, opt, warmup, loss, step, args)
        losses.append(loss.item())

        elapsed = time.monotonic() - start
        log_progress(losses, step, elapsed, args)
        if args.max_minutes and elapsed > args.max_minutes * 60:
            stopped_early = step + 1 < args.steps
            print(f"time budget of {args.max_minutes} min reached at step {step + 1}", flush=True)
            break
        if time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
            save(ema, args, record())
            last_ckpt = time.monotonic()
            print(f"checkpoint saved to {args.out} at step {step + 1}", flush=True)

    rec = record()
    save(ema, args, rec)
    print(
        f"done: {rec['steps_done']} steps, final loss {rec['final_loss']:.4f}, "
        f"{rec['wall_time_s'] / 60:.1f} min, saved to {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
