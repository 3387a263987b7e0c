"""Training-free calibration: bring a converted model back towards its original on real data.

A converted layer is fitted to the original kernel alone (:mod:`dscompress.nn.decompose`). At rank 1
that fit is poor (one spatial filter per input channel; resnet18's fit errors are about 0.9) and
the errors of successive layers compound: a resnet18 at 99.7% top-1 on digits falls to 9.7%.
Calibration corrects the model from a few hundred real images, with no training:

1. **refit**: for each converted layer, in forward order, solve for the pointwise weights (and
   bias) by least squares so that the layer's output matches the original layer's output. The
   inputs are what the *converted* model feeds the layer, with every earlier layer already
   refitted; the targets are the original layer's outputs on the *original* model's inputs.
   Fitting sequentially like this lets each layer also absorb the error its predecessors left.
   The depthwise half is kept: with it fixed the problem is linear, so the fit is closed-form
   (one pass over the images per layer, no learning rate, nothing to tune but a ridge).
2. **bn**: re-estimate every BatchNorm's running statistics on the same images, for the
   activations the calibrated model really produces.

**Order.** The refit runs first, then the BatchNorm re-estimation (:data:`ORDER`). Measured with
``benchmarks/calibrate.py`` (rank-1 resnet18 on digits at 3x32x32, 512 calibration images, top-1
on the 360 test images; BENCHMARKS.md has every run): converted 9.7%, BN only 50.3%, refit only
99.2%, BN then refit 96.7%, refit then BN 99.2%, BN then refit then BN 95.3% (baseline 99.7%).

- BN first hurts (0.8 to 3.6 points below the refit alone in every run): the refit targets the
  original's *pre*-BatchNorm outputs, which the original statistics normalise correctly and
  statistics re-estimated for the unrefitted outputs do not; and every later layer is then
  refitted on inputs shaped by those wrong statistics.
- Re-estimating again at the end (BN, refit, BN) does not repair it (2 to 9 points below the
  refit alone): the sequential refit has compensated, layer by layer, for the statistics in
  place while it ran, and changing them afterwards undoes that.
- Refit then BN: the refit runs under the original's statistics, which suit outputs that match
  the original's, so the final re-estimation only moves what the low-rank layers still leave.
  Against the refit alone it is neutral: over six runs (three calibration seeds, two other
  ridges, a less-trained baseline) top-1 differed by at most 3 of 360 test images either way,
  on average not at all, while the output error against the original rose a little (0.04-0.06
  to 0.06-0.09). It stays on by default as the one placement that does not hurt; for the
  closest match to the original (the lowest output error) turn it off (``bn=False``).

BatchNorm re-estimation assumes the original's running statistics describe the calibration
images (the original was trained on such data). When they do not (an untrained model, other
preprocessing) it moves the model away from its original: calibrate with ``bn=False``
(``--no-bn``) then.

The original model is never modified, and :func:`calibrate` works on a deep copy of the model.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx
from torch import nn

from dscompress.core.config import ConfigError, Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError
from dscompress.core.transform import TransformContext, register_transform
from dscompress.core.util import QUIET, Progress, model_device, resolve_device
from dscompress.data.datasets import DataSpec, check_classes, load_dataset, make_loader
from dscompress.models.build import output_classes
from dscompress.nn.graph import ModelGraph, Stages
from dscompress.nn.layers import DepthwiseSeparableConv2d, LayerTracer, named_layers

# The order of the two corrections; see the module docstring for the measurement behind it.
ORDER = ("refit", "bn")


@dataclass
class CalibrateConfig(StepConfig):
    """How to calibrate."""

    STEP: ClassVar[str] = "calibrate"

    data: str | None = option(None, "Dataset whose train split supplies the images: digits, mnist:DIR, cifar10:DIR, ...", metavar="SPEC")
    batches: int = option(16, "Batches of calibration images.")
    batch_size: int = option(32, "Images per batch (at least 2 with --bn: BatchNorm needs a batch statistic).")
    bn: bool = option(True, "Re-estimate the BatchNorm running statistics after the refit.")
    refit: bool = option(True, "Refit every converted layer's pointwise weights (and bias) by least squares.")
    ridge: float = option(
        1e-3,
        "Pull of the refit towards the current weights, relative to the layer's mean input energy; keeps directions "
        "the data does not constrain as they were.",
    )
    seed: int = option(0, "Which images are drawn.")
    device: str = option("auto", "auto, cpu or cuda.")

    def check(self):
        if self.data is not None:
            self.data = str(DataSpec.parse(self.data))
        check_range("batches", self.batches, low=1)
        check_range("batch_size", self.batch_size, low=1)
        if self.bn and self.batch_size < 2:
            raise ConfigError("batch_size", "must be at least 2 to re-estimate BatchNorm (or pass --no-bn)")
        check_range("ridge", self.ridge, low=0)
        if not (self.bn or self.refit):
            raise ConfigError(None, "nothing to do: enable the BatchNorm re-estimation (--bn), the refit (--refit), or both")


@dataclass
class LayerCalibration(Record):
    """One converted layer: relative error of its output against the original layer's output.

    ``||y_converted - y_original|| / ||y_original||`` over all calibration images, each model fed
    its own activations (so the error includes what earlier layers pass on), before and after.
    """

    name: str
    error_before: float
    error_after: float
    refit: bool


@dataclass
class CalibrationRecord(Record):
    """What :func:`calibrate` did, measured on the calibration images.

    ``output_error_*`` is the relative error of the model's output (logits) against the
    original's; ``agreement_*`` the share (percent) of predictions where both pick the same class:
    of images for logits (N, classes), of pixels for segmentation logits (N, classes, H, W)
    (``agreement_over`` says which). Both are None for models whose output is not a single tensor.
    """

    config: dict
    images: int
    order: list[str]
    bn_reestimated: bool
    bn_layers: int
    layers: list[LayerCalibration]
    skipped: list[dict] = field(default_factory=list)
    output_error_before: float | None = None
    output_error_after: float | None = None
    agreement_before: float | None = None
    agreement_after: float | None = None
    seconds: float = 0.0
    agreement_over: str = "images"


# --- data ---------------------------------------------------------------------------------------


def calibration_batches(data, input_size, batches: int = 16, batch_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Up to ``batches`` seeded, shuffled batches (batch_size, *input_size) from the train split."""
    return _draw(load_dataset(data, input_size, split="train"), batches, batch_size, seed)


def _draw(dataset, batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    loader = make_loader(dataset, batch_size, shuffle=True, seed=seed)
    return [images for images, _ in itertools.islice(loader, batches)]


def fitting_batches(model: nn.Module, data: str, context: TransformContext, batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """:func:`calibration_batches` of ``data`` for ``model`` (what calibrate, plan and equalize fit
    on), after checking that the data fits the model: one clear line where it does not."""
    dataset = load_dataset(data, context.input_size, split="train")
    outputs = output_classes(model, context.input_size, context.task, context.label)
    check_classes(dataset, outputs, data_name=data, task=context.task, model_name=context.label)
    return _draw(dataset, batches, batch_size, seed)


def _images(batches, limit: int) -> list[torch.Tensor]:
    """The first ``limit`` image tensors (N, C, H, W) of a loader or list of batches."""
    out = []
    for batch in itertools.islice(batches, limit):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise DscompressError("calibration batches must be image tensors (N, C, H, W) or (images, labels) pairs")
        out.append(images)
    if not out:
        raise DscompressError("no calibration images: the data is empty")
    return out


# --- finding the layers -------------------------------------------------------------------------


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def converted_layers(model: nn.Module, original: nn.Module, kept: dict[str, list[int]] | None = None) -> tuple[list[str], list[dict]]:
    """Names of ``model``'s layers that calibration refits against ``original``, and those skipped.

    They are the converted layers (:class:`DepthwiseSeparableConv2d`, whose original is the
    ``nn.Conv2d`` of the same name and stride), and the pruned ones: dense convs (``groups=1``)
    and linears with fewer input or output channels than their original. A layer whose outputs
    were pruned is matched to the original's outputs it kept, ``kept[name]`` (channel indices of
    the original, as :class:`~dscompress.compress.prune.LayerChannels` records them).
    """
    kept = kept or {}
    names, skipped = [], []
    originals = dict(original.named_modules())
    for name, layer in named_layers(model):
        converted = isinstance(layer, DepthwiseSeparableConv2d)
        dense = (type(layer) is nn.Conv2d and layer.groups == 1) or type(layer) is nn.Linear
        if not (converted or dense):
            continue
        reference = originals.get(name)
        reason = None
        if converted and not isinstance(reference, nn.Conv2d):
            reason = "the original has no nn.Conv2d of this name"
        elif dense and type(reference) is not type(layer):
            continue  # added or changed by something else: not ours to refit
        elif dense and (_in_features(layer), _out_features(layer)) == (_in_features(reference), _out_features(reference)):
            continue  # not pruned: its weights are the original's
        elif isinstance(reference, nn.Conv2d) and tuple(reference.stride) != tuple(layer.stride):
            reason = f"stride {tuple(layer.stride)} differs from the original's {tuple(reference.stride)}"
        elif _out_features(layer) != len(kept.get(name, range(_out_features(reference)))):
            reason = f"{_out_features(layer)} outputs against the original's {_out_features(reference)}, and no record of which were kept"
        if reason:
            skipped.append({"name": name, "reason": reason})
        else:
            names.append(name)
    if not names and not skipped:
        raise DscompressError(
            "the model has no converted (depthwise-separable) or pruned layers, so there is nothing to calibrate; "
            "convert or prune it first (dscompress convert MODEL -o DIR)"
        )
    if not names:
        raise DscompressError(f"none of the model's converted or pruned layers matches its original: {skipped[0]['name']}: {skipped[0]['reason']}")
    return names, skipped


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has seen what it needs."""


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor, calls: int, what: str) -> list[torch.Tensor]:
    """Run ``model`` on ``x`` until ``module`` has run ``calls`` times; its inputs or outputs."""
    seen = []

    def pre(mod, args):
        seen.append(args[0])
        if len(seen) == calls:
            raise _Stop

    def post(mod, args, output):
        seen.append(output)
        if len(seen) == calls:
            raise _Stop

    handle = module.register_forward_pre_hook(pre) if what == "input" else module.register_forward_hook(post)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) in float64 (on the CPU where the device has no float64)."""
    if t.device.type == "mps":
        t = t.cpu()
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()


# --- the two corrections ------------------------------------------------------------------------


def _features(layer: nn.Module, layer_input: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The module whose weights the refit solves for, and the rows (P x D) it multiplies.

    A depthwise-separable layer: its pointwise conv, on the depthwise outputs. A dense conv: the
    conv, on the image patches its kernel sees (``unfold``, ordered as ``weight.reshape(out, -1)``).
    A linear layer: itself, on its inputs.
    """
    if isinstance(layer, DepthwiseSeparableConv2d):
        return layer.pointwise, _rows(layer.depthwise(layer_input))
    if isinstance(layer, nn.Linear):
        return layer, layer_input.reshape(-1, layer.in_features).double()
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = nn.functional.pad(layer_input, layer._reversed_padding_repeated_twice, mode=mode)
    patches = nn.functional.unfold(padded, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # (N, D, L)
    return layer, patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()


def _targets(y: torch.Tensor, out_channels: list[int] | None) -> torch.Tensor:
    rows = _rows(y) if y.dim() == 4 else y.reshape(-1, y.shape[-1]).double()
    return rows if out_channels is None else rows[:, out_channels]


@torch.no_grad()
def refit_layer(
    model: nn.Module, original: nn.Module, name: str, images: list[torch.Tensor], ridge: float = 1e-3, calls: int = 1,
    out_channels: list[int] | None = None,
) -> None:
    """Refit one layer's weights (and bias) in place by ridge least squares against the original's output.

    With Z (P x D) the features of every pixel of every image (:func:`_features`: for a converted
    layer its depthwise outputs, for a dense conv the patches its kernel sees, for a linear layer
    its inputs), on the model's own inputs, and Y (P x C_out) the original layer's outputs on the
    original model's inputs (only ``out_channels`` of them when the layer's outputs were pruned),
    the new weights W (C_out x D, plus a column for the bias) minimise
    ``||Z W^T - Y||^2 + lam * ||W - W0||^2`` with W0 the current weights and
    ``lam = ridge * mean(diag(Z^T Z))``: ``W^T = (Z^T Z + lam I)^-1 (Z^T Y + lam W0^T)``.
    Only the Gram matrices (D x D, D x C_out) are kept, in float64. For a pruned dense conv this
    is the channel-pruning reconstruction of He et al. 2017 (ThiNet's, with the weights refitted).
    """
    layer = model.get_submodule(name)
    target = original.get_submodule(name)
    device = (layer.pointwise if isinstance(layer, DepthwiseSeparableConv2d) else layer).weight.device

    def pairs():
        for x in images:
            x = x.to(device)
            yield from zip(_capture(model, layer, x, calls, "input"), _capture(original, target, x, calls, "output"))

    refit_from(layer, pairs(), ridge, out_channels, name)


@torch.no_grad()
def refit_from(layer: nn.Module, pairs, ridge: float = 1e-3, out_channels: list[int] | None = None, name: str = "the layer") -> None:
    """:func:`refit_layer` on given activations: ``pairs`` yields (the layer's input, the original
    layer's output) tensors, (N, C_in, H, W) and (N, C_out, H', W'), for instance kept from one
    forward pass and reused for every candidate form of the layer (the plan's damage pass)."""
    solved = layer.pointwise if isinstance(layer, DepthwiseSeparableConv2d) else layer
    has_bias = solved.bias is not None
    out = solved.weight.shape[0]
    features = solved.weight[0].numel()
    d = features + int(has_bias)
    device = solved.weight.device
    gram = torch.zeros(d, d, dtype=torch.float64, device="cpu" if device.type == "mps" else device)
    cross = torch.zeros(d, out, dtype=gram.dtype, device=gram.device)
    for layer_input, y in pairs:
        _, z = _features(layer, layer_input.to(device))
        y = _targets(y.to(device), out_channels)
        if z.shape[0] != y.shape[0]:
            raise RuntimeError(f"{name}: {z.shape[0]} output positions against the original's {y.shape[0]}")
        if has_bias:
            z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
        gram += z.T @ z
        cross += z.T @ y.to(gram)
    solve_refit(layer, gram, cross, ridge)


@torch.no_grad()
def solve_refit(layer: nn.Module, gram: torch.Tensor, cross: torch.Tensor, ridge: float = 1e-3) -> None:
    """The ridge solve of :func:`refit_layer` from its Gram matrices: ``gram`` = Z^T Z (D x D) and
    ``cross`` = Z^T Y (D x C_out) over the layer's features (:func:`_features`, with a last column
    of ones when the solved conv has a bias), in float64. The weights go into ``layer`` in place."""
    solved = layer.pointwise if isinstance(layer, DepthwiseSeparableConv2d) else layer
    has_bias = solved.bias is not None
    out = solved.weight.shape[0]
    features = solved.weight[0].numel()
    d = features + int(has_bias)
    if gram.shape != (d, d) or cross.shape != (d, out):
        raise RuntimeError(f"refit: Gram matrices {tuple(gram.shape)}, {tuple(cross.shape)} for a layer of {d} features and {out} outputs")
    current = solved.weight.detach().reshape(out, -1)
    if has_bias:
        current = torch.cat([current, solved.bias.detach()[:, None]], dim=1)
    current = current.T.to(gram)  # (D, C_out)
    lam = ridge * float(gram.diagonal()[:features].mean())
    a = (gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device)).cpu()
    b = (cross + lam * current).cpu()
    if lam > 0:
        solution = torch.linalg.solve(a, b)
    else:
        solution = torch.linalg.lstsq(a, b, driver="gelsd").solution
    solution = solution.T.to(solved.weight)  # (C_out, D)
    solved.weight.copy_(solution[:, :features].reshape(solved.weight.shape))
    if has_bias:
        solved.bias.copy_(solution[:, features])


@torch.no_grad()
def patch_grams(conv: nn.Conv2d, layer_input: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's Gram matrices of a dense conv's input patches P, with a last column of ones,
    against its output y: P^T P ((D+1) x (D+1)) and P^T Y ((D+1) x C_out), in float64. Summed over
    batches, :func:`form_grams` turns them into any pruned or depthwise-separable form's."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = nn.functional.pad(layer_input, conv._reversed_padding_repeated_twice, mode=mode)
    patches = nn.functional.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (N, D, L)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    patches = torch.cat([patches, torch.ones_like(patches[:, :1])], dim=1)
    targets = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    # products in the activations' float32 (3-4x faster than float64 here), one batch at a time, summed in float64
    return (patches.T @ patches).double(), (patches.T @ targets).double()


def form_grams(layer: nn.Module, gram: torch.Tensor, cross: torch.Tensor, inputs: list[int] | None,
                     outputs: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gram matrices :func:`~dscompress.compress.calibrate.solve_refit` wants for ``layer``,
    from those of the original conv's input patches P (with a last column of ones: (D+1) x (D+1)
    and (D+1) x C_out, patch index ``c * kh * kw + k``), on the input channels ``inputs`` and the
    output channels ``outputs`` kept (None: all).

    A dense conv's features are the kept channels' patches. A depthwise-separable layer's are its
    depthwise outputs Z = P B, where B (in * kh * kw x in * rank) is block-diagonal with the
    depthwise kernel of input channel c (kh * kw x rank) as block c; so Z^T Z = B^T (P^T P) B and
    Z^T Y = B^T (P^T Y). The column of ones is kept when the solved conv has a bias.
    """
    solved = layer.pointwise if isinstance(layer, DepthwiseSeparableConv2d) else layer
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    channels = range(gram.shape[0] // taps) if inputs is None else inputs
    rows = [c * taps + k for c in channels for k in range(taps)]
    if solved.bias is not None:
        rows.append(gram.shape[0] - 1)
    gram, cross = gram[rows][:, rows], cross[rows]
    if outputs is not None:
        cross = cross[:, outputs]
    if isinstance(layer, DepthwiseSeparableConv2d):
        count = len(channels)
        kernel = layer.depthwise.weight.detach().to(gram).reshape(count, -1, taps)  # (in, rank, taps)
        core = gram[: count * taps, : count * taps].reshape(count, taps, count, taps)
        # B^T G B and B^T C, with B block-diagonal: contracted block by block (in^2 taps^2 rank, not in^3 taps^2 rank)
        features = torch.einsum("cjk,ckdl,dml->cjdm", kernel, core, kernel).reshape(count * kernel.shape[1], -1)
        projected = torch.einsum("cjk,cko->cjo", kernel, cross[: count * taps].reshape(count, taps, -1)).reshape(features.shape[0], -1)
        if solved.bias is not None:
            ones = torch.einsum("cjk,ck->cj", kernel, gram[: count * taps, -1].reshape(count, taps)).reshape(-1, 1)
            features = torch.cat([torch.cat([features, ones], 1), torch.cat([ones.T, gram[-1:, -1:]], 1)], 0)
            projected = torch.cat([projected, cross[-1:]], 0)
        gram, cross = features, projected
    return gram, cross


def refit(model: nn.Module, original: nn.Module, names: list[str], images: list[torch.Tensor], ridge: float = 1e-3,
          calls: dict | None = None, progress: Progress = QUIET, kept: dict[str, list[int]] | None = None) -> None:
    """Refit the named layers in place, one after another in the given (forward) order."""
    kept = kept or {}
    progress.start("calibrate: refit layers", len(names))
    try:
        staged = _stages(model, original, names) if all((calls or {}).get(name, 1) == 1 for name in names) else None
        if staged is None:
            for name in names:
                refit_layer(model, original, name, images, ridge, (calls or {}).get(name, 1), kept.get(name))
                progress.advance(1, name)
            return
        # Each layer's inputs (on the model, its earlier layers refitted) and the original's
        # outputs, carried from one layer to the next: two forward passes in all, not one per layer.
        (ours, model_envs), (theirs, original_envs) = ((s, [s.start(x) for x in images]) for s in staged)
        for name in names:
            at, there = ours.position(name), theirs.position(name)
            model_envs = [ours.run(env, at) for env in model_envs]
            original_envs = [theirs.run(env, there + 1) for env in original_envs]
            inputs = [ours.value(env, ours.nodes[at].args[0]) for env in model_envs]
            outputs = [theirs.value(env, theirs.nodes[there]) for env in original_envs]
            refit_from(model.get_submodule(name), zip(inputs, outputs), ridge, kept.get(name), name)
            progress.advance(1, name)
    finally:
        progress.stop()


def _stages(model: nn.Module, original: nn.Module, names: list[str]) -> tuple[Stages, Stages] | None:
    """Staged runs of the model and its original (their traces share their modules: a layer
    refitted in place is refitted in the model), or None when fx cannot trace either or the
    layers are not called in the order given."""
    try:
        staged = tuple(Stages(torch.fx.GraphModule(m, LayerTracer().trace(m))) for m in (model, original))
        for stages in staged:
            positions = [stages.position(name) for name in names]
            if positions != sorted(positions):
                return None
        return staged
    except Exception:  # noqa: BLE001 - fx raises many kinds of errors, StopIteration a layer it does not call; the plain way works on any model
        return None


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: list[torch.Tensor]) -> int:
    """Recompute every BatchNorm's running mean and variance in place; returns how many.

    The statistics become the plain average over the batches (``momentum=None``), as
    :func:`torch.optim.swa_utils.update_bn` does; every other module stays in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = model_device(model)
    momenta = {m: m.momentum for m in norms}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in images:
            if len(x) > 1:
                model(x.to(device))
    finally:
        for m in norms:
            m.momentum = momenta[m]
            m.eval()
    return len(norms)


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Errors:
    """Relative errors of a model against its original on some images."""

    layers: dict[str, float]
    output: float | None
    agreement: float | None
    over: str = "images"


@torch.no_grad()
def measure(model: nn.Module, original: nn.Module, names: list[str], images: list[torch.Tensor], kept: dict[str, list[int]] | None = None) -> Errors:
    """Per-layer and output relative errors of ``model`` against ``original`` (both fed the images);
    a layer with pruned outputs is compared on the original's outputs it kept (``kept[name]``)."""
    kept = kept or {}
    device = model_device(model)
    sums = {n: [0.0, 0.0] for n in names}  # squared error, squared norm of the original's output
    out_sums = [0.0, 0.0]
    agree = total = 0
    outputs = {"model": {}, "original": {}}

    def hook(side, name):
        def keep(module, args, output):
            outputs[side].setdefault(name, []).append(output)

        return keep

    handles = [model.get_submodule(n).register_forward_hook(hook("model", n)) for n in names]
    handles += [original.get_submodule(n).register_forward_hook(hook("original", n)) for n in names]
    tensor_output = True
    over = "images"
    try:
        for x in images:
            outputs["model"].clear()
            outputs["original"].clear()
            x = x.to(device)
            y, y0 = model(x), original(x)
            for n in names:
                for a, b in zip(outputs["model"][n], outputs["original"][n]):
                    if n in kept:
                        b = b[:, kept[n]]
                    sums[n][0] += float((a.double() - b.double()).pow(2).sum())
                    sums[n][1] += float(b.double().pow(2).sum())
            if isinstance(y, torch.Tensor) and isinstance(y0, torch.Tensor) and y.shape == y0.shape:
                out_sums[0] += float((y.double() - y0.double()).pow(2).sum())
                out_sums[1] += float(y0.double().pow(2).sum())
                if y.dim() in (2, 4):  # (N, classes) or per pixel (N, classes, H, W)
                    same = y.argmax(1) == y0.argmax(1)
                    agree += int(same.sum())
                    total += same.numel()
                    over = "images" if y.dim() == 2 else "pixels"
            else:
                tensor_output = False
    finally:
        for h in handles:
            h.remove()
    layers = {n: math.sqrt(s[0] / s[1]) if s[1] > 0 else 0.0 for n, s in sums.items()}
    output = math.sqrt(out_sums[0] / out_sums[1]) if tensor_output and out_sums[1] > 0 else None
    agreement = 100.0 * agree / total if tensor_output and total else None
    return Errors(layers, output, agreement, over)


# --- the transform ------------------------------------------------------------------------------


def calibrate(
    model: nn.Module,
    original: nn.Module,
    batches,
    config: CalibrateConfig | None = None,
    device=None,
    order: tuple[str, ...] = ORDER,
    progress: Progress = QUIET,
    kept: dict[str, list[int]] | None = None,
    *,
    graph: ModelGraph | None = None,
) -> tuple[nn.Module, CalibrationRecord]:
    """Return a calibrated deep copy of ``model`` and the record of what was done.

    Args:
        model: a converted (with :class:`DepthwiseSeparableConv2d` layers) or pruned model.
        original: the model it was converted from; the target. Not modified.
        batches: a DataLoader or list of image batches (N, C, H, W), or (images, labels) pairs;
            the first ``config.batches`` are held in memory (16 x 32 images at 224x224 take
            about 300 MB).
        config: what to do; defaults to a BatchNorm re-estimation and a refit.
        device: where to compute (default: ``config.device``); the returned model lives there.
        order: the corrections in the order to run them, each ``"refit"`` or ``"bn"`` (one may
            repeat); those the config disables are left out. For experiments: the default
            :data:`ORDER` is the one measured best.
        progress: receives one step per refitted layer.
        kept: for layers whose outputs were pruned, the original's output channels they kept.
        graph: which layers forward calls, how often and in which order: ``model``'s
            :class:`~dscompress.nn.graph.ModelGraph`, or ``original``'s (converting and pruning
            keep the layers' names, calls and order); found now, at the calibration images' size,
            when not given.
    """
    config = config or CalibrateConfig()
    if not set(order) <= {"refit", "bn"}:
        raise ValueError(f"order may only name 'refit' and 'bn', got {order}")
    start = time.perf_counter()
    device = resolve_device(config.device) if device is None else torch.device(device)
    images = _images(batches, config.batches)
    model = copy.deepcopy(model).to(device).eval()
    original = copy.deepcopy(original).to(device).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    kept = kept or {}
    names, skipped = converted_layers(model, original, kept)
    graph = graph or ModelGraph(model, tuple(images[0].shape[1:]))
    calls = graph.forward_order(names)
    skipped += [{"name": n, "reason": "not called by forward"} for n in names if n not in calls]
    layers = list(calls)  # in forward order

    before = measure(model, original, layers, images, kept)
    bn_layers = 0
    steps = [step for step in order if getattr(config, step)]
    for step in steps:
        if step == "refit":
            refit(model, original, layers, images, config.ridge, calls, progress, kept)
        else:
            bn_layers = reestimate_bn(model, images)
    after = measure(model, original, layers, images, kept)

    def rounded(v):
        return None if v is None else round(v, 6)

    record = CalibrationRecord(
        config=config.to_dict(),
        images=sum(len(x) for x in images),
        order=steps,
        bn_reestimated=bn_layers > 0,
        bn_layers=bn_layers,
        layers=[LayerCalibration(n, rounded(before.layers[n]), rounded(after.layers[n]), config.refit) for n in layers],
        skipped=skipped,
        output_error_before=rounded(before.output),
        output_error_after=rounded(after.output),
        agreement_before=rounded(before.agreement),
        agreement_after=rounded(after.agreement),
        agreement_over=after.over,
        seconds=round(time.perf_counter() - start, 3),
    )
    return model, record


@register_transform(CalibrateConfig)
def calibrate_transform(model: nn.Module, config: CalibrateConfig, context: TransformContext) -> tuple[nn.Module, CalibrationRecord]:
    """Refit a converted or pruned model to its original on real images, without training."""
    if context.original is None:
        raise DscompressError(
            f"{context.label!r} has no original model to calibrate against (calibration fits a converted model back to "
            f"the model it came from); convert it first: dscompress convert {context.label} -o DIR --calibrate DATA"
        )
    if config.data is None:
        raise DscompressError("calibration needs images: give a dataset with --data (e.g. --data digits)")
    images = fitting_batches(model, config.data, context, config.batches, config.batch_size, config.seed)
    model, record = calibrate(model, context.original(), images, config, progress=context.progress, kept=context.kept)
    return model.cpu(), record
