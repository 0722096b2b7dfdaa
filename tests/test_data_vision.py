"""Vision sources read tiny files written in each dataset's real on-disk format.

torchvision checks the md5 of CIFAR and SVHN files against the published
archives; the tests point its checksum tables at the files they wrote (via
``monkeypatch``, undone after each test) so the real loading code runs.
"""

from __future__ import annotations

import hashlib
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from kdrun.data import vision
from kdrun.errors import DataError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images[0] = 255  # a known pixel value to check normalisation against
    return images


def _write_cifar(monkeypatch, root: Path, cls: type, label_key: str, names_key: str,
                 num_classes: int, per_file: int = 4) -> list[int]:
    """Writes every file ``cls`` lists, as Python pickles with str keys like the originals; returns train labels."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_labels = []

    def write(entries: list, is_train: bool) -> list:
        pinned = []
        for name, _ in entries:
            labels = rng.integers(0, num_classes, per_file).tolist()
            train_labels.extend(labels if is_train else [])
            data = _images(rng, per_file, (3072,))
            (folder / name).write_bytes(pickle.dumps({"data": data, label_key: labels}, protocol=2))
            pinned.append([name, _md5(folder / name)])
        return pinned

    monkeypatch.setattr(cls, "train_list", write(cls.train_list, True))
    monkeypatch.setattr(cls, "test_list", write(cls.test_list, False))
    meta = folder / cls.meta["filename"]
    meta.write_bytes(pickle.dumps({names_key: [f"class{i}" for i in range(num_classes)]}, protocol=2))
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(meta)})
    return train_labels


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    path.write_bytes(np.array([magic, *array.shape], dtype=">i4").tobytes() + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, folder: str, n_train: int = 12, n_test: int = 5) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = _images(rng, n, (28, 28))
        images[0] = 0
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))


def _check_splits(splits, n_train: int, n_test: int, shape: tuple, num_classes: int) -> None:
    assert (len(splits.train), len(splits.train_eval), len(splits.test)) == (n_train, n_train, n_test)
    assert splits.input_shape == shape and splits.num_classes == num_classes and not splits.embedded
    for dataset in (splits.train, splits.train_eval, splits.test):
        image, label = dataset[len(dataset) - 1]
        assert image.shape == shape and image.dtype == torch.float32
        assert isinstance(label, int) and 0 <= label < num_classes
    train_labels = [splits.train[i][1] for i in range(n_train)]
    assert train_labels == [splits.train_eval[i][1] for i in range(n_train)]


def test_cifar10_loads_normalises_and_augments_train_only(tmp_path, monkeypatch):
    labels = _write_cifar(monkeypatch, tmp_path, datasets.CIFAR10, "labels", "label_names", 10)
    splits = vision.cifar10(str(tmp_path))

    _check_splits(splits, 20, 4, (3, 32, 32), 10)
    assert [splits.train_eval[i][1] for i in range(20)] == labels
    white = splits.train_eval[0][0]
    expected = (1 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    torch.testing.assert_close(white[:, 5, 7], expected)
    assert torch.equal(splits.train_eval[3][0], splits.train_eval[3][0])
    torch.manual_seed(0)
    assert any(not torch.equal(splits.train[i][0], splits.train_eval[i][0]) for i in range(1, 20))

    plain = vision.cifar10(str(tmp_path), augment=False)
    assert all(torch.equal(plain.train[i][0], plain.train_eval[i][0]) for i in range(20))


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch):
    labels = _write_cifar(monkeypatch, tmp_path, datasets.CIFAR100, "fine_labels", "fine_label_names", 100)
    splits = vision.cifar100(str(tmp_path))

    _check_splits(splits, 4, 4, (3, 32, 32), 100)
    assert [splits.train_eval[i][1] for i in range(4)] == labels


@pytest.mark.parametrize(("source", "folder", "mean", "std"), [
    (vision.mnist, "MNIST", 0.1307, 0.3081),
    (vision.fashion_mnist, "FashionMNIST", 0.2860, 0.3530),
])
def test_mnist_family_reads_raw_idx_files(tmp_path, source, folder, mean, std):
    _write_mnist(tmp_path, folder)
    splits = source(str(tmp_path))

    _check_splits(splits, 12, 5, (1, 28, 28), 10)
    assert torch.allclose(splits.train_eval[0][0], torch.full((1, 28, 28), -mean / std))
    assert torch.equal(splits.train[4][0], splits.train_eval[4][0])
    augmented = source(str(tmp_path), augment=True)
    torch.manual_seed(0)
    assert any(not torch.equal(augmented.train[i][0], augmented.train_eval[i][0]) for i in range(1, 12))


def test_root_is_expanded_from_home(tmp_path, monkeypatch):
    _write_mnist(tmp_path / "data", "MNIST")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(vision.mnist("~/data").test) == 5


def test_svhn_maps_label_10_to_digit_0(tmp_path, monkeypatch):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for split, n in (("train", 6), ("test", 3)):
        url, filename, _ = datasets.SVHN.split_list[split]
        images = np.moveaxis(_images(rng, n, (32, 32, 3)), 0, -1)  # SVHN stores (H, W, C, N)
        labels = np.array([[10], *rng.integers(1, 10, (n - 1, 1))], dtype=np.uint8)
        savemat(tmp_path / filename, {"X": images, "y": labels})
        monkeypatch.setitem(datasets.SVHN.split_list, split, [url, filename, _md5(tmp_path / filename)])
    splits = vision.svhn(str(tmp_path))

    _check_splits(splits, 6, 3, (3, 32, 32), 10)
    assert splits.train[0][1] == 0 and splits.test[0][1] == 0
    expected = (1 - torch.tensor((0.4377, 0.4438, 0.4728))) / torch.tensor((0.1980, 0.2010, 0.1970))
    torch.testing.assert_close(splits.train_eval[0][0][:, 0, 0], expected)


def _write_folder(root: Path, classes: tuple[str, ...], per_class: int) -> None:
    rng = np.random.default_rng(3)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_imagefolder_reads_class_folders(tmp_path):
    _write_folder(tmp_path / "train", ("cat", "dog"), 3)
    _write_folder(tmp_path / "val", ("cat", "dog"), 2)
    splits = vision.imagefolder(str(tmp_path), image_size=16)

    _check_splits(splits, 6, 4, (3, 16, 16), 2)
    assert [splits.train_eval[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [splits.test[i][1] for i in range(4)] == [0, 0, 1, 1]


def test_imagefolder_rejects_test_classes_that_differ(tmp_path):
    _write_folder(tmp_path / "train", ("cat", "dog"), 1)
    _write_folder(tmp_path / "val", ("bird", "cat"), 1)
    with pytest.raises(DataError, match=r"missing \['dog'\], extra \['bird'\]"):
        vision.imagefolder(str(tmp_path), image_size=16)


def test_fake_splits_differ_and_train_eval_matches_train():
    splits = vision.fake(num_train=8, num_test=4, image_size=12, channels=1, num_classes=3)

    _check_splits(splits, 8, 4, (1, 12, 12), 3)
    assert all(torch.equal(splits.train[i][0], splits.train_eval[i][0]) for i in range(8))
    assert not any(torch.equal(splits.train[i][0], splits.test[i][0]) for i in range(4))
    again = vision.fake(num_train=8, num_test=4, image_size=12, channels=1, num_classes=3)
    assert torch.equal(again.train[2][0], splits.train[2][0])


@pytest.mark.parametrize("source", [vision.cifar10, vision.cifar100, vision.mnist, vision.fashion_mnist, vision.svhn])
def test_missing_files_say_where_and_how_to_get_them(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as caught:
        source("data")
    message = str(caught.value)
    assert str(tmp_path / "data") in message and "dataset.download=true" in message
    assert "\n" not in message


def test_missing_imagefolder_says_where(tmp_path):
    with pytest.raises(DataError, match="dataset.root") as caught:
        vision.imagefolder(str(tmp_path))
    assert str(tmp_path / "train") in str(caught.value)


@pytest.fixture
def socket_timeout():
    """Bounds each network call, so a network that drops packets cannot stall the suite."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    yield
    socket.setdefaulttimeout(previous)


def test_failed_download_is_a_data_error(tmp_path, socket_timeout):
    try:
        vision.mnist(str(tmp_path), download=True)
    except DataError as err:
        assert str(tmp_path) in str(err) and "download" in str(err) and "\n" not in str(err)
    else:
        pytest.skip("a network is reachable here, so the download succeeded")
