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


def projection(in_shape: torch.Size, out_shape: torch.Size, norm: bool = True, bias: bool | None = None) -> nn.Module:
    """A learned map from features shaped ``in_shape`` to ``out_shape`` (batch dim included):
    a 1x1 convolution (+ BN) between maps of one rank, else a linear layer (+ BN) on vectors.
    ``bias`` defaults to ``not norm`` (a BN after it would cancel it)."""
    bias = not norm if bias is None else bias
    if len(in_shape) == len(out_shape) and len(in_shape) >= 3:
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if len(in_shape) == 3 else (nn.Conv2d, nn.BatchNorm2d)
        layers = [conv(in_shape[1], out_shape[1], kernel_size=1, bias=bias)]
        return nn.Sequential(*layers, bn(out_shape[1])) if norm else layers[0]
    in_dim, out_dim = int(torch.Size(in_shape[1:]).numel()), int(torch.Size(out_shape[1:]).numel())
    layers = [nn.Flatten(), nn.Linear(in_dim, out_dim, bias=bias)]
    return nn.Sequential(*layers, nn.BatchNorm1d(out_dim)) if norm else nn.Sequential(*layers)


def resizing_conv(in_shape: torch.Size, out_shape: torch.Size) -> nn.Module | None:
    """A convolution from one 2-D map onto another's channels *and* size, as RepDistiller's
    ``ConvReg`` (and mdistiller's) builds it: 3x3 stride 2 when the input is twice the output's
    size, a 4x4 stride-2 transposed convolution when it is half, else a ``(1+Hi-Ho) x (1+Wi-Wo)``
    convolution (1x1 for equal sizes). None where that code has none (a smaller input by
    another factor, or not 2-D maps); callers then pool (:func:`align_maps`)."""
    if len(in_shape) != 4 or len(out_shape) != 4:
        return None
    (_, c_in, h_in, w_in), (_, c_out, h_out, w_out) = in_shape, out_shape
    if h_in == 2 * h_out and w_in == 2 * w_out:
        return nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)
    if 2 * h_in == h_out and 2 * w_in == w_out:
        return nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
    if h_in >= h_out and w_in >= w_out:
        return nn.Conv2d(c_in, c_out, kernel_size=(1 + h_in - h_out, 1 + w_in - w_out))
    return None


class Regressor(nn.Module):
    """Maps a student feature onto a teacher feature's shape, sized on one probe pair:
    ``forward(student, teacher)`` gives ``(prediction, target)``.

    Between 2-D maps it is RepDistiller's ``ConvReg`` (FitNets' hint regressor): a
    :func:`resizing_conv` (with bias), BN and, with ``relu``, a ReLU. Pairs that conv cannot
    map (vectors, 1-D maps, a student map smaller by other than half) are first brought to a
    common size by :func:`align_maps` and mapped by a :func:`projection` (+ BN, + ReLU).
    """

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor, relu: bool = True):
        super().__init__()
        conv = resizing_conv(student.shape, teacher.shape)
        self.pools = conv is None
        if self.pools:
            student, teacher = align_maps(student, teacher)
            layers = list(projection(student.shape, teacher.shape))
        else:
            layers = [conv, nn.BatchNorm2d(teacher.shape[1])]
        self.layers = nn.Sequential(*layers, *([nn.ReLU()] if relu else []))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pools:
            student, teacher = align_maps(student, teacher)
        return self.layers(student), teacher
