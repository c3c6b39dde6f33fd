import pytest
import torch

from conftest import dit_inputs, pixart_inputs
from tocache_fx import UnsupportedModelError
from tocache_fx.capture import capture
from tocache_fx.passes.find_branches import find_branches


def branches_of(model, inputs):
    captured = capture(model, (), inputs)
    return find_branches(captured.graph_module, type(model).__name__)


def test_dit_branches(dit):
    branches = branches_of(dit, dit_inputs(torch.randn(2, 4, 8, 8), 10))
    assert [(b.block, b.kind) for b in branches] == [
        (i, kind) for i in range(3) for kind in ("self_attention", "mlp")]
    assert all(b.gate is not None for b in branches)  # adaLN-Zero gates
    assert [b.partial_ok for b in branches] == [False, True] * 3
    assert all(b.block_path == f"transformer_blocks.{b.block}" for b in branches)
    assert all(b.output.target is torch.ops.aten.linear.default for b in branches)


def test_pixart_branches(pixart):
    branches = branches_of(pixart, pixart_inputs(torch.randn(2, 4, 8, 8), 10))
    assert [b.kind for b in branches] == ["self_attention", "cross_attention", "mlp"] * 3
    assert [b.gate is None for b in branches] == [False, True, False] * 3  # ungated cross-attn
    assert [b.partial_ok for b in branches] == [False, True, True] * 3


class NoResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states):
        return self.proj(hidden_states).relu()


def test_unsupported_model_names_class_and_findings():
    with pytest.raises(UnsupportedModelError, match=r"NoResidual: found no residual branch.*"
                                                    r"0 adds of two equal 3-d tensors"):
        branches_of(NoResidual(), {"hidden_states": torch.randn(1, 4, 8)})


class PositionalMLP(torch.nn.Module):
    """x + mlp(x + pos): the pos table is per token, gathered with the tokens."""

    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(1, 4, 8))
        self.mlp = torch.nn.Linear(8, 8)

    def forward(self, hidden_states):
        return hidden_states + self.mlp(hidden_states + self.pos)


def test_per_token_side_input_is_recorded_for_gathering():
    (branch,) = branches_of(PositionalMLP(), {"hidden_states": torch.randn(2, 4, 8)})
    assert branch.kind == "mlp" and branch.partial_ok
    assert [(node.name, where) for node, where in branch.side_inputs.items()] == [
        ("p_pos", (1, 3, 0))]  # the parameter (a graph input), tokens on axis 1 of a rank-3 op


class JointMLP(torch.nn.Module):
    """One MLP over cat(text, image) tokens, each stream sliced back (CogVideoX)."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, text):
        out = self.mlp(torch.cat([text, hidden_states], dim=1))
        return hidden_states + out[:, text.shape[1]:], text + out[:, :text.shape[1]]


def test_joint_sequence_cat_and_slice_are_bypassed():
    image, text = branches_of(JointMLP(), {"hidden_states": torch.randn(2, 4, 8),
                                           "text": torch.randn(2, 3, 8)})
    assert image.partial_ok and text.partial_ok
    assert sorted(node.target.__name__ for node in image.bypass) == ["cat.default", "slice.Tensor"]
    assert image.num_tokens == 4 and text.num_tokens == 3
