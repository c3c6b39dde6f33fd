"""The compiled model: equal to eager, a bounded number of graphs shared by the blocks,
no recompiles; a static step graph run by inductor without Dynamo keeps Dynamo's checks."""

import contextlib

import pytest
import torch
from torch._dynamo.exc import RecompileError

from conftest import denoise, dit_inputs, make_dit
import tocache_fx
from tocache_fx import FORA, DuCa, NoCache, TaylorSeer, ToCa
from tocache_fx.compiling import DirectlyCompiled, compile_step_graph
from tocache_fx.explain import schedule_flops

STEPS = 20
POLICIES = [NoCache(), FORA(interval=3, num_steps=STEPS), ToCa(num_steps=STEPS),
            DuCa(num_steps=STEPS, cache_ratio=0.9), TaylorSeer(interval=2, order=2, num_steps=STEPS)]


@pytest.mark.parametrize("capture", ["blocks", "model"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_compiled_equals_eager_without_recompiles(dit, policy, capture):
    if capture == "model" and isinstance(policy, (NoCache, FORA)) and not isinstance(
            policy, TaylorSeer):
        pytest.skip("whole-model compile of the simplest plans: covered by the zoo test")
    torch._dynamo.reset()
    eager = denoise(tocache_fx.transform(dit, policy, compile=False, capture=capture),
                    dit_inputs, STEPS)
    compiled_model = tocache_fx.transform(dit, policy, capture=capture)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = denoise(compiled_model, dit_inputs, STEPS)
        again = denoise(compiled_model, dit_inputs, STEPS)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, compiled)
    graphs = compiled_model.num_compiled_graphs
    assert graphs == schedule_flops(compiled_model)["graphs"]
    if capture == "blocks":  # per block: FULL, REUSE, PARTIAL (exact k is a dynamic size)
        assert graphs <= (4 if isinstance(policy, DuCa) else 3)


def test_blocks_share_compiled_graphs_whatever_the_depth():
    """Blocks of one class with the same plan run one compiled graph: the number of
    inductor compilations does not grow with depth."""
    counts = {}
    for depth in (2, 6):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = tocache_fx.transform(make_dit(depth), FORA(interval=3, num_steps=6))
        denoise(model, dit_inputs, 6)
        counts[depth] = (model.num_compiled_graphs, inductor_compilations())
    assert counts[2] == counts[6] == (2, 2)


def inductor_compilations() -> int:
    """Graphs inductor compiled (or loaded from its on-disk cache) in this process since
    the counters were last cleared, through `torch.compile` or directly."""
    counter = torch._dynamo.utils.counters["inductor"]
    return sum(counter[f"fxgraph_cache_{kind}"] for kind in ("miss", "hit", "bypass"))


def test_batch_one_slices_do_not_recompile():
    """FLUX's single-stream blocks get `x[:, text:]`-style views at batch 1: contiguous, but
    with another stride on the size-1 batch dim than the first block's input. Served with
    canonical strides, every block of a class reuses one compiled graph per step shape."""
    import cp_worker

    model = cp_worker.flux_model()
    cached = tocache_fx.transform(model, tocache_fx.FORA(interval=2, num_steps=4))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = cp_worker.euler(cached, cp_worker.flux_inputs(), steps=4)
    assert torch.isfinite(out).all() and cached.num_compiled_graphs == 4


def _affine(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.relu(x @ w) + 1,)


def test_a_static_graph_runs_without_dynamo_while_its_inputs_and_state_match():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    run = compile_step_graph(torch.fx.symbolic_trace(_affine), None)
    assert isinstance(run, DirectlyCompiled)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        torch.testing.assert_close(run(x, w)[0], _affine(x, w)[0])
        torch.testing.assert_close(run(x + 1, w)[0], _affine(x + 1, w)[0])
    assert run.fallbacks == 0 and inductor_compilations() == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # Dynamo never ran


@pytest.mark.parametrize("change", ["strides", "dtype", "shape", "grad mode", "autocast"])
def test_a_call_that_fails_a_check_runs_through_torch_compile(change):
    """Each check Dynamo's guards would make: the mismatching call is still right (Dynamo
    compiles for it), and under `error_on_recompile` it raises instead."""
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    run = compile_step_graph(torch.fx.symbolic_trace(_affine), None)
    with torch.no_grad():
        run(x, w)
    inputs = {"strides": (x.t().contiguous().t(), w), "dtype": (x.double(), w.double()),
              "shape": (x[:2], w)}.get(change, (x, w))
    state = {"grad mode": torch.enable_grad(),
             "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}.get(change)
    with torch.no_grad(), state or contextlib.nullcontext():
        expected = _affine(*inputs)[0]
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(RecompileError):
            run(*inputs)
        torch.testing.assert_close(run(*inputs)[0], expected, rtol=2e-2, atol=2e-2)
    assert run.fallbacks == 1


def test_a_graph_with_a_run_time_token_count_goes_through_torch_compile():
    graph = torch.fx.symbolic_trace(_affine)
    next(iter(graph.graph.nodes)).meta.update(tocache_slot="ksize.0", tocache_max=8)
    assert not isinstance(compile_step_graph(graph, None), DirectlyCompiled)


def test_a_second_model_loads_its_step_graphs_from_the_on_disk_caches(dit, tmp_path, monkeypatch):
    """What a second process does: the step graphs, ToCa's FULL graph with this package's
    score op in it too, are loaded from AOTAutograd's and inductor's caches."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    denoise(tocache_fx.transform(dit, ToCa(num_steps=4)), dit_inputs, 4)
    torch._dynamo.utils.counters.clear()
    denoise(tocache_fx.transform(dit, ToCa(num_steps=4)), dit_inputs, 4)
    aot, inductor = (torch._dynamo.utils.counters[k] for k in ("aot_autograd", "inductor"))
    assert aot["autograd_cache_hit"] >= 2 and aot["autograd_cache_bypass"] == 0
    assert inductor["fxgraph_cache_miss"] == inductor["fxgraph_cache_bypass"] == 0


@pytest.mark.parametrize("call", [
    ((torch.ones(2), None), {"scale": 1.0}),
    ((torch.ones(2),), {"rotary": (torch.ones(3), torch.zeros(3)), "mask": None}),
    ((), {"rotary": (torch.ones(3),), "extra": [torch.ones(1)]}),
    ((), {"nested": ((torch.ones(1),), torch.ones(2))}),
], ids=["plain", "tuple", "list", "nested"])
def test_block_call_flattening_agrees_with_pytree(call):
    """The fast flattening of a block call gives pytree's leaves, and its signature
    test answers as `call_signature` does, for the call and for a changed one."""
    from torch.utils import _pytree as pytree
    from tocache_fx.capture import call_leaves, call_signature, has_signature

    args, kwargs = call
    leaves, structure = call_leaves(args, kwargs)
    assert all(a is b for a, b in zip(leaves, pytree.tree_leaves(call), strict=True))
    signature, known = call_signature(call), []
    assert has_signature(leaves, structure, signature, known, call)
    assert has_signature(leaves, structure, signature, known, call)  # structure now known
    changed = pytree.tree_map(lambda leaf: leaf[:1] if isinstance(leaf, torch.Tensor) and
                              leaf.shape[0] > 1 else leaf, call)
    assert call_signature(changed) != signature
    assert not has_signature(*call_leaves(*changed), signature, known, changed)
