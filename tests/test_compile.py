"""The compiled model: equal to eager, a bounded number of graphs shared by the blocks,
no recompiles."""

import pytest
import torch

from conftest import denoise, dit_inputs, make_dit
import tocache_fx
from tocache_fx import FORA, DuCa, NoCache, TaylorSeer, ToCa
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
        counts[depth] = (model.num_compiled_graphs,
                         torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[2] == counts[6] == (2, 2)


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
