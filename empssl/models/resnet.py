"""The ResNet-18 backbone (docs/method.md section 3), with the CIFAR stem or the ImageNet stem.

The backbone has exactly the module and parameter names of ``torchvision.models.resnet18``
without ``fc`` (conv1, bn1, layer1..layer4 of BasicBlocks with conv1/bn1/conv2/bn2/downsample.0/1),
so torchvision checkpoints load with ``strict=True``. It is written out here rather than built
from torchvision because torchvision's ResNet hard-codes 64 base channels and the width
multiplier (small CPU runs, ablations) needs another value.
"""

from __future__ import annotations

import torch
from torch import nn

ARCHS = ("resnet18-cifar", "resnet18-imagenet")


_RESNET18_BLOCKS_PER_STAGE = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with a residual; 1x1 conv + BN on the skip when the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Backbone(nn.Module):
    """ResNet-18 without ``fc``: images (N, 3, H, W) -> features (N, feature_dim).

    ``resnet18-imagenet`` keeps torchvision's stem (7x7 stride-2 conv, 3x3 stride-2 max-pool);
    ``resnet18-cifar`` uses a 3x3 stride-1 conv and no max-pool (``maxpool`` is an Identity,
    which has no parameters, so the state_dict names are unchanged). ``width`` scales every
    stage: base channels ``round(64 * width)``, feature_dim ``8 * base`` (512 at width 1).
    """

    def __init__(self, arch: str = "resnet18-cifar", width: float = 1.0):
        super().__init__()
        _check_arch_and_width(arch, width)
        base = max(1, round(64 * width))
        self.arch = arch
        self.base_channels = base
        self.feature_dim = 8 * base

        if arch == "resnet18-imagenet":
            self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, base, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)

        in_channels = base
        for stage, num_blocks in enumerate(_RESNET18_BLOCKS_PER_STAGE):
            channels = base * 2**stage
            first_stride = 1 if stage == 0 else 2
            blocks = []
            for index in range(num_blocks):
                blocks.append(BasicBlock(in_channels, channels, first_stride if index == 0 else 1))
                in_channels = channels
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

        # torchvision's initialisation, so a fresh backbone starts from the same distribution.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _check_arch_and_width(arch, width) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"width must be a number, got {type(width).__name__}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
