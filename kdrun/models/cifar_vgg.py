"""VGG with batch norm for CIFAR as in the CRD paper's code (RepDistiller ``models/vgg.py``, ``vgg*_bn``).

Five groups of 3x3 conv-BN-ReLU layers (convs with bias), 2x2 max-pooling between groups, no FC
layers but the classifier. Taps: ``stem`` (group 0) -> ``stage1..4`` (pool, then the group; post-ReLU
outputs as the reference's features) -> ``embedding`` -> ``fc``. On 32x32 inputs the last pool is
skipped, so ``stage4`` works on 4x4 maps as in the reference (which pools there for 64x64 inputs only).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

from torch import nn

from kdrun.models.cifar_common import StagedNet, image_shape, init_weights, pooled_embedding

# Widths of the convs of each group (the reference's configurations S, A, B, D, E).
VGG_GROUPS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def conv_group(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


class CifarVGG(StagedNet):
    def __init__(self, groups, num_classes: int, in_channels: int, height: int):
        super().__init__()
        self.stem = conv_group(in_channels, groups[0])
        for index in range(1, len(groups)):
            last = index == len(groups) - 1
            pool = nn.Identity() if last and height < 64 else nn.MaxPool2d(2)
            layers = conv_group(groups[index - 1][-1], groups[index])
            self.add_module(f"stage{index}", nn.Sequential(OrderedDict(pool=pool, layers=layers)))
        self.num_stages = len(groups) - 1
        self.embedding = pooled_embedding()
        self.fc = nn.Linear(groups[-1][-1], num_classes)
        init_weights(self)

    # RepDistiller: block0..4.{i} (conv, BN; the ReLUs hold no weights, so indices agree), classifier.
    REFERENCE_RULES = [
        (r"^block0\.", "stem."),
        (r"^block(\d)\.", r"stage\1.layers."),
        (r"^classifier\.", "fc."),
    ]



def cifar_vgg(name: str, num_classes: int, input_shape) -> CifarVGG:
    in_channels, height, _ = image_shape(name, input_shape)
    return CifarVGG(VGG_GROUPS[name], num_classes, in_channels, height)


vgg8 = partial(cifar_vgg, "vgg8")
vgg11 = partial(cifar_vgg, "vgg11")
vgg13 = partial(cifar_vgg, "vgg13")
vgg16 = partial(cifar_vgg, "vgg16")
vgg19 = partial(cifar_vgg, "vgg19")
