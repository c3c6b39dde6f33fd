"""Schedule tables against their definitions: the papers' rules and, for the presets, a
transcription of the authors' code (their step index, their per-layer token counts),
compared entry by entry."""

from types import SimpleNamespace

import pytest
import torch

from tocache_fx import FORA, DuCa, NoCache, StepKind, TaylorSeer, ToCa, build_schedule

N = 256
FULL, PARTIAL, AGGRESSIVE = int(StepKind.FULL), int(StepKind.PARTIAL), int(StepKind.AGGRESSIVE)


def stack(num_blocks: int, kinds=("self_attention", "mlp"), tokens=N, prefix="transformer_blocks",
          first_block: int = 0, out=None):
    """Branches of a stack of blocks, as the pass finds them."""
    out = [] if out is None else out
    for position in range(num_blocks):
        for kind in kinds:
            out.append(SimpleNamespace(
                index=len(out), block=first_block + position, block_path=f"{prefix}.{position}",
                kind=kind, partial_ok=kind != "self_attention", num_tokens=tokens,
                attention=None))
    return out


def flux_branches(double: int, single: int, image=N, text=16):
    """FLUX: double blocks (image and text attention outputs and MLPs), single blocks."""
    out = []
    for position in range(double):
        for kind, tokens in (("self_attention", image), ("self_attention", text),
                             ("mlp", image), ("mlp", text)):
            out.append(SimpleNamespace(index=len(out), block=position,
                                       block_path=f"transformer_blocks.{position}", kind=kind,
                                       partial_ok=kind == "mlp", num_tokens=tokens, attention=None))
    for position in range(single):
        out.append(SimpleNamespace(index=len(out), block=double + position,
                                   block_path=f"single_transformer_blocks.{position}",
                                   kind="attention_mlp", partial_ok=True, num_tokens=image + text,
                                   attention=None))
    return out


def table(policy, branches, steps):
    return build_schedule(policy, branches, steps).table.tolist()


# ---------------------------------------------------------------- the authors' code, transcribed
# Their sampling loops and schedulers (docs/methods.md §2-3), in their own index `i`:
# DiT counts down (i = T-1 ... 0), PixArt, FLUX and OpenSora count up. One decision
# per step (the authors' code re-decides in layers 1..L of a FULL step, a quirk we
# do not copy: docs/design.md).

def _round32(value: float) -> int:
    return int(torch.round(torch.tensor(value, dtype=torch.float32)))


def authors_dit_full(T: int, N_: int, r: float = 0.07) -> dict[int, tuple[bool, int]]:
    """DiT (force_scheduler + cal_type): {i: (full, i % interval)}."""
    threshold, out = N_, {}
    for i in range(T - 1, -1, -1):
        first = i == T - 1
        interval = N_ if first else threshold
        full = first or i % interval == 0
        out[i] = (full, i % interval)
        if full:
            w = 0.4 if r != 0 else 0.0
            threshold = _round32(N_ / (1 + w - 2 * w * i / T))
            if r != 0 and i in range(int(0.2 * T), int(0.4 * T)):
                threshold = 2
    return out


def authors_pixart_full(T: int, N_: int, w: float = 0.2) -> dict[int, tuple[bool, int]]:
    threshold, out = N_, {}
    for i in range(T):
        first = i == 0
        interval = N_ if first else threshold
        full = first or i % interval == 0
        out[i] = (full, i % interval)
        if full:
            threshold = _round32(N_ / (1 - w + 2 * w * i / T))
    return out


def authors_ratio(r, step_factor, layer, layers, b, module_factor) -> float:
    layer_factor = 1 + b - 2 * b * layer / (layers - 1)
    return min(1.0, max(0.0, r * step_factor * layer_factor * module_factor))


def authors_dit_rows(T, L, N_=3, r=0.07, a=2.0, b=-0.2, mlp=2.5, duca=False):
    rows = []
    for s in range(T):
        i = T - 1 - s
        full, residue = authors_dit_full(T, N_, r)[i]
        if full:
            rows.append([FULL] + [N] * 2 * L)
        elif duca and residue % 2 == 0:
            rows.append([AGGRESSIVE] + [0] * 2 * L)
        else:
            step_factor = 1 + a - 2 * a * i / T
            row = [PARTIAL]
            for layer in range(L):
                row += [0, int(authors_ratio(r, step_factor, layer, L, b, mlp) * N)]
            rows.append(row)
    return rows


@pytest.mark.parametrize("steps", [20, 50, 250])
@pytest.mark.parametrize("depth", [6, 28])
def test_toca_dit_presets_are_the_authors_schedule(steps, depth):
    branches = stack(depth)
    assert table(ToCa.dit_ddim50(), branches, steps) == authors_dit_rows(steps, depth)
    assert table(ToCa.dit_ddpm250(), branches, steps) == authors_dit_rows(
        steps, depth, N_=4, a=0.4, b=0.8)


@pytest.mark.parametrize("steps", [20, 50, 250])
@pytest.mark.parametrize("depth", [6, 28])
def test_duca_dit_preset_is_the_authors_schedule(steps, depth):
    assert table(DuCa.dit_ddim50(), stack(depth), steps) == authors_dit_rows(
        steps, depth, r=0.05, duca=True)


def test_dit_ddim50_full_steps_are_the_authors():
    """The authors' FULL steps (forward numbering), with one decision per step."""
    kinds = [row[0] for row in table(ToCa.dit_ddim50(), stack(28), 50)]
    full = [s for s, kind in enumerate(kinds) if kind == FULL]
    assert full == [0, 4, 5, 9, 13, 17, 19, 22, 25, 28, 31] + list(range(33, 50, 2))
    rows = table(ToCa.dit_ddim50(), stack(28), 50)
    # the first ~25%: the MLPs reuse all their tokens
    assert all(row[2::2] == [0] * 28 for row in rows[1:12] if row[0] == PARTIAL)
    assert all(row[1::2] == [0] * 28 for row in rows if row[0] == PARTIAL)  # attention reused


def pixart_rows(T, L, r, duca=False):
    rows = []
    full_steps = authors_pixart_full(T, 3, w=0.0 if duca else 0.2)
    for i in range(T):
        full, residue = full_steps[i]
        if full:
            rows.append([FULL] + [N] * 3 * L)
        elif duca and residue % 2 == 0:
            rows.append([AGGRESSIVE] + [0] * 3 * L)
        else:
            step_factor = 1 - (-0.9) + 2 * (-0.9) * i / T
            row = [PARTIAL]
            for layer in range(L):
                row += [0, int(authors_ratio(r, step_factor, layer, L, 0.6, 0.6) * N),
                        int(authors_ratio(r, step_factor, layer, L, 0.6, 1.6) * N)]
            rows.append(row)
    return rows


@pytest.mark.parametrize("steps", [20, 50, 250])
@pytest.mark.parametrize("depth", [6, 28])
def test_pixart_presets_are_the_authors_schedule(steps, depth):
    branches = stack(depth, kinds=("self_attention", "cross_attention", "mlp"))
    assert table(ToCa.pixart(), branches, steps) == pixart_rows(steps, depth, 0.3)
    assert table(DuCa.pixart(), branches, steps) == pixart_rows(steps, depth, 0.75, duca=True)


@pytest.mark.parametrize("steps", [20, 50, 250])
def test_flux_preset_is_the_authors_schedule(steps):
    double, single = 6, 12
    branches = flux_branches(double, single)
    expected, counter = [], 0
    for i in range(steps):
        full = i <= 2 or counter == 4 - 1
        counter = 0 if full else counter + 1
        if full:
            expected.append([FULL] + [b.num_tokens for b in branches])
            continue
        row = [PARTIAL]
        for position in range(double):
            ratio = authors_ratio(0.1, 1.0, position, double, 0.5, 0.4)
            row += [0, 0, int(ratio * N), int(ratio * 16)]
        for position in range(single):
            row.append(int(authors_ratio(0.1, 1.0, position, single, 0.5, 1.6) * (N + 16)))
        expected.append(row)
    assert table(ToCa.flux(), branches, steps) == expected


@pytest.mark.parametrize("steps", [20, 30, 50])
def test_opensora_presets_are_the_authors_schedule(steps):
    branches = stack(4, kinds=("self_attention", "cross_attention", "mlp"))
    mlp = int(min(1.0, 0.1 * 1.495) * N)
    toca, duca = [], []
    pattern = {0: "FFF", 1: "RRP", 2: "AAA", 3: "FRF", 4: "RRP", 5: "AAA"}  # DuCa's table
    for i in range(steps):
        due = [i % 3 == 0, i % 6 == 0, i % 3 == 0]
        if i <= 2 or all(due):
            toca.append([FULL] + [N] * 12)
        else:
            toca.append([PARTIAL] + [N if d else k for d, k in zip(due, [0, 0, mlp])] * 4)
        letters = "FFF" if i <= 2 else pattern[i % 6]
        if letters == "FFF":
            duca.append([FULL] + [N] * 12)
        elif letters == "AAA":
            duca.append([AGGRESSIVE] + [0] * 12)
        else:
            duca.append([PARTIAL] + [{"F": N, "R": 0, "P": mlp}[c] for c in letters] * 4)
    assert table(ToCa.opensora(), branches, steps) == toca
    assert table(DuCa.opensora(), branches, steps) == duca


# ---------------------------------------------------------------- the other policies

def test_no_cache_is_all_full():
    rows = table(NoCache(), stack(4), 7)
    assert all(row == [FULL] + [N] * 8 for row in rows)


def test_fora_is_the_papers_rule():
    rows = table(FORA(interval=3), stack(4), 7)
    assert [row[0] for row in rows] == [0, 1, 1, 0, 1, 1, 0]
    assert all(row[1:] == [0] * 8 for row in rows if row[0] == PARTIAL)
    # the ToCa repository's FORA mode (FULL at 0, 1, 4, 7, ...) is FORA with warmup=1
    assert [row[0] for row in table(FORA(interval=3, warmup=1), stack(4), 8)] == \
        [0, 0, 1, 1, 0, 1, 1, 0]


def test_taylorseer_forecast_terms_and_distances():
    schedule = build_schedule(TaylorSeer(interval=3, warmup=2, order=2), stack(4), 9)
    assert schedule.table.tolist() == build_schedule(FORA(interval=3, warmup=2), stack(4),
                                                     9).table.tolist()
    # FULL at 0, 1, 2, 5, 8: differences need earlier FULL steps, up to `order` of them
    assert schedule.forecast == ((0, 0), (1, 1), (2, 1), (2, 1), (2, 2), (2, 3), (2, 1),
                                 (2, 2), (2, 3))
    assert schedule.forecast_at(9) == (0, 0)  # past the plan: FULL, nothing forecast
    first_order = build_schedule(TaylorSeer(interval=2), stack(4), 5).forecast
    assert first_order == ((0, 0), (0, 1), (1, 2), (1, 1), (1, 2))
    assert build_schedule(FORA(interval=2), stack(4), 5).forecast == ()


@pytest.mark.parametrize("policy", [FORA(interval=1), ToCa(interval=1), DuCa(interval=1),
                                    ToCa(interval=1, full_schedule="fixed")])
def test_interval_one_never_caches(policy):
    rows = table(policy, stack(4), 12)
    assert all(row[0] == FULL for row in rows)


def test_steps_past_plan_are_full():
    schedule = build_schedule(FORA(interval=2), stack(4), 4)
    assert schedule.plan(7) == schedule.full_plan()


@pytest.mark.parametrize("policy", [FORA(interval=3, warmup=4),
                                    DuCa(interval=3, warmup=4, full_schedule="fixed"),
                                    ToCa(interval=3, warmup=4, full_schedule="fixed")])
def test_warmup_runs_the_first_steps_full_then_starts_the_cycle(policy):
    kinds = [row[0] for row in table(policy, stack(4), 12)]
    assert [step for step, kind in enumerate(kinds) if kind == FULL] == [0, 1, 2, 3, 4, 7, 10]


def test_duca_fixed_cycle_full_conservative_aggressive():
    rows = table(DuCa(interval=5, cache_ratio=0.9, full_schedule="fixed", time_weight=0.0,
                      depth_weight=0.0, kind_factors=(("mlp", 1.0),)), stack(4), 10)
    assert [row[0] for row in rows] == [0, 1, 2, 1, 2] * 2
    assert rows[1][1::2] == [0] * 4  # self-attention reused
    assert rows[1][2::2] == [int(0.1 * N)] * 4  # MLPs recompute 10% of tokens, exactly


def test_token_counts_are_exact_and_buckets_are_opt_in():
    branches = stack(28)
    exact = {k for row in table(ToCa(), branches, 50) for k in row[1:]}
    assert len(exact) > 20  # int(r N) per step and layer, not a few buckets
    bucketed = {k for row in table(ToCa(token_bucket=8, time_phases=4), branches, 50)
                for k in row[1:]}
    assert all(k % 8 == 0 for k in bucketed) and len(bucketed) < len(exact)


def test_branches_with_their_own_token_counts():
    """Joint attention: the text stream's MLP plans k against its own 16 tokens."""
    rows = table(ToCa.flux(), flux_branches(2, 2), 8)
    partial = rows[4]
    assert partial[0] == PARTIAL
    assert partial[3] == int(0.1 * 1.5 * 0.4 * N) and partial[4] == int(0.1 * 1.5 * 0.4 * 16)
