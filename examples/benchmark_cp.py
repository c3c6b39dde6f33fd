"""Latency of the uncached and the cached FLUX transformer at 1 rank and at N ranks, under
diffusers' context parallelism (Ulysses or Ring).

    torchrun --nproc_per_node=N examples/benchmark_cp.py [--model flux] [--steps 8]
        [--policies fora,taylorseer,toca,duca,token_cache] [--mode ulysses|ring] [--repeats 3]

Every rank builds the same model (random weights from one seed, or `--pretrained`). Rank 0
first runs each setting alone (the 1-rank numbers, the others wait), then all N ranks run it
with `model.enable_parallelism(ContextParallelConfig(ulysses_degree=N))` (or `ring_degree`),
the transformed model (`tocache_fx.transform`) caching each rank's shard of the tokens. Per
setting it prints the median seconds per generation at 1 and N ranks (after one warm-up
generation, which captures and compiles), and the max difference of the N-rank output to the
1-rank output of the same setting and to the uncached 1-rank output. Settings: `eager` (the
diffusers model as is), `NoCache` (our graphs, nothing cached) and the `--policies`
(TokenCache with the shipped predictor on `--model flux-digits`, else with an untrained
one from a fixed seed: a latency and correctness demo, not a quality one).

What to expect
* On CPU (gloo, the default there) this is a correctness demo: N processes share the cores,
  attention's all-to-alls go through gloo, and the N-rank column is not faster. NoCache,
  FORA and TaylorSeer at N ranks equal their 1-rank outputs to ~1e-6; ToCa and DuCa pick
  their tokens per shard (by the 1-rank scores of the shard's tokens), so they differ from
  1 rank by less than they differ from the uncached output; TokenCache's pruned blocks run
  their self-attention for all tokens under CP (docs/design.md), so it lands closer to the
  uncached output than at 1 rank. Eager by default (`--compile` compiles with inductor).
* On GPUs (nccl, one GPU per rank) the N-rank column is the real number: context parallelism
  divides each block's work by N and adds 4 all-to-alls (Ulysses) or one all-gather of K/V
  (Ring) per attention. Caching composes with it: a reused branch skips its collectives too,
  so a cached step is cheaper on every rank, and the step plan needs no communication (it
  is known from the step index). Expect the cached speedup over uncached at N ranks to be
  close to the 1-rank one while each rank's share of the tokens stays large (thousands);
  with small shards the collectives dominate and both gain less.

On GPUs, e.g. a FLUX.1-dev-sized random model at 1024x1024 (4096 image tokens), bf16:

    torchrun --nproc_per_node=4 examples/benchmark_cp.py --layers 19,38 --heads 24 \\
        --head-dim 128 --image-tokens 4096 --text-tokens 512 --dtype bfloat16 --steps 28
    # or the real weights (no text encoder needed): --pretrained black-forest-labs/FLUX.1-dev
    # Ring on GPUs needs an attention backend returning the log-sum-exp:
    #   --mode ring --attention-backend _native_cudnn   (or flash, with flash-attn installed)

The backend is nccl and each rank uses cuda:LOCAL_RANK when CUDA is available (compiled by
default there), gloo and the CPU otherwise. Image and text token counts must divide by N.
`--model flux-digits` runs the shipped 32x32 digits model (256 image + 8 text tokens).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.distributed as dist


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["flux", "flux-digits"], default="flux")
    parser.add_argument("--pretrained", default=None,
                        help="a FLUX checkpoint (its transformer subfolder) instead of random weights")
    parser.add_argument("--layers", default="2,2", help="double,single blocks (random model)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--policies", default="fora,taylorseer,toca,duca,token_cache")
    parser.add_argument("--mode", choices=["ulysses", "ring"], default="ulysses")
    parser.add_argument("--attention-backend", default=None,
                        help="diffusers attention backend (e.g. _native_cudnn, flash for Ring on GPUs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile with inductor (default: on CUDA only)")
    return parser.parse_args(argv)


def build_model(args, device, dtype):
    from diffusers import FluxTransformer2DModel

    if args.model == "flux-digits":
        from tocache_fx.harness.sampling import load_flux_digits

        model = load_flux_digits()
    elif args.pretrained:
        model = FluxTransformer2DModel.from_pretrained(args.pretrained, subfolder="transformer",
                                                       torch_dtype=dtype)
    else:
        double, single = (int(n) for n in args.layers.split(","))
        torch.manual_seed(0)
        width = args.heads * args.head_dim
        rope = (args.head_dim - 2 * (3 * args.head_dim // 8), 3 * args.head_dim // 8,
                3 * args.head_dim // 8)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=4 if width <= 64 else 64, num_layers=double,
            num_single_layers=single, attention_head_dim=args.head_dim,
            num_attention_heads=args.heads, joint_attention_dim=width,
            pooled_projection_dim=width, axes_dims_rope=rope)
    model = model.to(device)
    if model.dtype != dtype:
        model = model.to(dtype)
    return model.eval()


def make_inputs(model, args, device, dtype):
    config = model.config
    if args.model == "flux-digits":
        args.image_tokens, args.text_tokens = 256, 8
    generator = torch.Generator().manual_seed(1)
    side = max(1, int(math.isqrt(args.image_tokens)))
    img_ids = torch.zeros(args.image_tokens, 3)
    img_ids[:, 1] = torch.arange(args.image_tokens) // side
    img_ids[:, 2] = torch.arange(args.image_tokens) % side
    inputs = dict(
        hidden_states=torch.randn(1, args.image_tokens, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, args.text_tokens, config.joint_attention_dim,
                                          generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        img_ids=img_ids, txt_ids=torch.zeros(args.text_tokens, 3))
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((1,), 3.5)
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k != "guidance"
                    else v.dtype) for k, v in inputs.items()}


def euler(model, inputs, steps: int) -> torch.Tensor:
    """Rectified-flow Euler, sigma 1 -> 0, a fresh timestep tensor per step."""
    x = inputs["hidden_states"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((1,), float(sigmas[i]), device=x.device, dtype=x.dtype)
            v = model(**{**inputs, "hidden_states": x}, timestep=t, return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def timed(run, repeats: int, device, group: bool) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` runs after a warm-up run; the last output."""
    out = run()  # warm-up: capture and compile
    times = []
    for _ in range(repeats):
        if group:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def token_cache(args, model, steps: int):
    """TokenCache at 50%: the shipped predictor of flux-digits, else an untrained one."""
    from tocache_fx import CachePredictor, TokenCache

    if args.model == "flux-digits":
        from tocache_fx.harness.sampling import FLUX_MODEL_DIR

        return TokenCache.from_pretrained(FLUX_MODEL_DIR / "token_cache", num_steps=steps)
    torch.manual_seed(2)  # the same predictor on every rank
    blocks = model.config.num_layers + model.config.num_single_layers
    return TokenCache(CachePredictor(blocks, args.image_tokens), prune_ratio=0.5,
                      num_steps=steps)


def settings(args, model):
    import tocache_fx
    from tocache_fx import FORA, DuCa, NoCache, TaylorSeer, ToCa

    steps = args.steps
    known = {"fora": lambda: ("FORA N=2", FORA(interval=2, num_steps=steps)),
             "taylorseer": lambda: ("TaylorSeer N=2", TaylorSeer(interval=2, num_steps=steps)),
             "toca": lambda: ("ToCa.flux", ToCa.flux(num_steps=steps)),
             "duca": lambda: ("DuCa N=3 R=90%", DuCa(interval=3, cache_ratio=0.9,
                                                     num_steps=steps)),
             "token_cache": lambda: ("TokenCache 50%", token_cache(args, model, steps))}
    chosen = [("NoCache", NoCache())] + [known[name]() for name in args.policies.split(",")
                                         if name]
    return tocache_fx, chosen


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        from tocache_fx.harness.cpu_parallel import patch_for_cpu

        patch_for_cpu()
    compile_ = cuda if args.compile is None else args.compile
    dtype = getattr(torch, args.dtype)
    from diffusers import ContextParallelConfig

    model = build_model(args, device, dtype)
    tocache_fx, chosen = settings(args, model)
    if args.attention_backend:
        model.set_attention_backend(args.attention_backend)
    inputs = make_inputs(model, args, device, dtype)
    if args.image_tokens % world or args.text_tokens % world:
        raise SystemExit(f"--image-tokens and --text-tokens must divide by {world} ranks")

    def cached(base, policy):
        return tocache_fx.transform(base, policy, compile=compile_)

    # 1 rank: rank 0 alone
    single: dict[str, tuple[float, torch.Tensor]] = {}
    if rank == 0:
        single["eager"] = timed(lambda: euler(model, inputs, args.steps), args.repeats,
                                device, False)
        for name, policy in chosen:
            runner = cached(model, policy)
            single[name] = timed(lambda: euler(runner, inputs, args.steps), args.repeats,
                                 device, False)
    dist.barrier()
    # N ranks: context parallel
    parallel_model = model
    if world > 1:
        degree = {f"{args.mode}_degree": world}
        parallel_model.enable_parallelism(config=ContextParallelConfig(**degree))
    rows = []
    for name, policy in [("eager", None)] + chosen:
        runner = parallel_model if policy is None else cached(parallel_model, policy)
        seconds, out = timed(lambda: euler(runner, inputs, args.steps), args.repeats, device,
                             True)
        if rank == 0:
            one, one_out = single[name]
            rows.append((name, one, seconds, one / seconds,
                         float((out.float() - one_out.float()).abs().max()),
                         float((out.float() - single["eager"][1].float()).abs().max())))
    if rank == 0:
        print(f"\nFLUX ({args.model}{', ' + args.pretrained if args.pretrained else ''}): "
              f"{model.config.num_layers}+{model.config.num_single_layers} blocks, "
              f"{args.image_tokens}+{args.text_tokens} tokens, {args.steps} steps, {args.dtype}, "
              f"{device.type}, {'inductor' if compile_ else 'eager'}; "
              f"{world} ranks, {args.mode}; median of {args.repeats}")
        eager_one, eager_many = rows[0][1], rows[0][2]
        header = (f"{'setting':16s} {'1 rank s':>9s} {f'{world} ranks s':>10s} {f'{world}:1':>6s} "
                  f"{'vs eager 1|N':>13s} {'max|N - 1 rank|':>16s} {'max|vs uncached|':>17s}")
        print(header)
        print("-" * len(header))
        for name, one, many, speedup, vs_one, vs_uncached in rows:
            versus = f"{eager_one / one:.2f}x|{eager_many / many:.2f}x"
            print(f"{name:16s} {one:9.3f} {many:10.3f} {speedup:5.2f}x {versus:>13s} "
                  f"{vs_one:16.2e} {vs_uncached:17.2e}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
