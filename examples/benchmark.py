"""Compile benchmark: FLOPs and wall-clock of each policy against the compiled uncached model.

Random-weight DiT (speed only; quality needs a trained model). Every model is compiled
with inductor; latency is measured in this process, generations interleaved across
policies, median of `--repeats`, the first (compiling) generation excluded.

    python examples/benchmark.py                   # DiT-B/2 size, 256 tokens, 50 steps
    python examples/benchmark.py --full            # DiT-XL/2 size
    python examples/benchmark.py --layers 4 --steps 20 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DiTTransformer2DModel
from tabulate import tabulate

import tocache_fx
from tocache_fx import FORA, DuCa, NoCache, Policy, ToCa
from tocache_fx.explain import schedule_flops

SIZES = {"B": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
         "XL": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72)}


def make_model(size: str, layers: int | None, dtype: torch.dtype, device: str) -> DiTTransformer2DModel:
    config = dict(SIZES[size])
    if layers:
        config["num_layers"] = layers
    torch.manual_seed(0)
    model = DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=32, patch_size=2,
                                  num_embeds_ada_norm=1000, **config)
    return model.to(device=device, dtype=dtype).eval()


def generate(model: torch.nn.Module, steps: int, batch: int, device: str,
             dtype: torch.dtype) -> torch.Tensor:
    """One DDIM-like generation with CFG batched in one call ([cond; uncond])."""
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, 4, 32, 32, generator=generator, device=device, dtype=dtype)
    labels = torch.cat([torch.arange(batch, device=device) % 1000,
                        torch.full((batch,), 1000, device=device)])
    for i in range(steps):
        t = torch.full((2 * batch,), 999 - i * (1000 // steps), device=device)
        eps = model(hidden_states=torch.cat([latents, latents]), timestep=t,
                    class_labels=labels, return_dict=False)[0][:, :4]
        cond, uncond = eps.chunk(2)
        latents = latents - 0.02 * (uncond + 1.5 * (cond - uncond))
    return latents


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--full", action="store_true", help="DiT-XL/2 size instead of DiT-B/2")
    parser.add_argument("--layers", type=int, default=None, help="override the depth")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1, help="images per generation (x2 for CFG)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    model = make_model("XL" if args.full else "B", args.layers, dtype, device)
    steps = args.steps
    policies: dict[str, Policy] = {
        "NoCache": NoCache(),
        "FORA(N=3)": FORA(interval=3, num_steps=steps),
        "ToCa (DiT DDIM-50 defaults)": ToCa(num_steps=steps),
        "DuCa(N=3, R=95%)": DuCa(interval=3, cache_ratio=0.95, num_steps=steps),
        "DuCa(N=5, R=90%)": DuCa(interval=5, cache_ratio=0.90, num_steps=steps),
    }
    baseline = torch.compile(model, fullgraph=True, dynamic=False)
    models = {"compiled uncached": baseline}
    models.update({name: tocache_fx.transform(model, policy) for name, policy in policies.items()})
    run = {name: (lambda m=m: generate(m, steps, args.batch, device, dtype))
           for name, m in models.items()}
    compile_s = {name: timed(fn) for name, fn in run.items()}  # first generation compiles
    samples: dict[str, list[float]] = {name: [] for name in run}
    for _ in range(args.repeats):
        for name, fn in run.items():
            samples[name].append(timed(fn))
    latency = {name: statistics.median(values) for name, values in samples.items()}
    rows = []
    base_flops = None
    for name, m in models.items():
        if name == "compiled uncached":
            rows.append([name, "-", "1.00", f"{latency[name]:.3f}", "1.00",
                         f"{compile_s[name] - latency[name]:.1f}", 1, "0"])
            continue
        flops = schedule_flops(m, steps)
        base_flops = base_flops or flops["uncached_step"] * steps
        cache_mb = sum(t.numel() * t.element_size()
                       for g in m._generations.values() for t in g.slots.values()) / 2**20
        rows.append([name, f"{flops['total'] / 1e12:.3f}", f"{base_flops / flops['total']:.2f}",
                     f"{latency[name]:.3f}",
                     f"{latency['compiled uncached'] / latency[name]:.2f}",
                     f"{compile_s[name] - latency[name]:.1f}", m.num_compiled_graphs,
                     f"{cache_mb:.1f}"])
    config = model.config
    print(f"DiT {config.num_layers} layers, {config.num_attention_heads}x{config.attention_head_dim}, "
          f"256 tokens, batch {args.batch}x2 (CFG), {steps} steps, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(tabulate(rows, headers=["policy", "TFLOPs / gen", "FLOPs speedup", "latency s",
                                  "latency speedup", "compile s", "graphs", "cache MiB"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
