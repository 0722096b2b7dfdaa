"""ShuffleNet V1 and V2 for CIFAR as in the CRD paper's code (RepDistiller ``models/ShuffleNetv1.py``,
``models/ShuffleNetv2.py``: ``ShuffleV1`` with 3 groups, ``ShuffleV2`` at net size 1).

Both have a 1x1 stem without pooling and three stages that each halve the resolution. Taps:
``stem`` -> ``stage1..3`` (post-ReLU / post-shuffle outputs, the reference's features) ->
(ShuffleNetV2: ``head``, its 1x1 conv to 1024) -> ``embedding`` -> ``fc``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.cifar_common import (
    channel_shuffle,
    conv_bn_relu,
    image_shape,
    init_weights,
    pooled_embedding,
    rename,
)

STEM_WIDTH = 24
# RepDistiller: conv1, bn1, layer{1..3}.{i}.<same names as here>, [conv2, bn2,] linear.
REFERENCE_RULES = [
    (r"^conv1\.", "stem.0."),
    (r"^bn1\.", "stem.1."),
    (r"^layer(\d)\.", r"stage\1."),
    (r"^conv2\.", "head.0."),
    (r"^bn2\.", "head.1."),
    (r"^linear\.", "fc."),
]


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
    """A conv without bias and its BN, as two attributes' worth of modules."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(out_channels)


class ShuffleUnit(nn.Module):
    """ShuffleNet V1 bottleneck: grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1.

    A stride-2 unit concatenates an average-pooled copy of its input (so it adds ``out - in``
    channels); a stride-1 unit adds its input. The first unit after the 24-channel stem uses an
    ungrouped first conv, as in the reference.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        branch_channels = out_channels - in_channels if stride == 2 else out_channels
        mid = branch_channels // 4
        self.first_groups = 1 if in_channels == STEM_WIDTH else groups
        self.conv1, self.bn1 = conv_bn(in_channels, mid, groups=self.first_groups)
        self.conv2, self.bn2 = conv_bn(mid, mid, 3, stride=stride, groups=mid)
        self.conv3, self.bn3 = conv_bn(mid, branch_channels, groups=groups)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, widths=(240, 480, 960), blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, STEM_WIDTH)
        channels = STEM_WIDTH
        for index, (width, count) in enumerate(zip(widths, blocks), start=1):
            units = [ShuffleUnit(channels, width, 2, groups)]
            units += [ShuffleUnit(width, width, 1, groups) for _ in range(count - 1)]
            self.add_module(f"stage{index}", nn.Sequential(*units))
            channels = width
        self.embedding = pooled_embedding()
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.embedding(x))

    def reference_key(self, key: str) -> str:
        return rename(key, REFERENCE_RULES)


class SplitUnit(nn.Module):
    """ShuffleNet V2 basic unit: half the channels pass through, the other half goes through
    1x1, 3x3 depthwise, 1x1; concatenated and shuffled in two groups."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = conv_bn(half, half)
        self.conv2, self.bn2 = conv_bn(half, half, 3, groups=half)
        self.conv3, self.bn3 = conv_bn(half, half)

    def forward(self, x):
        kept, branch = x.split([x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(branch)))))
        return channel_shuffle(torch.cat([kept, branch], 1), 2)


class DownUnit(nn.Module):
    """ShuffleNet V2 stride-2 unit: two branches (3x3 depthwise then 1x1; 1x1, 3x3 depthwise, 1x1),
    each to half the output channels, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1, self.bn1 = conv_bn(in_channels, in_channels, 3, stride=2, groups=in_channels)
        self.conv2, self.bn2 = conv_bn(in_channels, mid)
        self.conv3, self.bn3 = conv_bn(in_channels, mid)
        self.conv4, self.bn4 = conv_bn(mid, mid, 3, stride=2, groups=mid)
        self.conv5, self.bn5 = conv_bn(mid, mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, widths=(116, 232, 464), blocks=(3, 7, 3), last=1024):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, STEM_WIDTH)
        channels = STEM_WIDTH
        for index, (width, count) in enumerate(zip(widths, blocks), start=1):
            # The reference puts ``count`` basic units after the down unit.
            units = [DownUnit(channels, width)] + [SplitUnit(width) for _ in range(count)]
            self.add_module(f"stage{index}", nn.Sequential(*units))
            channels = width
        self.head = conv_bn_relu(channels, last)
        self.embedding = pooled_embedding()
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.embedding(self.head(x)))

    def reference_key(self, key: str) -> str:
        return rename(key, REFERENCE_RULES)


def shufflenetv1(num_classes: int, input_shape) -> ShuffleNetV1:
    in_channels, _, _ = image_shape("shufflenetv1", input_shape)
    return ShuffleNetV1(num_classes, in_channels)


def shufflenetv2(num_classes: int, input_shape) -> ShuffleNetV2:
    in_channels, _, _ = image_shape("shufflenetv2", input_shape)
    return ShuffleNetV2(num_classes, in_channels)
