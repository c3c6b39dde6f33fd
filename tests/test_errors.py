"""Bad input gets a clear error, never a silent wrong result."""

import pytest
import torch

from conftest import dit_inputs, make_dit
import tocache_fx
from tocache_fx import CacheStateError, NoCache, ToCa, UnsupportedModelError


def test_transform_rejects_training_mode():
    model = make_dit(1).train()
    with pytest.raises(CacheStateError, match="inference only"):
        tocache_fx.transform(model, ToCa())


def test_call_in_training_mode_raises():
    model = tocache_fx.transform(make_dit(1), ToCa(), compile=False)
    model.train()
    with pytest.raises(CacheStateError, match=r"call \.eval\(\)"):
        model(**dit_inputs(torch.randn(2, 4, 8, 8), 10))
    model.eval()
    model(**dit_inputs(torch.randn(2, 4, 8, 8), 10))


def test_policy_must_be_a_policy():
    with pytest.raises(TypeError, match="Policy"):
        tocache_fx.transform(make_dit(1), {"interval": 3})


class Pointwise(torch.nn.Module):
    def forward(self, hidden_states):
        return hidden_states * 2


def test_unsupported_model_error_at_first_call():
    model = tocache_fx.transform(Pointwise().eval(), ToCa(), compile=False)
    with pytest.raises(UnsupportedModelError, match="Pointwise: found no residual branch"):
        model(torch.randn(1, 4, 8))


def test_explain_before_first_call():
    with pytest.raises(CacheStateError, match="not been called"):
        tocache_fx.explain(tocache_fx.transform(make_dit(1), ToCa(), compile=False))


class ResidualWithVarKwargs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, **extra):
        return hidden_states + self.mlp(hidden_states) * extra["scale"]


def test_var_keyword_arguments_reach_the_model():
    module = ResidualWithVarKwargs().eval()
    model = tocache_fx.transform(module, ToCa(), compile=False)
    x = torch.randn(1, 4, 8)
    assert torch.equal(model(x, scale=torch.tensor(2.0)), module(x, scale=torch.tensor(2.0)))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.mlp = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def forward(self, hidden_states, scale):
        return hidden_states + self.mlp(self.norm(hidden_states)) * scale


class GlueWithHiddenState(torch.nn.Module):
    """Its glue decides the blocks' arguments from attributes the call does not show."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.scale, self.tokens, self.by_keyword = 0.5, 4, False

    def forward(self, hidden_states):
        x = hidden_states[:, :self.tokens]
        for block in self.blocks:
            x = block(x, scale=self.scale) if self.by_keyword else block(x, self.scale)
        return x


@pytest.mark.parametrize("change", ["scale", "tokens", "by_keyword"])
def test_a_block_called_with_other_arguments_than_captured_raises(change):
    module = GlueWithHiddenState().eval()
    model = tocache_fx.transform(module, NoCache(), compile=False)
    x = torch.randn(1, 8, 8)
    torch.testing.assert_close(model(x), module(x))  # the capture's call
    torch.testing.assert_close(model(x), module(x))  # the same arguments again
    setattr(module, change, {"scale": 2.0, "tokens": 6, "by_keyword": True}[change])
    with pytest.raises(CacheStateError, match="other arguments than in the first call"):
        model(x)


class NumberAware(torch.nn.Module):
    """Computes something else from a Python-number timestep than from a tensor."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, timestep):
        scale = 2.0 if isinstance(timestep, (int, float)) else 1.0
        return hidden_states + self.mlp(hidden_states) * scale * timestep


def test_a_model_that_reads_a_number_timestep_otherwise_than_a_tensor_is_refused():
    module = NumberAware().eval()
    model = tocache_fx.transform(module, NoCache(), compile=False, capture="model")
    x = torch.randn(1, 4, 8)
    torch.testing.assert_close(model(x, torch.tensor(3.0)), module(x, torch.tensor(3.0)))
    with pytest.raises(CacheStateError, match=r"\['timestep'\] given as a tensor than as a "
                                              "Python number"):
        model(x, 3.0)
