"""The worker of `tests/test_context_parallel.py`: one rank of a CPU / gloo context-parallel run.

`run(rank, world, port, out_dir, jobs)` is started by `torch.multiprocessing.start_processes`
(importable: spawned children unpickle it by name). Every rank builds the same tiny models
(FLUX: 2 double + 2 single blocks, width 32, 64 image + 8 text tokens; Wan: 2 blocks, 32
tokens), computes the single-process references of each model family once (the policies
split between the ranks, then exchanged), then runs each job under diffusers' context
parallelism and writes what it measured to `out_dir/rank<r>.json`; the test asserts on it. A
job that raises records its traceback instead, so one failure does not hide the other checks.

Jobs are named `<family>/<mode>-<order>[:<policy>]`: family "flux" or "wan", mode "ulysses"
or "ring", order "enable_first" (`enable_parallelism`, then `tocache_fx.transform`) or
"transform_first" (the other way round, on the transformed model); every policy of the
family's `policies()` (captures shared by `with_policy`), or only `:<policy>`.
"flux/ulysses-compiled" runs FORA and ToCa compiled with inductor over two generations with
`torch._dynamo.config.error_on_recompile=True` (on the same FLUX without single-stream
blocks: see the job); "flux/ulysses-after_generation" runs a generation in one process, then
enables Ulysses on the transformed model and runs again; "<family>/<mode>-scores" compares
ToCa's and DuCa's token scores after the first (FULL) step with the one-process ones.
"zoo/models" runs every zoo model with a `_cp_plan` under Ulysses and Ring (see `_zoo`).

`python tests/cp_worker.py JOB ...` runs jobs on 2 ranks by hand and prints rank 0's results.

The workarounds a machine without accelerators needs (diffusers' device count, Ring's
log-sum-exp on the CPU) are in `tocache_fx.harness.cpu_parallel`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import traceback
from datetime import timedelta
from typing import Any

STEPS = 8
N_IMG, N_TXT = 64, 8  # tokens: divisible by 2 (and 4) ranks
CAPTURES = [0]  # calls of tocache_fx.runtime.prepare (see `run`)


def flux_model(single_layers: int = 2):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=single_layers,
        attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6)).eval()


def flux_inputs() -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(1)
    side = int(math.isqrt(N_IMG))
    img_ids = torch.zeros(N_IMG, 3)
    img_ids[:, 1] = torch.arange(N_IMG) // side
    img_ids[:, 2] = torch.arange(N_IMG) % side
    return dict(hidden_states=torch.randn(1, N_IMG, 4, generator=generator),
                encoder_hidden_states=torch.randn(1, N_TXT, 32, generator=generator),
                pooled_projections=torch.randn(1, 32, generator=generator),
                img_ids=img_ids, txt_ids=torch.zeros(N_TXT, 3))


def euler(model, inputs: dict[str, Any], steps: int = STEPS):
    """Rectified-flow Euler from sigma 1 to 0; a fresh timestep tensor per step."""
    import torch

    x = inputs["hidden_states"].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            call = {**inputs, "hidden_states": x}
            v = model(**call, timestep=torch.tensor([float(sigmas[i])]), return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def token_cache(num_blocks: int, num_tokens: int):
    """TokenCache with an untrained (seeded, so every rank's is the same) predictor."""
    import torch

    from tocache_fx import CachePredictor, TokenCache

    torch.manual_seed(2)
    return TokenCache(predictor=CachePredictor(num_blocks, num_tokens), prune_ratio=0.5,
                      k1=2, k2=2, num_steps=STEPS)


def policies() -> dict[str, Any]:
    from tocache_fx import FORA, DuCa, NoCache, TaylorSeer, ToCa

    return {"nocache": NoCache(), "fora": FORA(interval=2, num_steps=STEPS),
            "taylorseer": TaylorSeer(interval=2, warmup=2, num_steps=STEPS),
            "toca": ToCa.flux(num_steps=STEPS),
            "duca": DuCa(interval=3, cache_ratio=0.9, num_steps=STEPS),
            "token_cache": token_cache(4, N_IMG)}


def wan_model():
    """Tiny Wan 2.1-like video DiT: 2 blocks, 2 heads x 12; a 1x4x2x8x8 latent is 32 tokens."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def wan_inputs() -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=generator),
                encoder_hidden_states=torch.randn(1, 12, 16, generator=generator))


def wan_euler(model, inputs: dict[str, Any], steps: int = STEPS):
    """Flow-matching Euler with integer timesteps 999 -> 0 (fresh tensors), as Wan's."""
    import torch

    x = inputs["hidden_states"].clone()
    timesteps = torch.linspace(999, 0, steps + 1).round()
    with torch.no_grad():
        for i in range(steps):
            call = {**inputs, "hidden_states": x}
            t = torch.tensor([int(timesteps[i])])
            v = model(**call, timestep=t, return_dict=False)[0]
            x = x + float(timesteps[i + 1] - timesteps[i]) / 1000 * v
    return x


def wan_policies() -> dict[str, Any]:
    from tocache_fx import ToCa

    return {**policies(), "toca": ToCa(interval=3, cache_ratio=0.7, num_steps=STEPS),
            "token_cache": token_cache(2, 32)}


FAMILIES = {"flux": (flux_model, flux_inputs, euler, policies),
            "wan": (wan_model, wan_inputs, wan_euler, wan_policies)}


def cp_config(mode: str, world: int):
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(**{f"{mode}_degree": world})


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _psnr(out, ref) -> float:
    """PSNR of `out` against `ref`, peak = ref's range."""
    mse = float(((out.float() - ref.float()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return 99.0 if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def _collectives(graph_module) -> int:
    return sum("_c10d_functional" in str(node.target) for node in graph_module.graph.nodes)


def _describe(cached) -> dict[str, Any]:
    """What a cached model captured and ran: branches (kind, tokens, PARTIAL-able), the step
    kinds of its last generation, and the collectives in its non-FULL step graphs."""
    prepared = cached.last_prepared()
    generation = next(iter(cached._generations.values()))
    reuse_collectives = sum(_collectives(graph.graph_module) for unit in prepared.units
                            for key, graph in unit.step_graphs.items() if key[0][0] != 0)
    return {"branches": [(b.kind, b.num_tokens, b.partial_ok) for b in prepared.branches],
            "kinds": [int(kind) for kind in generation.kinds],
            "reuse_collectives": reuse_collectives}


def _record(output, reference, single) -> dict[str, Any]:
    import torch

    return {"finite": bool(torch.isfinite(output).all()),
            "vs_original": _max_diff(output, reference),
            "psnr_vs_original": _psnr(output, reference),
            "vs_single": None if single is None else _max_diff(output, single)}


def run(rank: int, world: int, port: int, out_dir: str, jobs: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    start = time.perf_counter()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1  # no compile worker pool on 2 shared cores
    from tocache_fx.harness.cpu_parallel import patch_for_cpu

    patch_for_cpu()
    import tocache_fx
    import tocache_fx.runtime

    prepare = tocache_fx.runtime.prepare

    def counted(*args, **kwargs):  # how many times a call signature is captured
        CAPTURES[0] += 1
        return prepare(*args, **kwargs)

    tocache_fx.runtime.prepare = counted

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    results: dict[str, Any] = {"timings": {"start": time.perf_counter() - start}}
    try:
        families: dict[str, tuple] = {}
        results["single"] = {}
        for job in jobs:
            family, _, task = job.rpartition("/")
            family = family or "flux"
            if family != "zoo" and family not in families:
                began = time.perf_counter()
                families[family] = _references(family, rank, world)
                results["single"][family] = {name: _record(out, families[family][2], None)
                                             for name, out in families[family][3].items()}
                results["timings"][f"{family}/single"] = time.perf_counter() - began
            began = time.perf_counter()
            try:
                results[job] = _zoo(world) if family == "zoo" else \
                    _job(task, family, *families[family], world)
            except Exception:  # noqa: BLE001 - reported to the test
                results[job] = {"error": traceback.format_exc()}
            results["timings"][job] = time.perf_counter() - began
            dist.barrier()
    except Exception:  # noqa: BLE001
        results["error"] = traceback.format_exc()
    finally:
        results["timings"]["total"] = time.perf_counter() - start
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        dist.destroy_process_group()


def _references(family: str, rank: int, world: int) -> tuple:
    """(model, inputs, uncached output, {policy: one-process output}) of a model family; the
    one-process runs are split between the ranks, then exchanged."""
    import torch
    import torch.distributed as dist

    import tocache_fx

    build, make_inputs, sample, family_policies = FAMILIES[family]
    model, inputs = build(), make_inputs()
    reference = sample(model, inputs)
    single: dict[str, Any] = {}
    base = tocache_fx.transform(model, family_policies()["nocache"], compile=False)
    for i, (name, policy) in enumerate(family_policies().items()):
        if i % world == rank:
            single[name] = sample(base.with_policy(policy), inputs)
    shared: list[dict] = [None] * world
    dist.all_gather_object(shared, {name: out.tolist() for name, out in single.items()})
    single = {name: torch.tensor(out) for part in shared for name, out in part.items()}
    return model, inputs, reference, single


def _job(job: str, family: str, model, inputs, reference, single, world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import tocache_fx

    _, _, euler, policies = FAMILIES[family]
    name, _, only = job.partition(":")
    mode, _, order = name.partition("-")
    chosen = {k: v for k, v in policies().items() if not only or k == only}
    copy_ = copy.deepcopy(model)
    out: dict[str, Any] = {}
    if order == "compiled":  # FORA and ToCa compiled with inductor, two generations each
        # On FLUX without single-stream blocks: inductor compiles one FULL graph per block
        # class, ~25 s each on a cold cache on 2 busy cores. FORA against its one-process
        # run; ToCa (scores with collectives of their own) against its eager CP run.
        model = flux_model(single_layers=0)
        reference = euler(model, inputs)
        torch._dynamo.reset()
        for name in ("fora", "toca"):
            policy, copy_ = policies()[name], copy.deepcopy(model)
            copy_.enable_parallelism(config=cp_config(mode, world))
            if name == "fora":
                eager = euler(tocache_fx.transform(model, policy, compile=False), inputs)
            else:
                parallel = copy.deepcopy(model)
                parallel.enable_parallelism(config=cp_config(mode, world))
                eager = euler(tocache_fx.transform(parallel, policy, compile=False), inputs)
            cached = tocache_fx.transform(copy_, policy)
            with torch._dynamo.config.patch(error_on_recompile=True):
                first = euler(cached, inputs)
                graphs = cached.num_compiled_graphs
                second = euler(cached, inputs)
            out[name] = {**_record(first, reference, eager), **_describe(cached),
                         "graphs": graphs, "graphs_after_second": cached.num_compiled_graphs,
                         "repeat": _max_diff(first, second)}
        return out
    if order == "scores":  # the first FULL step's token scores, against one process's
        return {name: _scores(family, model, copy.deepcopy(model), inputs, policies()[name],
                              mode, world) for name in ("toca", "duca")}
    if order == "after_generation":  # one-process generation, then enable_parallelism
        cached = tocache_fx.transform(copy_, policies()["fora"], compile=False)
        before = euler(cached, inputs)
        tokens_before = [b.num_tokens for b in cached.last_prepared().branches]
        cached.enable_parallelism(config=cp_config(mode, world))
        after = euler(cached, inputs)
        out["fora"] = {**_record(after, reference, single["fora"]), **_describe(cached),
                       "before_vs_single": _max_diff(before, single["fora"]),
                       "tokens_before": tokens_before}
        return out
    if order == "enable_first":
        copy_.enable_parallelism(config=cp_config(mode, world))
        base = tocache_fx.transform(copy_, policies()["nocache"], compile=False)
    elif order == "transform_first":
        base = tocache_fx.transform(copy_, policies()["nocache"], compile=False)
        base.enable_parallelism(config=cp_config(mode, world))  # forwarded to the model
    else:
        raise ValueError(f"unknown job {job!r}")
    for policy_name, policy in chosen.items():
        began, captures = time.perf_counter(), CAPTURES[0]
        cached = base if policy_name == "nocache" else base.with_policy(policy)
        output = euler(cached, inputs)
        seconds = time.perf_counter() - began
        gathered: list = [None] * world
        dist.all_gather_object(gathered, output)
        out[policy_name] = {**_record(output, reference, single[policy_name]),
                            **_describe(cached),
                            "ranks_agree": all(torch.equal(g, output) for g in gathered),
                            "seconds": seconds, "captures": CAPTURES[0] - captures}
    return out


def _cp_call(model, inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` as the model's CP plan expects them: `return_dict=False` (diffusers' output
    gather takes tensors), and an input the plan splits with one more dimension than given
    (Flux2's position ids) batched."""
    import torch

    plan = getattr(type(model), "_cp_plan", {}).get("", {})
    call = dict(inputs, return_dict=False)
    for name, spec in plan.items():
        dims = getattr(spec, "expected_dims", None)
        if isinstance(call.get(name), torch.Tensor) and dims == call[name].dim() + 1:
            call[name] = call[name][None]
    return call


def _plan_of(model) -> dict[str, Any]:
    """The class's `_cp_plan` without the entries naming modules this tiny config lacks
    (Helios' plan names its 40 blocks one by one; the zoo builds 2)."""
    def exists(name: str) -> bool:
        if "*" in name:  # a pattern: diffusers matches it against the modules itself
            return True
        try:
            model.get_submodule(name)
        except AttributeError:
            return False
        return True

    return {name: entry for name, entry in type(model)._cp_plan.items() if exists(name)}


def _outputs(output) -> list:
    """Every tensor a model returns, in order."""
    import torch
    from torch.utils import _pytree as pytree

    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def _max_diff_all(a: list, b: list) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(map(_max_diff, a, b))


def _zoo(world: int) -> dict[str, dict[str, Any]]:
    """Every zoo model with a `_cp_plan` (tests/zoo.py, batch 1), under Ulysses and Ring
    ({mode: {model: result}}): the one-process runs once per model, then per mode diffusers'
    own CP output against one process (where diffusers' CP fails on the model, its error),
    and ours: NoCache against one process, FORA(2) over two calls against its one-process
    run, ToCa(2) over two calls (FULL, PARTIAL) against the uncached second call, next to
    its one-process run's. Every output is compared (LTX2's and MiniMax-H3's audio too)."""
    import torch

    import tocache_fx
    from zoo import ZOO

    toca_policy = tocache_fx.ToCa(interval=2, full_schedule="fixed", step_clock="countup",
                                  num_steps=2)  # FULL, then PARTIAL
    out: dict[str, dict[str, Any]] = {mode: {} for mode in ("ulysses", "ring")}
    for entry in ZOO:
        model = entry.build()
        if not getattr(type(model), "_cp_plan", None):
            continue
        calls = [_cp_call(model, entry.inputs(1, t)) for t in (0.5, 0.4)]
        with torch.no_grad():
            reference = _outputs(model(**calls[0]))
            uncached = _outputs(model(**calls[1]))
            one = tocache_fx.transform(model, tocache_fx.FORA(2, num_steps=2), compile=False)
            fora_one = [_outputs(one(**call)) for call in calls]
            toca_single = one.with_policy(toca_policy)
            toca_one = [_outputs(toca_single(**call)) for call in calls][1]
            for mode, results in out.items():
                began = time.perf_counter()
                parallel = copy.deepcopy(model)
                try:
                    parallel.enable_parallelism(config=cp_config(mode, world),
                                                cp_plan=_plan_of(model))
                    theirs = _outputs(parallel(**calls[0]))
                except Exception as error:  # noqa: BLE001 - diffusers' own CP on this config
                    results[entry.name] = {"diffusers_error": f"{type(error).__name__}: {error}"[:300]}
                    continue
                base = tocache_fx.transform(parallel, tocache_fx.NoCache(), compile=False)
                ours = _outputs(base(**calls[0]))
                fora = base.with_policy(tocache_fx.FORA(2, num_steps=2))
                fora_many = [_outputs(fora(**call)) for call in calls]
                toca = base.with_policy(toca_policy)
                toca_out = [_outputs(toca(**call)) for call in calls]
                kinds = {name: [int(kind) for kind in next(iter(cached._generations.values())).kinds]
                         for name, cached in (("fora", fora), ("toca", toca))}
                results[entry.name] = {
                    "diffusers_vs_original": _max_diff_all(theirs, reference),
                    "nocache_vs_original": _max_diff_all(ours, reference),
                    "fora_vs_single": max(map(_max_diff_all, fora_many, fora_one)),
                    "toca_finite": all(bool(torch.isfinite(t).all()) for o in toca_out for t in o),
                    "toca_vs_original": _max_diff_all(toca_out[1], uncached),
                    "toca_single_vs_original": _max_diff_all(toca_one, uncached),
                    "kinds": kinds, "seconds": time.perf_counter() - began}
    return out


def _first_step_scores(model, policy, inputs, euler) -> dict[tuple[int, int], Any]:
    """(site, branch) -> the score slot of its source attention after one FULL step."""
    import tocache_fx

    cached = tocache_fx.transform(model, policy, compile=False)
    euler(cached, inputs, steps=1)
    generation = next(iter(cached._generations.values()))
    return {(site, int(name.split(".")[1])): value for site, slots in generation.slots.items()
            for name, value in slots.items() if name.startswith("score.")}


def _rank_positions(family: str, length: int, rank: int, world: int):
    """Where a rank's tokens sit in a one-process score of `length` tokens: its chunk of
    each stream (FLUX's single-stream joint sequence is text, then image)."""
    import torch

    parts = [N_TXT, N_IMG] if family == "flux" and length == N_TXT + N_IMG else [length]
    positions, offset = [], 0
    for part in parts:
        chunk = part // world
        positions.append(torch.arange(offset + rank * chunk, offset + (rank + 1) * chunk))
        offset += part
    return torch.cat(positions)


def _scores(family: str, model, parallel, inputs, policy, mode: str, world: int) -> dict:
    """Max |rank's score - one process's score of the rank's tokens| over every scored
    attention of the first (FULL) step."""
    import torch.distributed as dist

    _, _, euler, _ = FAMILIES[family]
    one = _first_step_scores(model, policy, inputs, euler)
    parallel.enable_parallelism(config=cp_config(mode, world))
    mine = _first_step_scores(parallel, policy, inputs, euler)
    rank = dist.get_rank()
    # (a block may score under one and not the other: k is computed from the local count)
    return {"scored": len(mine), "unmatched": [key for key in mine if key not in one],
            "max_diff": max((_max_diff(mine[key], one[key][:, _rank_positions(
                family, one[key].shape[1], rank, world)]) for key in mine if key in one),
                default=None)}


def main(argv: list[str] | None = None) -> int:
    """`python tests/cp_worker.py JOB ...`: run jobs on 2 ranks and print rank 0's results."""
    import socket
    import sys
    import tempfile

    import torch.multiprocessing as mp

    jobs = (argv if argv is not None else sys.argv[1:]) or ["ulysses-enable_first"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(run, args=(2, port, out_dir, jobs), nprocs=2, start_method="spawn")
        for rank in range(2):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                print(f"rank {rank}:", f.read() if rank == 0 else json.load(f)["timings"])
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cp_worker  # the spawned children unpickle `cp_worker.run`, not `__main__.run`

    raise SystemExit(cp_worker.main())
