"""Pieces shared by the CIFAR model families of the CRD paper's code (RepDistiller ``models/``).

Every family names its modules for kdrun's taps: ``stem`` -> ``stage1..N`` -> (``head``, where the
reference has layers between the last stage and the pooling) -> ``embedding`` (pooled, flat) -> ``fc``.
Each model also has ``reference_key(key)``: the name in kdrun's layout of a state-dict key in
RepDistiller's, so its released teachers load (see :mod:`kdrun.models.reference`).
"""

from __future__ import annotations

import re

from torch import nn

from kdrun.errors import ConfigError


def image_shape(name: str, input_shape) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the inputs, or a ConfigError naming the model."""
    try:
        channels, height, width = (int(size) for size in input_shape)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name}: input_shape must be (channels, height, width), got {input_shape!r}"
        ) from None
    return channels, height, width


def init_weights(model: nn.Module) -> None:
    """He-normal convs (fan-out), unit BN scales, zero biases: the reference codes' initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def pooled_embedding() -> nn.Sequential:
    """Global average pooling to a flat vector (the reference pools the last 4x4 or 8x8 map whole)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def rename(key: str, rules: list[tuple[str, str]]) -> str:
    """``key`` rewritten by the first regex rule that matches it (unchanged when none does)."""
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def channel_shuffle(x, groups: int):
    """Interleave the channels of ``groups`` groups (ShuffleNet): (g, C/g) -> (C/g, g)."""
    if groups == 1:
        return x
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class StagedNet(nn.Module):
    """Base of the CIFAR models: ``stem -> stage1..N -> embedding -> fc`` (``num_stages``), and
    RepDistiller's key names mapped to ours through ``REFERENCE_RULES`` (regex, replacement)."""

    REFERENCE_RULES: list[tuple[str, str]] = []
    num_stages: int

    def forward(self, x):
        x = self.stem(x)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{index}")(x)
        return self.fc(self.embedding(x))

    def reference_key(self, key: str) -> str:
        return rename(key, self.REFERENCE_RULES)
