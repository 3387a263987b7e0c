"""Torch-Pruning adapter: a depthwise-separable layer as one prunable unit.

Torch-Pruning only recognises depthwise convs with ``groups == in_channels == out_channels``;
the depthwise half of a rank-r :class:`~dscompress.nn.layers.DepthwiseSeparableConv2d` has
``out_channels = in_channels * r`` and would be treated as an ordinary grouped conv, breaking the
link between input channel j and its r filters ``j*r .. j*r+r-1``. :class:`DepthwiseSeparablePruner`
prunes the layer as the conv it replaced, and :func:`plain_group` shows the importance estimators
its two convs so that their weights count.

:func:`plain_group` builds Torch-Pruning group items (``tp.dependency.Node``, ``tp.Dependency``,
``tp._helpers.GroupItem``), which are not public API: their signatures are those of Torch-Pruning
1.5 and 1.6, hence the upper bound on the version in ``pyproject.toml``.
"""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from dscompress.nn.layers import DepthwiseSeparableConv2d

IMPORTANCES = ("magnitude", "taylor", "bn", "lamp")


class DepthwiseSeparablePruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning handler that prunes a :class:`DepthwiseSeparableConv2d` as one layer.

    Its channels are those of the conv it replaced: removing output channel o removes row o of
    the pointwise weight (pointwise: (out, in * rank, 1, 1)); removing input channel j removes
    the depthwise filters ``j*rank .. j*rank+rank-1`` (depthwise: (in * rank, 1, kh, kw)) and the
    matching pointwise columns, and sets the depthwise ``in_channels = groups = in`` and
    ``out_channels = in * rank``. Inputs and outputs are independent (like a dense conv), so
    ``prune_in_channels`` is not ``prune_out_channels``.
    """

    TARGET_MODULES = (DepthwiseSeparableConv2d,)

    def prune_out_channels(self, layer: DepthwiseSeparableConv2d, idxs) -> DepthwiseSeparableConv2d:
        tp.prune_conv_out_channels(layer.pointwise, list(idxs))
        return layer

    def prune_in_channels(self, layer: DepthwiseSeparableConv2d, idxs) -> DepthwiseSeparableConv2d:
        rank = layer.rank
        removed = set(int(i) for i in idxs)
        kept = [j for j in range(layer.in_channels) if j not in removed]
        kept_filters = [j * rank + t for j in kept for t in range(rank)]
        depthwise, pointwise = layer.depthwise, layer.pointwise
        depthwise.weight = self._prune_parameter_and_grad(depthwise.weight, kept_filters, 0)
        if depthwise.bias is not None:
            depthwise.bias = self._prune_parameter_and_grad(depthwise.bias, kept_filters, 0)
        depthwise.in_channels = depthwise.groups = len(kept)
        depthwise.out_channels = len(kept) * rank
        pointwise.weight = self._prune_parameter_and_grad(pointwise.weight, kept_filters, 1)
        pointwise.in_channels = len(kept) * rank
        return layer

    def get_out_channels(self, layer: DepthwiseSeparableConv2d) -> int:
        return layer.pointwise.out_channels

    def get_in_channels(self, layer: DepthwiseSeparableConv2d) -> int:
        return layer.depthwise.in_channels


DS_PRUNER = DepthwiseSeparablePruner()


def _item(module: nn.Module, handler, idxs: list[int], root_idxs: list) -> tp._helpers.GroupItem:
    node = tp.dependency.Node(module, grad_fn=None)
    item = tp._helpers.GroupItem(dep=tp.Dependency(handler, handler, source=node, target=node), idxs=idxs)
    item.root_idxs = root_idxs
    return item


def plain_group(group) -> list:
    """The items of a Torch-Pruning group, with depthwise-separable layers shown as their convs.

    Torch-Pruning's importance estimators score only standard layers (conv, linear, norms). An
    output-channel item of a depthwise-separable layer becomes one on its pointwise conv; an
    input-channel item (channel j) becomes the pointwise columns and the depthwise filters
    ``j*rank .. j*rank+rank-1``, each attributed to root channel j. Those come last, because
    the estimators size their result by the first scored item.
    """
    items, expanded = [], []
    for item in group:
        layer = item.dep.target.module
        if not isinstance(layer, DepthwiseSeparableConv2d):
            items.append(item)
        elif item.dep.handler == DS_PRUNER.prune_out_channels:
            items.append(_item(layer.pointwise, tp.prune_conv_out_channels, list(item.idxs), item.root_idxs))
        else:
            rank = layer.rank
            pairs = sorted(zip(item.idxs, item.root_idxs), key=lambda pair: pair[0])
            filters = [j * rank + t for j, _ in pairs for t in range(rank)]
            roots = [root for _, root in pairs for _ in range(rank)]
            expanded.append(_item(layer.pointwise, tp.prune_conv_in_channels, filters, roots))
            expanded.append(_item(layer.depthwise, tp.prune_conv_out_channels, list(filters), list(roots)))
    return items + expanded


class SeesDepthwiseSeparable(tp.importance.Importance):
    """Wraps a Torch-Pruning importance so that depthwise-separable layers' weights count."""

    def __init__(self, inner: tp.importance.Importance):
        self.inner = inner

    def __call__(self, group):
        return self.inner(plain_group(group))


def make_importance(name: str) -> tp.importance.Importance:
    inner = {
        "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "bn": lambda: tp.importance.BNScaleImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
    }[name]()
    return SeesDepthwiseSeparable(inner)
