"""Run the pass over one zoo model and report what it found and whether it holds.

Checks (the model is captured once, with the default capture: its repeated blocks where
it has them; the policies share the capture via `with_policy`): `NoCache` and
`ToCa(interval=1)` equal the original model over a short generation; a PARTIAL step
(half of every stream's tokens) run on the inputs of the FULL step before it reproduces
its output;
a ToCa and a DuCa policy run (compiled with inductor when asked, with recompiles made
errors), and a TaylorSeer policy runs eagerly; each gives finite outputs, counts the
steps of the generation and saves FLOPs. A model the pass cannot handle must raise
`UnsupportedModelError`; that is recorded as "not supported" with its message.

``python tests/zoo_coverage.py [--compile-all] [--write README.md] [ClassName ...]`` prints
the coverage table and, with ``--write``, replaces the table between the coverage
markers. ToCa and DuCa run compiled for the `COMPILED` families (all with --compile-all).

Example:
    >>> row = check(next(z for z in ZOO if z.name == "DiTTransformer2DModel"))  # doctest: +SKIP
    >>> row.status
    'passes'
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate
from torch.utils import _pytree as pytree

import tocache_fx
from tocache_fx import DuCa, NoCache, TaylorSeer, ToCa, UnsupportedModelError
from tocache_fx.explain import schedule_flops

sys.path.insert(0, str(Path(__file__).parent))
from zoo import ZOO, ZOO_SKIPPED, ZooModel  # noqa: E402

STEPS = 6
BATCH = 2
HALF = (("mlp", 1.0), ("attention_mlp", 1.0), ("cross_attention", 1.0))
POLICIES = {
    "ToCa": ToCa(num_steps=STEPS, interval=3, cache_ratio=0.5, kind_factors=HALF,
                 full_schedule="fixed"),
    "DuCa": DuCa(num_steps=STEPS, interval=3, cache_ratio=0.5, kind_factors=HALF,
                 full_schedule="fixed"),
}
EAGER_POLICIES = {  # run without inductor on every model (cheap: no partial compute)
    "TaylorSeer": TaylorSeer(num_steps=STEPS, interval=2, order=2),
}
COMPILED = {"DiTTransformer2DModel", "PixArtTransformer2DModel", "FluxTransformer2DModel",
            "SD3Transformer2DModel", "LatteTransformer3DModel", "WanTransformer3DModel",
            "HiDreamImageTransformer2DModel"}
REPRODUCE = ToCa(num_steps=2, interval=2, cache_ratio=0.5, depth_weight=0.0, time_weight=0.0,
                 kind_factors=HALF, full_schedule="fixed")  # half the tokens
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


@dataclass
class Coverage:
    name: str
    graph: str  # "one graph" | "one graph + N opaque modules (Class)"
    branches: str  # "12: 4 self_attention, 4 mlp, ..." with the PARTIAL-able count
    status: str  # "passes" | "passes (not compiled: <reason>)" | "not supported: <reason>"
    compiled: bool


def _tensors(output: object) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def generate(model, entry: ZooModel) -> list[list[torch.Tensor]]:
    """Every step's output tensors of a short generation (t from 1 down)."""
    with torch.no_grad():
        return [_tensors(model(**entry.inputs(BATCH, 1 - step / STEPS))) for step in range(STEPS)]


def _describe(cached) -> tuple[str, str]:
    prepared = cached.last_prepared()
    opaque = [o for unit in prepared.units for o in unit.captured.opaque.values()]
    graph = "one graph" if prepared.mode == "model" else \
        f"{len(prepared.sites)} blocks, {len(prepared.units)} graphs"
    if opaque:
        classes = sorted({o.class_name for o in opaque})
        graph += f" + {len(opaque)} opaque modules ({', '.join(classes)})"
    kinds = Counter(b.kind for b in prepared.branches)
    partial = sum(b.partial_ok for b in prepared.branches)
    branches = (f"{len(prepared.branches)} ({partial} PARTIAL-able): "
                + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))
    return graph, branches


def partial_reproduces_full(cached, entry: ZooModel) -> None:
    """A PARTIAL step on the inputs of the FULL step before it gives the FULL output:
    every recomputed token must land where it came from (gather, compute, scatter,
    reused attention outputs, opaque modules, per-stream token counts)."""
    inputs = entry.inputs(BATCH, 0.5)
    outputs = []
    for step in (0, 1):  # the step is stated, so the repeated inputs are step 1
        with torch.no_grad(), cached.cache_context("reproduce", step_index=step,
                                                   num_inference_steps=2):
            outputs.append(_tensors(cached(**inputs)))
    schedule, _ = cached.schedule_for(2)
    assert schedule.plan(1)[0] == 1 and any(0 < k < n for k, n in zip(
        schedule.plan(1)[1:], schedule.branch_tokens)), "step 1 is not PARTIAL"
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"PARTIAL on FULL's inputs differs: {m}")


def check(entry: ZooModel, compile: bool = False) -> Coverage:
    """Run every check on `entry`; raises AssertionError when a check fails."""
    model = entry.build()
    reference = generate(model, entry)
    base = tocache_fx.transform(model, NoCache(), compile=False)
    try:
        uncached = generate(base, entry)
    except UnsupportedModelError as error:
        return Coverage(entry.label, "-", "-", f"not supported: {error}", compile)
    graph, branches = _describe(base)
    torch.testing.assert_close(uncached, reference, msg=lambda m: f"NoCache differs: {m}")
    once = generate(base.with_policy(ToCa(interval=1)), entry)
    torch.testing.assert_close(once, reference, msg=lambda m: f"interval=1 differs: {m}")
    if any(b.partial_ok for b in base.last_prepared().branches):
        partial_reproduces_full(base.with_policy(REPRODUCE), entry)
    policies = [(name, policy, compile) for name, policy in POLICIES.items()] + [
        (name, policy, False) for name, policy in EAGER_POLICIES.items()]
    refused = ""
    for name, policy, compiled in policies:
        cached = base.with_policy(policy, compile=compiled)
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                outputs = generate(cached, entry)
        except UnsupportedModelError as error:  # compiling refused: the checks run eagerly
            if not compiled:
                raise
            refused, compile = str(error), False
            cached = base.with_policy(policy, compile=False)
            outputs = generate(cached, entry)
        assert all(t.isfinite().all() for step in outputs for t in step), f"{name}: not finite"
        steps_seen = cached._generations["default"].tracker.step + 1
        assert steps_seen == STEPS, f"{name}: counted {steps_seen} steps of one generation"
        saving = schedule_flops(cached)["speedup"]
        assert saving > 1, f"{name}: the schedule saves no FLOPs ({saving:.2f}x)"
    status = f"passes (not compiled: {refused})" if refused else "passes"
    return Coverage(entry.label, graph, branches, status, compile)


def table(rows: list[Coverage]) -> str:
    body = [(r.name, r.graph, r.branches, r.status + (
        " (ToCa, DuCa compiled)" if r.compiled and r.status == "passes" else ""))
        for r in rows]
    body += [(name, "-", "-", f"not in the zoo: {why}") for name, why in ZOO_SKIPPED.items()]
    return tabulate(body, headers=["model", "capture", "branches found", "result"],
                    tablefmt="github")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--compile-all", action="store_true",
                        help="ToCa/DuCa with inductor for every model (about an hour)")
    parser.add_argument("--write", type=Path, help="file whose coverage table is replaced")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for entry in ZOO:
        if args.names and not {entry.name, entry.label} & set(args.names):
            continue
        try:
            rows.append(check(entry, compile=args.compile_all or entry.name in COMPILED))
        except Exception as error:  # noqa: BLE001 - the table records every failure
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            rows.append(Coverage(entry.label, "-", "-",
                                 f"FAILS: {type(error).__name__}: {first}"[:200], False))
        print(rows[-1], flush=True)
    text = table(rows)
    print(text)
    if args.write:
        doc = args.write.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        args.write.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))


if __name__ == "__main__":
    main()
