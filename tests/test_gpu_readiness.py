"""No host synchronisation per step: the step graphs never read a tensor's value on the
host (checked here on the CPU, down to ATen), and a generation on a GPU runs under
`torch.cuda.set_sync_debug_mode("error")` (skipped without CUDA)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from conftest import denoise, dit_inputs, make_dit, make_pixart, pixart_inputs
import tocache_fx
from tocache_fx import FORA, DuCa, TaylorSeer, ToCa
from tocache_fx.meta import fake_inputs
from tocache_fx.opaque import OPAQUE_OP

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}
POLICIES = [FORA(interval=3, num_steps=8), TaylorSeer(interval=2, order=2, num_steps=8),
            ToCa(num_steps=8, cache_ratio=0.8), DuCa(num_steps=8, cache_ratio=0.8),
            DuCa(num_steps=8, cache_ratio=0.8, selection="similarity"),
            ToCa.pixart(num_steps=8)]


def host_reads(step_graph) -> list[str]:
    """ATen ops of the step graph that read a value on the host, traced through the
    inserted Python helpers (selection, scores, gathers)."""
    gm = step_graph.graph_module
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = fake_inputs(gm, mode)
    with mode:
        traced = make_fx(gm, tracing_mode="real")(*inputs)
    return [f"{n.target}" for n in traced.graph.nodes
            if n.target in HOST_READS and n.target is not OPAQUE_OP]


@pytest.mark.parametrize("capture", ["blocks", "model"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_no_step_graph_reads_a_value_on_the_host(policy, capture):
    model, inputs = (make_pixart(), pixart_inputs) if policy.token_selection(None).share_halves \
        else (make_dit(), dit_inputs)
    cached = tocache_fx.transform(model, policy, compile=False, capture=capture)
    denoise(cached, inputs, 8)
    graphs = [g for unit in cached.last_prepared().units for g in unit.step_graphs.values()]
    assert len(graphs) >= 2
    for graph in graphs:
        assert host_reads(graph) == [], graph.plan


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", POLICIES[:4], ids=lambda p: type(p).__name__)
def test_a_cuda_generation_never_synchronises(policy):
    model = make_dit().cuda()
    cached = tocache_fx.transform(model, policy)

    def inputs(latents, t):
        return {key: value.cuda() for key, value in dit_inputs(latents, t).items()}

    denoise(cached, lambda x, t: inputs(x.cuda(), t), 8)  # capture and compile first
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        timesteps = torch.arange(999, 0, -125, device="cuda")  # a scheduler array: views
        x = torch.randn(2, 4, 8, 8, device="cuda")
        labels = torch.tensor([1, 2], device="cuda")
        for t in timesteps:
            x = x - 0.05 * cached(hidden_states=x, timestep=t.expand(2),
                                  class_labels=labels).sample[:, :4]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
