"""The measurements behind the choices in docs/design.md, on this machine.

    python examples/design_measurements.py [--threads 1] [--only staleness dynamic taylor capture dispatch]

* staleness: what the stale-capture check costs per call (and per generation) against
  a REUSE step of DiT-B/2 (12 blocks, 768 wide, 256 tokens, CFG batch 2);
* dynamic: a PARTIAL step with the token count a dynamic size against one compiled for
  that exact count (DiT-B/2 width, 2 blocks);
* taylor: TaylorSeer's forecast with its coefficients as a graph input against the
  same coefficients baked in as constants;
* capture: steady ms per step of block capture, whole-model capture and plain
  `torch.compile`, interleaved, on the shipped digits DiT and on DiT-B/2;
* dispatch: at DiT-XL/2 depth, 128 wide (the compile benchmark's DiT), `NoCache` with
  block capture against plain `torch.compile` and against its own 28 compiled block
  graphs called back to back on one step's inputs (no glue, no per-block dispatch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tocache_fx
from tocache_fx import FORA, NoCache, TaylorSeer, ToCa
from tocache_fx.compiling import compile_step_graph
from tocache_fx.variants import DYNAMIC, build_step_graph
from tocache_fx.watch import fingerprint


def dit(layers: int, heads: int = 12, head_dim: int = 64):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_layers=layers, num_attention_heads=heads,
                                 attention_head_dim=head_dim, in_channels=4, out_channels=8,
                                 sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()


def calls(steps: int, size: int = 32, channels: int = 4):
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 1000]) if channels == 4 else torch.tensor([3, 10])
    timesteps = torch.linspace(999, 0, steps).long()
    return [dict(hidden_states=x, timestep=t.expand(2), class_labels=labels) for t in timesteps]


def timed(fn, repeats: int = 5) -> float:
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return statistics.median(values)


def interleaved(fns: dict, repeats: int = 5) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def generation(model, steps):
    def run():
        if hasattr(model, "reset"):
            model.reset()
        with torch.no_grad():
            for kwargs in steps:
                model(**kwargs)
    return run


def staleness() -> None:
    model = dit(12)
    steps = calls(3)
    cached = tocache_fx.transform(model, FORA(interval=3, num_steps=3))
    generation(cached, steps)()  # compiled, warm
    reuses = []
    for _ in range(5):  # steps 1 and 2 of each generation are REUSE steps
        cached.reset()
        with torch.no_grad():
            cached(**steps[0])
            for kwargs in steps[1:]:
                start = time.perf_counter()
                cached(**kwargs)
                reuses.append(time.perf_counter() - start)
    assert cached._generations["default"].kinds == [0, 1, 1]
    reuse = statistics.median(reuses)
    per_call = timed(lambda: [cached._check_registrations() for _ in range(1000)]) / 1000
    sites = cached.last_prepared().sites
    per_generation = timed(lambda: [fingerprint(site.module) for site in sites])
    print(f"staleness: REUSE step of DiT-B/2 {reuse * 1e3:.1f} ms; per-call check "
          f"{per_call * 1e6:.2f} us ({per_call / reuse:.4%} of it); per-generation "
          f"fingerprint of the {len(sites)} blocks {per_generation * 1e3:.2f} ms "
          f"({per_generation / (3 * reuse):.2%} of three REUSE steps)")


def dynamic() -> None:
    from tocache_fx.layout import plan_layout
    from tocache_fx.schedule import build_schedule
    from tocache_fx.units import prepare

    model = dit(2)
    inputs = calls(1)[0]
    prepared = prepare(model, ((), inputs), inputs, "blocks")
    policy = ToCa(cache_ratio=0.8, num_steps=10, time_weight=0.0)
    schedule = build_schedule(policy, prepared.branches, 10)
    layout = plan_layout(policy, schedule, prepared.branches, prepared.grid)
    site = prepared.sites[0]
    unit = site.unit
    local = layout.local(site.branch_range)
    block_call = {}

    def record(module, args, kwargs):
        block_call.setdefault("call", (args, kwargs))

    handle = site.module.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    flat = [*site.state(), *unit.captured.flatten(block_call["call"])]
    full = build_step_graph(unit.captured.graph_module, unit.branches, schedule.full_plan()[:3], local)
    with torch.no_grad():
        out = full.graph_module(*flat)
    slots = dict(zip(full.writes, out[full.num_outputs:]))
    for k in (13, 51, 128):
        graphs = {"static": build_step_graph(unit.captured.graph_module, unit.branches, (1, 0, k), local),
                  "dynamic": build_step_graph(unit.captured.graph_module, unit.branches, (1, 0, DYNAMIC), local)}
        feeds = {}
        for name, graph in graphs.items():
            feed = dict(slots, **{"ksize.1": torch.empty(k), "kvalid.1": torch.tensor(k)})
            compiled = compile_step_graph(graph.graph_module, None)
            args = flat + [feed[n] for n in graph.reads]
            with torch.no_grad():
                compiled(*args)
            feeds[name] = (compiled, args)

        def call(name):
            compiled, args = feeds[name]
            return lambda: compiled(*args)

        result = interleaved({name: call(name) for name in feeds}, repeats=15)
        print(f"dynamic: PARTIAL block step, k={k} of 256: static {result['static'] * 1e3:.2f} ms, "
              f"dynamic {result['dynamic'] * 1e3:.2f} ms ({result['dynamic'] / result['static'] - 1:+.1%})")


def taylor() -> None:
    model = dit(12)
    steps = calls(4)
    cached = tocache_fx.transform(model, TaylorSeer(interval=3, num_steps=4))
    generation(cached, steps)()
    unit = cached.last_prepared().units[0]
    reuse_key = next(key for key in unit.step_graphs if key[0][0] == 1)
    graph = unit.step_graphs[reuse_key]
    coefficient = cached._plans[next(iter(cached._plans))].coefficients[2]
    baked = graph.graph_module
    import copy
    constant = copy.deepcopy(baked)
    node = next(n for n in constant.graph.nodes if n.meta.get("tocache_slot") == "forecast")
    with constant.graph.inserting_after(node):
        const = constant.graph.call_function(torch.ops.aten.full.default,
                                             ([coefficient.numel()], float(coefficient[0])))
    node.replace_all_uses_with(const)
    constant.graph.erase_node(node)
    constant.recompile()
    site = cached.last_prepared().sites[0]
    generation_slots = cached._generations["default"].slots[site.index]
    block_call = {}
    handle = site.module.register_forward_pre_hook(
        lambda m, a, k: block_call.setdefault("call", (a, k)), with_kwargs=True)
    with torch.no_grad():
        model(**steps[0])
    handle.remove()
    flat = [*site.state(), *unit.captured.flatten(block_call["call"])]
    inputs = [generation_slots.get(n, coefficient) if n != "forecast" else coefficient
              for n in graph.reads]
    as_input = torch.compile(baked, fullgraph=True, dynamic=False)
    as_constant = torch.compile(constant, fullgraph=True, dynamic=False)
    rest = [generation_slots[n] for n in graph.reads if n != "forecast"]
    with torch.no_grad():
        as_input(*flat, *inputs)
        as_constant(*flat, *rest)
    result = interleaved({"input": lambda: as_input(*flat, *inputs),
                          "constant": lambda: as_constant(*flat, *rest)}, repeats=25)
    print(f"taylor: forecast block step, coefficients as input {result['input'] * 1e3:.3f} ms, "
          f"as constants {result['constant'] * 1e3:.3f} ms "
          f"({result['input'] / result['constant'] - 1:+.1%})")


def capture() -> None:
    from tocache_fx.harness.sampling import load_dit_digits

    for name, model, steps in (("shipped digits DiT (6 x 128, batch 2)", load_dit_digits(),
                                calls(10, 32, 1)),
                               ("DiT-B/2 (12 x 768)", dit(12), calls(4))):
        plain = torch.compile(model, fullgraph=True, dynamic=False)
        blocks = tocache_fx.transform(model, NoCache(), capture="blocks")
        whole = tocache_fx.transform(model, NoCache(), capture="model")
        runs = {"plain torch.compile": generation(plain, steps),
                "blocks": generation(blocks, steps), "model": generation(whole, steps)}
        for run in runs.values():
            run()
        result = interleaved(runs, repeats=7)
        base = result["plain torch.compile"]
        print(f"capture, {name}: " + ", ".join(
            f"{k} {v / len(steps) * 1e3:.2f} ms/step ({v / base:.3f}x)" for k, v in result.items()))


def dispatch() -> None:
    from benchmark import make_inputs, make_model  # examples/benchmark.py

    from tocache_fx.runtime import _dense

    model = make_model("dit", 128, torch.float32, "cpu")
    steps = make_inputs("dit", model, 20, "cpu", torch.float32)
    plain = torch.compile(model, fullgraph=True, dynamic=False)
    blocks = tocache_fx.transform(model, NoCache(), capture="blocks")
    generation(blocks, steps)()
    first = {}
    hook = model.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: first.update(call=(args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(**steps[0])
    hook.remove()
    sites = blocks.last_prepared().sites
    (planned,) = blocks._plans.values()
    graphs = [planned.bound[key].run for key in sorted(planned.bound)]  # one per site
    inputs = [_dense(t) for t in sites[0].unit.captured.flatten(first["call"])]
    hidden = next(i for i, t in enumerate(inputs) if t.dim() == 3)
    states = [site.state() for site in sites]

    def block_graphs() -> None:
        with torch.no_grad():
            for _ in steps:
                feed = list(inputs)
                for graph, state in zip(graphs, states):
                    feed[hidden] = graph(*state, *feed)[0]

    runs = {"plain torch.compile": generation(plain, steps), "NoCache (blocks)":
            generation(blocks, steps), f"its {len(graphs)} block graphs alone": block_graphs}
    for run in runs.values():
        run()
    result = interleaved(runs, repeats=5)
    base = result["plain torch.compile"]
    print("dispatch, DiT 28 x 128: " + ", ".join(
        f"{k} {v / len(steps) * 1e3:.1f} ms/step ({base / v:.3f}x plain)"
        for k, v in result.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*",
                        default=["staleness", "dynamic", "taylor", "capture", "dispatch"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.only:
        globals()[name]()


if __name__ == "__main__":
    main()
