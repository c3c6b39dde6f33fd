"""Graph-diff tests: the exact rewrite each step plan produces, for whole-model capture
("model") and block capture ("blocks": the graph of one block, shared by all of them)."""

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import dit_inputs, make_dit
from tocache_fx import FORA, DuCa, NoCache, TaylorSeer, ToCa, StepKind, build_schedule, ops
from tocache_fx.layout import plan_layout
from tocache_fx.units import prepare
from tocache_fx.variants import DYNAMIC, build_step_graph

SNAPSHOTS = Path(__file__).parent / "snapshots"
aten = torch.ops.aten
MODES = ["model", "blocks"]


def setup(policy, capture="model", num_layers=3, steps=10, model=None):
    """(captured graph, its branches, their schedule, their layout, (site, inputs)): the
    whole model's graph, or the first block's."""
    model = model or make_dit(num_layers)
    inputs = dit_inputs(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500)
    call = dict(inputs, return_dict=True) if capture == "model" else inputs
    prepared = prepare(model, ((), inputs), call, capture)
    schedule = build_schedule(policy, prepared.branches, steps)
    layout = plan_layout(policy, schedule, prepared.branches, prepared.grid)
    site = prepared.sites[0]
    unit = site.unit
    if capture == "model":
        return unit.captured, unit.branches, schedule, layout, (site, inputs)
    return unit.captured, unit.branches, build_schedule(policy, unit.branches, steps), \
        layout.local(site.branch_range), (site, inputs)


def targets(step):
    return Counter(n.target for n in step.graph_module.graph.nodes if n.op == "call_function")


def partial_plan(branches, k=DYNAMIC):
    return (int(StepKind.PARTIAL),) + tuple(k if b.partial_ok else 0 for b in branches)


def token_linears(step):
    return [n for n in step.graph_module.graph.nodes
            if n.target is aten.linear.default and n.meta["val"].dim() == 3]


@pytest.mark.parametrize("capture", MODES)
def test_partial_plan_has_one_gather_compute_scatter_per_partial_branch(capture):
    policy = DuCa(interval=4, cache_ratio=0.5, selection="random", full_schedule="fixed")
    captured, branches, _, layout, _ = setup(policy, capture)
    step = build_step_graph(captured.graph_module, branches, partial_plan(branches), layout)
    count = targets(step)
    partial = [b for b in branches if b.partial_ok]
    assert count[ops.select_tokens] == count[ops.gather_tokens] == len(partial)
    assert count[ops.scatter_tokens] == len(partial)
    dynamic = [f"{slot}.{b.index}" for b in partial for slot in ("ksize", "kvalid")]
    assert sorted(step.reads) == sorted([f"noise.{b.index}" for b in partial]
                                        + [f"cache.{b.index}" for b in branches]
                                        + [f"stale.{b.index}" for b in partial] + dynamic)
    stream = ["stream"] if capture == "model" else []  # blocks: the runtime keeps it
    assert sorted(step.writes) == sorted(stream + [f"cache.{b.index}" for b in partial]
                                         + [f"stale.{b.index}" for b in partial])
    # only the MLPs run (2 linears each, on the k gathered tokens); attention is reused
    assert count[aten.scaled_dot_product_attention.default] == 0
    mlp = [n for n in token_linears(step) if n.meta.get("tocache", "").startswith("compute")]
    assert len(mlp) == 2 * len(partial) == len(token_linears(step)) - (capture == "model")
    sizes = [n for n in step.graph_module.graph.nodes if n.target is aten.sym_size.int]
    assert len(sizes) == len(partial)  # k is each branch's own dynamic size


@pytest.mark.parametrize("capture", MODES)
def test_full_plan_stores_one_slot_per_cached_branch(capture):
    captured, branches, schedule, layout, _ = setup(FORA(interval=3), capture)
    full = build_step_graph(captured.graph_module, branches, schedule.full_plan(), layout)
    assert full.reads == []
    assert full.writes == [f"cache.{b.index}" for b in branches]
    assert targets(full) == Counter(n.target for n in captured.graph_module.graph.nodes
                                    if n.op == "call_function")


@pytest.mark.parametrize("capture", MODES)
def test_scored_full_plan_takes_attention_and_score_from_one_softmax(capture):
    """A FULL step that scores tokens for later PARTIAL steps (ToCa's s1), on the CPU in
    float32: each scored attention is one `attention_with_score`, no SDPA beside it."""
    captured, branches, schedule, layout, _ = setup(ToCa(interval=2, cache_ratio=0.5), capture)
    full = build_step_graph(captured.graph_module, branches, schedule.full_plan(), layout)
    count, before = targets(full), targets(captured)
    assert len(layout.scores) > 0
    assert count[ops.attention_with_score] == len(layout.scores)
    assert count[ops.attention_influence] == 0
    assert count[aten.scaled_dot_product_attention.default] == \
        before[aten.scaled_dot_product_attention.default] - len(layout.scores)


def _scored_attention_graph(dtype, mask=None, kind="influence", **sdpa):
    """A graph of one SDPA and the `kind` score of its query and key (chunks of 16
    queries, tokens 4:34; entropy with the CFG halves shared)."""
    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    examples = [torch.randn(2, 3, 40, 8, generator=torch.Generator().manual_seed(i)).to(dtype)
                for i in range(3)]
    nodes = [q, k, v]
    if mask is not None:
        nodes.append(graph.placeholder("mask"))
        examples.append(mask)
    for node, example in zip(nodes, examples):
        node.meta["val"] = example
    mask_node = nodes[3] if mask is not None else None
    attention = graph.call_function(aten.scaled_dot_product_attention.default,
                                    (q, k, v, mask_node), sdpa)
    score = graph.call_function(ops.attention_influence, (q, k, mask_node, None, 16, (4, 30))) \
        if kind == "influence" else graph.call_function(
            ops.cross_attention_entropy, (q, k, mask_node, None, 16, True, (4, 30)))
    graph.output((attention, score))
    return torch.fx.GraphModule({}, graph), examples


def _mask(kind):
    """None, or a float / boolean mask that hides key 7 and every key from query 3."""
    if kind is None:
        return None
    seen = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    seen[..., 7] = False
    seen[..., 3, :] = False
    if kind == "bool":
        return seen
    bias = torch.randn(2, 1, 40, 40, generator=torch.Generator().manual_seed(5))
    return bias.masked_fill(~seen, float("-inf"))


@pytest.mark.parametrize("kind", ["influence", "entropy"])
@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_fused_scored_attention_equals_sdpa_and_the_score(mask, kind):
    """Also with a query that sees no key: SDPA's output for it is zeros, and so is the
    fused one's."""
    from tocache_fx.passes.fuse_scored_attention import fuse_scored_attention

    gm, examples = _scored_attention_graph(torch.float32, _mask(mask), kind)
    expected = gm(*examples)
    assert fuse_scored_attention(gm) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert aten.scaled_dot_product_attention.default not in [n.target for n in gm.graph.nodes]
    attention, score = gm(*examples)
    torch.testing.assert_close(attention, expected[0], rtol=0, atol=1e-6)
    assert torch.equal(score, expected[1])
    assert score.isfinite().all()


@pytest.mark.parametrize("dtype, mask, sdpa", [
    (torch.bfloat16, None, {}),  # SDPA's kernel stays the fast path off float32
    (torch.float32, None, {"is_causal": True}),
    (torch.float32, None, {"dropout_p": 0.1}),
])
def test_scored_attention_that_is_not_plain_float32_sdpa_stays(dtype, mask, sdpa):
    from tocache_fx.passes.fuse_scored_attention import fuse_scored_attention

    gm, _ = _scored_attention_graph(dtype, mask, **sdpa)
    assert fuse_scored_attention(gm) == 0


@pytest.mark.parametrize("capture", MODES)
def test_reuse_plan_removes_every_block_computation(capture):
    captured, branches, schedule, layout, _ = setup(FORA(interval=3), capture)
    reuse = build_step_graph(captured.graph_module, branches, schedule.plan(1), layout)
    assert reuse.writes == []
    assert targets(reuse)[aten.scaled_dot_product_attention.default] == 0
    # the final projection only (whole model); nothing over tokens in a block
    assert len(token_linears(reuse)) == (1 if capture == "model" else 0)


@pytest.mark.parametrize("capture", MODES)
def test_reuse_plan_computes_only_the_gates_of_the_modulation(capture):
    """adaLN-Zero's linear makes 6 chunks (shift, scale, gate of attention and MLP); a
    REUSE step keeps the two gates, so each block's linear is narrowed to them."""
    captured, branches, schedule, layout, _ = setup(FORA(interval=3), capture)
    full = build_step_graph(captured.graph_module, branches, schedule.full_plan(), layout)
    reuse = build_step_graph(captured.graph_module, branches, schedule.plan(1), layout)

    def modulation(step):  # the linears of the blocks' adaLN (2-d, over the embedding)
        return [n.meta["val"].shape[-1] for n in step.graph_module.graph.nodes
                if n.target is aten.linear.default and n.meta["val"].dim() == 2
                and "norm1.linear" in str(n.meta.get("nn_module_stack", ""))]

    blocks = len({b.block_path for b in branches})
    width = branches[0].skip.meta["val"].shape[-1]
    assert modulation(full) == [6 * width] * blocks
    assert modulation(reuse) == [width] * (2 * blocks)  # gate_msa, gate_mlp
    # the blocks' chunks are gone (the final layer's shift and scale stay, whole model)
    assert targets(reuse)[aten.chunk.default] == targets(full)[aten.chunk.default] - blocks


def test_narrowed_linear_computes_the_chunks_it_keeps():
    """`linear(x).chunk(6)` read at chunks 1, 2 and 5 becomes two linears on row slices
    of the weight (chunks 1-2 and 5), with the same values."""
    from tocache_fx.passes.narrow_linears import narrow_linears

    class Modulation(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 6 * 4)

        def forward(self, emb):
            chunks = self.linear(emb).chunk(6, dim=-1)
            return chunks[1] * chunks[2], chunks[5]

    module, emb = Modulation(), torch.randn(3, 8)
    gm = torch.export.export(module, (emb,)).module()
    gm.graph.eliminate_dead_code()
    assert narrow_linears(gm) == 1
    gm.recompile()
    linears = gm.graph.find_nodes(op="call_function", target=aten.linear.default)
    assert len(linears) == 2
    assert not gm.graph.find_nodes(op="call_function", target=aten.chunk.default)
    for got, want in zip(gm(emb), module(emb)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("capture", MODES)
def test_taylorseer_full_step_writes_differences_and_reuse_step_forecasts(capture):
    captured, branches, schedule, layout, _ = setup(TaylorSeer(interval=3, order=2), capture)
    cached = [f"cache.{b.index}" for b in branches]
    diff1, diff2 = ([f"diff{i}.{b.index}" for b in branches] for i in (1, 2))
    full = build_step_graph(captured.graph_module, branches, schedule.full_plan(), layout)
    assert sorted(full.reads) == sorted(cached + diff1 + ["forecast"])
    assert full.optional == set(cached + diff1)  # zeros before the first FULL step
    assert sorted(full.writes) == sorted(diff1 + diff2 + cached)
    differences = [n for n in full.graph_module.graph.nodes if n.target is ops.finite_difference]
    assert len(differences) == 2 * len(branches)
    untouched = targets(full) - Counter({ops.finite_difference: 2 * len(branches),
                                         aten.select.int: 2 * len(branches)})
    assert untouched == Counter(n.target for n in captured.graph_module.graph.nodes
                                if n.op == "call_function")

    reuse = build_step_graph(captured.graph_module, branches, schedule.plan(8), layout)
    assert sorted(reuse.reads) == sorted(cached + diff1 + diff2 + ["forecast"])
    assert reuse.writes == []
    forecasts = [n for n in reuse.graph_module.graph.nodes if n.target is ops.taylor_forecast]
    assert len(forecasts) == len(branches)
    assert all(n.meta["tocache"].startswith("forecast") and len(n.args[1]) == 2
               and len(n.users) == 1 for n in forecasts)  # each feeds its branch's gate
    assert targets(reuse)[aten.scaled_dot_product_attention.default] == 0


def test_aggressive_plan_runs_no_block():
    policy = DuCa(interval=4, cache_ratio=0.5, full_schedule="fixed")
    captured, branches, schedule, layout, _ = setup(policy, "model")
    aggressive = build_step_graph(captured.graph_module, branches, schedule.plan(2), layout)
    assert schedule.plan(2)[0] == StepKind.AGGRESSIVE
    assert aggressive.reads == ["stream"] and aggressive.writes == []
    assert targets(aggressive)[aten.layer_norm.default] == 1  # the final layer's norm only


def site_call(model, inputs, site):
    """The (args, kwargs) of the site's call: the whole call, or the block's as the model
    makes it."""
    if site.module is model:
        return (), inputs
    calls = []
    handle = site.module.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)),
                                                   with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return calls[0]


@pytest.mark.parametrize("capture", MODES)
def test_partial_tokens_equal_full_computation(capture):
    """Token-wise property: recomputed tokens get exactly the FULL step's values."""
    policy = ToCa(interval=2, cache_ratio=0.5, time_weight=0.0, depth_weight=0.0,
                  kind_factors=(("mlp", 1.0),), staleness_weight=0.0, grid_bonus=0.0)
    model = make_dit(3)
    captured, branches, schedule, layout, (site, inputs) = setup(policy, capture, model=model)
    call = dict(inputs, return_dict=True) if capture == "model" else inputs
    flat = [*site.state(), *captured.flatten(site_call(model, call, site))]
    full = build_step_graph(captured.graph_module, branches, schedule.full_plan(), layout)
    outputs = full.graph_module(*flat)
    state = dict(zip(full.writes, outputs[full.num_outputs:]))
    partial = build_step_graph(captured.graph_module, branches, partial_plan(branches), layout)
    # attention caches from the FULL step, MLP caches zeroed: the first MLP sees the
    # FULL step's input, so its recomputed tokens must carry exactly the FULL values
    slots = {**state, **{f"cache.{b.index}": torch.zeros_like(state[f"cache.{b.index}"])
                         for b in branches if b.partial_ok}}
    slots.update({name: torch.empty(8) for name in partial.reads if name.startswith("ksize")})
    slots.update({name: torch.tensor(8) for name in partial.reads if name.startswith("kvalid")})
    outputs = partial.graph_module(*flat, *[slots[name] for name in partial.reads])
    new = dict(zip(partial.writes, outputs[partial.num_outputs:]))
    first = next(b for b in branches if b.partial_ok)
    written = new[f"cache.{first.index}"]
    recomputed = written.abs().sum(-1) != 0
    assert recomputed.sum(1).tolist() == [8, 8]
    assert not torch.equal(recomputed[0], recomputed[1])  # per sample: no shared halves
    torch.testing.assert_close(written[recomputed], state[f"cache.{first.index}"][recomputed])


def test_snapshot_of_partial_rewrite():
    """The exact PARTIAL graph of a DiT block (block capture), as a snapshot."""
    policy = ToCa(interval=2, cache_ratio=0.5, time_weight=0.0, kind_factors=(("mlp", 1.0),))
    captured, branches, _, layout, _ = setup(policy, "blocks", num_layers=2)
    assert layout.cached == {0, 1} and layout.scores == {(0, 0, 16): "influence"}
    step = build_step_graph(captured.graph_module, branches, partial_plan(branches), layout)
    code = step.graph_module.code.strip() + "\n"
    path = SNAPSHOTS / "dit_block_partial.py.txt"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(code)
    assert code == path.read_text()


def _zoo_setup(name, policy, steps=4):
    from zoo import ZOO

    entry = next(z for z in ZOO if z.name == name)
    inputs = entry.inputs(2, 0.5)
    prepared = prepare(entry.build(), ((), inputs), inputs, "model")
    unit = prepared.units[0]
    schedule = build_schedule(policy, unit.branches, steps)
    return unit.captured, unit.branches, plan_layout(policy, schedule, unit.branches)


def test_flux_single_stream_partial_reuses_attention_and_recomputes_mlp_path():
    policy = DuCa(interval=2, cache_ratio=0.5, full_schedule="fixed", selection="random",
                  kind_factors=(("mlp", 1.0), ("attention_mlp", 1.0)))
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

    policy = DuCa(interval=2, cache_ratio=0.5, full_schedule="fixed", selection="random",
                  kind_factors=(("mlp", 1.0), ("attention_mlp", 1.0)))
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


def test_block_outputs_that_are_views_are_returned_contiguous():
    """FLUX's single-stream block returns its two streams as slices of one joint
    sequence: the step graph writes them contiguous (the next block takes them without a
    copy), with the eager block's values."""
    from zoo import ZOO

    entry = next(z for z in ZOO if z.name == "FluxTransformer2DModel")
    inputs, model = entry.inputs(2, 0.5), entry.build()
    prepared = prepare(model, ((), inputs), inputs, "blocks")
    site = next(s for s in prepared.sites if s.path.startswith("single_transformer_blocks"))
    unit = site.unit
    captured = unit.captured.graph_module.graph.find_nodes(op="output")[0].args[0]
    assert any(not n.meta["val"].is_contiguous() for n in captured)  # eager: two views
    seen = {}
    hook = site.module.register_forward_pre_hook(
        lambda _, args, kwargs: seen.setdefault("call", (args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    block_inputs = [*site.state(), *unit.captured.flatten(seen["call"])]
    full = (int(StepKind.FULL),) + tuple(unit.tokens)
    layout = plan_layout(NoCache(), build_schedule(NoCache(), unit.branches, 4), unit.branches)
    step = build_step_graph(unit.captured.graph_module, unit.branches, full, layout)
    with torch.no_grad():
        want = unit.captured.graph_module(*block_inputs)
        got = step.graph_module(*block_inputs)[:step.num_outputs]
    for expected, output in zip(want, got):
        assert output.is_contiguous()
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
