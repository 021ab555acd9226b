"""Data for the examples and tests, with no download and no torchvision.

* :func:`sample_toy`: FFJORD's 2-D toy densities (``8gaussians``, ``2spirals``, ``pinwheel``,
  ``moons``, ``circles``, ``checkerboard``, ``swissroll``, ``rings``), seeded.
* :class:`CIFAR`: CIFAR-10/100 from a local python-pickle folder, with torch augmentation;
  :func:`write_fake_cifar` writes a tiny folder in the same format.
* :class:`Digits` / :func:`load_digits`: scikit-learn's 8x8 digits (needs scikit-learn).
"""
from .cifar import (
    CIFAR,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFARNotFoundError,
    augment_batch,
    cifar_files,
    random_crop,
    random_hflip,
    read_cifar_pickle,
    write_fake_cifar,
)
from .digits import Digits, load_digits
from .toy import TOY_DATASETS, sample_toy, toy_rng

__all__ = [
    "sample_toy", "TOY_DATASETS", "toy_rng",
    "CIFAR", "CIFARNotFoundError", "write_fake_cifar", "read_cifar_pickle", "cifar_files", "augment_batch",
    "random_crop", "random_hflip", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "Digits", "load_digits",
]
