"""`explain(model)`: what the pass found and rewrote, and what each step costs.

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` (`meta.flop_counter`,
which adds the formula torch lacks for SDPA's CPU kernel) on fake tensors by running the
same rewritten step graphs the compiled model runs. A step graph's FLOPs
are linear in its dynamic token counts, so each graph is counted once at a base count
and once per dynamic branch one token higher. With block capture, the glue (embedders,
final layer) is the eager whole-model count at capture minus the blocks'.

Example:
    >>> print(explain(cached))   # after one call of the cached model   # doctest: +SKIP
    #  block  module  kind  gate  PARTIAL-able
    ...
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tabulate import tabulate
from torch._subclasses.fake_tensor import FakeTensorMode

from .layout import CacheLayout
from .meta import fake_inputs, graph_flops
from .schedule import Plan, Schedule, StepKind
from .variants import DYNAMIC, StepGraph, build_step_graph, plan_shape

__all__ = ["explain", "step_flops", "schedule_flops", "graph_count"]


def step_flops(step_graph: StepGraph, by_op: bool = False,
               sizes: dict[str, int] | None = None) -> int | dict:
    """FLOPs of one run of a step graph on fake tensors; `sizes` sets the length of the
    1-D inputs named there (`ksize.b`, `prune.b`: the dynamic token counts)."""
    gm = step_graph.graph_module
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = fake_inputs(gm, mode)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with mode:
        for i, node in enumerate(placeholders):
            slot = node.meta.get("tocache_slot", "")
            if sizes and slot in sizes:
                inputs[i] = torch.empty(sizes[slot], dtype=inputs[i].dtype,
                                        device=inputs[i].device)
    return graph_flops(gm, inputs, mode, by_op)


class _Counter:
    """FLOPs of site plans, linear in the dynamic token counts, cached per graph."""

    def __init__(self) -> None:
        self._linear: dict[tuple, tuple[int, dict[int, int]]] = {}

    def site(self, unit, plan: Plan, layout: CacheLayout) -> int:
        tokens = [b.num_tokens for b in unit.branches]
        shape = plan_shape(plan, tokens)
        key = (id(unit), shape, layout.key())
        if key not in self._linear:
            graph = unit.step_graphs.get((shape, layout.key())) or build_step_graph(
                unit.captured.graph_module, unit.branches, shape, layout)
            dynamic = [i for i, k in enumerate(shape[1:]) if k == DYNAMIC]
            def sizes(k: dict[int, int]) -> dict[str, int]:  # k tokens: ToCa's or listed
                return {f"{name}.{i}": k.get(i, 2) for i in dynamic for name in ("ksize", "prune")}

            base = step_flops(graph, sizes=sizes({}))
            slopes = {i: step_flops(graph, sizes=sizes({i: 3})) - base
                      for i in dynamic if tokens[i] > 2}
            self._linear[key] = (base, slopes)
        base, slopes = self._linear[key]  # k = 1 runs as 2 tokens, and is counted so
        return base + sum(slope * (max(2, plan[1 + i]) - 2) for i, slope in slopes.items())


def _plan_flops(counter: _Counter, prepared, plan: Plan, layout: CacheLayout) -> int:
    total = prepared.glue_flops
    for site in prepared.sites:
        local = plan[:1] + plan[1 + site.branch_range.start:1 + site.branch_range.stop]
        if local[0] == StepKind.AGGRESSIVE and prepared.mode == "blocks":
            if site is prepared.sites[-1] or site.unit.passthrough is not None:
                continue  # returns the cached stream, or its inputs
            local = (int(StepKind.PARTIAL),) + (0,) * len(site.unit.branches)
        total += counter.site(site.unit, local, layout.local(site.branch_range))
    return total


def _label(plan: Plan, schedule: Schedule) -> str:
    kind = StepKind(plan[0])
    if kind is StepKind.PARTIAL:
        ks = [k for k, n in zip(plan[1:], schedule.branch_tokens) if 0 < k < n]
        if not ks:
            return "FORECAST" if schedule.forecast else "REUSE"
        return "PARTIAL"
    return kind.name


def graph_count(prepared, schedule: Schedule, layout: CacheLayout) -> int:
    """Compiled graphs a generation of this schedule needs (per unit, per plan shape)."""
    keys = set()
    for step in range(schedule.num_steps):
        plan = schedule.plan(step)
        for site in prepared.sites:
            local = plan[:1] + plan[1 + site.branch_range.start:1 + site.branch_range.stop]
            if local[0] == StepKind.AGGRESSIVE and prepared.mode == "blocks":
                if site is prepared.sites[-1] or site.unit.passthrough is not None:
                    continue
                local = (int(StepKind.PARTIAL),) + (0,) * len(site.unit.branches)
            tokens = [b.num_tokens for b in site.unit.branches]
            keys.add((id(site.unit), plan_shape(local, tokens),
                      layout.local(site.branch_range).key()))
    return len(keys)


def schedule_flops(cached, num_steps: int | None = None) -> dict[str, object]:
    """FLOPs per step kind and for the whole schedule of `cached`."""
    prepared = cached.last_prepared()
    schedule, layout = cached.schedule_for(num_steps)
    counter = _Counter()
    uncached = _plan_flops(counter, prepared, schedule.full_plan(), CacheLayout())
    per_kind: dict[str, list[int]] = defaultdict(list)
    per_plan: dict[Plan, int] = {}
    for step in range(schedule.num_steps):
        plan = schedule.plan(step)
        if plan not in per_plan:
            per_plan[plan] = _plan_flops(counter, prepared, plan, layout)
        per_kind[_label(plan, schedule)].append(per_plan[plan])
    total = sum(sum(values) for values in per_kind.values())
    return {"schedule": schedule, "per_kind": dict(per_kind), "per_plan": per_plan,
            "uncached_step": uncached, "total": total,
            "speedup": uncached * schedule.num_steps / total if total else float("inf"),
            "graphs": graph_count(prepared, schedule, layout)}


def _opaque_lines(prepared) -> list[str]:
    """What the submodules run outside inductor (tocache_fx.opaque) cost."""
    opaque = [o for unit in prepared.units for o in unit.captured.opaque.values()]
    if not opaque:
        return []
    classes = ", ".join(sorted({o.class_name for o in opaque}))
    partial = sum(o.token_wise for o in opaque)
    return [f"{len(opaque)} submodules ({classes}) could not be traced and run eagerly as "
            "opaque ops inside the compiled graphs, with their own host syncs "
            f"(data-dependent routing); {partial} of them are token-wise, so PARTIAL steps "
            "route only the selected tokens through them."]


def _zero_lines(schedule: Schedule, branches) -> list[str]:
    """Branches the policy could recompute in part but never does (k = 0 every step)."""
    partial_steps = [schedule.plan(s) for s in range(schedule.num_steps)
                     if schedule.plan(s)[0] == StepKind.PARTIAL]
    if not partial_steps:
        return []
    never = [b for b in branches if b.partial_ok and all(plan[1 + b.index] == 0
                                                          for plan in partial_steps)]
    if not never:
        return []
    names = ", ".join(f"#{b.index} {b.kind} ({b.num_tokens} tokens)" for b in never[:6])
    more = f" and {len(never) - 6} more" if len(never) > 6 else ""
    return [f"{len(never)} PARTIAL-able branches select 0 tokens at every partial step "
            f"(reused whole): {names}{more}"]


def _pruning_lines(cached, schedule: Schedule, branches) -> list[str]:
    """Which blocks prune how many image tokens at which steps (TokenCache)."""
    listed = cached.policy.listed_tokens(branches, schedule.num_steps)
    kept = {key[1][1]: [] for key in listed if isinstance(key[1], tuple)}
    for (step, key), tokens in listed.items():
        if isinstance(key, tuple):
            kept[key[1]].append((step, len(tokens)))
    if not kept:
        return []
    total = max((b.image_span[1] for b in branches if b.image_span), default=0)
    rows = []
    for block in sorted(kept):
        steps = sorted(step for step, _ in kept[block])
        counts = {count for _, count in kept[block]}
        rows.append((block, next(b.block_path for b in branches if b.block == block),
                     "/".join(str(total - c) for c in sorted(counts)), len(steps),
                     ",".join(map(str, steps))))
    unpruned = sorted({b.block for b in branches} - set(kept))
    return ["", f"pruned image tokens (of {total}) per P-step; blocks that never prune: "
            f"{unpruned if unpruned else 'none'}",
            tabulate(rows, headers=["block", "module", "pruned", "P-steps", "at steps"])]


def explain(cached, num_steps: int | None = None) -> str:
    """A table of the branches found and a table of FLOPs per step kind."""
    prepared = cached.last_prepared()
    branch_rows = [
        (b.index, b.block, b.block_path, b.kind, b.num_tokens,
         b.gate.name if b.gate is not None else "-",
         "yes" if b.partial_ok else f"no: {b.partial_reason}"
         + ("; TokenCache: for chosen queries" if b.query is not None else ""))
        for b in prepared.branches]
    flops = schedule_flops(cached, num_steps)
    schedule = flops["schedule"]
    step_rows = [(kind, len(values), f"{sum(values) / len(values) / 1e9:.3f}")
                 for kind, values in flops["per_kind"].items()]
    grid = prepared.grid
    capture = (f"block capture: {len(prepared.sites)} blocks, {len(prepared.units)} captured "
               "block graphs" if prepared.mode == "blocks" else "whole-model capture")
    lines = [
        f"{type(cached.original).__name__} with {cached.policy!r}",
        f"{capture}; {len(prepared.branches)} residual branches; token grid "
        f"{'x'.join(map(str, grid)) if grid else 'unknown (grid bonus off)'}",
        *_opaque_lines(prepared),
        tabulate(branch_rows, headers=["#", "block", "module", "kind", "tokens", "gate",
                                       "PARTIAL-able"]),
        "",
        tabulate(step_rows, headers=["step kind", "steps", "GFLOPs / step"]),
        *_zero_lines(schedule, prepared.branches),
        *_pruning_lines(cached, schedule, prepared.branches),
        "",
        f"schedule: {schedule.num_steps} steps, {flops['total'] / 1e9:.3f} GFLOPs vs "
        f"{flops['uncached_step'] * schedule.num_steps / 1e9:.3f} uncached: "
        f"{flops['speedup']:.2f}x fewer FLOPs; {flops['graphs']} compiled graphs",
    ]
    return "\n".join(lines)

