"""Parameters and MACs: the cost side of every comparison (size on disk is in the manifest), and
the scores of a model's outputs (top-1/top-5, mean IoU, pixel accuracy) as torchmetrics objects,
which accumulate over batches and add up across torchrun processes.

MACs come from PyTorch's own counter (:class:`torch.utils.flop_counter.FlopCounterMode`), which
counts convolutions and matrix products (as 2 FLOPs per multiply-accumulate); normalisation,
activations and pooling are not counted, as in most published MAC figures.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from dscompress.core.errors import DscompressError


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def conv_macs(in_channels: int, out_channels: int, kernel: tuple[int, int], out_pixels: int, rank: int | None = None,
              groups: int = 1) -> int:
    """MACs per image of a KxK conv over ``out_pixels`` output pixels: dense (``rank`` None), or
    depthwise-separable at ``rank`` (``rank`` KxK depthwise filters per input channel, then a 1x1
    to ``out_channels``). Counted in closed form where a plan weighs options it has not built."""
    kh, kw = kernel
    if rank is None:
        return out_pixels * out_channels * (in_channels // groups) * kh * kw
    return out_pixels * in_channels * rank * (kh * kw + out_channels)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int], per_module: bool = False):
    """Multiply-accumulates of one forward pass on a single image of ``input_size`` (C, H, W).

    Returns the total, or with ``per_module=True`` a pair (total, {module name: MACs}) with
    names as in ``model.named_modules()`` (only modules that do counted work appear).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    total = counter.get_total_flops() // 2
    if not per_module:
        return total
    root = type(model).__name__
    by_module = {}
    for name, counts in counter.get_flop_counts().items():
        if name == root or not name.startswith(root + "."):
            continue
        by_module[name[len(root) + 1 :]] = sum(counts.values()) // 2
    return total, by_module


# --- scores -------------------------------------------------------------------------------------

IGNORE_INDEX = 255
"""The label of pixels that count for nothing (PASCAL VOC's object boundaries): no loss, no score."""


def task_metrics(task: str, classes: int) -> MetricCollection:
    """The scores of a ``task`` model's outputs as torchmetrics objects: ``update(logits, labels)``
    per batch, ``compute()`` once after the last (fractions, not percent; :func:`in_percent`).

    Classification, logits (N, classes) and labels (N,): ``top1`` and ``top5``, the share of images
    whose label is the top class or among the top five. Segmentation, logits (N, classes, H, W) and
    masks (N, H, W), pixels labelled :data:`IGNORE_INDEX` not scored: ``miou``, the mean IoU over
    the classes that occur in the targets or the predictions (a class with an empty union has no
    IoU and is left out of the mean rather than counted as 0 or 1: torchmetrics' macro average),
    ``iou`` per class (NaN where the union is empty) and ``pixel_acc``, the share of scored pixels
    predicted right. Under torchrun ``compute()`` adds up the counts of all processes.
    """
    # validate_args off: targets are checked by check_targets; torchmetrics' own checks run
    # torch.unique on every batch.
    if task == "segmentation":
        metrics = {
            "miou": MulticlassJaccardIndex(classes, average="macro", ignore_index=IGNORE_INDEX, validate_args=False),
            "iou": MulticlassJaccardIndex(classes, average="none", ignore_index=IGNORE_INDEX, validate_args=False,
                                          zero_division=math.nan),
            "pixel_acc": MulticlassAccuracy(classes, average="micro", ignore_index=IGNORE_INDEX, validate_args=False),
        }
    else:
        metrics = {
            "top1": MulticlassAccuracy(classes, top_k=1, average="micro", validate_args=False),
            "top5": MulticlassAccuracy(classes, top_k=min(5, classes), average="micro", validate_args=False),
        }
    return MetricCollection(metrics)


def in_percent(scores: dict) -> dict:
    """:func:`task_metrics`' ``compute()`` as floats in percent; ``iou`` a list with None for a
    class without IoU, and ``miou`` 0.0 when no pixel was scored (the macro average is then NaN)."""
    result = {name: 100.0 * float(value.nan_to_num(0.0)) for name, value in scores.items() if name != "iou"}
    if "iou" in scores:
        result["iou"] = [None if math.isnan(v) else 100.0 * v for v in scores["iou"].tolist()]
    return result


def check_targets(target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
    """Raise one line when a target (class indices, any shape) is outside ``[0, num_classes)``
    other than ``ignore_index``: the data does not fit the model."""
    target = target[target != ignore_index]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = int(target.max()) if int(target.max()) >= num_classes else int(target.min())
        raise DscompressError(f"a target holds class {bad}, outside 0..{num_classes - 1} ({ignore_index} = ignore); the data does not fit the model")
