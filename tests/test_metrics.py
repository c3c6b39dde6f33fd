import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tocache_fx.harness.metrics import PSNR_CAP_DB, DigitsJudge, frechet_distance, psnr, ssim


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    return DigitsJudge()


def _noisy(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def test_identical_images_give_capped_psnr_and_unit_ssim():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(psnr(x, x), torch.full((4,), PSNR_CAP_DB))
    assert torch.allclose(ssim(x, x), torch.ones(4))


def test_psnr_matches_formula_and_is_per_sample():
    a = torch.zeros(2, 1, 8, 8)
    b = a.clone()
    b[1] += 0.2  # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    assert torch.allclose(psnr(a, b), torch.tensor([PSNR_CAP_DB, 20.0]))


def test_noisier_images_score_lower(judge: DigitsJudge):
    x = judge.real_images[:64]
    mild, strong = _noisy(x, 0.05), _noisy(x, 0.3)
    assert (psnr(x, strong) < psnr(x, mild)).all()
    assert (ssim(x, strong) < ssim(x, mild)).all()


def test_frechet_distance_formula():
    eye = np.eye(3)
    assert frechet_distance(np.zeros(3), eye, np.zeros(3), eye) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(np.zeros(3), eye, np.ones(3), eye) == pytest.approx(3.0)
    # 1-D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2
    assert frechet_distance(np.zeros(1), 4 * np.eye(1), np.zeros(1), np.eye(1)) == pytest.approx(1.0)


def test_judge_is_accurate_on_real_digits(judge: DigitsJudge):
    assert judge.real_accuracy > 0.9  # held-out split
    assert judge.accuracy(judge.real_images, judge.real_labels) > 0.9


def test_judge_is_deterministic(judge: DigitsJudge):
    again = DigitsJudge()
    x = judge.real_images[:100]
    np.testing.assert_array_equal(judge.features(x), again.features(x))
    assert judge.real_frechet_distance == again.real_frechet_distance


def test_frechet_distance_grows_with_distortion(judge: DigitsJudge):
    x = judge.real_images
    assert judge.frechet_distance(x) == pytest.approx(0.0, abs=1e-6)
    assert judge.real_frechet_distance > 0
    noised = judge.frechet_distance(_noisy(x, 0.5))
    shifted = judge.frechet_distance(torch.roll(x, shifts=4, dims=-1))
    blurred = judge.frechet_distance(F.avg_pool2d(x, 9, stride=1, padding=4, count_include_pad=False))
    for fd in (noised, shifted, blurred):
        assert fd > 5 * judge.real_frechet_distance
    assert judge.frechet_distance(_noisy(x, 0.6)) > judge.frechet_distance(_noisy(x, 0.2))


def test_features_shape(judge: DigitsJudge):
    assert judge.features(judge.real_images[:7]).shape == (7, 64)
