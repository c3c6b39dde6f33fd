"""Train and ship the TokenCache Cache Predictor of a shipped digits model.

The predictor learns from the model's own trajectories (its sampler with random class
labels; no data set), then is written next to the model with its training record and a
heatmap of what it learned (`importance.png`: mean weight per block and step, and the
token maps at a few steps):

    python examples/train_token_cache.py --model dit     # tocache_fx/models/dit-digits/token_cache
    python examples/train_token_cache.py --model flux    # tocache_fx/models/flux-digits/token_cache
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from tocache_fx import CachePredictor, train_token_cache
from tocache_fx.harness.sampling import (FLUX_MODEL_DIR, MODEL_DIR, load_dit_digits, load_flux_digits,
                                         sample_digits, sample_flux_digits)

MODELS = {
    "dit": (load_dit_digits, sample_digits, 50, MODEL_DIR),
    "flux": (load_flux_digits, sample_flux_digits, 28, FLUX_MODEL_DIR),
}


def heatmap(predictor, num_steps: int, path: Path) -> None:
    """Mean weight per (block, step), and token maps of the first and last block."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = predictor.importance(num_steps)  # [L, T, N]
    side = math.isqrt(predictor.num_tokens)
    steps = [0, num_steps // 4, num_steps // 2, 3 * num_steps // 4, num_steps - 1]
    blocks = [0, predictor.num_blocks - 1]
    fig = plt.figure(figsize=(2 + 1.6 * len(steps), 3.6 + 1.8 * len(blocks)),
                     layout="constrained")
    grid = fig.add_gridspec(1 + len(blocks), len(steps), height_ratios=[2] + [1] * len(blocks))
    top = fig.add_subplot(grid[0, :])
    image = top.imshow(weights.mean(dim=2), aspect="auto", cmap="viridis")
    top.set_xlabel("denoising step")
    top.set_ylabel("block")
    top.set_title("mean predicted weight w (high: recompute)")
    fig.colorbar(image, ax=top)
    for row, block in enumerate(blocks, start=1):
        for col, step in enumerate(steps):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(weights[block, step].view(side, side), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"block {block}, step {step}", fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="dit")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--per-generation", type=int, default=4, help="images per generation")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--heatmap-only", action="store_true",
                        help="redraw importance.png of an already trained predictor")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load, sample, steps, directory = MODELS[args.model]
    out = args.out or directory / "token_cache"
    if args.heatmap_only:
        heatmap(CachePredictor.from_pretrained(out), steps, out / "importance.png")
        return
    model = load()

    def generate(transformer, seed: int):
        labels = torch.randint(0, 10, (args.per_generation,),
                               generator=torch.Generator().manual_seed(1000 + seed))
        return sample(transformer, labels, num_steps=steps, seed=seed)

    predictor = train_token_cache(model, generate, steps, generations=args.generations,
                                  epochs=args.epochs, prune_ratio=args.prune_ratio)
    predictor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(predictor.info["training"], indent=2))
    heatmap(predictor, steps, out / "importance.png")
    print(json.dumps({k: v for k, v in predictor.info["training"].items() if k != "loss"}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
