import json

import pytest

from tocache_fx import FORA, DuCa, NoCache, TaylorSeer, ToCa, policy_from_dict


@pytest.mark.parametrize("policy", [
    NoCache(), FORA(interval=2), TaylorSeer(order=2), ToCa(), ToCa.pixart(), ToCa.dit_ddpm250(),
    ToCa.flux(), ToCa.opensora(), DuCa(selection="vnorm"), DuCa.pixart(), DuCa.opensora()])
def test_dict_round_trip(policy):
    data = json.loads(json.dumps(policy.to_dict()))  # tuples come back as lists
    assert policy_from_dict(data) == policy


def test_repr_is_readable():
    assert repr(FORA(interval=2)) == "FORA(interval=2, num_steps=None, warmup=0)"


def test_presets_follow_methods_md():
    pixart = ToCa.pixart()
    assert (pixart.interval, pixart.cache_ratio, pixart.depth_weight, pixart.time_weight) == (
        3, 0.7, 0.6, -0.9)
    assert pixart.step_clock == "countup" and pixart.share_cfg_selection
    ddpm = ToCa.dit_ddpm250()
    assert (ddpm.interval, ddpm.depth_weight, ddpm.time_weight) == (4, 0.8, 0.4)
    dit = ToCa.dit_ddim50()
    assert dit.step_clock == "countdown" and not dit.share_cfg_selection  # per sample
    duca = DuCa.dit_ddim50()
    assert (duca.interval, duca.cache_ratio, duca.grid_bonus, duca.selection) == (
        3, 0.95, 0.8, "attention")


@pytest.mark.parametrize("make, parameter, valid", [
    (lambda: ToCa(cache_ratio=1.5), "cache_ratio", "[0.0, 1.0]"),
    (lambda: ToCa(cache_ratio=-0.1), "cache_ratio", "[0.0, 1.0]"),
    (lambda: DuCa(cache_ratio=2), "cache_ratio", "[0.0, 1.0]"),
    (lambda: FORA(interval=0), "interval", ">= 1"),
    (lambda: ToCa(interval=0), "interval", ">= 1"),
    (lambda: DuCa(interval=1.5), "interval", ">= 1"),
    (lambda: DuCa(selection="topk"), "selection", "random"),
    (lambda: ToCa(attention_score="x"), "attention_score", "auto"),
    (lambda: ToCa(time_phases=0), "time_phases", ">= 1"),
    (lambda: ToCa(full_schedule="teacache"), "full_schedule", "dit"),
    (lambda: ToCa(kind_factors=(("mlp", float("nan")),)), "kind_factors['mlp']", "finite"),
    (lambda: ToCa(step_clock="up"), "step_clock", "countdown"),
    (lambda: FORA(num_steps=0), "num_steps", ">= 1"),
    (lambda: TaylorSeer(order=3), "order", "[1, 2]"),
    (lambda: TaylorSeer(order=0), "order", "[1, 2]"),
])
def test_invalid_values_name_parameter_and_range(make, parameter, valid):
    with pytest.raises(ValueError) as error:
        make()
    assert parameter in str(error.value) and valid in str(error.value)


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="unknown policy"):
        policy_from_dict({"policy": "TeaCache"})
