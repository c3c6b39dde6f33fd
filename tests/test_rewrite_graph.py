"""Graph-diff tests: the exact rewrite each step plan produces."""

import os
from collections import Counter
from pathlib import Path

import torch

from conftest import dit_inputs, make_dit
from tocache_fx import FORA, DuCa, TaylorSeer, ToCa, StepKind, build_schedule, ops
from tocache_fx.capture import capture
from tocache_fx.layout import plan_layout
from tocache_fx.passes.find_branches import find_branches
from tocache_fx.variants import build_step_graph

SNAPSHOTS = Path(__file__).parent / "snapshots"
aten = torch.ops.aten


def setup(policy, num_layers=3, steps=10):
    model = make_dit(num_layers)
    inputs = dit_inputs(torch.randn(2, 4, 8, 8), 500)
    captured = capture(model, inputs)
    branches = find_branches(captured.graph_module)
    schedule = build_schedule(policy, branches, steps)
    layout = plan_layout(policy, schedule, branches, grid=(4, 4))
    return model, inputs, captured, branches, schedule, layout


def targets(step):
    return Counter(n.target for n in step.graph_module.graph.nodes if n.op == "call_function")


def partial_plan(branches, k):
    return (int(StepKind.PARTIAL),) + tuple(k if b.partial_ok else 0 for b in branches)


def test_partial_plan_has_one_gather_compute_scatter_per_partial_branch():
    policy = DuCa(interval=4, cache_ratio=0.5, token_bucket=1)
    _, _, captured, branches, _, layout = setup(policy)
    plan = partial_plan(branches, 8)
    step = build_step_graph(captured.graph_module, branches, plan, layout)
    count = targets(step)
    partial = sum(b.partial_ok for b in branches)
    assert count[ops.select_tokens] == count[ops.gather_tokens] == partial
    assert count[ops.scatter_tokens] == partial
    assert sorted(step.reads) == sorted(["noise.2x16"] + [f"cache.{b.index}" for b in branches])
    assert sorted(step.writes) == sorted(
        ["stream"] + [f"cache.{b.index}" for b in branches if b.partial_ok])
    # only the MLPs run (2 linears each, on 8 of 16 tokens); attention is reused
    assert count[aten.scaled_dot_product_attention.default] == 0
    token_linears = [n for n in step.graph_module.graph.nodes
                     if n.target is aten.linear.default and n.meta["val"].dim() == 3]
    mlp_linears = [n for n in token_linears if n.meta.get("tocache", "").startswith("compute")]
    assert len(mlp_linears) == 2 * partial == len(token_linears) - 1  # + the final projection
    assert all(n.meta["val"].shape[1] == 8 for n in mlp_linears)


def test_full_plan_stores_one_slot_per_cached_branch():
    _, _, captured, branches, schedule, layout = setup(FORA(interval=3))
    full = build_step_graph(captured.graph_module, branches, schedule.full_plan(), layout)
    assert full.reads == []
    assert full.writes == [f"cache.{b.index}" for b in branches]
    assert targets(full) == Counter(n.target for n in captured.graph_module.graph.nodes
                                    if n.op == "call_function")


def test_reuse_plan_removes_every_block_computation():
    _, _, captured, branches, schedule, layout = setup(FORA(interval=3))
    reuse = build_step_graph(captured.graph_module, branches, schedule.plan(1), layout)
    assert reuse.writes == []
    assert targets(reuse)[aten.scaled_dot_product_attention.default] == 0
    token_linears = [n for n in reuse.graph_module.graph.nodes
                     if n.target is aten.linear.default and n.meta["val"].dim() == 3]
    assert [n.name for n in token_linears] == ["linear_30"]  # the final projection only


def test_taylorseer_full_step_writes_differences_and_reuse_step_forecasts():
    _, _, captured, branches, schedule, layout = setup(TaylorSeer(interval=3, order=2))
    cached = [f"cache.{b.index}" for b in branches]
    diff1, diff2 = ([f"diff{i}.{b.index}" for b in branches] for i in (1, 2))
    full = build_step_graph(captured.graph_module, branches, schedule.full_plan(), layout,
                            schedule.forecast_at(6))  # the third FULL step: (2, 3)
    assert schedule.forecast_at(6) == (2, 3)
    assert sorted(full.reads) == sorted(cached + diff1)
    assert sorted(full.writes) == sorted(diff1 + diff2 + cached)
    differences = [n for n in full.graph_module.graph.nodes if n.target is ops.finite_difference]
    assert len(differences) == 2 * len(branches)
    assert all(n.args[2] == 3 for n in differences)
    untouched = targets(full) - Counter({ops.finite_difference: 2 * len(branches)})
    assert untouched == Counter(n.target for n in captured.graph_module.graph.nodes
                                if n.op == "call_function")

    reuse = build_step_graph(captured.graph_module, branches, schedule.plan(8), layout,
                             schedule.forecast_at(8))  # two steps after FULL step 6
    assert sorted(reuse.reads) == sorted(cached + diff1 + diff2) and reuse.writes == []
    forecasts = [n for n in reuse.graph_module.graph.nodes if n.target is ops.taylor_forecast]
    assert len(forecasts) == len(branches) and all(n.args[2] == 2 for n in forecasts)
    assert all(n.meta["tocache"].startswith("forecast") and len(n.args[1]) == 2
               and len(n.users) == 1 for n in forecasts)  # each feeds its branch's gate
    assert targets(reuse)[aten.scaled_dot_product_attention.default] == 0


def test_aggressive_plan_runs_no_block():
    policy = DuCa(interval=4, cache_ratio=0.5)
    _, _, captured, branches, schedule, layout = setup(policy)
    aggressive = build_step_graph(captured.graph_module, branches, schedule.plan(2), layout)
    assert schedule.plan(2)[0] == StepKind.AGGRESSIVE
    assert aggressive.reads == ["stream"] and aggressive.writes == []
    assert targets(aggressive)[aten.layer_norm.default] == 1  # the final layer's norm only


def test_partial_tokens_equal_full_computation():
    """Token-wise property: recomputed tokens get exactly the FULL step's values."""
    policy = ToCa(interval=2, cache_ratio=0.5, token_bucket=1, time_weight=0.0,
                  depth_weight=0.0, type_weight=0.0, staleness_weight=0.0, grid_bonus=0.0)
    _, inputs, captured, branches, schedule, layout = setup(policy)
    flat = captured.flatten(inputs)
    full = build_step_graph(captured.graph_module, branches, schedule.full_plan(), layout)
    outputs = full.graph_module(*flat)
    state = dict(zip(full.writes, outputs[full.num_outputs:]))
    plan = partial_plan(branches, 8)
    partial = build_step_graph(captured.graph_module, branches, plan, layout)
    # attention caches from the FULL step, MLP caches zeroed: the first MLP sees the
    # FULL step's input, so its recomputed tokens must carry exactly the FULL values
    slots = {**state, **{f"cache.{b.index}": torch.zeros_like(state[f"cache.{b.index}"])
                         for b in branches if b.partial_ok}}
    outputs = partial.graph_module(*flat, *[slots[name] for name in partial.reads])
    new = dict(zip(partial.writes, outputs[partial.num_outputs:]))
    first = next(b for b in branches if b.partial_ok)
    written = new[f"cache.{first.index}"]
    recomputed = written.abs().sum(-1) != 0
    assert recomputed.sum(1).tolist() == [8, 8]
    assert torch.equal(recomputed[0], recomputed[1])  # CFG halves share the selection
    torch.testing.assert_close(written[recomputed], state[f"cache.{first.index}"][recomputed])


def test_snapshot_of_partial_rewrite():
    policy = ToCa(interval=2, cache_ratio=0.5, token_bucket=1, time_weight=0.0, type_weight=0.0)
    _, _, captured, branches, _, layout = setup(policy, num_layers=1)
    assert layout.cached == {0, 1} and layout.scores == {0: "influence"}
    step = build_step_graph(captured.graph_module, branches, partial_plan(branches, 8), layout)
    code = step.graph_module.code.strip() + "\n"
    path = SNAPSHOTS / "dit_1block_partial.py.txt"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(code)
    assert code == path.read_text()


def _zoo_setup(name, policy, steps=4):
    from zoo import ZOO

    entry = next(z for z in ZOO if z.name == name)
    captured = capture(entry.build(), entry.inputs(2, 0.5))
    branches = find_branches(captured.graph_module)
    schedule = build_schedule(policy, branches, steps)
    return captured, branches, plan_layout(policy, schedule, branches)


def test_flux_single_stream_partial_reuses_attention_and_recomputes_mlp_path():
    policy = DuCa(interval=2, cache_ratio=0.5, token_bucket=1)
    captured, branches, layout = _zoo_setup("FluxTransformer2DModel", policy)
    single = [b for b in branches if b.kind == "attention_mlp"]
    assert [b.block_path for b in single] == ["single_transformer_blocks.0",
                                               "single_transformer_blocks.1"]
    assert layout.attention == {b.index for b in single}
    full = build_step_graph(captured.graph_module, branches,
                            (int(StepKind.FULL),) + tuple(b.num_tokens for b in branches), layout)
    assert {f"attn.{b.index}" for b in single} <= set(full.writes)
    plan = (int(StepKind.PARTIAL),) + tuple(b.num_tokens // 2 if b.partial_ok else 0
                                            for b in branches)
    step = build_step_graph(captured.graph_module, branches, plan, layout)
    count = targets(step)
    partial = [b for b in branches if b.partial_ok]
    assert count[aten.scaled_dot_product_attention.default] == 0  # every attention reused
    # one gather of the stream per PARTIAL branch, one more of each reused attention
    assert count[ops.gather_tokens] == len(partial) + len(single)
    assert count[ops.scatter_tokens] == len(partial)
    assert {f"attn.{b.index}" for b in single} <= set(step.reads)
    for branch in single:  # proj_mlp and proj_out run on half of the joint tokens
        compute = [n for n in step.graph_module.graph.nodes
                   if n.meta.get("tocache") == f"compute:{branch.index}"
                   and n.target is aten.linear.default]
        assert len(compute) == 2
        assert all(n.meta["val"].shape[1] == branch.num_tokens // 2 for n in compute)


def test_hidream_moe_runs_as_opaque_op_on_selected_tokens():
    from tocache_fx.opaque import OPAQUE_OP

    policy = DuCa(interval=2, cache_ratio=0.5, token_bucket=1)
    captured, branches, layout = _zoo_setup("HiDreamImageTransformer2DModel", policy)
    assert len(captured.opaque) == 4
    assert all(o.class_name == "MOEFeedForwardSwiGLU" and o.token_wise
               for o in captured.opaque.values())
    moe = [b for b in branches if any(n.target is OPAQUE_OP for n in b.nodes)]
    assert len(moe) == 4 and all(b.kind == "mlp" and b.partial_ok for b in moe)
    plan = (int(StepKind.PARTIAL),) + tuple(b.num_tokens // 2 if b.partial_ok else 0
                                            for b in branches)
    step = build_step_graph(captured.graph_module, branches, plan, layout)
    calls = [n for n in step.graph_module.graph.nodes if n.target is OPAQUE_OP]
    assert len(calls) == 4
    assert all(n.meta["val"].shape[1] == b.num_tokens // 2 for n, b in zip(calls, moe))
