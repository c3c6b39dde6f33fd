"""Speed and quality of caching policies on the shipped digits DiT.

Every setting generates the same labels from the same noise with the 50-step DDIM
sampler and CFG; latency is the median over `repeats` interleaved generations of the
inductor-compiled model, against the compiled uncached model, compile excluded.
Quality: PSNR / SSIM against the uncached images of the same seed, the class accuracy
of a digits classifier trained at run time, and the Fréchet distance of its features
to the real digits (FD, like FID).

Example:
    >>> rows = run_bench(quick=True)           # doctest: +SKIP
    >>> print(format_rows(rows))
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

import tocache_fx
from tocache_fx.explain import schedule_flops
from tocache_fx.metrics import DigitsJudge, psnr, ssim
from tocache_fx.peers import PEERS, build_peer
from tocache_fx.policies import FORA, DuCa, Policy, ToCa
from tocache_fx.sampling import load_dit_digits, sample_digits

__all__ = ["Setting", "settings", "run_bench", "format_rows"]

STEPS = 50


@dataclass(frozen=True)
class Setting:
    name: str
    policy: Policy | None = None  # one of ours; None and no peer: the uncached model
    steps: int = STEPS
    peer: str | None = None  # a diffusers cache from `tocache_fx.peers.PEERS`


def settings(quick: bool) -> list[Setting]:
    """The grid of settings; `quick` keeps a representative few."""
    grid = [Setting("uncached"), Setting("DDIM-20", steps=20),
            Setting("ToCa N=3 R=93%", ToCa(num_steps=STEPS)),
            Setting("DuCa N=3 R=95%", DuCa(interval=3, cache_ratio=0.95, num_steps=STEPS))]
    if quick:
        return grid
    return grid[:2] + [Setting("DDIM-25", steps=25), Setting("DDIM-17", steps=17),
                       Setting("FORA N=2", FORA(interval=2, num_steps=STEPS)),
                       Setting("FORA N=3", FORA(interval=3, num_steps=STEPS))] + grid[2:] + [
        Setting("ToCa N=4 R=90%", ToCa(interval=4, cache_ratio=0.9, num_steps=STEPS)),
        Setting("ToCa N=5 R=90% fixed", ToCa(interval=5, cache_ratio=0.9, full_schedule="fixed",
                                             time_weight=0.0, num_steps=STEPS)),
        Setting("DuCa N=4 R=95%", DuCa(interval=4, cache_ratio=0.95, num_steps=STEPS)),
        Setting("DuCa N=5 R=90%", DuCa(interval=5, cache_ratio=0.9, num_steps=STEPS)),
    ] + [Setting(name, peer=name) for name in PEERS]


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _generation_flops(denoiser, labels: torch.Tensor, steps: int) -> int:
    """FLOPs of one eager generation (matmuls, convolutions, attention), counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        sample_digits(denoiser, labels, num_steps=steps, seed=0)
    return counter.get_total_flops()


def _build(setting: Setting, model, uncached, labels: torch.Tensor, compile: bool):
    """The callable a setting samples with, or raises if the setup fails."""
    if setting.peer is not None:
        return build_peer(setting.peer, load_dit_digits, setting.steps,
                          calibrate=lambda d: sample_digits(d, labels, num_steps=setting.steps))
    if setting.policy is not None:
        return tocache_fx.transform(model, setting.policy, compile=compile)
    return uncached


def _generate(setting: Setting, denoiser, labels: torch.Tensor) -> torch.Tensor:
    if hasattr(denoiser, "reset"):
        denoiser.reset()
    return sample_digits(denoiser, labels, num_steps=setting.steps, seed=0)


def run_bench(quick: bool = True, per_class: int | None = None, repeats: int | None = None,
              progress: bool = True, compile: bool = True,
              ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Measure every setting; returns one dict per row and the images per setting.

    `compile=False` runs everything eagerly (a smoke test; latencies then mean little).
    """
    from tqdm.auto import tqdm

    per_class = per_class or (2 if quick else 10)
    repeats = repeats or (2 if quick else 3)
    model = load_dit_digits()
    labels = torch.arange(10).repeat_interleave(per_class)
    uncached = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
    chosen = settings(quick)
    bar = tqdm(total=len(chosen) * (repeats + 1), desc="bench", disable=not progress)
    runners, failures, images, compile_s = {}, {}, {}, {}
    for setting in chosen:  # build, then a first generation that compiles
        bar.set_postfix_str(setting.name)
        try:
            denoiser = _build(setting, model, uncached, labels, compile)
            compile_s[setting.name], images[setting.name] = _timed(
                lambda: _generate(setting, denoiser, labels))
            runners[setting.name] = (setting, denoiser)
        except Exception as error:  # a peer that does not accept this model
            failures[setting.name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        bar.update(repeats + 1 if setting.name in failures else 1)
    latency = {name: [] for name in runners}
    for _ in range(repeats):  # interleaved, so drift hits every setting alike
        for name, (setting, denoiser) in runners.items():
            bar.set_postfix_str(name)
            latency[name].append(_timed(lambda: _generate(setting, denoiser, labels))[0])
            bar.update()
    bar.close()
    judge = DigitsJudge()
    reference, base = images["uncached"], statistics.median(latency["uncached"])
    base_flops = _generation_flops(model, labels, STEPS)
    rows = []
    for name, (setting, denoiser) in runners.items():
        if setting.policy is not None:
            flops_speedup = schedule_flops(denoiser, STEPS)["speedup"]
        elif setting.peer is not None:
            denoiser.reset()
            flops_speedup = base_flops / _generation_flops(denoiser, labels, setting.steps)
        else:
            flops_speedup = STEPS / setting.steps
        seconds = statistics.median(latency[name])
        rows.append({
            "setting": name, "policy": setting.policy.to_dict() if setting.policy else None,
            "peer": setting.peer, "steps": setting.steps, "flops_speedup": flops_speedup,
            "latency_s": seconds, "latency_speedup": base / seconds,
            "compile_s": compile_s[name] - seconds,
            "psnr": float(psnr(images[name], reference).mean()),
            "ssim": float(ssim(images[name], reference).mean()),
            "accuracy": judge.accuracy(images[name], labels),
            "fd": judge.frechet_distance(images[name]),
        })
    rows += [{"setting": name, "error": why} for name, why in failures.items()]
    return rows, images


def format_rows(rows: list[dict]) -> str:
    """The rows as a markdown table; settings that failed say why."""
    table = []
    for r in rows:
        if "error" in r:
            table.append((r["setting"], "-", "-", "-", "-", "-", "-", f"failed: {r['error']}"))
            continue
        table.append((r["setting"], f"{r['flops_speedup']:.2f}", f"{r['latency_speedup']:.2f}",
                      f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r['accuracy']:.3f}",
                      f"{r['fd']:.2f}", ""))
    return tabulate(table, headers=["setting", "FLOPs speedup", "latency speedup", "PSNR dB",
                                    "SSIM", "class acc", "FD", "note"], tablefmt="github")


def _family(row: dict) -> str:
    if row.get("peer"):
        return "diffusers hooks"
    if row.get("policy"):
        return "tocache-fx"
    return "fewer steps" if row["steps"] != STEPS else "uncached"


def _pareto_plot(rows: list[dict], metric: str, label: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    colours = {"tocache-fx": "tab:blue", "fewer steps": "tab:gray",
               "diffusers hooks": "tab:orange", "uncached": "black"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, colour in colours.items():
        points = [r for r in rows if "error" not in r and _family(r) == family]
        if metric == "psnr":  # the uncached reference is its own capped 100 dB
            points = [r for r in points if r["psnr"] < 99]
        ax.scatter([r["latency_speedup"] for r in points], [r[metric] for r in points],
                   color=colour, label=family)
        for r in points:
            ax.annotate(r["setting"], (r["latency_speedup"], r[metric]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("latency speedup vs compiled uncached")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save(rows: list[dict], images: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """Write the table as JSON, a sample grid and speedup-vs-FD / -PSNR plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    table = out / "bench.json"
    table.write_text(json.dumps(rows, indent=2))
    names = list(images)
    count = min(10, images[names[0]].shape[0])
    step = max(1, images[names[0]].shape[0] // count)
    fig, axes = plt.subplots(len(names), count, figsize=(count, len(names) * 1.1), squeeze=False)
    for row, name in enumerate(names):
        for col in range(count):
            ax = axes[row][col]
            ax.imshow(images[name][col * step, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row][0].set_ylabel(name, rotation=0, ha="right", fontsize=7)
    grid = out / "samples.png"
    fig.savefig(grid, dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths = [table, grid]
    for metric, label in (("fd", "FD to real digits (lower is better)"),
                          ("psnr", "PSNR vs uncached, dB (higher is better)")):
        paths.append(out / f"pareto_{metric}.png")
        _pareto_plot(rows, metric, label, paths[-1])
    return paths
