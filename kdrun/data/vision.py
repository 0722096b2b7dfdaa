"""Image datasets read with torchvision's own dataset classes.

Each source returns :class:`~kdrun.data.Splits`. ``train_eval`` is a shallow
copy of ``train`` with the eval transform swapped in: it shares the loaded
arrays and file lists, so it holds the same samples in the same order at no
extra memory or load time.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms as T
from torchvision.datasets.vision import StandardTransform

from kdrun.data import Splits
from kdrun.data.augment import Augmentation
from kdrun.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_HOW_TO_GET = (
    "Run once with dataset.download=true where a network is available, "
    "or copy the files there and set dataset.root=..."
)


def download_urls(dataset_class: type) -> str:
    """Where torchvision would download ``dataset_class`` from (its class attributes say)."""
    if getattr(dataset_class, "url", None):
        return dataset_class.url
    if getattr(dataset_class, "mirrors", None):
        files = ", ".join(name for name, _ in dataset_class.resources)
        return f"{dataset_class.mirrors[0]} ({files})"
    if getattr(dataset_class, "split_list", None):
        return ", ".join(entry[0] for split, entry in dataset_class.split_list.items() if split != "extra")
    return "its project page"


def how_to_get(source: _Source, root: str) -> str:
    return (f"Get it from {download_urls(source.dataset_class)}, put the files under {root} (expected {source.expected}), "
            "or run once with dataset.download=true where a network is available; dataset.root=... points elsewhere")


@dataclass(frozen=True)
class _Source:
    dataset_class: type
    expected: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    size: int
    crop_padding: int
    flip: bool = False
    # SVHN selects its split with ``split=``, the others with ``train=``.
    split_kwargs: tuple[dict, dict] = ({"train": True}, {"train": False})


_SOURCES = {
    "cifar10": _Source(
        datasets.CIFAR10, "cifar-10-batches-py/",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, 32, 4, flip=True,
    ),
    "cifar100": _Source(
        datasets.CIFAR100, "cifar-100-python/",
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100, 32, 4, flip=True,
    ),
    "mnist": _Source(datasets.MNIST, "MNIST/raw/*-ubyte", (0.1307,), (0.3081,), 10, 28, 2),
    "fashion_mnist": _Source(
        datasets.FashionMNIST, "FashionMNIST/raw/*-ubyte", (0.2860,), (0.3530,), 10, 28, 2
    ),
    # No flip for SVHN: a mirrored digit is a different (or no) digit.
    "svhn": _Source(
        datasets.SVHN, "train_32x32.mat and test_32x32.mat",
        (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 10, 32, 4,
        split_kwargs=({"split": "train"}, {"split": "test"}),
    ),
}


def _load(name: str, path: str, expected: str, make: Callable[[], Dataset], download: bool = False,
          how_to_get: str = _HOW_TO_GET) -> Dataset:
    """Builds a dataset and turns torchvision's errors into one line that says where to put the files.

    torchvision reports missing or corrupt files as ``RuntimeError`` (``OSError``
    for ImageFolder) and a failed download as whatever urllib raised, with a
    multi-line text that tells Python users to pass ``download=True``; kdrun
    users set a config field instead.
    """
    try:
        return make()
    except Exception as err:
        if download:
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            raise DataError(
                f"{name}: download into {path} failed ({reason}). "
                f"Copy the files there (expected {expected}) and set dataset.root=..."
            ) from err
        if isinstance(err, (RuntimeError, OSError)):
            raise DataError(f"{name} not found (or corrupt) in {path}. {how_to_get}") from err
        raise


def _with_transform(dataset: Dataset, transform: Callable) -> Dataset:
    view = copy.copy(dataset)
    view.transform = transform
    view.transforms = StandardTransform(transform, dataset.target_transform)
    return view


def _standard(name: str, root: str, download: bool, augment: bool) -> Splits:
    source = _SOURCES[name]
    root = os.path.abspath(os.path.expanduser(root))
    to_tensor = [T.ToTensor(), T.Normalize(source.mean, source.std)]
    eval_tf = T.Compose(to_tensor)
    augmentation = [T.RandomCrop(source.size, padding=source.crop_padding)]
    augmentation += [T.RandomHorizontalFlip()] if source.flip else []
    train_tf = T.Compose(augmentation + to_tensor) if augment else eval_tf

    def load(split: dict) -> Dataset:
        make = partial(source.dataset_class, root, transform=eval_tf, download=download, **split)
        return _load(name, root, source.expected, make, download, how_to_get(source, root))

    train_eval, test = (load(split) for split in source.split_kwargs)
    shape = (len(source.mean), source.size, source.size)
    # The crop pads with black pixels before normalisation: -mean/std after it.
    fill = tuple(-m / s for m, s in zip(source.mean, source.std))
    declared = Augmentation(crop_padding=source.crop_padding, flip=source.flip, fill=fill) if augment else None
    return Splits(_with_transform(train_eval, train_tf), train_eval, test, source.num_classes, shape,
                  augmentation=declared, in_memory=True)


def cifar10(root: str, download: bool = False, augment: bool = True) -> Splits:
    """CIFAR-10; ``root`` holds ``cifar-10-batches-py/`` (the extracted python archive)."""
    return _standard("cifar10", root, download, augment)


def cifar100(root: str, download: bool = False, augment: bool = True) -> Splits:
    """CIFAR-100 with its 100 fine labels; ``root`` holds ``cifar-100-python/``."""
    return _standard("cifar100", root, download, augment)


def mnist(root: str, download: bool = False, augment: bool = False) -> Splits:
    """MNIST; off by default, augmentation is a 2-pixel shift (digits must not be flipped)."""
    return _standard("mnist", root, download, augment)


def fashion_mnist(root: str, download: bool = False, augment: bool = False) -> Splits:
    """Fashion-MNIST, a drop-in for MNIST that small models do not solve as easily."""
    return _standard("fashion_mnist", root, download, augment)


def svhn(root: str, download: bool = False, augment: bool = False) -> Splits:
    """SVHN ``train`` and ``test`` (not ``extra``); torchvision maps label 10 to digit 0."""
    return _standard("svhn", root, download, augment)


def imagefolder(root: str, image_size: int = 224, augment: bool = True, train_dir: str = "train",
                test_dir: str = "val") -> Splits:
    """Any ``root/<split>/<class>/<image>`` tree, with the usual ImageNet recipe.

    Eval resizes to 256/224 of the crop size before the center crop, as the
    ImageNet reference scripts do, so accuracies compare with published ones.
    """
    root = os.path.abspath(os.path.expanduser(root))
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    eval_tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), *normalize])
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *normalize])
    if not augment:
        train_tf = eval_tf

    def load(split_dir: str) -> Dataset:
        path = os.path.join(root, split_dir)
        make = partial(datasets.ImageFolder, path, transform=eval_tf)
        return _load("imagefolder", path, "one folder of images per class", make,
                     how_to_get=f"Put one folder of images per class under {path}, or set dataset.root=...")

    train_eval, test = load(train_dir), load(test_dir)
    if test.classes != train_eval.classes:
        missing = sorted(set(train_eval.classes) - set(test.classes))
        extra = sorted(set(test.classes) - set(train_eval.classes))
        raise DataError(
            f"imagefolder: class folders in {os.path.join(root, test_dir)} differ from those in "
            f"{os.path.join(root, train_dir)} (missing {missing}, extra {extra}); both splits need the same classes"
        )
    shape = (3, image_size, image_size)
    declared = Augmentation(flip=True, on_device=False) if augment else None
    return Splits(_with_transform(train_eval, train_tf), train_eval, test, len(train_eval.classes), shape,
                  augmentation=declared)


def fake(num_train: int = 256, num_test: int = 128, image_size: int = 32, channels: int = 3,
         num_classes: int = 10, seed: int = 0) -> Splits:
    """Random images from torchvision's FakeData, for smoke tests and benchmarks without files.

    Each sample is generated from ``index + random_offset``, so the test offset
    starts where the training indices end and the two splits share no image.
    """
    shape = (channels, image_size, image_size)

    def make(size: int, offset: int) -> Dataset:
        return datasets.FakeData(size, shape, num_classes, transform=T.ToTensor(), random_offset=offset)

    train = make(num_train, seed)
    return Splits(train, train, make(num_test, seed + num_train), num_classes, shape, in_memory=True)


def _images(transform: Callable) -> Callable:
    """Apply a per-image eval ``transform`` to raw images: one PIL image, a list of them, or a uint8
    array of one image (``HxW``, ``HxWx3``) or a batch (``NxHxW``, ``NxHxWxC``). Returns a batch tensor."""
    from PIL import Image

    def preprocess(images) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        elif not isinstance(images, (list, tuple)):
            array = np.asarray(images)
            single = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
            images = [array] if single else list(array)
        return torch.stack([transform(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
                            for image in images])

    return preprocess


def preprocess(name: str) -> Callable:
    """A torchvision dataset's eval transform for raw images: what its trained models expect."""
    source = _SOURCES[name]
    return _images(T.Compose([T.ToTensor(), T.Normalize(source.mean, source.std)]))


def imagefolder_preprocess(image_size: int = 224) -> Callable:
    """The ImageNet-style eval transform of :func:`imagefolder` for raw images."""
    return _images(T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(),
                              T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))


def tensor_preprocess() -> Callable:
    """Raw images as tensors in [0, 1] (``fake``'s transform)."""
    return _images(T.ToTensor())
