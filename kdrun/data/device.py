"""Device-resident data (``perf.device_data``): whole splits as tensors on the device, batches
sliced there, train-time augmentation applied to whole batches there; no DataLoader workers.

:class:`DeviceLoader` is a drop-in for the training loop's DataLoader: it yields the same
tuples (``inputs, labels[, index]``), has ``len()`` and a ``generator`` the loop reseeds
every epoch, and, with augmentation off, gives the very batches the DataLoader gives.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kdrun.data import DataBundle, WithIndex
from kdrun.data.augment import Augmentation
from kdrun.engine import distributed
from kdrun.engine.perf import Perf, free_bytes
from kdrun.errors import ConfigError

# Share of free memory (device memory on CUDA, RAM on the CPU) that device-resident data may take.
MEMORY_SHARE = 0.25


class DeviceLoader:
    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, augmentation: Augmentation | None = None, with_index: bool = False,
                 seed: int = 0):
        self.inputs, self.labels = inputs, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augmentation, self.with_index = augmentation, with_index
        self.generator = torch.Generator().manual_seed(seed) if shuffle else None

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n, device = len(self.labels), self.inputs.device
        order, augment_rng = None, None
        if self.shuffle:
            # As a DataLoader over a RandomSampler does: one int64 drawn for the worker base
            # seed when the iterator is made, then the sampler's randperm, both from ``generator``.
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            order = torch.randperm(n, generator=self.generator).to(device)
            if self.augmentation is not None:
                seed = int(torch.randint(0, 2**62, (), generator=self.generator))
                augment_rng = torch.Generator(device=device).manual_seed(seed)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            stop = min(start + self.batch_size, n)
            index = order[start:stop] if order is not None else torch.arange(start, stop, device=device)
            # index_select, not ``tensor[index]``: the same gather with less Python overhead per batch.
            inputs = self.inputs.index_select(0, index) if order is not None else self.inputs[start:stop]
            labels = self.labels.index_select(0, index) if order is not None else self.labels[start:stop]
            if augment_rng is not None:
                inputs = self.augmentation(inputs, augment_rng)
            yield (inputs, labels, index) if self.with_index else (inputs, labels)


def materialize(dataset: Dataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``dataset`` as two tensors (inputs, labels), each sample as the DataLoader collates it."""
    base, indices = dataset, None
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
    if type(base) is TensorDataset:  # embedded sets: index the tensors (what collate of their items gives)
        inputs, labels = base.tensors[:2]
        return (inputs, labels) if indices is None else (inputs[indices], labels[indices])
    batches = list(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def resident_bytes(data: DataBundle) -> int:
    """Bytes the splits take as float32 tensors on the device."""
    samples = len(data.train_set) + len(data.test.dataset) + (0 if data.val_is_test else len(data.val.dataset))
    return samples * math.prod(data.input_shape) * 4


def unsupported(data: DataBundle) -> str | None:
    """Why ``data`` cannot live on the device (None when it can)."""
    if not data.in_memory:
        return f"dataset {data.name} is read from files per sample"
    if data.augmentation is not None and not data.augmentation.on_device:
        return f"dataset {data.name}'s augmentation has no batched device version"
    return None


def to_device(data: DataBundle, device: torch.device) -> DataBundle:
    """``data`` with every split on ``device``; the eval transform is applied once here."""
    augmented = data.augmentation is not None
    train_inputs, train_labels = materialize(data.train_eval_set if augmented else data.train_set)
    train_inputs, train_labels = train_inputs.to(device), train_labels.to(device)
    train_loader, val_loader = data.train, data.val

    def evaluation(loader: DataLoader) -> DeviceLoader:
        inputs, labels = materialize(loader.dataset)
        return DeviceLoader(inputs.to(device), labels.to(device), loader.batch_size)

    def training(with_index: bool) -> DeviceLoader:
        return DeviceLoader(train_inputs, train_labels, train_loader.batch_size, shuffle=True,
                            drop_last=train_loader.drop_last, augmentation=data.augmentation, with_index=with_index)

    def make_loader(dataset: Dataset, shuffle: bool):
        if shuffle and dataset is data.train_set:
            return training(with_index=False)
        if shuffle and isinstance(dataset, WithIndex) and dataset.dataset is data.train_set:
            return training(with_index=True)
        # Other training sets (a strategy's labelled share, hidden labels) are read as before.
        return data.make_loader(dataset, shuffle)

    val = evaluation(val_loader)
    test = val if data.val_is_test else evaluation(data.test)
    return replace(data, train=training(with_index=False), val=val, test=test, make_loader=make_loader)


def place(data: DataBundle, perf: Perf) -> DataBundle:
    """``data`` on the device when ``perf.device_data`` says so (and it fits); the decision and
    its reason go into ``perf.notes`` for the log line at start."""
    setting = perf.device_data
    if setting is False:
        perf.notes["device_data"] = "off"
        return data
    reason = unsupported(data)
    if reason is None and distributed.active():
        reason = "distributed run: each rank reads its shard through a DataLoader"
    if reason is None:
        need, free = resident_bytes(data), free_bytes(perf.device)
        if need > MEMORY_SHARE * free:
            reason = f"{need / 2**20:.0f} MiB is more than {MEMORY_SHARE:.0%} of free memory ({free / 2**20:.0f} MiB)"
    if reason is not None:
        if setting is True:
            raise ConfigError(f"perf.device_data=true but the data cannot live on the device: {reason}")
        perf.notes["device_data"] = f"off ({reason})"
        return data
    placed = to_device(data, perf.device)
    perf.notes["device_data"] = (
        f"on ({resident_bytes(data) / 2**20:.1f} MiB on {perf.device.type}"
        f"{', augmentation on the device' if data.augmentation is not None else ''})"
    )
    return placed
