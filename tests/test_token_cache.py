"""TokenCache: the predictor's training, TPRR, the block-pruning rewrite, and its checks."""

import pytest
import torch

from conftest import denoise, dit_inputs, make_dit
import tocache_fx
from tocache_fx import CachePredictor, StepKind, TokenCache, build_schedule, ops, train_token_cache
from tocache_fx.layout import plan_layout
from tocache_fx.units import prepare
from tocache_fx.variants import DYNAMIC, build_step_graph

STEPS = 10
aten = torch.ops.aten


def generate(model, seed):
    return denoise(model, dit_inputs, STEPS, seed=seed)


@pytest.fixture(scope="module")
def trained(dit):
    return train_token_cache(dit, generate, STEPS, generations=2, epochs=4, progress_bar=False)


def test_training_reduces_its_loss_and_is_reproducible(dit, trained):
    losses = trained.info["training"]["loss"]
    assert losses[-1] < losses[0]
    again = train_token_cache(dit, generate, STEPS, generations=2, epochs=4, progress_bar=False)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                 again.state_dict().values()))
    assert trained.info["model"] == "DiTTransformer2DModel" and trained.num_tokens == 16


def test_saved_predictor_round_trips(trained, tmp_path):
    trained.save_pretrained(tmp_path / "predictor")
    loaded = CachePredictor.from_pretrained(tmp_path / "predictor")
    assert torch.equal(loaded.importance(STEPS), trained.importance(STEPS))
    policy = TokenCache.from_pretrained(tmp_path / "predictor", prune_ratio=0.3)
    assert tocache_fx.policy_from_dict(policy.to_dict()) == policy


def test_tprr_table_matches_its_definition():
    policy = TokenCache(CachePredictor(3, 16), k1=3, k2=1, boundary=0.5)
    kinds = policy.step_kinds(20)
    # an I-step, then k1 = 3 P-steps while before step 10, then I-steps every k2 + 1 = 2
    expected = [0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert kinds == expected


def test_grid_level_pruning_keeps_the_highest_weights_per_cell():
    predictor = CachePredictor(1, 16)
    policy = TokenCache(predictor, prune_ratio=0.5, grid=2)
    kept = policy.kept(4)[0][1]
    weights = predictor.importance(4)[0, 1].view(4, 4)
    for row in (0, 2):
        for col in (0, 2):
            cell = [(row + i) * 4 + col + j for i in (0, 1) for j in (0, 1)]
            best = sorted(cell, key=lambda t: -weights.view(-1)[t])[:2]
            assert set(best) == {t for t in kept.tolist() if t in cell}
    assert len(kept) == 8


@pytest.mark.parametrize("ranks", [2, 4])
def test_context_parallel_tables_are_each_ranks_chunk(ranks):
    """Under context parallelism a rank holds the contiguous chunk `rank` of the 8 x 8
    image tokens. Two ranks' chunks (4 rows) hold whole 2 x 2 cells: each keeps its part of
    the one-process table. Four ranks' (2 rows) too; with a 4 x 4 grid they would not, and
    each rank ranks its own chunk. Every rank keeps as many tokens (Ulysses' all-to-all of
    the kept queries needs equal counts)."""
    torch.manual_seed(0)
    predictor = CachePredictor(1, 64)
    for grid in (2, 4):
        policy = TokenCache(predictor, prune_ratio=0.5, grid=grid)
        whole = policy.kept(3)[0][1]
        local = 64 // ranks
        chunks = [policy.kept(3, shard=(rank, ranks))[0][1] for rank in range(ranks)]
        assert len({len(chunk) for chunk in chunks}) == 1
        assert all(0 <= int(chunk.min()) and int(chunk.max()) < local for chunk in chunks)
        if local % (8 * grid) == 0:
            assert torch.equal(torch.cat([c + r * local for r, c in enumerate(chunks)]), whole)
        else:
            weights = predictor.importance(3)[0, 1]
            for rank, chunk in enumerate(chunks):
                mine = weights[rank * local:(rank + 1) * local]
                assert set(chunk.tolist()) == set(mine.topk(local // 2).indices.tolist())


def test_adaptive_block_selection_prunes_the_least_important_blocks():
    predictor = CachePredictor(4, 16)
    with torch.no_grad():
        predictor.blocks.weight.zero_()
        predictor.blocks.weight[:, 0] = torch.tensor([3.0, -3.0, 1.0, -1.0])
        predictor.head[1].weight.zero_()
        predictor.head[1].weight[:, 0] = 1.0
        predictor.head[3].weight.zero_()
        predictor.head[3].weight[:, :] = 1.0
    order = predictor.importance(5).mean(dim=(1, 2)).argsort().tolist()
    ratios = TokenCache(predictor, prune_ratio=0.5, blocks=2).ratios(4)
    assert [block for block, ratio in enumerate(ratios) if ratio] == sorted(order[:2])


def test_prune_ratio_zero_is_the_original(dit):
    reference = denoise(dit, dit_inputs, STEPS)
    cached = tocache_fx.transform(dit, TokenCache(CachePredictor(3, 16), prune_ratio=0.0,
                                                  num_steps=STEPS), compile=False)
    assert torch.equal(denoise(cached, dit_inputs, STEPS), reference)


def test_block_pruning_rewrite():
    """A P-step of a pruning block: every branch recomputes the listed tokens; the
    self-attention for those queries, its keys and values over all tokens."""
    model = make_dit(3)
    inputs = dit_inputs(torch.randn(2, 4, 8, 8), 500)
    prepared = prepare(model, ((), inputs), inputs, "blocks")
    policy = TokenCache(CachePredictor(3, 16), prune_ratio=0.5, num_steps=STEPS)
    schedule = build_schedule(policy, prepared.branches, STEPS)
    layout = plan_layout(policy, schedule, prepared.branches).local(prepared.sites[0].branch_range)
    unit = prepared.units[0]
    plan = (int(StepKind.PARTIAL), DYNAMIC, DYNAMIC)
    step = build_step_graph(unit.captured.graph_module, unit.branches, plan, layout)
    assert sorted(step.reads) == ["cache.0", "cache.1", "prune.0", "prune.1"]
    nodes = list(step.graph_module.graph.nodes)
    count = lambda target: sum(n.target is target for n in nodes)
    assert count(ops.gather_tokens) == count(ops.scatter_tokens) == 2
    assert count(ops.select_tokens) == 0  # the tokens are listed, not scored
    attention = [n for n in nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(attention) == 1
    query, key, value = (a.meta["val"].shape for a in attention[0].args[:3])
    assert query[-2] == 8 and key[-2] == value[-2] == 16  # listed queries, every key


@pytest.mark.parametrize("attention", ["all", "kept", "cached"])
@pytest.mark.parametrize("cache", ["branches", "output", "change"])
def test_compiled_equals_eager_without_recompiles(trained, attention, cache):
    model = make_dit(3)
    policy = TokenCache(trained, prune_ratio=0.5, k1=2, k2=1, num_steps=STEPS,
                        attention=attention, cache=cache)
    eager = denoise(tocache_fx.transform(model, policy, compile=False), dit_inputs, STEPS)
    torch._dynamo.reset()
    compiled = tocache_fx.transform(model, policy)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = denoise(compiled, dit_inputs, STEPS)
        second = denoise(compiled, dit_inputs, STEPS)
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(first, second)
    assert compiled.num_compiled_graphs == 2  # I-step and P-step, every block
    assert not torch.equal(first, denoise(model, dit_inputs, STEPS))


def test_a_predictor_for_another_model_or_resolution_is_refused(trained):
    other = tocache_fx.transform(make_dit(3, sample_size=16), TokenCache(trained, num_steps=4),
                                 compile=False)
    with pytest.raises(ValueError, match="64 .*tokens|16 image tokens"):
        other(**dit_inputs(torch.randn(2, 4, 16, 16), 500))
    deeper = tocache_fx.transform(make_dit(4), TokenCache(trained, num_steps=4), compile=False)
    with pytest.raises(ValueError, match="3 blocks, the model 4"):
        deeper(**dit_inputs(torch.randn(2, 4, 8, 8), 500))


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_counted_flops_match_a_run(dit, ratio):
    """`explain`'s FLOP count of a TokenCache schedule equals FlopCounterMode around a
    real (eager) generation, at every pruning ratio (the listed token counts are sizes)."""
    from tocache_fx.explain import schedule_flops
    from tocache_fx.meta import flop_counter

    cached = tocache_fx.transform(dit, TokenCache(CachePredictor(3, 16), prune_ratio=ratio,
                                                  k1=2, k2=2, num_steps=STEPS), compile=False)
    denoise(cached, dit_inputs, STEPS)  # captures
    with flop_counter() as counter:
        denoise(cached, dit_inputs, STEPS)
    assert schedule_flops(cached, STEPS)["total"] == counter.get_total_flops()
