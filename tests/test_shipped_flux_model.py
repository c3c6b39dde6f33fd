import json

import pytest
import torch

from tocache_fx.harness.sampling import (
    FLUX_MODEL_DIR,
    FLUX_PROMPTS_FILE,
    flux_prompts,
    load_flux_digits,
    pack_latents,
    sample_flux_digits,
    unpack_latents,
)

WEIGHTS = FLUX_MODEL_DIR / "diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.skipif(
    not WEIGHTS.exists(),
    reason=f"shipped flux model not trained yet: {WEIGHTS} missing (run examples/train_flux_digits.py)",
)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_flux_digits()


def test_weights_are_small_safetensors():
    assert WEIGHTS.stat().st_size <= 25 * 1024 * 1024
    assert (FLUX_MODEL_DIR / FLUX_PROMPTS_FILE).stat().st_size <= 1024 * 1024


def test_loads_in_eval_mode_with_expected_config(model):
    assert not model.training
    expected = dict(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
    )
    assert {k: model.config[k] for k in expected} == expected
    assert list(model.config.axes_dims_rope) == [8, 12, 12]
    assert len(model.transformer_blocks) == 2 and len(model.single_transformer_blocks) == 4


def test_prompts_shape_and_null_class():
    ehs, pooled = flux_prompts(torch.arange(11))
    assert ehs.shape == (11, 8, 64) and pooled.shape == (11, 64)
    assert ehs.dtype == pooled.dtype == torch.float32
    # fixed, distinct per class (the null class 10 included)
    assert torch.equal(flux_prompts(torch.tensor([4]))[0][0], ehs[4])
    assert not torch.allclose(ehs[10], ehs[0])


def test_pack_unpack_roundtrip():
    x = torch.randn(3, 1, 32, 32)
    tokens = pack_latents(x)
    assert tokens.shape == (3, 256, 4)
    assert torch.equal(unpack_latents(tokens), x)


def test_sample_two_steps(model):
    labels = torch.tensor([0, 7, 3])
    images = sample_flux_digits(model, labels, num_steps=2, seed=0)
    assert images.shape == (3, 1, 32, 32)
    assert torch.isfinite(images).all()
    assert images.abs().max() <= 1.0
    assert torch.equal(images, sample_flux_digits(model, labels, num_steps=2, seed=0))


def test_sampler_calls_transformer_once_per_step_on_doubled_batch(model):
    calls = []

    def spy(**kw):
        calls.append(kw)
        return model(**kw)

    sample_flux_digits(spy, torch.tensor([1, 2]), num_steps=3, seed=0)
    assert len(calls) == 3
    for kw in calls:
        assert kw["hidden_states"].shape == (4, 256, 4)
        assert kw["timestep"].shape == (4,)
        assert kw["img_ids"].shape == (256, 3) and kw["txt_ids"].shape == (8, 3)
    assert calls[0]["timestep"][0] == 1.0


def test_training_record():
    record = json.loads((FLUX_MODEL_DIR / "training.json").read_text())
    assert record["steps_done"] > 0
    assert record["weights"] == "EMA"
    assert {"seed", "final_loss", "wall_time_s", "command", "model_config",
            "torch_version", "diffusers_version"} <= set(record)
    assert record["model_config"]["num_single_layers"] == 4
