"""BatchNorm folded into the conv before it, in PyTorch, and the chains of modules between convs
that the INT8 transforms (equalization, bias correction) read from the model's fx trace.

Folding ``conv -> BatchNorm`` (eval mode: running statistics) gives a conv with a bias,
``W' = W * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``, and puts an
``nn.Identity`` where the BatchNorm was: the same function (to float rounding), and the weights
the exported ONNX graph will hold as they are, so that a transform which reasons about the
quantized weights sees exactly what ONNX Runtime's quantizer will see (the exporter would
otherwise fold the BatchNorm itself, with its own rounding).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from dscompress.nn.graph import ModelGraph
from dscompress.nn.layers import DepthwiseSeparableConv2d

# Activations that commute with a positive per-channel scale: relu(x / s) = relu(x) / s for s > 0.
POSITIVE_HOMOGENEOUS = (nn.ReLU,)
POSITIVE_HOMOGENEOUS_FUNCTIONS = (torch.relu, F.relu, torch.relu_)
# Activations that clip or bend at a fixed value, so that a scale does not commute with them.
NOT_HOMOGENEOUS = (nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish)
NOT_HOMOGENEOUS_FUNCTIONS = (F.relu6, F.hardtanh, F.silu, F.gelu, F.hardswish, torch.sigmoid, torch.tanh, F.leaky_relu, F.elu)


def _module(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return graph_module.get_submodule(node.target) if node.op == "call_module" else None


def single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def activation_kind(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """``relu`` (commutes with a positive scale), the name of an activation that does not, or None
    for a node that is no activation."""
    module = _module(graph_module, node)
    if module is not None:
        if type(module) in POSITIVE_HOMOGENEOUS:
            return "relu"
        return type(module).__name__ if isinstance(module, NOT_HOMOGENEOUS) else None
    if node.op == "call_function":
        if node.target in POSITIVE_HOMOGENEOUS_FUNCTIONS:
            return "relu"
        if node.target in NOT_HOMOGENEOUS_FUNCTIONS:
            return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def foldable_norms(graph: ModelGraph) -> dict[str, str]:
    """``{conv: BatchNorm}`` for each ``nn.Conv2d`` called once whose output feeds only a
    ``BatchNorm2d`` with running statistics, itself called once (empty without an fx trace). A
    depthwise-separable layer's BatchNorm is its pointwise half's (``layer.pointwise``)."""
    graph_module = graph.graph_module
    if graph_module is None:
        return {}
    pairs = {}
    for node in graph_module.graph.nodes:
        module = _module(graph_module, node)
        if type(module) not in (nn.Conv2d, DepthwiseSeparableConv2d) or graph.calls.get(node.target) != 1:
            continue
        user = single_user(node)
        norm = _module(graph_module, user) if user is not None else None
        if isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats and norm.running_var is not None and graph.calls.get(user.target) == 1:
            pairs[node.target + (".pointwise" if isinstance(module, DepthwiseSeparableConv2d) else "")] = user.target
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, conv_name: str, norm_name: str) -> nn.Conv2d:
    """Fold the BatchNorm ``norm_name`` into the conv ``conv_name`` of ``model`` (in place): the
    conv becomes a new one with a bias, the BatchNorm an ``nn.Identity``. Returns the new conv."""
    conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                       conv.groups, bias=True, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    factor = (norm.weight if norm.affine else torch.ones_like(norm.running_var)) / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    folded.weight.copy_(conv.weight * factor.view(-1, 1, 1, 1))
    folded.bias.copy_((bias - norm.running_mean) * factor + shift)
    folded.train(conv.training)
    model.set_submodule(conv_name, folded)
    model.set_submodule(norm_name, nn.Identity())
    return folded


def fold_batchnorms(model: nn.Module, graph: ModelGraph, convs=None) -> dict[str, str]:
    """Fold every :func:`foldable_norms` pair of ``model`` (of the convs whose name ``convs``
    accepts, when given) in place; returns ``{conv: BatchNorm}`` of those folded."""
    pairs = {c: n for c, n in foldable_norms(graph).items() if convs is None or convs(c)}
    for conv, norm in pairs.items():
        fold_batchnorm(model, conv, norm)
    return pairs
