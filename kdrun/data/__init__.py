"""Datasets: each source returns :class:`Splits`; :func:`build` makes the loaders.

A dataset config names a source with ``_target_`` (a function returning
``Splits``) plus loader settings; adding a dataset is one function and one
YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from kdrun.config import instantiate_user
from kdrun.data.augment import Augmentation
from kdrun.engine import distributed
from kdrun.errors import ConfigError


@dataclass
class Splits:
    """What a dataset source provides.

    ``train`` and ``train_eval`` hold the same samples in the same order; the
    first applies train-time augmentation, the second the eval transform (the
    validation split is carved out of it so validation is never augmented).
    ``augmentation`` declares what ``train`` adds (None: nothing, so ``train`` is
    ``train_eval``); ``in_memory`` says all samples are held in memory, not read
    from files, so ``perf.device_data`` may put them on the device.
    """

    train: Dataset
    train_eval: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    embedded: bool = False
    augmentation: Augmentation | None = None
    in_memory: bool = False
    val: Dataset | None = None
    text: Any = None


@dataclass
class DataBundle:
    name: str
    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    input_shape: tuple[int, ...]
    embedded: bool
    val_is_test: bool
    train_set: Dataset = field(repr=False, default=None)
    make_loader: Callable[[Dataset, bool], DataLoader] = field(repr=False, default=None)
    augmentation: Augmentation | None = None
    in_memory: bool = False
    # The training samples with the eval transform (what device-resident data augments itself).
    train_eval_set: Dataset = field(repr=False, default=None)
    text: Any = field(repr=False, default=None)

    def indexed(self) -> DataBundle:
        """The same data, with training batches of ``(inputs, labels, index)``; the
        index (0..len(train)-1) keys per-sample memories such as CRD's."""
        return replace(self, train=self.make_loader(WithIndex(self.train_set), True))


    def with_train_set(self, train_set: Dataset) -> DataBundle:
        """The same validation and test data around another training set."""
        return replace(self, train=self.make_loader(train_set, True), train_set=train_set)


class HiddenLabels(Dataset):
    """``dataset`` with the labels of the samples in ``hidden`` replaced by -1 (unlabeled)."""

    def __init__(self, dataset: Dataset, hidden: set[int]):
        self.dataset, self.hidden = dataset, hidden

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        inputs, label, *rest = self.dataset[index]
        if index in self.hidden:
            label = torch.full_like(label, -1) if isinstance(label, torch.Tensor) else -1
        return (inputs, label, *rest)


class WithIndex(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of ``range(n)``; the same seed gives the same split."""
    n_val = int(round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def build(cfg: DictConfig, seed: int, pin_memory: bool = False, persistent_workers: bool = True) -> DataBundle:
    splits: Splits = instantiate_user(cfg.source, f"dataset {cfg.name}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction={cfg.val_fraction} must be in [0, 1)")
    if splits.val is not None:
        train_idx, val_is_test, val_set = list(range(len(splits.train))), False, splits.val
    else:
        train_idx, val_idx = split_indices(len(splits.train), cfg.val_fraction, seed)
        val_is_test = not val_idx
        val_set = splits.test if val_is_test else Subset(splits.train_eval, val_idx)
    train_set = Subset(splits.train, train_idx)
    workers = int(cfg.num_workers)
    # Under DDP dataset.batch_size stays the global batch: each of N ranks takes 1/N of it,
    # so a config means the same training (batch, steps per epoch, schedule) on any N.
    # (kdrun.run checks that it divides.)
    rank, ranks = distributed.rank(), distributed.world_size()

    def loader(dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        sampler = None
        if ranks > 1:
            sampler = (
                distributed.ShardedRandomSampler(dataset, generator, rank, ranks) if shuffle
                else distributed.ShardedSequentialSampler(dataset, rank, ranks)
            )
        return DataLoader(
            dataset,
            batch_size=int(cfg.batch_size) // ranks if shuffle else int(cfg.get("eval_batch_size", 512)),
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=shuffle and bool(cfg.get("drop_last", False)),
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and workers > 0,
            # The engine reseeds this generator at every epoch, so the shuffle
            # order (and worker seeds) depend only on (seed, epoch): resume is exact.
            generator=generator,
        )

    return DataBundle(
        name=str(cfg.name),
        train=loader(train_set, shuffle=True),
        val=loader(val_set, shuffle=False),
        test=loader(splits.test, shuffle=False),
        num_classes=splits.num_classes,
        input_shape=tuple(splits.input_shape),
        embedded=splits.embedded,
        val_is_test=val_is_test,
        train_set=train_set,
        make_loader=loader,
        augmentation=splits.augmentation,
        in_memory=splits.in_memory,
        train_eval_set=Subset(splits.train_eval, train_idx),
        text=splits.text,
    )
