"""`explain(model)`: what the pass rewrote and what each step costs.

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on fake tensors, by
running each step graph (the same rewritten graphs the compiled model runs) once.

Example:
    >>> print(explain(cached))   # after one call of the cached model   # doctest: +SKIP
    block  branch           gate       PARTIAL-able
    ...
"""

from __future__ import annotations

from collections import Counter

import torch
from tabulate import tabulate
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .layout import CacheLayout
from .schedule import Schedule, StepKind
from .meta import fake_inputs
from .variants import build_step_graph

__all__ = ["explain", "step_flops", "schedule_flops"]


def _plan_label(plan: tuple[int, ...], schedule: Schedule) -> str:
    kind = StepKind(plan[0])
    if kind is StepKind.PARTIAL:
        ks = [k for k, n in zip(plan[1:], schedule.branch_tokens) if 0 < k < n]
        if not ks:
            return "FORECAST" if schedule.forecast else "REUSE"
        return f"PARTIAL(k={min(ks)}..{max(ks)})" if min(ks) != max(ks) else f"PARTIAL(k={ks[0]})"
    return kind.name


def step_flops(step_graph, by_op: bool = False) -> int | dict:
    """FLOPs of one run of a step graph, counted on fake tensors (per op with `by_op`)."""
    gm = step_graph.graph_module
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = fake_inputs(gm, mode)
    with mode, FlopCounterMode(display=False) as counter:
        gm(*inputs)
    return dict(counter.get_flop_counts()["Global"]) if by_op else counter.get_total_flops()


def schedule_flops(cached, num_steps: int | None = None) -> dict[str, object]:
    """FLOPs per distinct step plan and for the whole schedule of `cached`."""
    prepared = cached.last_prepared()
    schedule, layout = cached.schedule_for(num_steps)
    full_plan = schedule.full_plan()
    per_plan, counts = {}, Counter(schedule.plan(i) for i in range(schedule.num_steps))
    uncached = step_flops(build_step_graph(prepared.captured.graph_module, prepared.branches,
                                           full_plan, type(layout)()))
    for plan in schedule.plans():
        per_plan[plan] = step_flops(build_step_graph(prepared.captured.graph_module,
                                                     prepared.branches, plan, layout))
    total = sum(per_plan[plan] * count for plan, count in counts.items())
    return {"schedule": schedule, "per_plan": per_plan, "counts": counts,
            "uncached_step": uncached, "total": total,
            "speedup": uncached * schedule.num_steps / total if total else float("inf"),
            "labels": {plan: _plan_label(plan, schedule) for plan in per_plan}}


def _opaque_lines(prepared) -> list[str]:
    """What the submodules run outside inductor (tocache_fx.opaque) cost."""
    opaque = list(prepared.captured.opaque.values())
    if not opaque:
        return []
    full = build_step_graph(prepared.captured.graph_module, prepared.branches,
                            (int(StepKind.FULL),) + tuple(b.num_tokens for b in prepared.branches),
                            CacheLayout())
    per_op = step_flops(full, by_op=True)
    share = per_op.get(torch.ops.tocache.opaque_module, 0) / max(sum(per_op.values()), 1)
    classes = ", ".join(sorted({o.class_name for o in opaque}))
    partial = sum(o.token_wise for o in opaque)
    return [f"{len(opaque)} submodules ({classes}) could not be traced and run eagerly as "
            f"opaque ops inside the compiled graph: {share:.0%} of a FULL step's FLOPs get "
            "no inductor fusion, and their own host syncs "
            f"(data-dependent routing) remain; {partial} of them are token-wise, so "
            "PARTIAL steps route only the selected tokens through them."]


def explain(cached, num_steps: int | None = None) -> str:
    """A table of the branches found and a table of FLOPs per step kind."""
    prepared = cached.last_prepared()
    branch_rows = [
        (b.index, b.block, b.block_path, b.kind, b.gate.name if b.gate is not None else "-",
         "yes" if b.partial_ok else f"no: {b.partial_reason}")
        for b in prepared.branches]
    flops = schedule_flops(cached, num_steps)
    schedule = flops["schedule"]
    step_rows = [(flops["labels"][plan], flops["counts"][plan], f"{flops['per_plan'][plan] / 1e9:.3f}")
                 for plan in flops["per_plan"]]
    grid = prepared.grid
    lines = [
        f"{type(cached.original).__name__} with {cached.policy!r}",
        f"{len(prepared.branches)} residual branches; token grid "
        f"{'x'.join(map(str, grid)) if grid else 'unknown (grid bonus off)'}",
        *_opaque_lines(prepared),
        tabulate(branch_rows, headers=["#", "block", "module", "kind", "gate", "PARTIAL-able"]),
        "",
        tabulate(step_rows, headers=["step kind", "steps", "GFLOPs / step"]),
        "",
        f"schedule: {schedule.num_steps} steps, {flops['total'] / 1e9:.3f} GFLOPs vs "
        f"{flops['uncached_step'] * schedule.num_steps / 1e9:.3f} uncached: "
        f"{flops['speedup']:.2f}x fewer FLOPs; {len(schedule.variants())} compiled graphs",
    ]
    return "\n".join(lines)
