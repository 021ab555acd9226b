"""The 2-D toy densities of FFJORD (Grathwohl et al., 2019), generated with an explicit seed.

Definitions and scaling follow FFJORD's ``lib/toy_data.py`` (``inf_train_gen``); ``moons``,
``circles`` and ``swissroll`` re-implement scikit-learn's generators with numpy, so scikit-learn is
not needed at run time. Unlike the original, every name returns exactly ``n`` points, and every
random draw goes through the one generator passed as ``seed`` (the original mixes in numpy's
global state for ``2spirals`` and ``checkerboard``).

>>> from pyode_bridge.data import sample_toy
>>> sample_toy("8gaussians", 5, seed=0).shape
torch.Size([5, 2])
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TOY_DATASETS", "sample_toy", "toy_rng"]


def toy_rng(seed=None) -> np.random.RandomState:
    """A numpy ``RandomState`` from ``seed``.

    ``seed`` may be ``None`` (fresh entropy), an int, a ``np.random.RandomState`` (used as is), a
    ``np.random.Generator`` or a ``torch.Generator`` (one 31-bit integer is drawn from it to seed a
    ``RandomState``, which advances that generator).
    """
    if seed is None:
        return np.random.RandomState()
    if isinstance(seed, np.random.RandomState):
        return seed
    if isinstance(seed, np.random.Generator):
        return np.random.RandomState(int(seed.integers(0, 2**31 - 1)))
    if isinstance(seed, torch.Generator):
        return np.random.RandomState(int(torch.randint(0, 2**31 - 1, (1,), generator=seed)))
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.RandomState(int(seed))
    raise TypeError(f"seed must be None, an int, a numpy RandomState/Generator or a torch.Generator, "
                    f"got {type(seed).__name__}")


def _swissroll(n, rng):
    # sklearn.datasets.make_swiss_roll(n, noise=1.0), columns (x, z), divided by 5.
    t = 1.5 * np.pi * (1 + 2 * rng.rand(n))
    y = 21 * rng.rand(n)
    X = np.stack([t * np.cos(t), y, t * np.sin(t)], 1)
    X += 1.0 * rng.randn(n, 3)
    return X[:, [0, 2]] / 5


def _circles(n, rng):
    # sklearn.datasets.make_circles(n, factor=0.5, noise=0.08), times 3.
    n_out = n // 2
    n_in = n - n_out
    a_out = np.linspace(0, 2 * np.pi, n_out, endpoint=False)
    a_in = np.linspace(0, 2 * np.pi, n_in, endpoint=False)
    X = np.concatenate([np.stack([np.cos(a_out), np.sin(a_out)], 1),
                        0.5 * np.stack([np.cos(a_in), np.sin(a_in)], 1)])
    X = X[rng.permutation(n)]
    X += 0.08 * rng.randn(n, 2)
    return X * 3


def _rings(n, rng):
    # Four concentric circles of radii 1, 0.75, 0.5, 0.25, times 3, noise 0.08.
    sizes = [n // 4, n // 4, n // 4]
    sizes.append(n - sum(sizes))
    parts = []
    for r, m in zip((1.0, 0.75, 0.5, 0.25), sizes):
        a = np.linspace(0, 2 * np.pi, m, endpoint=False)
        parts.append(r * np.stack([np.cos(a), np.sin(a)], 1))
    X = np.concatenate(parts) * 3.0
    X = X[rng.permutation(n)]
    return X + rng.normal(scale=0.08, size=X.shape)


def _moons(n, rng):
    # sklearn.datasets.make_moons(n, noise=0.1), then 2 * x + (-1, -0.2).
    n_out = n // 2
    n_in = n - n_out
    a_out = np.linspace(0, np.pi, n_out)
    a_in = np.linspace(0, np.pi, n_in)
    X = np.concatenate([np.stack([np.cos(a_out), np.sin(a_out)], 1),
                        np.stack([1 - np.cos(a_in), 1 - np.sin(a_in) - 0.5], 1)])
    X = X[rng.permutation(n)]
    X += 0.1 * rng.randn(n, 2)
    return X * 2 + np.array([-1.0, -0.2])


def _eight_gaussians(n, rng):
    # Centres on the circle of radius 4, std 0.5, all divided by 1.414: radius ~2*sqrt(2).
    s = 1.0 / math.sqrt(2)
    centers = 4.0 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    X = rng.randn(n, 2) * 0.5 + centers[rng.randint(8, size=n)]
    return X / 1.414


def _pinwheel(n, rng):
    # Five arms; radial std 0.3, tangential std 0.1, rate 0.25, times 2.
    num_classes, rate = 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    features = rng.randn(n, 2) * np.array([0.3, 0.1])
    features[:, 0] += 1.0
    labels = np.arange(n) % num_classes
    angles = rads[labels] + rate * np.exp(features[:, 0])
    rotations = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)])
    rotations = np.reshape(rotations.T, (-1, 2, 2))
    return 2 * rng.permutation(np.einsum("ti,tij->tj", features, rotations))


def _two_spirals(n, rng):
    # Two interleaved spirals (the second is the first mirrored through the origin), noise 0.1.
    m = n - n // 2
    a = np.sqrt(rng.rand(m, 1)) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(a) * a + rng.rand(m, 1) * 0.5
    d1y = np.sin(a) * a + rng.rand(m, 1) * 0.5
    arm = np.hstack((d1x, d1y))
    X = np.vstack((arm, -arm[:n - m])) / 3
    return X + rng.randn(*X.shape) * 0.1


def _checkerboard(n, rng):
    # x in [-4, 4)^2 with floor(x/2) + floor(y/2) even.
    x1 = rng.rand(n) * 4 - 2
    x2_ = rng.rand(n) - rng.randint(0, 2, n) * 2
    x2 = x2_ + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1) * 2


_GENERATORS = {
    "8gaussians": _eight_gaussians,
    "2spirals": _two_spirals,
    "pinwheel": _pinwheel,
    "moons": _moons,
    "circles": _circles,
    "checkerboard": _checkerboard,
    "swissroll": _swissroll,
    "rings": _rings,
}

#: Names accepted by :func:`sample_toy`.
TOY_DATASETS = tuple(_GENERATORS)


def sample_toy(name: str, n: int, seed=None, dtype: torch.dtype = torch.float32,
               device=None) -> torch.Tensor:
    """Draw ``n`` points from one of FFJORD's 2-D toy densities.

    Args:
        name: one of :data:`TOY_DATASETS`: ``"8gaussians"``, ``"2spirals"``, ``"pinwheel"``,
            ``"moons"``, ``"circles"``, ``"checkerboard"``, ``"swissroll"``, ``"rings"``.
        n: number of points (>= 1).
        seed: ``None``, an int, a ``np.random.RandomState``/``Generator`` or a ``torch.Generator``
            (see :func:`toy_rng`); the same int gives the same points.
        dtype, device: of the returned tensor.

    Returns:
        Tensor of shape ``(n, 2)``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names) or ``n < 1``.
    """
    if name not in _GENERATORS:
        raise ValueError(f"unknown toy dataset {name!r}; valid names: {', '.join(TOY_DATASETS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    X = _GENERATORS[name](int(n), toy_rng(seed))
    return torch.as_tensor(np.ascontiguousarray(X, dtype=np.float64)).to(dtype=dtype, device=device)
