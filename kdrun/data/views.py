"""Extra views of each training sample, for terms that compare a model's outputs on transformed
copies of its inputs (SSKD's rotations, MLKD's strongly augmented copy).

A term declares the views it needs (:attr:`kdrun.losses.base.Term.views`); the training data
then yields batches of ``count`` views per sample, interleaved: view ``k`` of sample ``i`` is
item ``i * count + k`` and view 0 is the sample as loaded. Copies either keep the sample's
label or carry the label -1 (not scored: the task reads it as ``IGNORE``, so cross-entropy and
the training accuracy see the originals only). Validation and test data are never expanded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kdrun.data import DataBundle
from kdrun.errors import ConfigError


@dataclass(frozen=True)
class Views:
    """``count`` views per sample: the sample, then ``make(inputs)`` (``count - 1`` tensors shaped
    like ``inputs``). ``labelled``: whether the copies keep the sample's label."""

    name: str
    count: int
    make: Callable[[torch.Tensor], list[torch.Tensor]]
    labelled: bool

    def expand(self, inputs: torch.Tensor, labels: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A loader's ``(inputs, labels[, index])`` with every sample followed by its copies."""
        copies = self.make(inputs)
        stacked = torch.stack([inputs, *copies], dim=1).flatten(0, 1)
        copy_labels = labels if self.labelled else torch.full_like(labels, -1)
        stacked_labels = torch.stack([labels, *[copy_labels] * len(copies)], dim=1).flatten(0, 1)
        return (stacked, stacked_labels, *(tensor.repeat_interleave(self.count) for tensor in rest))


def rotations(inputs: torch.Tensor) -> list[torch.Tensor]:
    """SSKD's transformations: images turned by 90, 180 and 270 degrees. A signal ``(B, C, L)``
    has no rotations; its analogue is the group of time reversal and sign flip (reversed,
    negated, both), which keeps a signal's statistics as rotations keep an image's."""
    if inputs.dim() == 4:
        if inputs.shape[2] != inputs.shape[3]:
            raise ConfigError(f"rotated views need square images; the inputs are {inputs.shape[2]}x{inputs.shape[3]}")
        return [torch.rot90(inputs, turns, dims=(2, 3)) for turns in (1, 2, 3)]
    if inputs.dim() == 3:
        return [inputs.flip(-1), -inputs, -inputs.flip(-1)]
    raise ConfigError(f"rotated views need images (B, C, H, W) or signals (B, C, L); the inputs are {tuple(inputs.shape)}")


class ViewsLoader:
    """A training loader whose batches carry ``views`` of every sample; its length and its
    ``generator`` (which the loop reseeds each epoch) are the wrapped loader's."""

    def __init__(self, loader, views: Views):
        self.loader, self.views = loader, views

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def generator(self):
        return getattr(self.loader, "generator", None)

    def __iter__(self):
        for loaded in self.loader:
            yield self.views.expand(*loaded)


def with_views(data: DataBundle, views: Views) -> DataBundle:
    """``data`` with training batches of ``views`` (validation and test unchanged)."""
    return replace(data, train=ViewsLoader(data.train, views))
