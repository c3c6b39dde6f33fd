"""Image-quality metrics that need no download: PSNR, SSIM and a digits judge.

``psnr`` and ``ssim`` compare a cached run against the uncached reference, sample
by sample. ``DigitsJudge`` scores generated digits on their own: class accuracy
and a Fréchet distance (the FID formula) in the feature space of a small MLP
trained at construction on ``sklearn.datasets.load_digits``. Example::

    >>> import torch
    >>> from tocache_fx.harness.metrics import DigitsJudge, psnr, ssim
    >>> a = torch.rand(4, 1, 32, 32) * 2 - 1
    >>> psnr(a, a)
    tensor([100., 100., 100., 100.])
    >>> judge = DigitsJudge()
    >>> judge.accuracy(judge.real_images, judge.real_labels) > 0.9
    True
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

PSNR_CAP_DB = 100.0
"""PSNR reported for identical images (zero error); every PSNR is clamped to at most this."""


def _as_numpy(images: torch.Tensor) -> np.ndarray:
    return images.detach().to("cpu", torch.float64).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample peak signal-to-noise ratio in dB, capped at ``PSNR_CAP_DB``.

    ``data_range`` is max - min of the pixel range: 2.0 for images in [-1, 1].

    >>> a = torch.zeros(2, 1, 4, 4)
    >>> psnr(a, a + 0.02).round()
    tensor([40., 40.])
    """
    diff = a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64)
    mse = diff.flatten(1).pow(2).mean(dim=1)
    value = 10.0 * torch.log10(data_range**2 / mse)  # +inf where mse == 0
    return value.clamp(max=PSNR_CAP_DB).float()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample structural similarity of ``[B, C, H, W]`` images (skimage, 7x7 window).

    >>> a = torch.rand(3, 1, 32, 32) * 2 - 1
    >>> ssim(a, a)
    tensor([1., 1., 1.])
    """
    xa, xb = _as_numpy(a), _as_numpy(b)
    values = [
        structural_similarity(ia, ib, data_range=data_range, channel_axis=0)
        for ia, ib in zip(xa, xb)
    ]
    return torch.tensor(values, dtype=torch.float32)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between two Gaussians (the FID formula).

    ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, with the trace of the matrix
    square root computed from the eigenvalues of the symmetric PSD matrix
    ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), so no complex parts arise;
    tiny negative eigenvalues from round-off are clipped to zero, and so is the result.

    >>> eye = np.eye(3)
    >>> round(frechet_distance(np.zeros(3), eye, np.ones(3), eye), 6)
    3.0
    """
    w1, v1 = np.linalg.eigh(sigma1)
    sqrt1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
    inner = np.linalg.eigvalsh(sqrt1 @ sigma2 @ sqrt1)
    tr_covmean = np.sqrt(np.clip(inner, 0.0, None)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean))


def load_real_digits(sample_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The sklearn digits as the DiT was trained on them: ``[N, 1, S, S]`` in [-1, 1], labels.

    >>> images, labels = load_real_digits()
    >>> images.shape, labels.shape
    (torch.Size([1797, 1, 32, 32]), torch.Size([1797]))
    """
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(sample_size, sample_size), mode="bilinear", align_corners=False)
    return x * 2.0 - 1.0, torch.from_numpy(digits.target).long()


class DigitsJudge:
    """A small MLP trained on the real digits that scores generated ``[B, 1, 32, 32]`` images.

    Images are average-pooled back to 8x8 and mapped from [-1, 1] to [0, 1] (sklearn's
    0..16 divided by 16). The MLP (one ReLU hidden layer, fixed ``seed``) trains in a
    second or two on a stratified ``1 - test_size`` split of the real digits; the
    held-out split gives ``real_accuracy``, the reference for ``accuracy`` on
    generated samples. ``frechet_distance`` compares hidden-layer features against all
    1,797 real digits; ``real_frechet_distance`` is the FD of one random half of the
    real digits against the other, the floor to compare generated samples with (FD
    grows as the sample shrinks, so compare at similar sample sizes).

    >>> judge = DigitsJudge()
    >>> judge.features(judge.real_images[:5]).shape
    (5, 64)
    >>> judge.frechet_distance(judge.real_images) < 1e-6
    True
    >>> judge.real_accuracy > 0.9
    True
    """

    def __init__(self, hidden_size: int = 64, test_size: float = 0.2, seed: int = 0) -> None:
        self.real_images, self.real_labels = load_real_digits()
        x = self._inputs(self.real_images)
        y = self.real_labels.numpy()
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=test_size, random_state=seed, stratify=y
        )
        self.classifier = MLPClassifier(
            hidden_layer_sizes=(hidden_size,), alpha=1e-3, max_iter=500, random_state=seed
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.classifier.fit(x_train, y_train)
        self.real_accuracy = float(self.classifier.score(x_test, y_test))

        feats = self._hidden(x)
        self.real_mu, self.real_sigma = feats.mean(axis=0), np.cov(feats, rowvar=False)
        half = np.random.default_rng(seed).permutation(len(feats))
        a, b = feats[half[: len(feats) // 2]], feats[half[len(feats) // 2 :]]
        self.real_frechet_distance = frechet_distance(
            a.mean(axis=0), np.cov(a, rowvar=False), b.mean(axis=0), np.cov(b, rowvar=False)
        )

    @staticmethod
    def _inputs(images: torch.Tensor) -> np.ndarray:
        small = F.adaptive_avg_pool2d(images.detach().to("cpu", torch.float32), 8)
        return ((small.flatten(1) + 1.0) / 2.0).numpy().astype(np.float64)

    def _hidden(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.classifier.coefs_[0] + self.classifier.intercepts_[0], 0.0)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Predicted class of each image, ``[B]``."""
        return self.classifier.predict(self._inputs(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images the judge classifies as their requested label."""
        return float((self.predict(images) == labels.cpu().numpy()).mean())

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Hidden-layer (ReLU) activations, ``[B, hidden_size]``."""
        return self._hidden(self._inputs(images))

    def frechet_distance(self, images: torch.Tensor) -> float:
        """Fréchet distance of the images' features to those of all real digits (needs B >= 2)."""
        feats = self.features(images)
        return frechet_distance(
            feats.mean(axis=0), np.cov(feats, rowvar=False), self.real_mu, self.real_sigma
        )
