"""Feature layouts for the map-based terms of the zoo (ReviewKD, OFD, AB, CWD, FT, KTAAD, FSP, NST).

Their papers compare channel-first maps ``(B, C, H, W)``; kdrun's models also give 1-D maps
``(B, C, L)`` (CNNs on signals) and vectors ``(B, D)`` (MLP stages, ``embedding``). Here a
vector is read as a map with ``D`` channels at one position, shaped like the maps it meets, so
one code path serves every pair; convolutions, pooling and batch norm follow the map's rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.losses.adapters import pool_to


def as_map(feature: torch.Tensor, rank: int = 3) -> torch.Tensor:
    """A map as it is; a vector ``(B, D)`` as a map of ``rank`` dimensions with one position."""
    if feature.dim() >= 3:
        return feature
    return feature.reshape(*feature.shape, *[1] * (rank - 2))


def paired_maps(student: torch.Tensor, teacher: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both features as maps of one rank: a vector takes the other side's rank (two vectors: 1-D
    maps of one position). Maps of different ranks (a signal against an image) cannot pair."""
    rank = max(student.dim(), teacher.dim(), 3)
    student, teacher = as_map(student, rank), as_map(teacher, rank)
    if student.dim() != teacher.dim():
        raise ConfigError(
            f"{what} pairs maps of one kind; got a student feature {tuple(student.shape)} and a teacher feature "
            f"{tuple(teacher.shape)} (choose taps of the same kind, e.g. both image stages)"
        )
    return student, teacher


def size_of(feature: torch.Tensor) -> tuple[int, ...]:
    return tuple(feature.shape[2:])


def pooled(feature: torch.Tensor, size: tuple[int, ...], kind: str = "avg") -> torch.Tensor:
    """Adaptive average (or max) pooling of a map to ``size``; a map of that size as it is."""
    if kind == "avg" or size_of(feature) == tuple(size):
        return pool_to(feature, size)
    return (F.adaptive_max_pool1d if feature.dim() == 3 else F.adaptive_max_pool2d)(feature, size)


def smallest(*features: torch.Tensor) -> tuple[int, ...]:
    """The common (smallest) spatial size of maps of one rank."""
    return tuple(min(sizes) for sizes in zip(*(size_of(f) for f in features)))


def conv(rank: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d`` for 1-D maps (rank 3), ``nn.Conv2d`` for images (rank 4)."""
    return (nn.Conv1d if rank == 3 else nn.Conv2d)(*args, **kwargs)


def conv_transpose(rank: int, *args, **kwargs) -> nn.Module:
    return (nn.ConvTranspose1d if rank == 3 else nn.ConvTranspose2d)(*args, **kwargs)


def batch_norm(rank: int, channels: int) -> nn.Module:
    return (nn.BatchNorm1d if rank == 3 else nn.BatchNorm2d)(channels)
