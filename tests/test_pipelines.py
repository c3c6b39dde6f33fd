"""The transformed model inside real diffusers pipelines (tiny, random, built in code):
the same call gives the same output whatever ran before, a changed model is seen, and
samples of a batch do not affect each other."""

import pytest
import torch

from tiny_pipelines import PIPELINES, as_tensor
import tocache_fx
from tocache_fx import FORA, DuCa, NoCache, TaylorSeer, ToCa

# one case per pipeline, plus the two-calls-per-step variants
CASES = ["flux", "flux_true_cfg", "sd3", "pixart", "dit", "wan_cfg", "sana", "qwenimage",
         "cogview4"]
CACHING = [FORA(interval=2), ToCa(interval=2, cache_ratio=0.5)]


def run(case, pipe, steps=6, seed=0, **overrides):
    return as_tensor(case.run(pipe, steps=steps, seed=seed, **overrides))


@pytest.fixture(scope="module", params=CASES)
def case_and_pipe(request):
    case = PIPELINES[request.param]
    return case, case.build()


def test_no_cache_equals_original_and_caching_differs(case_and_pipe):
    case, pipe = case_and_pipe
    reference = run(case, pipe)
    tocache_fx.transform(pipe, NoCache(), compile=False)
    try:
        cached = pipe.transformer
        assert cached.last_prepared is not None
        assert torch.equal(run(case, pipe), reference)
        assert cached.last_prepared().mode == "blocks"
        for policy in CACHING:
            pipe.transformer = cached.with_policy(policy)
            out = run(case, pipe)
            assert out.shape == reference.shape and torch.isfinite(out).all()
            assert not torch.equal(out, reference), f"{policy} cached nothing"
            assert torch.equal(run(case, pipe), out)  # the same seed twice: identical
            kinds = pipe.transformer._generations[_context(case)].kinds
            schedule, _ = pipe.transformer.schedule_for(6)  # planned for the pipeline's 6 steps
            assert kinds == [schedule.plan(step)[0] for step in range(6)]
            assert schedule.num_steps == pipe.transformer._generations[_context(case)].num_steps
    finally:
        tocache_fx.untransform(pipe)
    assert torch.equal(run(case, pipe), reference)  # untransform restores the pipeline


def _context(case):
    return case.cache_context[0] if case.cache_context else "default"


@pytest.mark.parametrize("name", CASES)
def test_a_run_never_depends_on_earlier_runs(name):
    """6 -> 10 -> 6 steps: each run equals a fresh transform's run of that length."""
    case = PIPELINES[name]
    policy = ToCa(interval=2, cache_ratio=0.5)

    def fresh(steps):
        return run(case, tocache_fx.transform(case.build(), policy, compile=False), steps)

    pipe = tocache_fx.transform(case.build(), policy, compile=False)
    for steps in (6, 10, 6):
        assert torch.equal(run(case, pipe, steps), fresh(steps)), f"{steps} steps"


@pytest.mark.parametrize("name", CASES)
def test_bf16_100_steps_cache_as_planned(name):
    """Neighbouring bfloat16 timesteps of a 100-step schedule collide (FLUX.1's shifted
    sigmas): the step comes from the pipeline, never from comparing them."""
    case = PIPELINES[name]
    pipe = case.build()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.bfloat16()
    tocache_fx.transform(pipe, FORA(interval=3), compile=False)
    out = run(case, pipe, steps=100)
    assert torch.isfinite(out.float()).all()
    for context in case.cache_context or ("default",):
        kinds = pipe.transformer._generations[context].kinds
        assert kinds == [0 if step % 3 == 0 else 1 for step in range(100)], context


def test_model_level_bf16_timesteps_are_counted_not_compared():
    case = PIPELINES["flux_bf16"]
    pipe = case.build()
    cached = tocache_fx.transform(pipe.transformer, FORA(interval=3, num_steps=100), compile=False)
    pipe.transformer = cached
    run(case, pipe, steps=100)
    assert cached._generations["cond"].kinds == [0 if s % 3 == 0 else 1 for s in range(100)]


def test_model_level_without_length_plans_a_default_and_says_so():
    case = PIPELINES["flux"]
    pipe = case.build()
    pipe.transformer = tocache_fx.transform(pipe.transformer, FORA(interval=2), compile=False)
    with pytest.warns(UserWarning, match="num_steps"):
        first = run(case, pipe, steps=10)
    run(case, pipe, steps=6)
    assert torch.equal(run(case, pipe, steps=10), first)  # never the previous run's length


@pytest.mark.parametrize("name", ["flux_batch2", "pixart_batch2"])
@pytest.mark.parametrize("policy", [FORA(interval=2), TaylorSeer(interval=2),
                                    ToCa(interval=2, cache_ratio=0.5), DuCa(cache_ratio=0.5),
                                    DuCa(cache_ratio=0.5, selection="random"), ToCa.pixart()],
                         ids=lambda p: type(p).__name__ + getattr(p, "selection", ""))
def test_samples_of_a_batch_are_independent(name, policy):
    """[A, B] and [A, C] give the same A (different prompts, no shared selection unless
    the pipeline built [uncond; cond] halves)."""
    case = PIPELINES[name]
    pipe = tocache_fx.transform(case.build(), policy, compile=False)
    a_b = run(case, pipe, prompt_embeds=_prompts(case, pipe, (1, 2)))
    a_c = run(case, pipe, prompt_embeds=_prompts(case, pipe, (1, 3)))
    assert torch.equal(a_b[0], a_c[0]) and not torch.equal(a_b[1], a_c[1])


def _prompts(case, pipe, seeds):
    """Prompt embeddings whose rows come from their own seeds."""
    width = pipe.transformer.config.get("joint_attention_dim") or \
        pipe.transformer.config.get("caption_channels")
    rows = [torch.randn(1, 6, width, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.cat(rows).to(pipe.transformer.dtype)


def test_lora_and_replaced_modules_after_the_first_call_are_honoured():
    from peft import LoraConfig

    case = PIPELINES["flux"]
    pipe = tocache_fx.transform(case.build(), NoCache(), compile=False)
    original = pipe.transformer.original

    def reference():
        pipe.transformer = original
        try:
            return run(case, pipe)
        finally:
            tocache_fx.transform(pipe, NoCache(), compile=False)

    run(case, pipe)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "proj_mlp"]))
    added = run(case, pipe)
    assert torch.equal(added, reference())
    pipe.transformer.set_adapters(["default"], weights=[0.5])
    scaled = run(case, pipe)
    assert torch.equal(scaled, reference()) and not torch.equal(scaled, added)
    pipe.transformer.disable_adapters()
    disabled = run(case, pipe)
    assert torch.equal(disabled, reference()) and not torch.equal(disabled, scaled)
    original.proj_out = torch.nn.Linear(original.proj_out.in_features,
                                        original.proj_out.out_features)
    replaced = run(case, pipe)
    assert torch.equal(replaced, reference()) and not torch.equal(replaced, disabled)
    with torch.no_grad():
        original.single_transformer_blocks[0].proj_out.weight.mul_(2)  # in place, in a block
    assert torch.equal(run(case, pipe), reference())


def test_a_copy_under_another_policy_lets_go_of_captures_a_model_change_dropped():
    """`with_policy` copies share captures: after one copy saw the model change and
    captured again, the other copy's next call releases the old capture too."""
    import gc
    import weakref

    from conftest import dit_inputs, make_dit

    module = make_dit(2)
    fora = tocache_fx.transform(module, FORA(interval=2, num_steps=4), compile=False)
    toca = fora.with_policy(ToCa(num_steps=4))
    inputs = dit_inputs(torch.randn(2, 4, 8, 8), 500)
    fora(**inputs), toca(**inputs)
    old = weakref.ref(fora.last_prepared())
    mlp = module.transformer_blocks[0].ff.net[2]
    module.transformer_blocks[0].ff.net[2] = torch.nn.Linear(mlp.in_features, mlp.out_features,
                                                             bias=False)  # another graph
    fora.reset(), toca.reset()
    fora(**inputs), toca(**inputs)
    gc.collect()
    assert old() is None


def test_dtype_round_trip_reads_the_current_weights_and_buffers():
    case = PIPELINES["flux"]
    pipe = tocache_fx.transform(case.build(), NoCache(), compile=False)
    run(case, pipe)
    cached = pipe.transformer
    cached.original.to(torch.bfloat16).to(torch.float32)  # new (rounded) tensors everywhere
    after = run(case, pipe)
    pipe.transformer = cached.original
    assert torch.equal(after, run(case, pipe))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Linear(16, 16)

    def forward(self, x):
        return x + self.mlp(x)


class NumberTimestep(torch.nn.Module):
    """Blocks fed by glue that turns a Python-number timestep into an embedding."""

    def __init__(self):
        super().__init__()
        self.time = torch.nn.Linear(1, 16)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

    def forward(self, hidden_states, timestep):
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32)
        x = hidden_states + self.time(timestep.float().view(-1, 1))[:, None]
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("capture", ["blocks", "model"])
def test_python_number_timesteps_capture_once(capture):
    model = NumberTimestep().eval()
    cached = tocache_fx.transform(model, FORA(interval=2, num_steps=10), compile=False,
                                  capture=capture)
    x = torch.randn(1, 4, 16)
    outputs = [cached(x, timestep=t) for t in range(999, 0, -100)]
    assert len(cached._shared.prepared) == 1  # one capture for every value
    assert torch.equal(outputs[0], model(x, timestep=999))
    assert cached._generations["default"].kinds == [0, 1] * 5


def test_blocks_the_user_compiled_stay_compiled():
    """A block's own `.compile()` (what `compile_repeated_blocks` sets) is back in place
    after every transformed call: ours serves the block only while a step runs."""
    from conftest import denoise, dit_inputs, make_dit

    model = make_dit()
    with torch.no_grad():
        reference = denoise(model, dit_inputs, 4)
    for block in model.transformer_blocks:
        block.compile(backend="eager")
    compiled = [block._compiled_call_impl for block in model.transformer_blocks]
    cached = tocache_fx.transform(model, NoCache(), compile=False)
    with torch.no_grad():
        torch.testing.assert_close(denoise(cached, dit_inputs, 4), reference)
    assert [block._compiled_call_impl for block in model.transformer_blocks] == compiled


class _PassThroughMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class ModeAroundBlocks(NumberTimestep):
    """Glue that runs its blocks under a dispatch mode of its own."""

    def forward(self, hidden_states, timestep):
        x = hidden_states + self.time(timestep.float().view(-1, 1))[:, None]
        with _PassThroughMode():
            for block in self.blocks:
                x = block(x)
        return x


@pytest.mark.parametrize("model", [NumberTimestep, ModeAroundBlocks])
def test_uncached_flops_equal_a_counted_run(model):
    """`explain`'s FLOPs of an uncached step equal FlopCounterMode around the model,
    also where the glue's own mode sits between the capture's counter and the blocks."""
    from tocache_fx.explain import schedule_flops
    from tocache_fx.meta import flop_counter

    model = model().eval()
    x, t = torch.randn(2, 4, 16), torch.tensor([999.0])
    cached = tocache_fx.transform(model, NoCache(), compile=False)
    with torch.no_grad():
        cached(x, timestep=t)
        with flop_counter() as counter:
            model(x, timestep=t)
    assert schedule_flops(cached)["uncached_step"] == counter.get_total_flops()
