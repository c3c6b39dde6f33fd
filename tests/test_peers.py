"""Peer caches on a tiny random FLUX transformer (and the DiT registry still in place).

Every peer runs a 6-step CFG loop (batch ``cat([uncond, cond])``, timestep in 0..1).
Where a step is cached is checked by teacher forcing: each step gets the uncached
trajectory's input, so a step the peer computes in full is bit-identical to the
uncached model's and a step served from its cache is not.
"""

import copy
import importlib.util

import pytest
import torch
from diffusers import FluxTransformer2DModel

from tocache_fx.harness import peers
from tocache_fx.harness.peers import FLUX_PEERS, PEERS, build_peer, flux_peers, peers_for

STEPS = 6
HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None
needs_cache_dit = pytest.mark.skipif(
    not HAS_CACHE_DIT, reason="cache-dit not installed (pip install cache-dit --no-deps)")

# name -> (setup options that make the 6-step tiny model cache, expected "computed in
# full" per step under teacher forcing; None: cache-dit, checked against its own record)
EXPECTED = {
    # attention recomputed every 2nd step, broadcast in between
    "diffusers PAB": ({}, [True, False, True, False, True, False]),
    # unconditional half estimated (and attention reused) from step 3 (t = 500 < 641)
    # on, except every 5th iteration
    "diffusers FasterCache": ({}, [True, True, True, False, False, True]),
    # a threshold no residual change reaches: every step after the first is cached
    "diffusers FirstBlockCache": ({"threshold": 10.0}, [True] + [False] * 5),
    # full for steps 0-2 (disable_cache_before_step=3), then forecast / refresh
    "diffusers TaylorSeer": ({}, [True, True, True, False, True, False]),
    # step 0 kept (retention 20%), then at most max_skip_steps=3 skipped in a row
    "diffusers MagCache": ({"threshold": 10.0}, [True, False, False, False, True, False]),
    "cache-dit DBCache": ({"threshold": 10.0}, None),
    "cache-dit DBCache+TaylorSeer": ({"threshold": 10.0}, None),
}


def _tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        axes_dims_rope=(8, 12, 12)).eval()


@pytest.fixture(scope="module")
def flux():
    torch.set_num_threads(1)
    return _tiny_flux()


def _conditioning(seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 256, 4, generator=g)
    ctx = {"encoder_hidden_states": torch.randn(2 * batch, 8, 64, generator=g),
           "pooled_projections": torch.randn(2 * batch, 64, generator=g),
           "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0),
                                                 torch.arange(16.0), indexing="ij"), -1).reshape(-1, 3),
           "txt_ids": torch.zeros(8, 3)}
    return noise, ctx


TIMESTEPS = torch.linspace(1.0, 0.0, STEPS + 1)


def _step(model, x: torch.Tensor, ctx: dict, i: int) -> torch.Tensor:
    t = TIMESTEPS[i].expand(2 * x.shape[0]).clone()
    return model(hidden_states=torch.cat([x, x]), timestep=t, return_dict=False, **ctx)[0]


def _update(x: torch.Tensor, out: torch.Tensor, i: int, scale: float = 3.0) -> torch.Tensor:
    uncond, cond = out.chunk(2)
    return x + (TIMESTEPS[i + 1] - TIMESTEPS[i]) * (uncond + scale * (cond - uncond))


@torch.no_grad()
def _generate(model, seed: int = 1, steps: int = STEPS) -> torch.Tensor:
    x, ctx = _conditioning(seed)
    for i in range(steps):
        x = _update(x, _step(model, x, ctx, i), i)
    return x


@torch.no_grad()
def _computed_in_full(model, reference) -> list[bool]:
    """Per step: is the output identical to the uncached model's on the same input?"""
    x, ctx = _conditioning(1)
    same = []
    for i in range(STEPS):
        expected = _step(reference, x, ctx, i)
        same.append(torch.equal(_step(model, x, ctx, i), expected))
        x = _update(x, expected, i)
    return same


def test_registries(flux):
    assert peers_for(flux) is FLUX_PEERS
    assert list(FLUX_PEERS) == list(EXPECTED)
    assert list(PEERS) == ["diffusers PAB", "diffusers FasterCache", "diffusers FirstBlockCache",
                           "diffusers TaylorSeer", "diffusers MagCache"]


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=needs_cache_dit) if n.startswith("cache-dit") else n for n in EXPECTED])
def test_flux_peer(flux, name):
    options, expected = EXPECTED[name]
    peer = build_peer(name, lambda: copy.deepcopy(flux), STEPS,
                      calibrate=lambda d: _generate(d), **options)

    peer.reset()
    first = _generate(peer)
    assert first.shape == (1, 256, 4) and torch.isfinite(first).all()
    assert not torch.equal(first, _generate(flux)), "the peer never used its cache"

    # reset: an interrupted generation of other noise leaves nothing behind
    _generate(peer, seed=2, steps=3)
    peer.reset()
    assert torch.equal(_generate(peer), first)

    peer.reset()
    computed = _computed_in_full(peer, flux)
    if expected is None:  # cache-dit: its record of cached steps, past the 2 warm-up steps
        cached = peer.cached_steps()
        assert cached == [2, 3, 4, 5]
        expected = [i not in cached for i in range(STEPS)]
    assert computed == expected


def test_flux_timestep_on_the_hooks_scale(flux):
    peer = build_peer("diffusers PAB", lambda: copy.deepcopy(flux), STEPS)
    x, ctx = _conditioning(1)
    with torch.no_grad():
        _step(peer, x, ctx, 2)
    assert peer.current_timestep() == pytest.approx(1000 * float(TIMESTEPS[2]))


@needs_cache_dit
def test_cache_dit_uncached_is_the_original(flux):
    """cache-dit's FLUX adapter fuses both block lists; with nothing cached it is exact."""
    peer = build_peer("cache-dit DBCache", lambda: copy.deepcopy(flux), STEPS, threshold=0.0)
    peer.reset()
    assert _computed_in_full(peer, flux) == [True] * STEPS and peer.cached_steps() == []


def test_flux_peers_builds_each_on_its_own_copy(flux):
    errors = {}
    built = flux_peers(flux, STEPS, names=["diffusers PAB", "cache-dit DBCache"],
                       on_error=lambda name, error: errors.update({name: error}))
    names = [name for name, _ in built]
    if HAS_CACHE_DIT:
        assert names == ["diffusers PAB", "cache-dit DBCache"] and not errors
    else:
        assert names == ["diffusers PAB"] and isinstance(errors["cache-dit DBCache"], ImportError)
    assert all(peer.model is not flux for _, peer in built)
    assert not hasattr(flux, "_diffusers_hook") and not hasattr(flux, "_is_cached")


def test_dit_faster_cache_runs():
    """FasterCache on the DiT: image layout and the class labels split with the CFG batch."""
    from tocache_fx.harness.sampling import load_dit_digits, sample_digits

    labels = torch.tensor([3, 7])
    peer = build_peer("diffusers FasterCache", load_dit_digits, num_steps=6)
    peer.reset()
    images = sample_digits(peer, labels, num_steps=6, seed=0)
    reference = sample_digits(load_dit_digits(), labels, num_steps=6, seed=0)
    assert torch.isfinite(images).all() and not torch.equal(images, reference)
    assert peers.HookedDenoiser is type(peer)
