"""Sample grid and judge scores for the model card of the shipped digits DiT.

Writes ``samples.png`` (one row per class 0..9, ``--per-class`` samples each) and
``evaluation.json`` (judge class accuracy and Fréchet distance of ``--num-eval``
generated samples, next to the real-data references) into ``--out``.

Example::

    python examples/make_model_card.py --guidance-scale 4 --num-eval 500
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

from tocache_fx.metrics import DigitsJudge  # noqa: E402
from tocache_fx.sampling import MODEL_DIR, sample_digits  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    p.add_argument("--out", type=Path, default=None, help="defaults to --model-dir")
    p.add_argument("--num-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--per-class", type=int, default=8, help="grid columns")
    p.add_argument("--num-eval", type=int, default=500, help="samples scored by the judge")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


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
    model = DiTTransformer2DModel.from_pretrained(args.model_dir).eval()
    sample = lambda labels, **kw: sample_digits(  # noqa: E731
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
