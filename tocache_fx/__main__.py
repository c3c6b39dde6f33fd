"""Command line: `python -m tocache_fx bench [--model dit|flux] [--quick] [--out DIR]`."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tocache-fx")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="speed and quality of policies and peers on a "
                                              "shipped model")
    bench.add_argument("--model", choices=("dit", "flux"), default="dit",
                       help="the digits DiT (DDIM-50) or the FLUX-style model (Euler-28)")
    bench.add_argument("--quick", action="store_true", help="a few settings, 10 samples")
    bench.add_argument("--per-class", type=int, default=None, help="samples per digit class")
    bench.add_argument("--repeats", type=int, default=None, help="timed generations per setting")
    bench.add_argument("--out", type=Path, default=Path("bench_out"))
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from tocache_fx.harness.bench import dominance, format_rows, run_bench, save

    rows, images = run_bench(quick=args.quick, per_class=args.per_class, repeats=args.repeats,
                             model=args.model)
    print(format_rows(rows))
    for peer, winner in dominance(rows):
        print(f"{peer}: " + (f"dominated by {winner}" if winner else
                             "not dominated (no tocache-fx row as fast and as close, better in one)"))
    for path in save(rows, images, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
