"""Compile and speed benchmark: cold and warm compile, graphs and steady latency of every
policy against plain `torch.compile` and diffusers' regional compilation.

Random-weight models (speed only; quality needs a trained model): a DiT at DiT-XL/2
depth (28 blocks) and a FLUX at FLUX.1 depth (19 double + 38 single blocks), narrow
enough for a CPU (`--width`). Every setting runs in a fresh process with an empty
inductor cache (cold), then again in a second process on the caches the first left on
disk (warm); compile time is the first generation minus a steady one. Steady latency is
the median of `--repeats` generations; speedups are against plain `torch.compile` of
the same model in the same process, FLOPs speedups from `tocache_fx.explain`.

    python examples/benchmark.py                          # both models, every setting
    python examples/benchmark.py --model dit --steps 20 --width 128
    python examples/benchmark.py --model dit --settings plain NoCache FORA   # a subset
    python examples/benchmark.py --steady --repeats 5     # steady latency, interleaved

On a GPU pass `--dtype bfloat16 --width 1152` (DiT-XL/2) or `--width 3072` (FLUX).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tabulate import tabulate

SETTINGS = ["plain", "regional", "NoCache", "NoCache (model capture)", "FORA", "TaylorSeer",
            "ToCa", "DuCa", "TokenCache"]


def make_model(kind: str, width: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    heads = max(1, width // 64)
    if kind == "dit":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(num_layers=28, num_attention_heads=heads,
                                      attention_head_dim=width // heads, in_channels=4,
                                      out_channels=8, sample_size=32, patch_size=2,
                                      num_embeds_ada_norm=1000)
        model._repeated_blocks = ["BasicTransformerBlock"]  # diffusers leaves it empty
    else:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(num_layers=19, num_single_layers=38,
                                       num_attention_heads=heads, attention_head_dim=width // heads,
                                       in_channels=16, joint_attention_dim=64,
                                       pooled_projection_dim=64, axes_dims_rope=(8, 12, 12)
                                       if width // heads == 32 else (16, 24, 24))
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(kind: str, model, steps: int, device: str, dtype: torch.dtype):
    """One generation's calls: (kwargs per step), CFG batched (batch 2), 256 tokens."""
    generator = torch.Generator().manual_seed(0)
    if kind == "dit":
        latents = torch.randn(2, 4, 32, 32, generator=generator).to(device, dtype)
        labels = torch.tensor([3, 1000], device=device)
        timesteps = torch.linspace(999, 0, steps, device=device).long()
        return [dict(hidden_states=latents, timestep=t.expand(2), class_labels=labels)
                for t in timesteps]
    latents = torch.randn(2, 256, 16, generator=generator).to(device, dtype)
    text = torch.randn(2, 16, 64, generator=generator).to(device, dtype)
    pooled = torch.randn(2, 64, generator=generator).to(device, dtype)
    ids = torch.zeros(256, 3, device=device)
    ids[:, 1], ids[:, 2] = torch.arange(256) // 16, torch.arange(256) % 16
    sigmas = torch.linspace(1, 0, steps + 1, device=device)[:-1]
    return [dict(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                 timestep=s.expand(2).to(dtype), img_ids=ids, txt_ids=torch.zeros(16, 3, device=device))
            for s in sigmas]


def policy_for(name: str, kind: str, steps: int, model):
    """The policy of a setting (`name`, optionally suffixed " (model capture)")."""
    from tocache_fx import FORA, CachePredictor, DuCa, NoCache, TaylorSeer, ToCa, TokenCache

    name = name.removesuffix(" (model capture)")
    return {
        "NoCache": NoCache,
        "FORA": lambda: FORA(interval=3, num_steps=steps),
        "TaylorSeer": lambda: TaylorSeer(interval=3, num_steps=steps),
        "ToCa": lambda: (ToCa.dit_ddim50 if kind == "dit" else ToCa.flux)(num_steps=steps),
        "DuCa": lambda: DuCa.dit_ddim50(num_steps=steps),
        "TokenCache": lambda: TokenCache(CachePredictor(28 if kind == "dit" else 57, 256),
                                         prune_ratio=0.5, num_steps=steps),
    }[name]()


def make_runner(setting: str, kind: str, model: torch.nn.Module, steps: int):
    """`model` as one setting runs it: plain or regional `torch.compile`, or transformed."""
    import tocache_fx

    if setting == "plain":
        return torch.compile(model, fullgraph=True, dynamic=False)
    if setting == "regional":
        model.compile_repeated_blocks(fullgraph=True, dynamic=False)
        return model
    capture = "model" if "model capture" in setting else "auto"
    return tocache_fx.transform(model, policy_for(setting, kind, steps, model), capture=capture)


def generation(runner, calls: list[dict], device: str) -> float:
    """Seconds for one generation (the runner's cache reset first)."""
    if hasattr(runner, "reset"):
        runner.reset()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for kwargs in calls:
            runner(**kwargs)
    sync()
    return time.perf_counter() - start


def _setup(args) -> tuple[str, torch.dtype, torch.nn.Module, list[dict]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    model = make_model(args.model, args.width, dtype, device)
    return device, dtype, model, make_inputs(args.model, model, args.steps, device, dtype)


def _graph_row(runner) -> dict:
    from tocache_fx.explain import schedule_flops

    if not hasattr(runner, "num_compiled_graphs"):
        return {}
    return {"graphs": runner.num_compiled_graphs,
            "flops_speedup": schedule_flops(runner)["speedup"]}


def run_one(args) -> dict:
    """One setting in this process: compile time, graphs, steady latency, FLOPs."""
    device, _, model, calls = _setup(args)
    runner = make_runner(args.setting, args.model, model, args.steps)
    first = generation(runner, calls, device)
    steady = statistics.median(generation(runner, calls, device) for _ in range(args.repeats))
    return {"setting": args.setting, "compile_s": first - steady,
            "steady_ms_per_step": 1000 * steady / args.steps, **_graph_row(runner)}


def run_steady(args) -> list[dict]:
    """Every setting in this process, generations interleaved across settings (round
    after round), median of `--repeats`: the steady latencies to compare."""
    device, _, model, calls = _setup(args)
    runners = {setting: make_runner(setting, args.model, copy.deepcopy(model), args.steps)
               for setting in args.settings}
    for runner in runners.values():
        generation(runner, calls, device)  # compiles
    times: dict[str, list[float]] = {setting: [] for setting in runners}
    for _ in range(args.repeats):
        for setting, runner in runners.items():
            times[setting].append(generation(runner, calls, device))
    plain = statistics.median(times["plain"]) if "plain" in times else float("nan")
    rows = []
    for setting, runner in runners.items():
        steady = statistics.median(times[setting])
        row = {"model": args.model, "setting": setting, "steady_ms_per_step":
               1000 * steady / args.steps, "vs_plain": plain / steady, **_graph_row(runner)}
        row["latency_over_flops"] = row["vs_plain"] / row.get("flops_speedup", 1.0)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", choices=("dit", "flux", "both"), default="both")
    parser.add_argument("--settings", nargs="*", default=SETTINGS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--steady", action="store_true",
                        help="steady latency only: every setting in one process, interleaved")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print("ROW " + json.dumps(run_one(args)))
        return
    if args.steady:
        rows = [row for kind in (("dit", "flux") if args.model == "both" else (args.model,))
                for row in run_steady(argparse.Namespace(**{**vars(args), "model": kind}))]
        print(tabulate([(r["model"], r["setting"], f"{r['steady_ms_per_step']:.1f}",
                         f"{r['vs_plain']:.2f}x", f"{r.get('flops_speedup', 1.0):.2f}",
                         f"{r['latency_over_flops']:.2f}") for r in rows],
                       headers=("model", "setting", "steady ms/step", "vs plain",
                                "FLOPs speedup", "latency / FLOPs"), tablefmt="github"))
        if args.out:
            with open(args.out, "w") as file:
                json.dump(rows, file, indent=2)
        return
    rows = []
    for kind in (("dit", "flux") if args.model == "both" else (args.model,)):
        for setting in args.settings:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                row = {"model": kind}
                for phase in ("cold", "warm"):
                    command = [sys.executable, __file__, "--one", "--model", kind, "--setting",
                               setting, "--steps", str(args.steps), "--width", str(args.width),
                               "--repeats", str(args.repeats), "--dtype", args.dtype]
                    if args.threads:
                        command += ["--threads", str(args.threads)]
                    done = subprocess.run(command, env=env, capture_output=True, text=True)
                    line = next((l for l in done.stdout.splitlines() if l.startswith("ROW ")), None)
                    if line is None:
                        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
                        break
                    result = json.loads(line[4:])
                    row.update({k: v for k, v in result.items() if k != "compile_s"})
                    row[f"{phase}_s"] = result["compile_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=2)


def table(rows: list[dict]) -> str:
    body = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        plain = next((r for r in mine if r["setting"] == "plain" and "error" not in r), None)
        regional = next((r for r in mine if r["setting"] == "regional" and "error" not in r), None)
        for r in mine:
            if "error" in r:
                body.append((model, r["setting"], "-", "-", "-", "-", "-", "-", "-", r["error"]))
                continue
            speed = plain["steady_ms_per_step"] / r["steady_ms_per_step"] if plain else float("nan")
            flops = r.get("flops_speedup", 1.0)
            body.append((model, r["setting"], f"{r['cold_s']:.1f}",
                         f"{r['cold_s'] / plain['cold_s']:.2f}" if plain else "-",
                         f"{r['cold_s'] / regional['cold_s']:.2f}" if regional else "-",
                         f"{r['warm_s']:.1f}", f"{r['warm_s'] / r['cold_s']:.2f}",
                         r.get("graphs", 1), f"{r['steady_ms_per_step']:.1f}",
                         f"{speed:.2f} / {flops:.2f}"))
    return tabulate(body, headers=["model", "setting", "cold s", "x plain", "x regional",
                                   "warm s", "warm/cold", "graphs", "ms/step",
                                   "speedup: latency / FLOPs"], tablefmt="github")


if __name__ == "__main__":
    main()
