"""Sample grid and judge scores for the model card of a shipped digits model.

``--model dit`` (the default) is the class-conditional DiT in
``tocache_fx/models/dit-digits`` sampled with DDIM; ``--model flux`` is the tiny
FLUX-style transformer in ``tocache_fx/models/flux-digits`` sampled with
flow-matching Euler steps (``--num-steps`` defaults to 50 and 28 respectively).

Writes ``samples.png`` (one row per class 0..9, ``--per-class`` samples each) and
``evaluation.json`` (judge class accuracy and Fréchet distance of ``--num-eval``
generated samples, next to the real-data references) into ``--out``.

Example::

    python examples/make_model_card.py --guidance-scale 4 --num-eval 500
    python examples/make_model_card.py --model flux --guidance-scale 4 --num-eval 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DiTTransformer2DModel  # noqa: E402

from tocache_fx.harness.metrics import DigitsJudge  # noqa: E402
from tocache_fx.harness.sampling import (  # noqa: E402
    FLUX_GUIDANCE_SCALE,
    FLUX_MODEL_DIR,
    MODEL_DIR,
    sample_digits,
    sample_flux_digits,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["dit", "flux"], default="dit")
    p.add_argument("--model-dir", type=Path, default=None, help="defaults to the shipped one")
    p.add_argument("--out", type=Path, default=None, help="defaults to --model-dir")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (dit 50, flux 28)")
    p.add_argument("--guidance-scale", type=float, default=None, help="dit 4.0, flux its default")
    p.add_argument("--per-class", type=int, default=8, help="grid columns")
    p.add_argument("--num-eval", type=int, default=500, help="samples scored by the judge")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    flux = args.model == "flux"
    if args.model_dir is None:
        args.model_dir = FLUX_MODEL_DIR if flux else MODEL_DIR
    if args.num_steps is None:
        args.num_steps = 28 if flux else 50
    if args.guidance_scale is None:
        args.guidance_scale = FLUX_GUIDANCE_SCALE if flux else 4.0
    return args


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 4, pad: int = 2) -> None:
    """Tile ``[rows * cols, 1, H, W]`` images in [-1, 1] into a grey PNG, row by row."""
    n, _, h, w = images.shape
    cols = n // rows
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad))  # grey padding
    for i, img in enumerate(images[:, 0].numpy()):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = img
    grid = np.kron(grid, np.ones((scale, scale)))
    plt.imsave(path, grid, cmap="gray", vmin=-1.0, vmax=1.0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or args.model_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.model == "flux":
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(args.model_dir).eval()
        sampler = sample_flux_digits
    else:
        model = DiTTransformer2DModel.from_pretrained(args.model_dir).eval()
        sampler = sample_digits
    sample = lambda labels, **kw: sampler(  # noqa: E731
        model, labels, num_steps=args.num_steps, guidance_scale=args.guidance_scale, **kw
    )

    grid_labels = torch.arange(10).repeat_interleave(args.per_class)
    save_grid(sample(grid_labels, seed=args.seed), rows=10, path=out / "samples.png")
    print(f"wrote {out / 'samples.png'}", flush=True)

    start = time.monotonic()
    eval_labels = torch.arange(args.num_eval) % 10
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = torch.cat(
        [sample(chunk, generator=generator) for chunk in eval_labels.split(args.batch_size)]
    )
    judge = DigitsJudge()
    result = {
        **({"model": "flux", "sampler": "FlowMatchEulerDiscreteScheduler"} if args.model == "flux" else {}),
        "num_samples": args.num_eval,
        "num_steps": args.num_steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "judge_accuracy": judge.accuracy(images, eval_labels),
        "judge_frechet_distance": judge.frechet_distance(images),
        "real_heldout_accuracy": judge.real_accuracy,
        "real_half_vs_half_frechet_distance": judge.real_frechet_distance,
        "sampling_time_s": round(time.monotonic() - start, 1),
    }
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
