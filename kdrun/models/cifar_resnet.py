"""CIFAR ResNets (depth 6n+2) as in the CRD paper's code (RepDistiller ``models/resnet.py``).

Parameter counts match the reference exactly; the modules are renamed to kdrun's tap names:
``stem`` -> ``stage1`` .. ``stage3`` -> ``embedding`` (pooled, flat features) -> ``fc``.
The stage outputs are the post-ReLU block outputs (the reference's ``f1..f3``, not its preact).
``reference_key`` maps the reference's state-dict keys to these names (its released teachers load).
"""

from functools import partial

from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.cifar_common import StagedNet, image_shape

RESNET_WIDTHS = (16, 16, 32, 64)
RESNET_X4_WIDTHS = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """Two 3x3 convs and a residual; the shortcut is a 1x1 conv + BN when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # Also projects when only the width changes (stride 1), as in resnet8x4's first stage 32 -> 64.
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Not in place: a hook may hold the block's output, which is the next block's input.
        return nn.functional.relu(out + self.shortcut(x))


class CifarResNet(StagedNet):
    def __init__(self, depth: int, widths: tuple, num_classes: int, in_channels: int):
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stage_in = widths[0]
        for index, width in enumerate(widths[1:], start=1):
            stride = 1 if index == 1 else 2
            blocks = [BasicBlock(stage_in, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"stage{index}", nn.Sequential(*blocks))
            stage_in = width
        self.num_stages = len(widths) - 1
        self.embedding = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[-1], num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # RepDistiller: conv1, bn1, layer{1..3}.{i}.(conv1|bn1|conv2|bn2|downsample.{0,1}), fc.
    REFERENCE_RULES = [
        (r"^conv1\.", "stem.0."),
        (r"^bn1\.", "stem.1."),
        (r"^layer(\d)\.(\d+)\.downsample\.", r"stage\1.\2.shortcut."),
        (r"^layer(\d)\.", r"stage\1."),
    ]



def cifar_resnet(name: str, depth: int, widths: tuple, num_classes: int, input_shape) -> CifarResNet:
    """A CIFAR ResNet of ``depth`` = 6n+2: stem width ``widths[0]``, stage widths ``widths[1:]``."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ConfigError(f"{name}: depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
    in_channels, _, _ = image_shape(name, input_shape)
    return CifarResNet(depth, tuple(widths), num_classes, in_channels)


# The family of the CRD paper's code; each is ``factory(num_classes, input_shape)``.
resnet8 = partial(cifar_resnet, "resnet8", 8, RESNET_WIDTHS)
resnet14 = partial(cifar_resnet, "resnet14", 14, RESNET_WIDTHS)
resnet20 = partial(cifar_resnet, "resnet20", 20, RESNET_WIDTHS)
resnet32 = partial(cifar_resnet, "resnet32", 32, RESNET_WIDTHS)
resnet44 = partial(cifar_resnet, "resnet44", 44, RESNET_WIDTHS)
resnet56 = partial(cifar_resnet, "resnet56", 56, RESNET_WIDTHS)
resnet110 = partial(cifar_resnet, "resnet110", 110, RESNET_WIDTHS)
resnet8x4 = partial(cifar_resnet, "resnet8x4", 8, RESNET_X4_WIDTHS)
resnet32x4 = partial(cifar_resnet, "resnet32x4", 32, RESNET_X4_WIDTHS)
