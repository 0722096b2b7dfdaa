"""Shape alignment and learned projections shared by feature-based terms.

Features come in three layouts: vectors ``(B, D)`` (MLP stages, ``embedding``),
channel-first maps ``(B, C, L)`` / ``(B, C, H, W)`` (CNN stages), and token
sequences ``(B, T, D)`` (transformer hidden states, handled by the transformer
terms themselves). Teacher and student may differ in layout and size; these
helpers bring a pair to comparable shapes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_map(feature: torch.Tensor) -> bool:
    return feature.dim() >= 3


def pool_to(feature: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of a channel-first map to spatial ``size``."""
    if tuple(feature.shape[2:]) == tuple(size):
        return feature
    pool = F.adaptive_avg_pool1d if feature.dim() == 3 else F.adaptive_avg_pool2d
    return pool(feature, size)


def align_maps(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two maps of one rank are pooled to their common (smallest) spatial size;
    any other pair (a vector on either side, or maps of different rank) is flattened to vectors."""
    if is_map(student) and is_map(teacher) and student.dim() == teacher.dim():
        size = tuple(min(a, b) for a, b in zip(student.shape[2:], teacher.shape[2:]))
        return pool_to(student, size), pool_to(teacher, size)
    return student.flatten(1), teacher.flatten(1)


def projection(in_shape: torch.Size, out_shape: torch.Size, norm: bool = True) -> nn.Module:
    """A learned map from features shaped ``in_shape`` to ``out_shape`` (batch dim included):
    a 1x1 convolution (+ BN) between maps of one rank, else a linear layer (+ BN) on vectors."""
    if len(in_shape) == len(out_shape) and len(in_shape) >= 3:
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if len(in_shape) == 3 else (nn.Conv2d, nn.BatchNorm2d)
        layers = [conv(in_shape[1], out_shape[1], kernel_size=1, bias=not norm)]
        return nn.Sequential(*layers, bn(out_shape[1])) if norm else layers[0]
    in_dim, out_dim = int(torch.Size(in_shape[1:]).numel()), int(torch.Size(out_shape[1:]).numel())
    layers = [nn.Flatten(), nn.Linear(in_dim, out_dim, bias=not norm)]
    return nn.Sequential(*layers, nn.BatchNorm1d(out_dim)) if norm else nn.Sequential(*layers)
