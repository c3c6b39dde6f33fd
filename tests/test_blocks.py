"""`find_blocks`: the repeated blocks of a module tree, found from its structure alone."""

from __future__ import annotations

from torch import nn

from tocache_fx.blocks import find_blocks
from zoo import ZOO


class Layer(nn.Module):
    """A layer, or one expert of an MoE."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)


class MoEBlock(nn.Module):
    """A block whose MLP is a list of experts: repeated parts of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.experts = nn.ModuleList(Layer() for _ in range(4))


class Refiner(nn.Module):
    """A token refiner: a declared class around layers of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(2))


class Model(nn.Module):
    _repeated_blocks = ["Refiner"]

    def __init__(self) -> None:
        super().__init__()
        self.refiner = Refiner()
        self.blocks = nn.ModuleList(MoEBlock() for _ in range(3))
        self.single = nn.ModuleList(Layer() for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(2))  # torch's own: not blocks


def test_blocks_holding_experts_are_blocks_and_a_declared_refiner_is_glue():
    found = [path for path, _ in find_blocks(Model())]
    assert found == ["blocks.0", "blocks.1", "blocks.2", "single.0", "single.1"]


def test_blocks_nested_in_blocks_are_dropped():
    outer = nn.ModuleList(Refiner() for _ in range(2))  # each holds a list of 2 layers
    model = nn.Module()
    model.stages = outer
    assert [path for path, _ in find_blocks(model)] == ["stages.0", "stages.1"]


def test_hidream_stream_blocks_are_found_with_their_moe_inside():
    entry = next(e for e in ZOO if e.name == "HiDreamImageTransformer2DModel")
    model = entry.build()
    found = [path for path, _ in find_blocks(model)]
    assert [p for p in found if "stream" in p] == [
        "double_stream_blocks.0", "double_stream_blocks.1",
        "single_stream_blocks.0", "single_stream_blocks.1"]
    assert any(isinstance(m, nn.ModuleList) and len(m) >= 2
               for m in model.double_stream_blocks[0].modules())  # the experts are inside
