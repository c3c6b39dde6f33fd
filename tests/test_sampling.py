import pytest
import torch
from diffusers import DiTTransformer2DModel

from tocache_fx.harness.sampling import NULL_LABEL, sample_digits


class CallRecorder:
    """Wraps a DiT and records the inputs of every call."""

    def __init__(self, model: DiTTransformer2DModel) -> None:
        self.model = model
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, hidden_states, timestep, class_labels, return_dict=True):
        self.calls.append({"x": hidden_states, "t": timestep, "y": class_labels})
        return self.model(hidden_states, timestep=timestep, class_labels=class_labels, return_dict=return_dict)


@pytest.fixture(scope="module")
def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=10,
    ).eval()


def test_shape_and_range(tiny_dit: DiTTransformer2DModel):
    images = sample_digits(tiny_dit, torch.tensor([0, 5, 9]), num_steps=4, sample_size=8)
    assert images.shape == (3, 1, 8, 8)
    assert images.dtype == torch.float32
    assert images.abs().max() <= 1.0


def test_deterministic_for_a_seed(tiny_dit: DiTTransformer2DModel):
    labels = torch.arange(4)
    run = lambda seed: sample_digits(tiny_dit, labels, num_steps=3, seed=seed, sample_size=8)  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(run(1), sample_digits(tiny_dit, labels, num_steps=3, generator=gen, sample_size=8))


def test_one_call_per_step_on_uncond_cond_batch(tiny_dit: DiTTransformer2DModel):
    labels = torch.tensor([1, 2, 3])
    recorder = CallRecorder(tiny_dit)
    sample_digits(recorder, labels, num_steps=5, sample_size=8)
    assert len(recorder.calls) == 5
    timesteps = []
    for call in recorder.calls:
        assert call["x"].shape == (6, 1, 8, 8)
        assert torch.equal(call["x"][:3], call["x"][3:])
        assert call["t"].shape == (6,)
        assert (call["t"] == call["t"][0]).all()
        assert torch.equal(call["y"], torch.tensor([NULL_LABEL] * 3 + [1, 2, 3]))
        timesteps.append(int(call["t"][0]))
    assert timesteps == sorted(timesteps, reverse=True)


def test_guidance_scale_changes_the_samples(tiny_dit: DiTTransformer2DModel):
    labels = torch.tensor([4, 7])
    unguided = sample_digits(tiny_dit, labels, num_steps=3, guidance_scale=1.0, sample_size=8)
    guided = sample_digits(tiny_dit, labels, num_steps=3, guidance_scale=3.0, sample_size=8)
    assert not torch.allclose(unguided, guided)
