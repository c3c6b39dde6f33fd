"""Eager numerics of the transformed model against the original and references."""

import math

import pytest
import torch

from conftest import denoise, dit_inputs, pixart_inputs
import tocache_fx
from tocache_fx import FORA, DuCa, NoCache, TaylorSeer, ToCa
from tocache_fx.explain import schedule_flops

STEPS = 10


@pytest.fixture(scope="module")
def dit_reference(dit):
    return denoise(dit, dit_inputs, STEPS)


def cached(model, policy):
    return tocache_fx.transform(model, policy, compile=False)


def test_no_cache_is_bitwise_original(dit, dit_reference):
    assert torch.equal(denoise(cached(dit, NoCache()), dit_inputs, STEPS), dit_reference)


def test_no_cache_is_bitwise_original_pixart(pixart):
    reference = denoise(pixart, pixart_inputs, 4)
    assert torch.equal(denoise(cached(pixart, NoCache()), pixart_inputs, 4), reference)


@pytest.mark.parametrize("policy", [FORA(interval=1), TaylorSeer(interval=1, order=2),
                                    ToCa(interval=1), DuCa(interval=1), ToCa.pixart(interval=1)])
def test_interval_one_is_original(dit, dit_reference, policy):
    assert torch.equal(denoise(cached(dit, policy), dit_inputs, STEPS), dit_reference)


@pytest.mark.parametrize("policy", [FORA(interval=3), ToCa(cache_ratio=0.5, num_steps=STEPS),
                                    DuCa(interval=4, cache_ratio=0.5)])
def test_caching_changes_output_but_stays_close(dit, dit_reference, policy):
    out = denoise(cached(dit, policy), dit_inputs, STEPS)
    assert not torch.equal(out, dit_reference)
    assert torch.isfinite(out).all()
    # step 0 is always FULL; where it scores tokens (ToCa, DuCa) its attention runs
    # explicitly (passes/fuse_scored_attention.py): equal within float rounding
    if isinstance(policy, FORA):
        assert torch.equal(out[0], dit_reference[0])
    else:
        torch.testing.assert_close(out[0], dit_reference[0], rtol=0, atol=1e-5)


def branch_cache_with_hooks(model, interval: int, order: int = 0):
    """An independent FORA / TaylorSeer: forward hooks replay (order 0) or extrapolate
    (order 1, 2: Taylor series of finite differences over FULL steps) attn1/ff outputs
    between FULL steps."""
    derivatives, last_full, calls = {}, {}, {"n": -1}

    def count(module, args, kwargs):
        calls["n"] += 1

    def replay(name):
        def hook(module, args, output):
            step = calls["n"]
            if step % interval == 0:
                old = derivatives.get(name, [])
                new = [output]
                for i in range(min(order, len(old))):
                    new.append((new[i] - old[i]) / (step - last_full[name]))
                derivatives[name], last_full[name] = new, step
                return output
            distance = step - last_full[name]
            return sum(d * distance ** i / math.factorial(i)
                       for i, d in enumerate(derivatives[name]))
        return hook

    handles = [model.register_forward_pre_hook(count, with_kwargs=True)]
    for i, block in enumerate(model.transformer_blocks):
        handles.append(block.attn1.register_forward_hook(replay(f"attn{i}")))
        handles.append(block.ff.register_forward_hook(replay(f"ff{i}")))
    return handles


@pytest.mark.parametrize("policy", [FORA(interval=3), TaylorSeer(interval=3),
                                    TaylorSeer(interval=2, order=2)])
def test_fora_and_taylorseer_match_hook_reference(dit, policy):
    handles = branch_cache_with_hooks(dit, policy.interval, getattr(policy, "order", 0))
    try:
        reference = denoise(dit, dit_inputs, STEPS)
    finally:
        for handle in handles:
            handle.remove()
    out = denoise(cached(dit, policy), dit_inputs, STEPS)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_taylorseer_forecast_differs_from_reuse(dit):
    fora = denoise(cached(dit, FORA(interval=3)), dit_inputs, STEPS)
    taylor = denoise(cached(dit, TaylorSeer(interval=3)), dit_inputs, STEPS)
    assert torch.equal(fora[:4], taylor[:4])  # no difference exists before the 2nd FULL step
    assert not torch.allclose(fora[4:], taylor[4:])


@pytest.mark.parametrize("policy", [ToCa(cache_ratio=0.5), DuCa(interval=3, cache_ratio=0.5)])
def test_reset_repeats_generation(dit, policy):
    model = cached(dit, policy)
    first = denoise(model, dit_inputs, STEPS)
    model.reset()
    assert torch.equal(denoise(model, dit_inputs, STEPS), first)


@pytest.mark.parametrize("policy", [ToCa(cache_ratio=0.5, num_steps=STEPS),
                                    DuCa(interval=3, cache_ratio=0.5, num_steps=STEPS)])
def test_restarting_timesteps_start_a_new_generation(dit, policy):
    model = cached(dit, policy)
    first = denoise(model, dit_inputs, STEPS)
    assert torch.equal(denoise(model, dit_inputs, STEPS), first)


def test_rising_timesteps_are_counted(dit):
    model = cached(dit, FORA(interval=2))
    x = torch.randn(2, 4, 8, 8)
    for step, t in enumerate([0, 100, 200, 300]):
        model(**dit_inputs(x, t))
        assert model._generations["default"].tracker.step == step
    model(**dit_inputs(x, 0))  # restart
    assert model._generations["default"].tracker.step == 0


def test_scheduler_timestep_views_give_step_and_length(dit):
    """`t.expand(batch)` over a scheduler array: index and length from metadata."""
    model = cached(dit, FORA(interval=2))
    x = torch.randn(2, 4, 8, 8)
    timesteps = torch.arange(999, 0, -100)  # 10 steps
    generation = None
    for start in (0, 4):  # a full generation, then an img2img-style slice
        for i, t in enumerate(timesteps[start:]):
            model(hidden_states=x, timestep=t.expand(2), class_labels=torch.tensor([1, 2]))
            generation = model._generations["default"]
            assert generation.tracker.step == i
        assert generation.num_steps == len(timesteps) - start


def test_return_dict_both_ways(dit):
    model = cached(dit, FORA(interval=3))  # step 0 FULL, bitwise the original's
    inputs = dit_inputs(torch.randn(2, 4, 8, 8), 10)
    as_tuple = model(**inputs, return_dict=False)
    model.reset()
    as_output = model(**inputs)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_output.sample)
    assert torch.equal(as_output.sample, dit(**inputs).sample)


def test_batch_change_resets_cache(dit):
    model = cached(dit, FORA(interval=4))
    x2, x4 = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 8, 8)
    model(**dit_inputs(x2, 999))
    model(**dit_inputs(x2, 900))  # a REUSE step for batch 2
    out = model(**dit_inputs(x4, 800)).sample  # new signature: FULL, never stale caches
    assert model._generations["default"].tracker.step == 0
    assert torch.equal(out, dit(**dit_inputs(x4, 800)).sample)


def test_cache_contexts_are_separate(dit):
    model = cached(dit, FORA(interval=4))
    x = torch.randn(2, 4, 8, 8)
    with model.cache_context("cond"):
        model(**dit_inputs(x, 999))
    with model.cache_context("uncond"):
        out = model(**dit_inputs(x, 900)).sample  # first call in this context: FULL
    assert torch.equal(out, dit(**dit_inputs(x, 900)).sample)


def test_drop_in_surface(dit):
    model = cached(dit, ToCa())
    assert model.config is dit.config and model.dtype == dit.dtype and model.device == dit.device
    assert model.transformer_blocks is dit.transformer_blocks
    assert tocache_fx.untransform(model) is dit


def test_explain_reports_branches_and_flops(dit):
    model = cached(dit, ToCa(num_steps=STEPS, cache_ratio=0.5))
    denoise(model, dit_inputs, STEPS)
    text = tocache_fx.explain(model)
    assert text.count(" self_attention ") == 3 and text.count(" mlp ") == 3
    flops = schedule_flops(model)
    assert flops["speedup"] > 1
    full = flops["per_plan"][flops["schedule"].full_plan()]
    # FULL steps also score tokens (s1) for later steps; on the CPU in float32 from the
    # attention's own map (explicit attention: the FLOPs of SDPA, no second QKᵀ)
    assert full == flops["uncached_step"]
    assert all(f < full for plan, f in flops["per_plan"].items() if plan[0] != 0)


def test_flop_counter_counts_cpu_attention_as_its_matmuls():
    """SDPA on the CPU (a kernel torch's FLOP formulas leave out) counts what the same
    attention written as matmuls counts under torch's own counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from tocache_fx.meta import flop_counter

    q, k, v = (torch.randn(2, 3, 40, 8) for _ in range(3))
    with flop_counter() as fused:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with FlopCounterMode(display=False) as explicit:
        (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v
    assert fused.get_total_flops() == explicit.get_total_flops() > 0


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_a_query_that_sees_no_key_leaves_the_scores_of_the_others(mask_dtype):
    """Query 2 may attend to no key (SDPA outputs zeros for it): s1 is what the other
    queries give, and s2 gives it entropy 0 and the others theirs, all finite (softmax
    over the masked row alone was NaN and made every token's score NaN)."""
    from tocache_fx import ops

    q, k = (torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(i)) for i in (0, 1))
    seen = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    seen[..., 2, :] = False
    mask = seen if mask_dtype == torch.bool else \
        torch.zeros(seen.shape).masked_fill(~seen, float("-inf"))
    others = [0, 1, 3, 4, 5]
    torch.testing.assert_close(ops.attention_influence(q, k, mask),
                               ops.attention_influence(q[:, :, others], k))
    probs = (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(dim=-1).mean(dim=1)
    entropy = -(probs * torch.log(probs + 1e-7)).sum(dim=-1)
    entropy[:, 2] = 0  # it attends to nothing
    expected = torch.nn.functional.normalize(1 + entropy, dim=-1)
    got = ops.cross_attention_entropy(q, k, mask)
    assert got.isfinite().all()
    torch.testing.assert_close(got, expected)


def test_graph_flops_of_a_graph_without_flop_ops_is_zero():
    """A step graph with only elementwise ops (a REUSE step of a block without its own
    linears) counts as 0 FLOPs; the counter then reports no "Global" entry at all."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tocache_fx.meta import graph_flops

    gm = torch.fx.symbolic_trace(lambda x, cached: x + 0.5 * cached)
    mode = FakeTensorMode()
    inputs = [mode.from_tensor(torch.randn(2, 4, 8)) for _ in range(2)]
    assert graph_flops(gm, inputs, mode) == 0
    assert graph_flops(gm, inputs, mode, by_op=True) == {}


def test_explain_counts_taylorseer_graphs(dit):
    """Forecast distances are data: one FULL and one FORECAST graph, whatever the steps."""
    model = cached(dit, TaylorSeer(interval=3, order=2, num_steps=STEPS))
    denoise(model, dit_inputs, STEPS)
    text = tocache_fx.explain(model)
    assert "FORECAST" in text and "REUSE" not in text
    assert "2 compiled graphs" in text
    assert sum(len(unit.step_graphs) for unit in model.last_prepared().units) == 2


@pytest.mark.parametrize("policy", [FORA(interval=3), TaylorSeer(interval=2, order=2),
                                    ToCa(cache_ratio=0.8, num_steps=STEPS),
                                    DuCa(cache_ratio=0.8, num_steps=STEPS),
                                    DuCa(selection="random", num_steps=STEPS)],
                         ids=lambda p: type(p).__name__)
def test_block_and_whole_model_capture_agree(dit, policy):
    blocks = denoise(tocache_fx.transform(dit, policy, compile=False, capture="blocks"),
                     dit_inputs, STEPS)
    model = denoise(tocache_fx.transform(dit, policy, compile=False, capture="model"),
                    dit_inputs, STEPS)
    torch.testing.assert_close(blocks, model, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", [FORA(interval=3), TaylorSeer(interval=2, order=2),
                                    ToCa(cache_ratio=0.8, num_steps=STEPS)],
                         ids=lambda p: type(p).__name__)
def test_cache_dtype_stores_values_in_low_precision(dit, policy):
    full = cached(dit, policy)
    low = tocache_fx.transform(dit, policy, compile=False, cache_dtype=torch.bfloat16)
    dtypes = set()

    def recording(**inputs):
        out = low(**inputs)
        dtypes.update(t.dtype for g in low._generations.values() for slots in g.slots.values()
                      for name, t in slots.items() if name.startswith(("cache.", "diff")))
        return out

    out_full, out_low = denoise(full, dit_inputs, STEPS), denoise(recording, dit_inputs, STEPS)
    assert dtypes == {torch.bfloat16}  # after every step, FULL and cached ones
    assert not torch.equal(out_low, out_full)  # rounded, and only slightly
    torch.testing.assert_close(out_low, out_full, rtol=0.05, atol=0.05)
