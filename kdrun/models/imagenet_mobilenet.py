"""MobileNetV1 (Howard et al. 2017) as the ImageNet distillation benchmarks use it: the student of
ResNet50 -> MobileNetV1 in the OFD, ReviewKD and DKD papers (mdistiller ``models/imagenet/mobilenetv1.py``).

Width 1.0: a stride-2 3x3 conv, 13 depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, each
with BN and ReLU), global average pooling and one linear layer; 4,231,976 parameters for 1,000
classes (the "4.23M" of the OFD code's README). Taps: ``stem`` -> ``stage1..4`` (mdistiller's
feature points: after blocks 3, 5, 11 and 13, where the map is 56, 28, 14 and 7 pixels wide on a
224 input) -> ``embedding`` (pooled, flat) -> ``fc``. The pooling is adaptive, so any
``(C, H, W)`` input works (the reference's ``AvgPool2d(7)`` fits 224 only). Weights start from
PyTorch's default initialisation, as the reference's do.
"""

from __future__ import annotations

from torch import nn

from kdrun.models.cifar_common import StagedNet, conv_bn_relu, image_shape, pooled_embedding

# Output width and stride of the depthwise-separable blocks, grouped by stage.
STAGES = (
    ((64, 1), (128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1)),
    ((1024, 2), (1024, 1)),
)
STEM_WIDTH = 32


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        conv_bn_relu(in_channels, in_channels, 3, stride=stride, groups=in_channels),
        conv_bn_relu(in_channels, out_channels),
    )


class MobileNetV1(StagedNet):
    num_stages = len(STAGES)

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0):
        super().__init__()
        channels = int(STEM_WIDTH * width)
        self.stem = conv_bn_relu(in_channels, channels, 3, stride=2)
        for index, blocks in enumerate(STAGES, start=1):
            layers = []
            for out_width, stride in blocks:
                layers.append(depthwise_separable(channels, int(out_width * width), stride))
                channels = int(out_width * width)
            self.add_module(f"stage{index}", nn.Sequential(*layers))
        self.embedding = pooled_embedding()
        self.fc = nn.Linear(channels, num_classes)
        # PyTorch's default initialisation, as mdistiller's model has (no init of its own).


def mobilenetv1(num_classes: int, input_shape, width: float = 1.0) -> MobileNetV1:
    """MobileNetV1 of the ImageNet benchmarks (``width`` multiplies every layer's channels)."""
    in_channels, _, _ = image_shape("mobilenetv1", input_shape)
    return MobileNetV1(num_classes, in_channels, width)
