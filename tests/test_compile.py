"""The compiled model: equal to eager, one graph per step plan, no recompiles."""

import pytest
import torch

from conftest import denoise, dit_inputs
import tocache_fx
from tocache_fx import DuCa, TaylorSeer, ToCa

STEPS = 20


@pytest.mark.parametrize("policy", [ToCa(num_steps=STEPS, cache_ratio=0.5),
                                    DuCa(interval=3, cache_ratio=0.5, num_steps=STEPS),
                                    TaylorSeer(interval=2, order=2, num_steps=STEPS)])
def test_compiled_equals_eager_without_recompiles(dit, policy):
    torch._dynamo.reset()
    eager = denoise(tocache_fx.transform(dit, policy, compile=False), dit_inputs, STEPS)
    compiled_model = tocache_fx.transform(dit, policy)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = denoise(compiled_model, dit_inputs, STEPS)
        again = denoise(compiled_model, dit_inputs, STEPS)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, compiled)
    schedule, _ = compiled_model.schedule_for()
    assert compiled_model.num_compiled_graphs == len(schedule.variants()) <= 6
