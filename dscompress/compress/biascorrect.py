"""Bias correction of the expected error that INT8 weights add to each conv's output (empirical
bias correction, Nagel et al. 2019, "Data-Free Quantization").

ONNX Runtime's quantizer (``quantize_static``, per-channel, ``WeightSymmetric``) rounds each output
channel ``c`` of a conv weight to ``round(w / s_c)`` with ``s_c = max|w_c| / 127`` (``/ 64`` with
``reduce_range``: its 7-bit range is [-64, 64]), rounding half to even as numpy does;
:func:`quantized_weight` computes that grid exactly (float64 scale cast to float32, as ONNX
Runtime does), so that ``dW = W_q - W`` is the error the INT8 graph will have. Its expected effect
on the conv's output is ``dW * E[x]``; subtracting it from the bias removes the shift (not the
noise) that the rounding adds, channel by channel.

``E[x]`` is the mean input *map* (C, H, W) over calibration images, convolved with ``dW`` (the
conv's own padding, stride and groups) and averaged over the output positions: exact for the
mean output error, padding included (zeros at the borders are part of the map's convolution),
rather than the per-channel mean times the kernel's sum, which is wrong at the borders.

BatchNorms after convs are folded first (:mod:`dscompress.compress.fold`), since the exported
graph quantizes the folded weights; a conv without a bias gets one. Only the weights' error is
corrected: the activations' rounding is not modelled. The means are those of the fp32 model
(every conv's input before any correction), one forward pass per batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from dscompress.compress.calibrate import fitting_batches
from dscompress.compress.fold import fold_batchnorms
from dscompress.core.config import Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError
from dscompress.core.selection import check_pattern, matches_any
from dscompress.core.transform import TransformContext, register_transform
from dscompress.core.util import eval_mode, model_device
from dscompress.data.datasets import DataSpec
from dscompress.nn.graph import ModelGraph

# ONNX Runtime's symmetric signed 8-bit weight ranges (quant_utils: ONNX_INT_TYPE_SYMMETRIC_RANGE
# and, with reduce_range, ONNX_INT_TYPE_REDUCED_RANGE).
FULL_RANGE = (-127, 127)
REDUCED_RANGE = (-64, 64)


@dataclass
class BiasCorrectConfig(StepConfig):
    """How to correct the biases for INT8 weights."""

    STEP: ClassVar[str] = "bias-correct"

    data: str | None = option(None, "Dataset whose train split gives each conv's mean input.", metavar="SPEC")
    batches: int = option(4, "Batches of images that measure the means.")
    batch_size: int = option(32, "Images per batch.")
    seed: int = option(0, "Which images are drawn.")
    reduce_range: bool = option(False, "The weights get 7 bits ([-64, 64], ONNX Runtime's reduce_range) instead of 8 ([-127, 127]).")
    exclude: list[str] = option(factory=list, repeat=True, help="Leave convs matching this pattern as they are (those kept in float).")

    def check(self):
        if self.data is not None:
            self.data = str(DataSpec.parse(self.data))
        check_range("batches", self.batches, low=1)
        check_range("batch_size", self.batch_size, low=1)
        for pattern in self.exclude:
            check_pattern(pattern)


@dataclass
class CorrectedConv(Record):
    """One conv's correction: the largest and mean |shift| of its biases, and that of the biases
    themselves for scale. ``folded``: the BatchNorm folded into it first; ``added``: it had no bias."""

    name: str
    channels: int
    largest_shift: float
    mean_shift: float
    mean_bias: float
    folded: str = ""
    added: bool = False


@dataclass
class BiasCorrectRecord(Record):
    """What :func:`bias_correct` did: ``bits`` of the weight grid predicted, ``images`` the means were measured on."""

    config: dict
    bits: int
    images: int
    layers: list[CorrectedConv] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def quantized_weight(weight: torch.Tensor, reduce_range: bool = False) -> torch.Tensor:
    """``weight`` (out, ...) as ONNX Runtime's per-channel symmetric s8 quantizer leaves it,
    dequantized: ``round_half_even(w / s) * s`` per output channel, in float32."""
    qmin, qmax = REDUCED_RANGE if reduce_range else FULL_RANGE
    w = weight.detach().to(torch.float32)
    flat = w.flatten(1)
    low = flat.amin(1).clamp_max(0)
    high = flat.amax(1).clamp_min(0)
    absmax = torch.maximum(low.abs(), high)
    scale = ((absmax.double() * 2) / float(qmax - qmin)).to(torch.float32)  # float64 range over float64 steps, cast, as ORT
    scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.view(shape)).clamp(-128, 127)  # torch.round rounds half to even, as numpy
    return (q * scale.view(shape)).to(weight.dtype)


@torch.no_grad()
def _mean_inputs(model: nn.Module, convs: dict[str, nn.Conv2d], images: list[torch.Tensor]) -> tuple[dict, dict]:
    """The mean input map (C, H, W) of each conv over the images, and how often each was called per batch."""
    sums: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    shapes_differ: set[str] = set()

    def hook(name):
        def record(module, args):
            x = args[0].detach().double()
            calls[name] = calls.get(name, 0) + 1
            if name in sums and sums[name].shape != x.shape[1:]:
                shapes_differ.add(name)
            elif name not in shapes_differ:
                sums[name] = sums[name] + x.sum(0) if name in sums else x.sum(0)
        return record

    handles = [conv.register_forward_pre_hook(hook(name)) for name, conv in convs.items()]
    device = model_device(model)
    count = 0
    try:
        with eval_mode(model):
            for batch in images:
                model(batch.to(device))
                count += len(batch)
    finally:
        for handle in handles:
            handle.remove()
    means = {name: (total / count) for name, total in sums.items() if name not in shapes_differ}
    return means, {name: n / len(images) for name, n in calls.items()}


@torch.no_grad()
def bias_correct(model: nn.Module, config: BiasCorrectConfig | None = None, images: list[torch.Tensor] | None = None,
                 input_size=None) -> tuple[nn.Module, BiasCorrectRecord]:
    """Return a copy of ``model`` whose convs' biases absorb the mean error of their INT8 weights.

    Args:
        model: any model; its ``nn.Conv2d`` modules that forward calls once are corrected
            (BatchNorms after them folded first).
        config: the weights' bit width and the convs left alone (its ``data`` only says where ``images`` came from).
        images: batches (N, C, H, W) whose mean conv inputs are measured.
        input_size: (C, H, W) the model is traced at to find the BatchNorms (default: the images').

    In fp32 the copy computes the model's function plus the corrections; quantized by ONNX
    Runtime, its output's mean error is smaller.
    """
    config = config or BiasCorrectConfig()
    if not images:
        raise DscompressError("bias correction measures each conv's mean input on images: give --data SPEC (e.g. --data digits)")
    model = copy.deepcopy(model).eval()
    graph = ModelGraph(model, input_size or tuple(images[0].shape[1:]))
    folded = fold_batchnorms(model, graph, convs=lambda name: not matches_any(name, config.exclude))
    record = BiasCorrectRecord(config.to_dict(), 7 if config.reduce_range else 8, sum(len(b) for b in images))
    convs = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Conv2d:
            continue
        if matches_any(name, config.exclude):
            record.skipped.append({"name": name, "reason": "excluded by pattern"})
        else:
            convs[name] = module
    if not convs:
        raise DscompressError("nothing to correct: the model has no nn.Conv2d left to quantize")
    means, calls = _mean_inputs(model, convs, images)
    for name, conv in convs.items():
        if calls.get(name, 0) != 1 or name not in means:
            why = "not run by forward" if name not in calls else f"run {calls[name]:g} times per forward (one bias cannot serve each call)"
            record.skipped.append({"name": name, "reason": why})
            continue
        error = quantized_weight(conv.weight, config.reduce_range).double() - conv.weight.double()
        shift = conv._conv_forward(means[name][None], error, None).mean(dim=(0, 2, 3))
        added = conv.bias is None
        if added:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
        conv.bias.sub_(shift.to(conv.bias.dtype))
        record.layers.append(CorrectedConv(name, conv.out_channels, float(shift.abs().max()), float(shift.abs().mean()),
                                           float(conv.bias.abs().mean()), folded.get(name, ""), added))
    return model, record


@register_transform(BiasCorrectConfig)
def bias_correct_transform(model: nn.Module, config: BiasCorrectConfig, context: TransformContext) -> tuple[nn.Module, BiasCorrectRecord]:
    """Correct each conv's bias for the mean error its INT8 weights will add (empirical bias correction)."""
    if config.data is None:
        raise DscompressError("bias correction measures each conv's mean input on images: give --data SPEC (e.g. --data digits)")
    images = fitting_batches(model, config.data, context, config.batches, config.batch_size, config.seed)
    return bias_correct(model, config, images, context.input_size)
