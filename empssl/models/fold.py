"""BatchNorm folded into the layer before it, for evaluation (docs/method.md section 6): the eval-mode encoder's
outputs without a BatchNorm pass over the activations.

The pairs are found, not listed: ``torch.fx`` traces the backbone and the head, and a pair is a convolution or
Linear module whose output goes only into a BatchNorm module (each called once, channels matching, running
statistics kept). A backbone without such pairs (a LayerNorm transformer) or one that torch.fx cannot trace runs as
it is, in eval mode (its BatchNorms, if any, normalise with their running statistics): the same outputs, unfolded.
"""

from __future__ import annotations

import collections
import copy
import sys
from typing import List, Tuple

import torch
from torch import nn

from ..distributed import SyncBatchNorm
from .encoder import EMPSSLEncoder

# exact types: a subclass may compute something else (timm's StdConv2d standardises its weight, BatchNormAct2d
# adds an activation), so folding into it or dropping it would change the outputs
FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, SyncBatchNorm)


_LEAVES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with every convolution, Linear and BatchNorm a leaf, subclasses too (timm's, empssl's
    SyncBatchNorm): their forwards check shapes in Python, which tracing cannot follow, and none is folded into."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _LEAVES) or super().is_leaf_module(module, qualified_name)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def fold_pairs(module: nn.Module) -> List[Tuple[str, str]]:
    """(layer, BatchNorm) module names of ``module`` in which the layer's output goes only into the BatchNorm, in
    the order of the forward. [] when there is none, or when torch.fx cannot trace ``module`` (then a note)."""
    norms = [m for m in module.modules() if type(m) in FOLDABLE_NORMS and m.running_mean is not None]
    if not norms:
        return []
    try:
        graph = _Tracer().trace(module)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no folding, the plain path
        print(
            f"empssl: note: the {type(module).__name__}'s BatchNorms are not folded for evaluation (torch.fx cannot "
            f"trace it: {str(err).splitlines()[0] if str(err) else type(err).__name__}); they run in eval mode",
            file=sys.stderr,
        )
        return []
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        norm, source = module.get_submodule(node.target), node.args[0]
        if type(norm) not in FOLDABLE_NORMS or norm.running_mean is None:
            continue
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        layer = module.get_submodule(source.target)
        if (
            type(layer) in FOLDABLE_LAYERS
            and calls[source.target] == 1
            and calls[node.target] == 1
            and _out_channels(layer) == norm.num_features
        ):
            pairs.append((source.target, node.target))
    return pairs


def encoder_fold_pairs(encoder: EMPSSLEncoder) -> List[Tuple[str, str]]:
    """``fold_pairs`` of the encoder's backbone, pre_feature and projection, under the encoder's module names."""
    return [
        (f"{part}.{layer}", f"{part}.{norm}")
        for part in ("backbone", "pre_feature", "projection")
        for layer, norm in fold_pairs(encoder.get_submodule(part))
    ]


@torch.no_grad()
def fold_batchnorm(encoder: EMPSSLEncoder) -> EMPSSLEncoder:
    """A copy of ``encoder`` in eval mode in which every BatchNorm of ``encoder_fold_pairs`` is folded into its layer.

    With y = W x + b and BN(y) = gamma (y - mean) / sqrt(var + eps) + beta (running statistics):
    W' = s W, b' = s (b - mean) + beta, s = gamma / sqrt(var + eps) (computed in float64). The copy
    computes the eval-mode encoder's outputs (to rounding) with no BatchNorm pass over the
    activations; the folded BatchNorms become Identity. ``encoder`` itself is not changed.
    """
    if not isinstance(encoder, EMPSSLEncoder):
        raise TypeError(f"fold_batchnorm needs an EMPSSLEncoder, got {type(encoder).__name__}")
    folded = copy.deepcopy(encoder).eval()
    for layer_name, norm_name in encoder_fold_pairs(folded):
        layer, norm = folded.get_submodule(layer_name), folded.get_submodule(norm_name)
        gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(norm.running_var.double())
        beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(gamma)
        scale = gamma / torch.sqrt(norm.running_var.double() + norm.eps)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
        weight = layer.weight.double() * scale.reshape(-1, *([1] * (layer.weight.ndim - 1)))
        layer.weight.copy_(weight)  # in place: keeps the parameter's dtype and memory format
        layer.bias = torch.nn.Parameter(
            ((bias - norm.running_mean.double()) * scale + beta).to(layer.weight.dtype), requires_grad=False
        )
        parent, _, child = norm_name.rpartition(".")
        setattr(folded.get_submodule(parent), child, torch.nn.Identity())
    return folded.requires_grad_(False)
