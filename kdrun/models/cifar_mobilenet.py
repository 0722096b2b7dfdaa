"""MobileNetV2 for CIFAR as in the CRD paper (RepDistiller ``models/mobilenetv2.py``, ``mobile_half``).

Width multiplier 0.5 and expansion 6, a stride-2 stem, inverted residual blocks, a 1x1 conv to 1280
channels before pooling. Taps: ``stem`` -> ``stage1..4`` (the reference's feature points: after its
block groups 1, 2, 4 and 6) -> ``head`` (the 1x1 conv) -> ``embedding`` -> ``fc``.
"""

from __future__ import annotations

from torch import nn

from kdrun.models.cifar_common import conv_bn_relu, image_shape, init_weights, pooled_embedding, rename

# (expansion or None for the model's, width, blocks, stride of the first block, stage) per group.
GROUPS = (
    (1, 16, 1, 1, 1),
    (None, 24, 2, 1, 1),
    (None, 32, 3, 2, 2),
    (None, 64, 4, 2, 3),
    (None, 96, 3, 1, 3),
    (None, 160, 3, 2, 4),
    (None, 320, 1, 1, 4),
)
LAST_WIDTH = 1280


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.layers = nn.Sequential(
            conv_bn_relu(in_channels, hidden),
            conv_bn_relu(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float = 0.5, expansion: int = 6):
        super().__init__()
        channels = int(32 * width)
        self.stem = conv_bn_relu(in_channels, channels, 3, stride=2)
        stages: dict[int, list[nn.Module]] = {}
        # Where each of the reference's (group, block) went: stage and index in it.
        self._reference_place: dict[tuple[int, int], tuple[int, int]] = {}
        for group, (group_expansion, group_width, blocks, stride, stage) in enumerate(GROUPS):
            out_channels = int(group_width * width)
            for block in range(blocks):
                stage_blocks = stages.setdefault(stage, [])
                self._reference_place[(group, block)] = (stage, len(stage_blocks))
                stage_blocks.append(
                    InvertedResidual(channels, out_channels, stride if block == 0 else 1, group_expansion or expansion)
                )
                channels = out_channels
        for stage, blocks in stages.items():
            self.add_module(f"stage{stage}", nn.Sequential(*blocks))
        last_width = int(LAST_WIDTH * width) if width > 1.0 else LAST_WIDTH
        self.head = conv_bn_relu(channels, last_width)
        self.embedding = pooled_embedding()
        self.fc = nn.Linear(last_width, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.fc(self.embedding(self.head(x)))

    # The reference's block conv is one flat Sequential: conv, BN, ReLU, conv, BN, ReLU, conv, BN.
    _LAYER_IN_BLOCK = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}

    def reference_key(self, key: str) -> str:
        """RepDistiller: conv1.{0,1}, blocks.{group}.{block}.conv.{layer}, conv2.{0,1}, classifier.0."""
        parts = key.split(".")
        if parts[0] == "blocks" and parts[3:4] == ["conv"] and len(parts) > 5 and parts[4] in self._LAYER_IN_BLOCK:
            place = self._reference_place.get((int(parts[1]), int(parts[2])))
            if place is not None:
                stage, index = place
                return ".".join([f"stage{stage}", str(index), "layers", self._LAYER_IN_BLOCK[parts[4]], *parts[5:]])
        return rename(key, [(r"^conv1\.", "stem."), (r"^conv2\.", "head."), (r"^classifier\.0\.", "fc.")])


def mobilenetv2(num_classes: int, input_shape, width: float = 0.5, expansion: int = 6) -> CifarMobileNetV2:
    """The CRD paper's "MobileNetV2": RepDistiller's ``mobile_half`` (width 0.5, expansion 6)."""
    in_channels, _, _ = image_shape("mobilenetv2", input_shape)
    return CifarMobileNetV2(num_classes, in_channels, width, expansion)
