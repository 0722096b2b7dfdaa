"""The MNIST-1D paper's baseline models (Greydanus, "Scaling down deep learning", 2020):
logistic regression, a residual MLP and a small strided 1-D CNN, with kdrun's part names
(``stem``, ``stageN``, ``embedding``, ``fc``) so they work as teachers and students too."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from kdrun.errors import ConfigError


class _Staged(nn.Sequential):
    pass


def logistic(num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """One linear layer on the flattened signal."""
    return _Staged(OrderedDict(stem=nn.Flatten(), embedding=nn.Identity(), fc=nn.Linear(math.prod(input_shape), num_classes)))


class ResidualLayer(nn.Module):
    """``h + relu(W h + b)``: the paper MLP's second layer."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.linear(hidden).relu()


def residual_mlp(num_classes: int, input_shape: Sequence[int], hidden: int = 100) -> nn.Module:
    """Linear-ReLU, then a residual Linear-ReLU, then the classifier (hidden width 100)."""
    return _Staged(OrderedDict(
        stem=nn.Flatten(),
        stage1=nn.Sequential(nn.Linear(math.prod(input_shape), hidden), nn.ReLU()),
        stage2=ResidualLayer(hidden),
        embedding=nn.Identity(),
        fc=nn.Linear(hidden, num_classes),
    ))


def strided_cnn(num_classes: int, input_shape: Sequence[int], channels: int = 25) -> nn.Module:
    """Three stride-2 1-D convolutions (kernels 5, 3, 3; no pooling, no normalisation), then a
    linear classifier on the flattened maps: 25 channels x 5 positions for length-40 signals."""
    if len(input_shape) != 2:
        raise ConfigError(f"the MNIST-1D paper CNN takes (C, L) signals, got input shape {tuple(input_shape)}")
    length = input_shape[1]
    for kernel in (5, 3, 3):
        length = (length + 2 - kernel) // 2 + 1
    return _Staged(OrderedDict(
        stem=nn.Identity(),
        stage1=nn.Sequential(nn.Conv1d(input_shape[0], channels, 5, stride=2, padding=1), nn.ReLU()),
        stage2=nn.Sequential(nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU()),
        stage3=nn.Sequential(nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU()),
        embedding=nn.Flatten(),
        fc=nn.Linear(channels * length, num_classes),
    ))
