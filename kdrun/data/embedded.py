"""Datasets that ship inside packages: no download, no files to fetch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kdrun.data import Splits
from kdrun.data.augment import Augmentation

log = logging.getLogger(__name__)


class SignalAugment:
    """Random circular shift by up to ``max_shift`` positions plus Gaussian noise.

    MNIST-1D digits are already translated and noisy by construction, so small
    extra shifts and noise make new, plausible signals each epoch.
    """

    def __init__(self, max_shift: int = 3, noise: float = 0.05):
        self.max_shift, self.noise = max_shift, noise

    def __call__(self, signal: torch.Tensor) -> torch.Tensor:
        shift = int(torch.randint(-self.max_shift, self.max_shift + 1, ()))
        signal = torch.roll(signal, shift, dims=-1)
        return signal + self.noise * torch.randn_like(signal) if self.noise else signal


class AugmentedTensors(TensorDataset):
    """A TensorDataset whose inputs pass through ``transform`` when read."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, transform):
        super().__init__(inputs, labels)
        self.transform = transform

    def __getitem__(self, index):
        inputs, labels = super().__getitem__(index)
        return self.transform(inputs), labels


def _tensor_splits(x_train, y_train, x_test, y_test, num_classes: int, augment=None) -> Splits:
    inputs, labels = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train, dtype=torch.long)
    train_eval = TensorDataset(inputs, labels)
    train = AugmentedTensors(inputs, labels, augment) if augment else train_eval
    test = TensorDataset(torch.as_tensor(x_test, dtype=torch.float32), torch.as_tensor(y_test, dtype=torch.long))
    declared = Augmentation(max_shift=augment.max_shift, noise=augment.noise) if augment else None
    return Splits(train, train_eval, test, num_classes, tuple(inputs.shape[1:]), embedded=True, augmentation=declared,
                  in_memory=True)


def mnist1d(
    cache_dir: str, num_samples: int = 5000, train_split: float = 0.8, seed: int = 42,
    max_shift: int = 0, noise: float = 0.0,
) -> Splits:
    """MNIST-1D (Greydanus 2020), generated procedurally by the ``mnist1d`` package.

    The defaults give the paper's 4,000 train / 1,000 test signals of length 40.
    Generation takes a few seconds, so the arrays are cached as ``.npz``.
    ``max_shift``/``noise`` > 0 augment the training signals (see :class:`SignalAugment`).
    """
    path = Path(os.path.expanduser(cache_dir)) / f"mnist1d_n{num_samples}_split{train_split}_seed{seed}.npz"
    arrays = _read_cached(path)
    if arrays is None:
        arrays = _generate(path, num_samples, train_split, seed)
    # (N, 40) signals become (N, 1, 40): one channel, so 1-D convolutions apply directly.
    augment = SignalAugment(max_shift, noise) if max_shift or noise else None
    return _tensor_splits(arrays["x"][:, None, :], arrays["y"], arrays["x_test"][:, None, :], arrays["y_test"], 10, augment)


MNIST1D_ARRAYS = ("x", "y", "x_test", "y_test")


def _read_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays; None when there are none, or when the file cannot be read (a cut-short
    write, a stray file): it is then moved aside and the data generated again."""
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            return {name: data[name] for name in MNIST1D_ARRAYS}
    except Exception as err:  # noqa: BLE001 - np.load raises many kinds on a damaged file; all mean "regenerate"
        aside = path.with_name(path.name + ".unreadable")
        path.replace(aside)
        log.warning("Cached MNIST-1D file %s could not be read (%s: %s); moved it to %s and generating the data again",
                    path, type(err).__name__, err, aside)
        return None


def _generate(path: Path, num_samples: int, train_split: float, seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    log.info("Generating MNIST-1D (%d samples) into %s", num_samples, path)
    data = make_dataset(args)
    arrays = {name: data[name] for name in MNIST1D_ARRAYS}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("Could not cache MNIST-1D in %s (%s); it will be generated again next time. "
                    "Set paths.cache to a writable directory to keep it", path.parent, err.strerror or err)
    return arrays


def digits(test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return _tensor_splits(
        images[train_idx, None], bunch.target[train_idx], images[test_idx, None], bunch.target[test_idx], 10
    )


def signal_preprocess() -> Callable[[Any], torch.Tensor]:
    """Raw MNIST-1D signals, ``(N, L)`` or ``(L,)`` numbers, as the models take them: ``(N, 1, L)`` float32."""

    def preprocess(signals) -> torch.Tensor:
        tensor = torch.as_tensor(np.asarray(signals), dtype=torch.float32)
        return tensor.reshape(-1, 1, tensor.shape[-1])

    return preprocess


def digits_preprocess(test_fraction: float = 0.2, seed: int = 0) -> Callable[[Any], torch.Tensor]:
    """Raw 8x8 digit images (pixel values 0..16, as scikit-learn gives them) scaled and
    standardised as :func:`digits` does for training: ``(N, 1, 8, 8)`` float32."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    train = images[order[int(round(len(images) * test_fraction)):]]
    mean, std = float(train.mean()), float(train.std())

    def preprocess(raw) -> torch.Tensor:
        tensor = torch.as_tensor(np.asarray(raw, dtype=np.float32) / 16.0)
        return ((tensor - mean) / std).reshape(-1, 1, 8, 8)

    return preprocess
