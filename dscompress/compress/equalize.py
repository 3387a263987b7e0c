"""Cross-layer equalization of the depthwise -> pointwise pairs that conversion makes (Nagel et al.
2019, "Data-Free Quantization"), so that INT8 loses less.

Inside a :class:`~dscompress.nn.layers.DepthwiseSeparableConv2d` nothing sits between the halves
(no bias, no norm, no activation), so scaling the depthwise filter ``k`` by ``1 / s_k`` and the
pointwise column ``k`` by ``s_k`` leaves the layer's function exactly as it was, in fp32. What
changes is how well 8 bits cover it: the depthwise outputs are one activation tensor quantized with
one scale, so a channel whose values span a hundredth of the largest one's gets a hundredth of the
grid. With ``s_k = sqrt(a_k / c_k)`` (``a_k`` the channel's range, ``c_k`` the largest weight of its
pointwise column), each channel's range and its column's weights meet at ``sqrt(a_k c_k)``: the
channels' ranges come together and no column grows past what its neighbours hold.

The ranges ``a_k`` are those of the depthwise outputs on calibration images (``--data``), or, with
no data, of the depthwise filters themselves (DFQ's data-free form).

With ``pairs`` (DFQ's own case), a conv ``A`` whose outputs feed one conv ``B`` alone, through at
most a BatchNorm and a ReLU, is equalized too: the BatchNorm is folded into ``A`` first
(:mod:`dscompress.compress.fold`: ``A`` gains a bias, the BatchNorm becomes an ``nn.Identity``),
then ``A``'s output channel ``i`` (filter and bias) is divided by ``s_i = sqrt(r_A_i / r_B_i)`` and
``B``'s input channel ``i`` multiplied by it (``r``: each channel's largest weight), so both meet at
``sqrt(r_A_i r_B_i)``. ``relu(x / s) = relu(x) / s`` for ``s > 0``, so the function is unchanged;
a ReLU6 (or any activation that clips or bends at a fixed value) does not commute with a scale,
and such pairs are left alone and listed. The weights' own ranges are used (data-free), one pass
in forward order (a conv that is ``B`` of one pair and ``A`` of the next is scaled by both).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from dscompress.compress.calibrate import fitting_batches
from dscompress.compress.fold import activation_kind, fold_batchnorm, foldable_norms, single_user
from dscompress.core.config import Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError
from dscompress.core.transform import TransformContext, register_transform
from dscompress.core.util import eval_mode, model_device
from dscompress.data.datasets import DataSpec
from dscompress.nn.graph import ModelGraph
from dscompress.nn.layers import DepthwiseSeparableConv2d, named_layers

# Ranges below this are treated as this (a dead channel is left alone rather than blown up).
FLOOR = 1e-8


@dataclass
class EqualizeConfig(StepConfig):
    """How to equalize."""

    STEP: ClassVar[str] = "equalize"

    data: str | None = option(None, "Dataset whose train split gives the depthwise outputs' ranges; none: the filters' own (data-free).",
                              metavar="SPEC")
    batches: int = option(4, "Batches of images that measure the ranges.")
    batch_size: int = option(32, "Images per batch.")
    seed: int = option(0, "Which images are drawn.")
    pairs: bool = option(False, "Also equalize each conv -> conv pair through at most a BatchNorm (folded first) and a ReLU (DFQ).")

    def check(self):
        if self.data is not None:
            self.data = str(DataSpec.parse(self.data))
        check_range("batches", self.batches, low=1)
        check_range("batch_size", self.batch_size, low=1)


@dataclass
class EqualizedLayer(Record):
    """One layer's pair, before and after: the spread is the largest channel range over the smallest
    (how many times coarser the smallest channel's grid is than it could be)."""

    name: str
    channels: int
    spread_before: float
    spread_after: float
    largest_scale: float
    smallest_scale: float


@dataclass
class EqualizedPair(Record):
    """One conv -> conv pair, before and after: ``spread_before`` is that of the producer's output
    channels' weight ranges, ``consumer_spread_before`` that of the consumer's input columns'; after,
    both are the same (``spread_after``). ``folded``: the BatchNorm folded into the producer."""

    producer: str
    consumer: str
    channels: int
    folded: str
    activation: str
    spread_before: float
    consumer_spread_before: float
    spread_after: float
    largest_scale: float
    smallest_scale: float


@dataclass
class EqualizeRecord(Record):
    """What :func:`equalize` did; ``skipped``: conv -> conv pairs left alone, with the reason."""

    config: dict
    ranges: str
    images: int
    layers: list[EqualizedLayer] = field(default_factory=list)
    pairs: list[EqualizedPair] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _spread(ranges: torch.Tensor) -> float:
    live = ranges[ranges > FLOOR]
    return round(float(live.max() / live.min()), 3) if len(live) else 1.0


@torch.no_grad()
def _output_ranges(model: nn.Module, layers: dict[str, DepthwiseSeparableConv2d], images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The largest |value| of each depthwise output channel over the images, per layer."""
    ranges: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):  # on the layer's input: its forward may not call the depthwise half (split_pays)
            seen = module.depthwise(args[0]).abs().amax(dim=(0, 2, 3))
            ranges[name] = torch.maximum(ranges[name], seen) if name in ranges else seen
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    device = model_device(model)
    try:
        with eval_mode(model):
            for batch in images:
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def find_pairs(graph: ModelGraph) -> tuple[list[tuple[str, str, str, str]], list[dict]]:
    """The conv -> conv pairs of the traced model, in forward order, as (producer, consumer,
    BatchNorm to fold or "", activation: ``relu`` or ``none``), and those an activation that does
    not commute with a scale blocks (``{"name": "A -> B", "reason": ...}``). Both convs are plain
    ``nn.Conv2d`` modules called once; the producer's output feeds nothing else."""
    graph_module = graph.graph_module
    pairs, skipped = [], []
    if graph_module is None:
        return pairs, skipped
    norms = foldable_norms(graph)

    def conv(node):
        return node is not None and node.op == "call_module" and type(graph_module.get_submodule(node.target)) is nn.Conv2d \
            and graph.calls.get(node.target) == 1

    for node in graph_module.graph.nodes:
        if not conv(node):
            continue
        norm, activation, blocked = "", "none", None
        follower = single_user(node)
        if follower is not None and norms.get(node.target) == follower.target:
            norm, follower = follower.target, single_user(follower)
        kind = activation_kind(graph_module, follower) if follower is not None else None
        if kind is not None:
            activation, blocked = ("relu", None) if kind == "relu" else (kind, kind)
            follower = single_user(follower)
        if not conv(follower):
            continue
        if blocked:
            skipped.append({"name": f"{node.target} -> {follower.target}",
                            "reason": f"{blocked} between them clips or bends at a fixed value: a channel scale does not pass through it"})
            continue
        pairs.append((node.target, follower.target, norm, activation))
    return pairs, skipped


def _input_ranges(conv: nn.Conv2d) -> torch.Tensor:
    """The largest |weight| of each input channel's column of ``conv`` (grouped: within its group)."""
    groups = conv.groups
    weight = conv.weight.view(groups, conv.out_channels // groups, conv.in_channels // groups, -1)
    return weight.abs().amax(dim=(1, 3)).flatten()


def _equalize_pair(model: nn.Module, producer: str, consumer: str, norm: str, activation: str) -> EqualizedPair:
    if norm:
        fold_batchnorm(model, producer, norm)
    first, second = model.get_submodule(producer), model.get_submodule(consumer)
    ranges, columns = first.weight.abs().flatten(1).amax(1), _input_ranges(second)
    live = (ranges > FLOOR) & (columns > FLOOR)
    scale = torch.where(live, (ranges.clamp_min(FLOOR) / columns.clamp_min(FLOOR)).sqrt(), torch.ones_like(ranges))
    first.weight.div_(scale.view(-1, 1, 1, 1))
    if first.bias is not None:
        first.bias.div_(scale)
    groups = second.groups
    second.weight.view(groups, second.out_channels // groups, second.in_channels // groups, -1).mul_(scale.view(groups, 1, -1, 1))
    return EqualizedPair(producer, consumer, len(scale), norm, activation, _spread(ranges), _spread(columns),
                         _spread(ranges / scale), round(float(scale.max()), 4), round(float(scale.min()), 4))


@torch.no_grad()
def equalize(model: nn.Module, config: EqualizeConfig | None = None, images: list[torch.Tensor] | None = None,
             input_size=None) -> tuple[nn.Module, EqualizeRecord]:
    """Return a copy of ``model`` with every depthwise-separable layer's halves equalized (and,
    with ``config.pairs``, every conv -> conv pair through a BatchNorm and a ReLU).

    Args:
        model: a converted model; its :class:`DepthwiseSeparableConv2d` layers are equalized.
        config: the policy (its ``data`` only says where ``images`` came from).
        images: batches (N, C, H, W) whose depthwise outputs give the ranges; None: the filters'.
        input_size: (C, H, W) the model is traced at to find the pairs (default: the images').

    The copy computes the same function in fp32 (to float rounding).
    """
    config = config or EqualizeConfig()
    model = copy.deepcopy(model).eval()
    layers = {name: m for name, m in named_layers(model) if isinstance(m, DepthwiseSeparableConv2d)}
    pairs, skipped = [], []
    if config.pairs:
        if input_size is None and not images:
            raise DscompressError("equalizing conv -> conv pairs traces the model: give its input size (or images)")
        pairs, skipped = find_pairs(ModelGraph(model, input_size or tuple(images[0].shape[1:])))
    if not layers and not pairs:
        raise DscompressError("nothing to equalize: the model has no depthwise-separable layer"
                              + (" and no conv -> conv pair through a BatchNorm and ReLU" if config.pairs else "; convert it first, or pass --pairs"))
    measured = _output_ranges(model, layers, images) if images and layers else {}
    record = EqualizeRecord(config.to_dict(), "activations" if images else "weights", sum(len(b) for b in images or []), skipped=skipped)
    for producer, consumer, norm, activation in pairs:
        record.pairs.append(_equalize_pair(model, producer, consumer, norm, activation))
    for name, layer in layers.items():
        depthwise, pointwise = layer.depthwise.weight, layer.pointwise.weight  # (C*r, 1, kh, kw), (out, C*r, 1, 1)
        ranges = measured.get(name)
        if ranges is None:  # not called by forward, or data-free
            ranges = depthwise.abs().flatten(1).amax(1)
        columns = pointwise.abs().amax(dim=(0, 2, 3))
        live = (ranges > FLOOR) & (columns > FLOOR)
        scale = torch.where(live, (ranges.clamp_min(FLOOR) / columns.clamp_min(FLOOR)).sqrt(), torch.ones_like(ranges))
        depthwise.div_(scale.view(-1, 1, 1, 1).to(depthwise.dtype))
        pointwise.mul_(scale.view(1, -1, 1, 1).to(pointwise.dtype))
        record.layers.append(EqualizedLayer(name, len(ranges), _spread(ranges), _spread(ranges / scale),
                                            round(float(scale.max()), 4), round(float(scale.min()), 4)))
    return model, record


@register_transform(EqualizeConfig)
def equalize_transform(model: nn.Module, config: EqualizeConfig, context: TransformContext) -> tuple[nn.Module, EqualizeRecord]:
    """Equalize each depthwise-separable layer's halves for INT8 (cross-layer equalization), leaving its fp32 function as it was."""
    images = None
    if config.data is not None:
        images = fitting_batches(model, config.data, context, config.batches, config.batch_size, config.seed)
    return equalize(model, config, images, context.input_size)

