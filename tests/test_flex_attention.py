"""Blocks whose attention is eager flex attention with a block mask built in the forward
(Kandinsky 6 SR's NABLA pattern, in miniature): the mask's vmap levels survive the
rewrite, FLOPs are counted around the op the counter cannot run, and the eager model
still runs afterwards."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import tocache_fx
from tocache_fx import NoCache, ToCa
from tocache_fx.explain import schedule_flops

B, T, C, H = 2, 64, 16, 2


def _local(b, h, q, kv):  # tokens attend within their half of the sequence
    return (q // (T // 2)) == (kv // (T // 2))


class FlexBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(C, 3 * C, bias=False)
        self.out = torch.nn.Linear(C, C, bias=False)
        self.mlp = torch.nn.Linear(C, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = create_block_mask(_local, None, None, T, T, device="cpu", BLOCK_SIZE=32)
        q, k, v = self.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        attended = flex_attention(q, k, v, block_mask=mask).transpose(1, 2).reshape(B, T, C)
        x = x + self.out(attended)
        return x + self.mlp(x)


class FlexModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(FlexBlock() for _ in range(2))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states * timestep[:, None, None]


def _steps(model, steps: int = 4) -> list[torch.Tensor]:
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return [model(x, torch.full((B,), 1.0 - s / steps)) for s in range(steps)]


def test_flex_attention_blocks_are_captured_and_equal_the_original():
    model = FlexModel().eval()
    reference = _steps(model)
    uncached = tocache_fx.transform(model, NoCache(), compile=False)
    for ours, theirs in zip(_steps(uncached), reference):
        torch.testing.assert_close(ours, theirs)
    assert len(uncached.last_prepared().branches) == 4
    _steps(uncached.with_policy(ToCa(num_steps=4, interval=2)))
    for again, theirs in zip(_steps(model), reference):  # eager flex attention still runs
        torch.testing.assert_close(again, theirs)


def test_uncached_flops_count_the_flex_attention_by_its_formula():
    cached = tocache_fx.transform(FlexModel().eval(), NoCache(), compile=False)
    _steps(cached, 1)
    linears = 2 * B * T * C * (3 * C + C + C)                      # qkv, out, mlp
    attention = 4 * B * H * T * T * (C // H)                       # QK^T and PV, dense
    assert schedule_flops(cached)["uncached_step"] == 2 * (linears + attention)
