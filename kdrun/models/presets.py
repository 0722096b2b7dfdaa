"""MLP and CNN presets that adapt to any dataset's input shape and class count.

A CNN preset uses 1-D convolutions on (C, L) inputs (MNIST-1D) and 2-D
convolutions on (C, H, W) inputs (digits, MNIST, CIFAR); an MLP flattens.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn

from kdrun.errors import ConfigError


class _Staged(nn.Sequential):
    """stem -> stage1..N -> embedding -> fc, as DESIGN.md names them for hooks."""


def mlp(num_classes: int, input_shape: Sequence[int], hidden: Sequence[int] = (128, 128), dropout: float = 0.0) -> nn.Module:
    layers: dict[str, nn.Module] = {"stem": nn.Flatten()}
    width = math.prod(input_shape)
    for i, out in enumerate(hidden, start=1):
        block = [nn.Linear(width, out), nn.ReLU(inplace=True)]
        if dropout:
            block.append(nn.Dropout(dropout))
        layers[f"stage{i}"] = nn.Sequential(*block)
        width = out
    layers["embedding"] = nn.Identity()
    layers["fc"] = nn.Linear(width, num_classes)
    return _Staged(OrderedDict(layers))


def cnn(
    num_classes: int,
    input_shape: Sequence[int],
    channels: Sequence[int] = (32, 64, 128),
    kernel_size: int = 3,
    stem_channels: int | None = None,
) -> nn.Module:
    if len(input_shape) not in (2, 3):
        raise ConfigError(f"cnn expects (C, L) or (C, H, W) inputs, got shape {tuple(input_shape)}")
    conv, norm, pool = (
        (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d)
        if len(input_shape) == 2
        else (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d)
    )

    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            conv(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            norm(c_out),
            nn.ReLU(inplace=True),
        )

    stem_width = stem_channels or channels[0]
    layers: dict[str, nn.Module] = {"stem": block(input_shape[0], stem_width, 1)}
    width = stem_width
    for i, out in enumerate(channels, start=1):
        # Downsample from the second stage on, but never below a few positions.
        stride = 2 if i > 1 and min(input_shape[1:]) // 2 ** (i - 1) >= 2 else 1
        layers[f"stage{i}"] = nn.Sequential(block(width, out, stride), block(out, out, 1))
        width = out
    layers["embedding"] = nn.Sequential(pool(1), nn.Flatten())
    layers["fc"] = nn.Linear(width, num_classes)
    return _Staged(OrderedDict(layers))
