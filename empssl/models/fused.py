"""The folded encoder's convolutions with their epilogue in the same kernel, for evaluation on CUDA (docs/method.md
section 6): bias and ReLU (``conv -> relu``), or bias, a residual add and ReLU (``conv -> add -> relu``), as one
cuDNN fused operation (``torch.cudnn_convolution_relu``, ``torch.cudnn_convolution_add_relu``) instead of a
convolution and one or two passes over its output.

``fuse_conv_epilogues(network)`` rewrites the FX graph of ``network.features``: nothing here knows the backbone, so
it is generic over the encoder (one torch.fx cannot trace runs unfused, with a note). A BatchNorm-folded encoder
(``models.fold``) gives every convolution a bias and leaves the BatchNorms out of the way. Off CUDA (or for inputs
cuDNN does not take) the fused calls compute the same thing op by op.
"""

from __future__ import annotations

import operator
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn


def conv_bias_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation, groups: int
) -> torch.Tensor:
    """relu(conv2d(x, weight) + bias): one cuDNN kernel on CUDA."""
    if x.is_cuda and torch.backends.cudnn.is_available():
        return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))


def conv_bias_add_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    stride,
    padding,
    dilation,
    groups: int,
) -> torch.Tensor:
    """relu(conv2d(x, weight) + bias + residual): one cuDNN kernel on CUDA."""
    if x.is_cuda and torch.backends.cudnn.is_available():  # it lays out the residual as the output itself
        return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)
    return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)


fx.wrap("conv_bias_relu")
fx.wrap("conv_bias_add_relu")


class _Features(nn.Module):
    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.features(x)


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every convolution, Linear and BatchNorm a leaf, subclasses too (their forwards check
    shapes in Python, which tracing cannot follow; only exact nn.Conv2d is fused: a subclass may compute otherwise)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        leaves = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
        return isinstance(module, leaves) or super().is_leaf_module(module, qualified_name)


class FusedFeatures(nn.Module):
    """``features(x)`` of the rewritten graph (also its ``forward``); ``fused`` counts the fused convolutions."""

    def __init__(self, graph_module: nn.Module, fused: int):
        super().__init__()
        self.graph_module, self.fused = graph_module, fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)

    features = forward


def _is_relu(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _fusable_conv(node, modules) -> Optional[nn.Conv2d]:
    """The Conv2d a node calls, if its result goes nowhere else and cuDNN's fused call takes its settings."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1:
        return None
    conv = modules[node.target]
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    return conv


def _is_add(node) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in (operator.add, torch.add) and not node.kwargs)
        or (node.op == "call_method" and node.target == "add" and not node.kwargs)
    )


def fuse_conv_epilogues(network: nn.Module) -> FusedFeatures:
    """A module whose ``features(x)`` is ``network.features(x)`` with every ``conv -> relu`` and ``conv -> add ->
    relu`` of its graph one fused call (``network`` itself is not changed; the result shares its parameters)."""
    root = _Features(network)
    try:
        graph_module = fx.GraphModule(root, _Tracer().trace(root))
    except Exception as err:  # noqa: BLE001 - any tracing failure means: nothing fused, the folded path as it is
        print(
            f"empssl: note: --fused-conv: torch.fx cannot trace the {type(network).__name__} "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); its convolutions run unfused",
            file=sys.stderr,
        )
        return FusedFeatures(root, 0)
    modules = dict(graph_module.named_modules())
    graph = graph_module.graph
    for node in list(graph.nodes):  # a folded BatchNorm is an Identity: out of the way of the patterns
        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    fused = 0
    for relu in list(graph.nodes):
        if not _is_relu(relu, modules) or len(relu.args) != 1:
            continue
        source, residual = relu.args[0], None
        conv_node = source if _fusable_conv(source, modules) is not None else None
        if conv_node is None and _is_add(source) and len(source.users) == 1 and len(source.args) == 2:
            for mine, other in (source.args, source.args[::-1]):
                if _fusable_conv(mine, modules) is not None:
                    conv_node, residual = mine, other
                    break
        if conv_node is None:
            continue
        conv = modules[conv_node.target]
        with graph.inserting_before(relu):
            weight = graph.get_attr(f"{conv_node.target}.weight")
            bias = graph.get_attr(f"{conv_node.target}.bias") if conv.bias is not None else None
            settings = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
            if residual is None:
                call = graph.call_function(conv_bias_relu, (conv_node.args[0], weight, bias, *settings))
            else:
                call = graph.call_function(conv_bias_add_relu, (conv_node.args[0], weight, bias, residual, *settings))
        relu.replace_all_uses_with(call)
        graph.erase_node(relu)
        if residual is not None:
            graph.erase_node(source)
        graph.erase_node(conv_node)
        fused += 1
    graph.lint()
    graph_module.recompile()
    return FusedFeatures(graph_module, fused)
