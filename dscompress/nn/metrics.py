"""Parameters and MACs: the cost side of every comparison (size on disk is in the manifest), and
the segmentation scores (mean IoU, pixel accuracy) from a confusion matrix.

MACs come from PyTorch's own counter (:class:`torch.utils.flop_counter.FlopCounterMode`), which
counts convolutions and matrix products (as 2 FLOPs per multiply-accumulate); normalisation,
activations and pooling are not counted, as in most published MAC figures.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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


# --- segmentation ---------------------------------------------------------------------------------

IGNORE_INDEX = 255
"""The label of pixels that count for nothing (PASCAL VOC's object boundaries): no loss, no score."""


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class.

    ``predicted`` and ``target`` are class indices of the same shape (any, e.g. (N, H, W));
    pixels whose target is ``ignore_index`` are left out. A target outside ``[0, num_classes)``
    (other than ``ignore_index``) is an error: the data does not fit the model.
    """
    target = target.reshape(-1)
    predicted = predicted.reshape(-1)
    keep = target != ignore_index
    target, predicted = target[keep].long(), predicted[keep].long()
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = int(target.max()) if int(target.max()) >= num_classes else int(target.min())
        raise DscompressError(f"a target holds class {bad}, outside 0..{num_classes - 1} ({ignore_index} = ignore); the data does not fit the model")
    counts = torch.bincount(target * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion: torch.Tensor) -> dict:
    """Mean IoU and pixel accuracy (percent) from a confusion matrix (:func:`confusion_matrix`).

    Per class, IoU = true positives / (true positives + false positives + false negatives).
    ``miou`` is the mean over the classes that occur in the targets or the predictions (a class
    with an empty union has no IoU and is left out of the mean, rather than counted as 0 or 1);
    ``pixel_acc`` is the share of scored pixels predicted right. ``iou`` lists every class's IoU
    in percent (None where the union is empty).
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    iou = torch.where(present, true_positive / union.clamp(min=1), torch.zeros_like(union))
    total = float(confusion.sum())
    return {
        "miou": 100.0 * float(iou[present].mean()) if bool(present.any()) else 0.0,
        "pixel_acc": 100.0 * float(true_positive.sum()) / total if total else 0.0,
        "iou": [100.0 * float(v) if p else None for v, p in zip(iou, present)],
        "pixels": int(total),
    }
