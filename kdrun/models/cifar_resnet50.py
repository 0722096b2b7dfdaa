"""ResNet50 for CIFAR as in the CRD paper's code (RepDistiller ``models/resnetv2.py``, ``ResNet50``).

The ImageNet bottleneck ResNet50 (3, 4, 6, 3 blocks; widths 64..512, x4 expansion) with a 3x3,
stride-1 stem and no max-pool, so 32x32 inputs end at 4x4. Taps: ``stem`` -> ``stage1..4`` (post-ReLU
block outputs) -> ``embedding`` (2048) -> ``fc``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdrun.models.cifar_common import StagedNet, conv_bn_relu, image_shape, init_weights, pooled_embedding

EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet50(StagedNet):
    def __init__(self, num_classes: int, in_channels: int, blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512)):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, 64, 3)
        channels = 64
        for index, (width, count) in enumerate(zip(widths, blocks), start=1):
            stride = 1 if index == 1 else 2
            layers = [Bottleneck(channels, width, stride)]
            layers += [Bottleneck(width * EXPANSION, width, 1) for _ in range(count - 1)]
            self.add_module(f"stage{index}", nn.Sequential(*layers))
            channels = width * EXPANSION
        self.embedding = pooled_embedding()
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.fc(self.embedding(x))

    # RepDistiller: conv1, bn1, layer{1..4}.{i}.<same names as here>, linear.
    REFERENCE_RULES = [
        (r"^conv1\.", "stem.0."),
        (r"^bn1\.", "stem.1."),
        (r"^layer(\d)\.", r"stage\1."),
        (r"^linear\.", "fc."),
    ]



def resnet50(num_classes: int, input_shape) -> CifarResNet50:
    in_channels, _, _ = image_shape("resnet50", input_shape)
    return CifarResNet50(num_classes, in_channels)
