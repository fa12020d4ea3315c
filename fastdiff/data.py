"""The handwritten-digits dataset used to train the embedded model.

scikit-learn's ``load_digits`` (1,797 grey 8x8 images of the digits 0-9, pixel values 0..16) is
upsampled bilinearly to 16x16 and scaled to [-1, 1] as in DDPM (Ho et al., 2020, section 3.3).

    >>> from fastdiff.data import load_digits
    >>> x, y = load_digits()          # doctest: +SKIP
    >>> x.shape, y.shape              # doctest: +SKIP
    (torch.Size([1797, 1, 16, 16]), torch.Size([1797]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn "
            "(or pip install 'fastdiff[test]')"
        ) from exc
    return sk_load_digits()


def load_digits(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``([N x 1 x size x size] float32 in [-1, 1], [N] int64 labels)``.

    8x8 images with values 0..16 are scaled to [0, 1], upsampled bilinearly to ``size`` and mapped
    to [-1, 1]. Deterministic: the same tensors on every call.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size: expected an int >= 8, got {size!r}")
    d = _sklearn_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N x 1 x 8 x 8]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    y = torch.as_tensor(d.target, dtype=torch.int64)
    return x, y


def split(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed random train/test split: ``(x_train, y_train, x_test, y_test)``, with
    ``round(N * test_fraction)`` test samples (``test_fraction`` in [0, 1])."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} labels (one per image), got {y.shape[0]}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction: expected a fraction in [0, 1], got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = int(round(x.shape[0] * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]
