"""BatchNorm folded into the layer before it, for evaluation (docs/method.md section 6): the eval-mode encoder's
outputs without a BatchNorm pass over the activations."""

from __future__ import annotations

import copy

import torch

from .encoder import EMPSSLEncoder


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
        layer.bias = torch.nn.Parameter(
            ((bias - norm.running_mean.double()) * scale + norm.bias.double()).to(layer.weight.dtype),
            requires_grad=False,
        )
        setattr(parent, norm_name, torch.nn.Identity())
    return folded.requires_grad_(False)
