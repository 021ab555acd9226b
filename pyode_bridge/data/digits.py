"""scikit-learn's bundled 8x8 handwritten digits (1797 images, no download) as tensors / a Dataset.

scikit-learn is imported lazily, inside :func:`load_digits`: it is a test and example dependency
only, not a run-time requirement of pyode-bridge.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["load_digits", "Digits"]


def load_digits(flatten: bool = False, dtype: torch.dtype = torch.float32):
    """All 1797 digits as ``(images, labels)``.

    Args:
        flatten: return images as ``(N, 64)`` instead of ``(N, 1, 8, 8)``.
        dtype: of the images, scaled from scikit-learn's ``0..16`` to ``[0, 1]``.

    Returns:
        ``images`` ``(1797, 1, 8, 8)`` (or ``(1797, 64)``), ``labels`` int64 ``(1797,)`` in ``0..9``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set ships with scikit-learn; install it with "
                          "`pip install scikit-learn`") from exc
    d = _sk_load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float64) / 16.0
    x = x.to(dtype)
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    return x, torch.as_tensor(d.target, dtype=torch.int64)


class Digits(Dataset):
    """A seeded train/test split of the 8x8 digits as a map-style dataset of ``(image, label)``.

    Args:
        train: the training part (else the held-out part).
        test_fraction: share of the 1797 images held out (the split is a seeded permutation).
        seed: seed of the split (the same seed gives the same split for both parts).
        flatten: images ``(64,)`` instead of ``(1, 8, 8)``.
        normalize: standardise with the training part's pixel mean and std (one scalar each).
        dtype: of the images.

    Attributes:
        data: ``(n, 1, 8, 8)`` or ``(n, 64)`` tensor (after normalisation); targets: ``(n,)`` int64.
    """

    def __init__(self, train: bool = True, test_fraction: float = 0.2, seed: int = 0,
                 flatten: bool = False, normalize: bool = False, dtype: torch.dtype = torch.float32):
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        x, y = load_digits(flatten=flatten, dtype=dtype)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_test = int(round(test_fraction * len(y)))
        idx_train, idx_test = perm[n_test:], perm[:n_test]
        if normalize:
            mean, std = x[idx_train].mean(), x[idx_train].std()
            x = (x - mean) / std
        idx = idx_train if train else idx_test
        self.data, self.targets = x[idx].contiguous(), y[idx].contiguous()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        return self.data[index], int(self.targets[index])
