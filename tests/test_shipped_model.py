import json

import pytest

from tocache_fx.harness.sampling import MODEL_DIR, load_dit_digits

WEIGHTS = MODEL_DIR / "diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.skipif(
    not WEIGHTS.exists(),
    reason=f"shipped model not trained yet: {WEIGHTS} missing (run examples/train_dit_digits.py)",
)


def test_weights_are_small_safetensors():
    assert WEIGHTS.stat().st_size <= 25 * 1024 * 1024


def test_loads_with_expected_config():
    model = load_dit_digits()
    assert not model.training
    cfg = model.config
    expected = dict(
        sample_size=32,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=6,
        num_attention_heads=4,
        attention_head_dim=32,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )
    assert {k: cfg[k] for k in expected} == expected
    # null class for classifier-free guidance at index 10
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11


def test_training_record():
    record = json.loads((MODEL_DIR / "training.json").read_text())
    assert record["steps_done"] > 0
    assert record["weights"] == "EMA"
    assert {"seed", "final_loss", "wall_time_s", "torch_version", "diffusers_version"} <= set(record)
