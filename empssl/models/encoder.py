"""The EMP-SSL encoder (docs/method.md section 3): a backbone (``empssl.models.backbones``: the built-in ResNet-18,
a torchvision or a timm model), then the projector built on the backbone's feature size."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..checks import check_positive_int
from ..device import check_fits
from .backbones import build_backbone, parse_backbone_args


class EMPSSLEncoder(nn.Module):
    """Backbone -> ``pre_feature`` (Linear, BN, ReLU) -> ``projection`` (Linear, BN, ReLU, Linear) -> unit-norm z.

    ``forward(x)`` returns z (N, z_dim) with unit-norm rows; ``forward(x, return_features=True)``
    returns (z, features) where features (N, hidden_dim) is the ``pre_feature`` output that
    evaluation uses; ``features(x)`` returns only that.

    ``arch``, ``width``, ``stem`` and ``backbone_args`` choose the backbone (``empssl.models.backbones``); the
    built-in ResNet-18's parameters keep torchvision's resnet18 names under ``backbone.``, a torchvision or timm
    model's keep its library's names there.
    """

    def __init__(
        self,
        arch: str = "resnet18-cifar",
        width: float = 1.0,
        hidden_dim: int = 4096,
        z_dim: int = 1024,
        stem: str = "default",
        backbone_args=None,
    ):
        super().__init__()
        check_positive_int(hidden_dim, "hidden_dim")
        check_positive_int(z_dim, "z_dim")
        built = build_backbone(arch, width, stem, backbone_args)
        self.backbone = built.module
        self.arch, self.width, self.stem = arch, width, stem
        self.backbone_args = parse_backbone_args(backbone_args)
        self.source, self.feature_dim, self.removed_head = built.source, built.feature_dim, built.removed_head
        self.hidden_dim = hidden_dim
        self.z_dim = z_dim
        self.pre_feature = nn.Sequential(
            nn.Linear(self.feature_dim, hidden_dim),
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
    arch: str = "resnet18-cifar",
    width: float = 1.0,
    hidden_dim: int = 4096,
    z_dim: int = 1024,
    stem: str = "default",
    backbone_args=None,
) -> EMPSSLEncoder:
    """The encoder of docs/method.md section 3 (defaults: the paper's CIFAR ResNet-18, 4096-d features, 1024-d z);
    ``arch`` also takes ``torchvision:NAME`` and ``timm:NAME`` (docs/training.md section 8)."""
    return EMPSSLEncoder(
        arch=arch, width=width, hidden_dim=hidden_dim, z_dim=z_dim, stem=stem, backbone_args=backbone_args
    )


def check_buildable(model_config: Dict[str, Any], device: torch.device) -> None:
    """ValueError, before anything is allocated, unless an encoder of ``model_config`` can be built and its weights
    fit in the memory left on ``device`` (built first on the meta device: an absurd --width is one line)."""
    try:
        with torch.device("meta"):
            skeleton = build_encoder(**model_config)
    except (RuntimeError, OverflowError, TypeError) as err:  # sizes no tensor can have
        raise ValueError(
            f"an encoder of {ckpt.describe_model(model_config)} cannot be built: its tensors are too large "
            f"({str(err).splitlines()[0]})"
        ) from None
    check_fits(
        sum(tensor.numel() * tensor.element_size() for tensor in skeleton.state_dict().values()),
        device,
        f"an encoder of {ckpt.describe_model(model_config)}",
        "lower --width, --hidden-dim or --z-dim",
    )


def _check_images(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (N, 3, H, W), got {tuple(x.shape)}")


torch.fx.wrap("_check_images")  # a call in a traced graph (models.fused), so it still checks the real inputs


def load_encoder(path: str, device: Optional[torch.device] = None):
    """(encoder, checkpoint dict): the encoder built from the checkpoint's architecture, its weights loaded."""
    payload = ckpt.load_checkpoint(path)
    model_config = payload["model_config"]
    try:  # first on the meta device (no memory): its tensors' shapes must be the checkpoint's before any is allocated
        fields = ckpt.model_config_of(model_config)
        with torch.device("meta"):
            skeleton = build_encoder(**fields)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ckpt.CheckpointError(
            f"checkpoint {path} has an unusable model_config {model_config!r}: {str(err).splitlines()[0]}"
        ) from None
    ckpt.check_state_shapes(path, "model", skeleton.state_dict(), payload["model"])
    encoder = build_encoder(**fields)
    ckpt.check_finite(path, payload["model"])
    ckpt.load_model_state(encoder, payload["model"], path)
    if device is not None:
        encoder = encoder.to(device)
    return encoder, payload
