"""Wide ResNets WRN-d-k for CIFAR as in the CRD paper's code (RepDistiller ``models/wrn.py``).

Pre-activation blocks (BN-ReLU-conv twice); depth d = 6n+4 with n blocks per stage, stage widths
16k, 32k, 64k. Taps: ``stem`` (the first conv) -> ``stage1..3`` (block sums, before the next BN,
as the reference's features) -> ``head`` (final BN-ReLU) -> ``embedding`` -> ``fc``.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.cifar_common import StagedNet, image_shape, init_weights, pooled_embedding


class PreActBlock(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))``; when the width changes, the 1x1 projection
    shortcut takes the activated input instead of ``x`` (as in the reference)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(StagedNet):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int):
        super().__init__()
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        for index in (1, 2, 3):
            stride = 1 if index == 1 else 2
            blocks = [PreActBlock(widths[index - 1], widths[index], stride)]
            blocks += [PreActBlock(widths[index], widths[index], 1) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"stage{index}", nn.Sequential(*blocks))
        self.head = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True))
        self.embedding = pooled_embedding()
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.embedding(self.head(x)))

    # RepDistiller: conv1, block{1..3}.layer.{i}.(bn1|conv1|bn2|conv2|convShortcut), bn1, fc.
    REFERENCE_RULES = [
        (r"^conv1\.", "stem."),
        (r"^block(\d)\.layer\.(\d+)\.convShortcut\.", r"stage\1.\2.shortcut."),
        (r"^block(\d)\.layer\.", r"stage\1."),
        (r"^bn1\.", "head.0."),
    ]



def wide_resnet(name: str, depth: int, widen: int, num_classes: int, input_shape) -> WideResNet:
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ConfigError(f"{name}: depth must be 6n+4 with n >= 1 (10, 16, 22, ..., 40), got {depth}")
    in_channels, _, _ = image_shape(name, input_shape)
    return WideResNet(depth, widen, num_classes, in_channels)


wrn_16_1 = partial(wide_resnet, "wrn_16_1", 16, 1)
wrn_16_2 = partial(wide_resnet, "wrn_16_2", 16, 2)
wrn_40_1 = partial(wide_resnet, "wrn_40_1", 40, 1)
wrn_40_2 = partial(wide_resnet, "wrn_40_2", 40, 2)
