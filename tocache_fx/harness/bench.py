"""Speed and quality of caching policies on a shipped digits model.

Two models: "dit" (the class-conditional DiT, DDIM 50 steps) and "flux" (the
FLUX-style MMDiT, rectified flow with Euler 28 steps), each raced against fewer steps
and the peers' caches (diffusers hooks; cache-dit on FLUX). Every setting generates
the same labels from the same noise with CFG; latency is the median over `repeats`
interleaved generations of the inductor-compiled model, against the compiled
uncached model, compile excluded.
Quality: PSNR / SSIM against the uncached images of the same seed, the class accuracy
of a digits classifier trained at run time, and the Fréchet distance of its features
to the real digits (FD, like FID).

Example:
    >>> rows, images = run_bench(quick=True, model="flux")           # doctest: +SKIP
    >>> print(format_rows(rows))
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

import tocache_fx
from tocache_fx.explain import schedule_flops
from tocache_fx.meta import flop_counter
from tocache_fx.harness.metrics import DigitsJudge, psnr, ssim
from tocache_fx.harness.peers import FLUX_PEERS, PEERS, build_peer
from tocache_fx.harness.sampling import (FLUX_MODEL_DIR, MODEL_DIR, load_dit_digits,
                                         load_flux_digits, sample_digits,
                                         sample_flux_digits)
from tocache_fx.policies import FORA, DuCa, NoCache, Policy, TaylorSeer, ToCa, TokenCache

__all__ = ["Setting", "BenchModel", "MODELS", "settings", "run_bench", "format_rows",
           "dominance", "save"]


@dataclass(frozen=True)
class Setting:
    name: str
    policy: Policy | None = None  # one of ours; None and no peer: the uncached model
    steps: int = 50
    peer: str | None = None  # a peer cache from `tocache_fx.harness.peers.PEERS` / `FLUX_PEERS`
    peer_options: tuple[tuple[str, Any], ...] = ()  # keyword arguments of the peer's setup


@dataclass(frozen=True)
class BenchModel:
    """A shipped model, its sampler and its grid of settings."""

    load: Callable[[], torch.nn.Module]
    sample: Callable[..., torch.Tensor]  # sample(denoiser, labels, num_steps=, seed=)
    steps: int
    grid: Callable[[int, bool], list[Setting]]


def _token_cache(model_dir: Path, steps: int, ratio: float, **options: Any) -> Setting:
    name = f"TokenCache {ratio:.0%}" + "".join(f" {k}={v}" for k, v in options.items())
    policy = TokenCache.from_pretrained(model_dir / "token_cache", prune_ratio=ratio,
                                        num_steps=steps, **options)
    return Setting(name, policy, steps)


def _token_cache_grid(model_dir: Path, steps: int) -> list[Setting]:
    """Pruning ratios and TPRR settings, and the variants docs/design.md compares."""
    return [_token_cache(model_dir, steps, ratio) for ratio in (0.3, 0.5, 0.7)] + [
        _token_cache(model_dir, steps, 0.5, k1=2),
        _token_cache(model_dir, steps, 0.7, blocks=0.5),
        *(_token_cache(model_dir, steps, 0.5, attention=a) for a in ("kept", "cached")),
        *(_token_cache(model_dir, steps, 0.5, cache=c) for c in ("output", "change"))]


def _dit_grid(steps: int, quick: bool) -> list[Setting]:
    uncached, ddim20 = Setting("uncached", steps=steps), Setting("DDIM-20", steps=20)
    taylorseer = {n: Setting(f"TaylorSeer N={n}", TaylorSeer(interval=n, num_steps=steps), steps)
                  for n in (2, 3, 4)}
    toca = Setting("ToCa DDIM-50 preset (N=3 R=93%)", ToCa.dit_ddim50(num_steps=steps), steps)
    duca = Setting("DuCa DDIM-50 preset (N=3 R=95%)", DuCa.dit_ddim50(num_steps=steps), steps)
    token_cache = _token_cache(MODEL_DIR, steps, 0.5)
    if quick:
        return [uncached, ddim20, taylorseer[3], toca, duca, token_cache]
    return [
        uncached, ddim20, Setting("DDIM-25", steps=25), Setting("DDIM-17", steps=17),
        Setting("FORA N=2", FORA(interval=2, num_steps=steps), steps),
        Setting("FORA N=3", FORA(interval=3, num_steps=steps), steps),
        *taylorseer.values(), toca,
        Setting("ToCa N=4 R=90%", ToCa.dit_ddim50(interval=4, cache_ratio=0.9, num_steps=steps),
                steps),
        duca,
        Setting("DuCa DDIM-50 random", DuCa.dit_ddim50(selection="random", num_steps=steps), steps),
        Setting("DuCa N=5 R=90%", DuCa.dit_ddim50(interval=5, cache_ratio=0.9, num_steps=steps),
                steps),
        *_token_cache_grid(MODEL_DIR, steps),
        *(Setting(name, steps=steps, peer=name) for name in PEERS),
    ]


def _flux_duca(steps: int, interval: int, **options: Any) -> DuCa:
    """DuCa on FLUX (the authors ship no FLUX DuCa): ToCa.flux's terms, a fixed cycle."""
    base = ToCa.flux()
    return DuCa(interval=interval, cache_ratio=0.9, full_schedule="fixed", step_clock="countup",
                time_weight=0.0, depth_weight=base.depth_weight, kind_factors=base.kind_factors,
                grid_bonus=0.0, num_steps=steps, **options)


def _flux_grid(steps: int, quick: bool) -> list[Setting]:
    uncached, euler14 = Setting("uncached", steps=steps), Setting("Euler-14", steps=14)
    fora = Setting("FORA N=2", FORA(interval=2, num_steps=steps), steps)
    taylorseer = Setting("TaylorSeer N=2", TaylorSeer(interval=2, num_steps=steps), steps)
    toca = Setting("ToCa FLUX preset (N=4 R=90%)", ToCa.flux(num_steps=steps), steps)
    duca = Setting("DuCa N=3 R=90%", _flux_duca(steps, 3), steps)
    token_cache = _token_cache(FLUX_MODEL_DIR, steps, 0.5)
    if quick:
        return [uncached, euler14, fora, taylorseer, toca, duca, token_cache]
    return [
        uncached, Setting("NoCache", NoCache(), steps),  # our compiled graph, nothing cached
        euler14, Setting("Euler-20", steps=20), Setting("Euler-10", steps=10), fora,
        *(Setting(f"FORA N=2 warmup {w}", FORA(interval=2, warmup=w, num_steps=steps), steps)
          for w in (4, 10, 14)),
        Setting("FORA N=3", FORA(interval=3, num_steps=steps), steps), taylorseer,
        *(Setting(f"TaylorSeer N=2 warmup {w}",
                  TaylorSeer(interval=2, warmup=w, num_steps=steps), steps)
          for w in (4, 10, 14, 22)),
        toca,
        Setting("ToCa N=3 R=90%", ToCa.flux(interval=3, num_steps=steps), steps),
        Setting("ToCa N=2 R=90% warmup 4", ToCa.flux(interval=2, warmup=4, num_steps=steps),
                steps),
        Setting("DuCa N=2 R=90% warmup 4", _flux_duca(steps, 2, warmup=4), steps),
        duca, Setting("DuCa N=5 R=90%", _flux_duca(steps, 5), steps),
        *_token_cache_grid(FLUX_MODEL_DIR, steps),
        *(Setting(name, steps=steps, peer=name) for name in FLUX_PEERS),
        # cache-dit's default thresholds cache little on this small model: tuned points too
        Setting("cache-dit DBCache threshold 0.16", steps=steps, peer="cache-dit DBCache",
                peer_options=(("threshold", 0.16),)),
        Setting("cache-dit DBCache+TaylorSeer threshold 0.24", steps=steps,
                peer="cache-dit DBCache+TaylorSeer", peer_options=(("threshold", 0.24),)),
    ]


MODELS: dict[str, BenchModel] = {
    "dit": BenchModel(load_dit_digits, sample_digits, 50, _dit_grid),
    "flux": BenchModel(load_flux_digits, sample_flux_digits, 28, _flux_grid),
}


def settings(quick: bool, model: str = "dit") -> list[Setting]:
    """The grid of settings of `model`; `quick` keeps a representative few."""
    spec = MODELS[model]
    return spec.grid(spec.steps, quick)


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _generation_flops(spec: BenchModel, denoiser, labels: torch.Tensor, steps: int) -> int:
    """FLOPs of one eager generation (matmuls, convolutions, attention), counted."""
    with flop_counter() as counter:
        spec.sample(denoiser, labels, num_steps=steps, seed=0)
    return counter.get_total_flops()


def _build(spec: BenchModel, setting: Setting, cached, uncached, labels: torch.Tensor):
    """The callable a setting samples with, or raises if the setup fails."""
    if setting.peer is not None:
        return build_peer(setting.peer, spec.load, setting.steps,
                          calibrate=lambda d: spec.sample(d, labels, num_steps=setting.steps),
                          **dict(setting.peer_options))
    if setting.policy is not None:
        return cached.with_policy(setting.policy)  # one capture shared by our policies
    return uncached


def _generate(spec: BenchModel, setting: Setting, denoiser, labels: torch.Tensor) -> torch.Tensor:
    if hasattr(denoiser, "reset"):
        denoiser.reset()
    return spec.sample(denoiser, labels, num_steps=setting.steps, seed=0)


def run_bench(quick: bool = True, per_class: int | None = None, repeats: int | None = None,
              progress: bool = True, compile: bool = True, model: str = "dit",
              ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Measure every setting of `model` ("dit" or "flux"); returns one dict per row and
    the images per setting.

    `compile=False` runs everything eagerly (a smoke test; latencies then mean little).
    """
    from tqdm.auto import tqdm

    per_class = per_class or (1 if quick else 10)
    repeats = repeats or (2 if quick else 3)
    spec = MODELS[model]
    network = spec.load()
    labels = torch.arange(10).repeat_interleave(per_class)
    uncached = torch.compile(network, fullgraph=True, dynamic=False) if compile else network
    cached = tocache_fx.transform(network, tocache_fx.NoCache(), compile=compile)
    chosen = settings(quick, model)
    bar = tqdm(total=len(chosen) * (repeats + 1), desc="bench", disable=not progress)
    runners, failures, images, compile_s = {}, {}, {}, {}
    for setting in chosen:  # build, then a first generation that compiles
        bar.set_postfix_str(setting.name)
        try:
            denoiser = _build(spec, setting, cached, uncached, labels)
            compile_s[setting.name], images[setting.name] = _timed(
                lambda: _generate(spec, setting, denoiser, labels))
            runners[setting.name] = (setting, denoiser)
        except Exception as error:  # a peer that does not accept this model
            failures[setting.name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        bar.update(repeats + 1 if setting.name in failures else 1)
    latency = {name: [] for name in runners}
    for _ in range(repeats):  # interleaved, so drift hits every setting alike
        for name, (setting, denoiser) in runners.items():
            bar.set_postfix_str(name)
            latency[name].append(_timed(lambda: _generate(spec, setting, denoiser, labels))[0])
            bar.update()
    bar.close()
    judge = DigitsJudge()
    reference, base = images["uncached"], statistics.median(latency["uncached"])
    # every uncached step calls the model with the same shapes: one step's FLOPs x steps
    base_flops = _generation_flops(spec, network, labels, 1) * spec.steps
    rows = []
    for name, (setting, denoiser) in runners.items():
        if setting.policy is not None:
            flops_speedup = schedule_flops(denoiser, spec.steps)["speedup"]
        elif setting.peer is not None:
            denoiser.reset()
            flops_speedup = base_flops / _generation_flops(spec, denoiser, labels, setting.steps)
        else:
            flops_speedup = spec.steps / setting.steps
        seconds = statistics.median(latency[name])
        rows.append({
            "model": model, "setting": name, "policy": setting.policy.to_dict() if setting.policy else None,
            "peer": setting.peer, "peer_options": dict(setting.peer_options) or None,
            "steps": setting.steps, "flops_speedup": flops_speedup,
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
                      f"{r['fd']:.2f}", r.get("note", "")))
    return tabulate(table, headers=["setting", "FLOPs speedup", "latency speedup", "PSNR dB",
                                    "SSIM", "class acc", "FD", "note"], tablefmt="github")


def dominance(rows: list[dict]) -> list[tuple[str, str | None]]:
    """For each peer row, our fastest row that Pareto-dominates it: at least as fast and
    at least as close (PSNR), strictly better in one of the two (None where no
    tocache-fx row does). An exact peer point (PSNR at the cap) can only be matched in
    PSNR, so there it takes an exact point of ours that is faster."""
    ours = sorted((r for r in rows if "error" not in r and _family(r) == "tocache-fx"),
                  key=lambda r: -r["latency_speedup"])
    verdicts = []
    for peer in rows:
        if "error" in peer or not peer.get("peer"):
            continue
        winner = next((r["setting"] for r in ours if _dominates(r, peer)), None)
        verdicts.append((peer["setting"], winner))
    return verdicts


def _dominates(ours: dict, peer: dict) -> bool:
    speed, quality = ours["latency_speedup"], ours["psnr"]
    return (speed >= peer["latency_speedup"] and quality >= peer["psnr"]
            and (speed > peer["latency_speedup"] or quality > peer["psnr"]))


def _family(row: dict) -> str:
    if row.get("peer"):
        return "cache-dit" if row["peer"].startswith("cache-dit") else "diffusers hooks"
    if row.get("policy"):
        return "tocache-fx"
    return "fewer steps" if row["steps"] != MODELS[row.get("model", "dit")].steps else "uncached"


def _pareto_plot(rows: list[dict], metric: str, label: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    colours = {"tocache-fx": "tab:blue", "fewer steps": "tab:gray",
               "diffusers hooks": "tab:orange", "cache-dit": "tab:red", "uncached": "black"}
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
