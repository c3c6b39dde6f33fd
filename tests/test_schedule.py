"""Schedule tables against their definitions in methods.md."""

from types import SimpleNamespace

import pytest

from tocache_fx import FORA, DuCa, NoCache, StepKind, TaylorSeer, ToCa, build_schedule


def branches(num_blocks: int = 4):
    out = []
    for block in range(num_blocks):
        out.append(SimpleNamespace(index=len(out), block=block, kind="self_attention",
                                   partial_ok=False, num_tokens=N))
        out.append(SimpleNamespace(index=len(out), block=block, kind="mlp", partial_ok=True,
                                   num_tokens=N))
    return out


N = 256


def test_no_cache_is_all_full():
    table = build_schedule(NoCache(), branches(), 7).table
    assert (table[:, 0] == StepKind.FULL).all() and (table[:, 1:] == N).all()


def test_fora_alternates_full_and_reuse():
    table = build_schedule(FORA(interval=3), branches(), 7).table
    assert table[:, 0].tolist() == [0, 1, 1, 0, 1, 1, 0]
    assert (table[[1, 2, 4, 5], 1:] == 0).all() and (table[[0, 3, 6], 1:] == N).all()


def test_duca_cycle_full_conservative_aggressive():
    table = build_schedule(DuCa(interval=5, cache_ratio=0.9, token_bucket=1), branches(), 10).table
    assert table[:, 0].tolist() == [0, 1, 2, 1, 2] * 2
    conservative = table[1, 1:].tolist()
    assert conservative[0::2] == [0] * 4  # self-attention reused
    assert conservative[1::2] == [round(0.1 * N)] * 4  # MLPs recompute 10% of tokens


def test_taylorseer_forecast_terms_and_distances():
    schedule = build_schedule(TaylorSeer(interval=3, warmup=2, order=2), branches(), 9)
    assert schedule.table.tolist() == build_schedule(FORA(interval=3, warmup=2), branches(),
                                                     9).table.tolist()
    # FULL at 0, 1, 2, 5, 8: differences need earlier FULL steps, up to `order` of them
    assert schedule.forecast == ((0, 0), (1, 1), (2, 1), (2, 1), (2, 2), (2, 3), (2, 1),
                                 (2, 2), (2, 3))
    assert schedule.forecast_at(9) == (0, 0)  # past the plan: FULL, nothing forecast
    assert len(schedule.variants()) == 6 and len(schedule.plans()) == 2
    first_order = build_schedule(TaylorSeer(interval=2), branches(), 5).forecast
    assert first_order == ((0, 0), (0, 1), (1, 2), (1, 1), (1, 2))
    assert build_schedule(FORA(interval=2), branches(), 5).forecast == ()


@pytest.mark.parametrize("policy", [FORA(interval=1), ToCa(interval=1), DuCa(interval=1)])
def test_interval_one_never_caches(policy):
    table = build_schedule(policy, branches(), 12).table
    assert (table[:, 0] == StepKind.FULL).all()


def test_toca_dit_ddim50_full_steps_and_fractions():
    policy = ToCa()  # DiT DDIM-50 defaults
    schedule = build_schedule(policy, branches(), 50)
    table = schedule.table
    full = [i for i in range(50) if table[i, 0] == StepKind.FULL]
    # interval round(3 / (1.4 - 0.8 t/T)) outside the 20-40% window, 2 inside it
    expected, step = [], 0
    while step < 50:
        expected.append(step)
        progress = step / 50
        step += 2 if 0.2 <= progress < 0.4 else round(3 / (1.4 - 0.8 * (1 - progress)))
    assert full == expected
    partial = [i for i in range(50) if i not in full]
    assert all((table[i, 1:] == 0).all() for i in partial if i < 12)  # first quarter: reuse
    assert all((table[i, 1::2] == 0).all() for i in partial)  # self-attention never partial
    # last phase (t/T = 0.125): r = 0.07 * f_L * (1 + 2 * 0.75) * (1 + 0.6 * 2.5)
    last = partial[-1]
    for block in range(4):
        f_l = 1 - 0.2 * (1 - 2 * block / 3)
        r = min(1.0, 0.07 * f_l * 2.5 * 2.5)
        assert table[last, 2 + 2 * block] == round(r * N / 8) * 8


def test_toca_bounds_compiled_graphs():
    for policy in [ToCa(), ToCa.dit_ddpm250(), ToCa.pixart(), DuCa(), FORA()]:
        for steps in (20, 50, 250):
            assert len(build_schedule(policy, branches(28), steps).plans()) <= 6


def test_steps_past_plan_are_full():
    schedule = build_schedule(FORA(interval=2), branches(), 4)
    assert schedule.plan(7) == schedule.full_plan()


@pytest.mark.parametrize("policy", [FORA(interval=3, warmup=4), DuCa(interval=3, warmup=4),
                                    ToCa(interval=3, warmup=4, full_schedule="fixed")])
def test_warmup_runs_the_first_steps_full_then_starts_the_cycle(policy):
    kinds = build_schedule(policy, branches(), 12).table[:, 0].tolist()
    full = [step for step, kind in enumerate(kinds) if kind == StepKind.FULL]
    assert full == [0, 1, 2, 3, 4, 7, 10]


def test_opensora_per_kind_cycles_and_mlp_fraction():
    kinds = ["self_attention", "cross_attention", "mlp"]
    stack = [SimpleNamespace(index=i, block=0, kind=kind, partial_ok=kind != "self_attention",
                             num_tokens=N) for i, kind in enumerate(kinds)]
    table = build_schedule(ToCa.opensora(token_bucket=1), stack, 12).table.tolist()
    assert [row[0] == StepKind.FULL for row in table] == [i % 6 == 0 for i in range(12)]
    mlp_partial = round(0.15 * N)  # R = 85% on MLPs
    cross_partial = round(0.1 * (1 - 0.4 * 0.5 / 0.6) * N)
    for step in (3, 9):  # attention and MLP cycles (3) are due, cross-attention's (6) not
        assert table[step][1:] == [N, cross_partial, N]
    for step in (1, 2, 4, 5):
        assert table[step][1:] == [0, cross_partial, mlp_partial]


def test_branches_with_their_own_token_counts():
    """Joint attention: the text stream's MLP plans k against its own 8 tokens."""
    image = SimpleNamespace(index=0, block=0, kind="mlp", partial_ok=True, num_tokens=256)
    text = SimpleNamespace(index=1, block=0, kind="mlp", partial_ok=True, num_tokens=8)
    schedule = build_schedule(DuCa(interval=2, cache_ratio=0.5, token_bucket=1), [image, text], 4)
    assert schedule.full_plan() == (StepKind.FULL, 256, 8)
    assert schedule.plan(1) == (StepKind.PARTIAL, 128, 4)
