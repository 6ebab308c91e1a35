"""The EMP-SSL encoder (docs/method.md section 3): a ResNet-18 backbone and the projector.

The backbone has exactly the module and parameter names of ``torchvision.models.resnet18``
without ``fc`` (conv1, bn1, layer1..layer4 of BasicBlocks with conv1/bn1/conv2/bn2/downsample.0/1),
so torchvision checkpoints load with ``strict=True``. It is written out here rather than built
from torchvision because torchvision's ResNet hard-codes 64 base channels and the width
multiplier (small CPU runs, ablations) needs another value.
"""
from __future__ import annotations

import copy
from typing import Tuple, Union

import torch
import torch.nn.functional as F
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


class EMPSSLEncoder(nn.Module):
    """Backbone -> ``pre_feature`` (Linear, BN, ReLU) -> ``projection`` (Linear, BN, ReLU, Linear) -> unit-norm z.

    ``forward(x)`` returns z (N, z_dim) with unit-norm rows; ``forward(x, return_features=True)``
    returns (z, features) where features (N, hidden_dim) is the ``pre_feature`` output that
    evaluation uses; ``features(x)`` returns only that.
    """

    def __init__(self, arch: str = "resnet18-cifar", width: float = 1.0, hidden_dim: int = 4096, z_dim: int = 1024):
        super().__init__()
        _check_positive_int("hidden_dim", hidden_dim)
        _check_positive_int("z_dim", z_dim)
        self.backbone = ResNet18Backbone(arch, width)
        self.hidden_dim = hidden_dim
        self.z_dim = z_dim
        self.pre_feature = nn.Sequential(
            nn.Linear(self.backbone.feature_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
        )
        self.projection = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, z_dim),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        return self.pre_feature(self.backbone(x))

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        features = self.features(x)
        z = F.normalize(self.projection(features), p=2, dim=1)
        return (z, features) if return_features else z


def build_encoder(
    arch: str = "resnet18-cifar", width: float = 1.0, hidden_dim: int = 4096, z_dim: int = 1024
) -> EMPSSLEncoder:
    """The encoder of docs/method.md section 3 (defaults: the paper's CIFAR ResNet-18, 4096-d features, 1024-d z)."""
    return EMPSSLEncoder(arch=arch, width=width, hidden_dim=hidden_dim, z_dim=z_dim)


def _check_arch_and_width(arch, width) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"width must be a number, got {type(width).__name__}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_images(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (N, 3, H, W), got {tuple(x.shape)}")


def _fold_pairs(encoder: EMPSSLEncoder):
    """(parent, layer name, BatchNorm name) of every conv/linear layer that a BatchNorm follows directly."""
    backbone = encoder.backbone
    yield backbone, "conv1", "bn1"
    for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        for block in stage:
            yield block, "conv1", "bn1"
            yield block, "conv2", "bn2"
            if block.downsample is not None:
                yield block.downsample, "0", "1"
    yield encoder.pre_feature, "0", "1"
    yield encoder.projection, "0", "1"


@torch.no_grad()
def fold_batchnorm(encoder: EMPSSLEncoder) -> EMPSSLEncoder:
    """A copy of ``encoder`` in eval mode in which every BatchNorm is folded into the layer before it.

    With y = W x + b and BN(y) = gamma (y - mean) / sqrt(var + eps) + beta (running statistics):
    W' = s W, b' = s (b - mean) + beta, s = gamma / sqrt(var + eps) (computed in float64). The copy
    computes the eval-mode encoder's outputs (to rounding) with no BatchNorm pass over the
    activations; the BatchNorms become Identity. ``encoder`` itself is not changed.
    """
    if not isinstance(encoder, EMPSSLEncoder):
        raise TypeError(f"fold_batchnorm needs an EMPSSLEncoder, got {type(encoder).__name__}")
    folded = copy.deepcopy(encoder).eval()
    for parent, layer_name, norm_name in _fold_pairs(folded):
        layer, norm = getattr(parent, layer_name), getattr(parent, norm_name)
        scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
        weight = layer.weight.double() * scale.reshape(-1, *([1] * (layer.weight.ndim - 1)))
        layer.weight.copy_(weight)  # in place: keeps the parameter's dtype and memory format
        layer.bias = torch.nn.Parameter(((bias - norm.running_mean.double()) * scale + norm.bias.double())
                                        .to(layer.weight.dtype), requires_grad=False)
        setattr(parent, norm_name, torch.nn.Identity())
    return folded.requires_grad_(False)
