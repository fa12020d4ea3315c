"""A digits classifier for judging generated samples (tests/test_digits_quality.py and
benchmarks/report_digits.py).

An RBF support-vector machine (scikit-learn ``SVC``) on the same 16x16 [-1, 1] images the
diffusion model is trained on (``fastdiff.data.load_digits``), with each training image also
shifted by one pixel in the four directions so that slightly off-centre samples are still read
correctly. Deterministic (no randomness in the fit) and fast (about a second on one core).

    >>> clf = fit()                                  # doctest: +SKIP
    >>> predict(clf, samples)                        # [N] int64 digits  # doctest: +SKIP
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fastdiff.data import load_digits, split


def _shifts(x: torch.Tensor) -> torch.Tensor:
    """``x`` plus its one-pixel shifts (background -1 fills the vacated row/column)."""
    out = [x]
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        s = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        if dy == 1:
            s[..., 0, :] = -1.0
        elif dy == -1:
            s[..., -1, :] = -1.0
        if dx == 1:
            s[..., :, 0] = -1.0
        elif dx == -1:
            s[..., :, -1] = -1.0
        out.append(s)
    return torch.cat(out)


def _features(x: torch.Tensor) -> np.ndarray:
    """[N x 1 x 16 x 16] in [-1, 1] -> [N x 256] float64."""
    if x.ndim != 4 or x.shape[1:] != (1, 16, 16):
        raise ValueError(f"expected [N x 1 x 16 x 16] images, got {tuple(x.shape)}")
    return x.detach().float().cpu().clamp(-1, 1).reshape(x.shape[0], -1).double().numpy()


def _fit(x: torch.Tensor, y: torch.Tensor):
    from sklearn.svm import SVC

    xa = _shifts(x)
    ya = y.repeat(5)
    return SVC(C=10.0, gamma="scale").fit(_features(xa), ya.numpy())


@functools.lru_cache(maxsize=2)
def fit(held_out: bool = False):
    """The classifier, fitted on all digits (``held_out=False``) or on a 75% split."""
    x, y = load_digits()
    if held_out:
        x, y, _, _ = split(x, y)
    return _fit(x, y)


def predict(clf, images: torch.Tensor) -> torch.Tensor:
    """Predicted digit for each ``[N x 1 x 16 x 16]`` image in [-1, 1]."""
    return torch.as_tensor(clf.predict(_features(images)), dtype=torch.int64)


def held_out_accuracy() -> float:
    """Accuracy of the classifier fitted on 75% of the digits, on the other 25%."""
    x, y = load_digits()
    _, _, xt, yt = split(x, y)
    return float((predict(fit(held_out=True), xt) == yt).double().mean())
