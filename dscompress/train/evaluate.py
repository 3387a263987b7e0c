"""Accuracy on the test split of a dataset: top-1/top-5 for classification, mean IoU and pixel
accuracy for segmentation (the model's recorded task decides)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dscompress.core.config import Record, StepConfig, check_range, option
from dscompress.core.util import QUIET, Progress, eval_mode, resolve_device
from dscompress.data.datasets import DataSpec, check_classes, load_dataset, make_loader, num_classes
from dscompress.models.build import output_classes
from dscompress.nn.metrics import IGNORE_INDEX, confusion_matrix, segmentation_scores


@dataclass
class EvaluateConfig(StepConfig):
    """What to evaluate on."""

    STEP: ClassVar[str] = "evaluate"

    data: str | None = option(None, "Dataset whose test split is evaluated: digits, mnist:DIR, cifar10:DIR, digits-seg, voc:DIR, ...", metavar="SPEC")
    batch_size: int = option(256, "Images per batch.")
    device: str = option("auto", "auto, cpu or cuda.")
    workers: int = option(0, "DataLoader worker processes.")

    def check(self):
        if self.data is not None:
            self.data = str(DataSpec.parse(self.data))
        check_range("batch_size", self.batch_size, low=1)
        check_range("workers", self.workers, low=0)


@dataclass
class EvalRecord(Record):
    """Scores in percent on ``images`` test images of ``data``, and the mean cross-entropy ``loss``.

    Classification: ``top1``, ``top5``. Segmentation: ``miou`` (mean over the classes present),
    ``pixel_acc``, ``iou`` per class (None for a class absent from both targets and predictions)
    and the number of scored ``pixels``; ``loss`` is then per pixel.
    """

    data: str
    images: int
    loss: float
    top1: float | None = None
    top5: float | None = None
    task: str = "classification"
    miou: float | None = None
    pixel_acc: float | None = None
    iou: list | None = None
    pixels: int | None = None

    def metrics(self) -> dict:
        """What an artifact's metrics keep of it."""
        keys = ("miou", "pixel_acc") if self.task == "segmentation" else ("top1", "top5")
        return {**{k: getattr(self, k) for k in keys}, "eval_data": self.data, "eval_images": self.images}


@torch.no_grad()
def accuracy(model: nn.Module, loader, device: torch.device | str = "cpu", progress: Progress = QUIET) -> dict:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``."""
    device = torch.device(device)
    correct1 = correct5 = total = 0
    loss = 0.0
    progress.start("evaluate", len(loader))
    with eval_mode(model):
        for images, labels in loader:
            progress.advance(1)
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(dim=-1).sum())
            total += len(labels)
    progress.stop()
    total = max(total, 1)
    return {"images": total, "top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss / total}


@torch.no_grad()
def segmentation_accuracy(model: nn.Module, loader, classes: int, device: torch.device | str = "cpu", progress: Progress = QUIET) -> dict:
    """Mean IoU and pixel accuracy (percent) of ``model`` over ``loader`` of (images, masks).

    Pixels labelled :data:`~dscompress.nn.metrics.IGNORE_INDEX` are not scored. Returns ``images``,
    ``miou``, ``pixel_acc``, ``iou`` (per class), ``pixels``, the mean per-pixel cross-entropy
    ``loss``, and the ``confusion`` matrix (rows: true class) the scores come from, so that
    processes can add theirs up (:func:`segmentation_scores` then scores the sum).
    """
    device = torch.device(device)
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    loss = 0.0
    images_seen = 0
    progress.start("evaluate", len(loader))
    with eval_mode(model):
        for images, masks in loader:
            progress.advance(1)
            images, masks = images.to(device), masks.to(device)
            logits = model(images)
            loss += float(nn.functional.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum"))
            confusion += confusion_matrix(logits.argmax(1), masks, classes)
            images_seen += len(images)
    progress.stop()
    scores = segmentation_scores(confusion)
    return {"images": images_seen, **scores, "loss": loss / max(scores["pixels"], 1), "confusion": confusion}


def task_scores(model: nn.Module, loader, task: str, classes: int, device: torch.device | str = "cpu", progress: Progress = QUIET) -> dict:
    """:func:`accuracy` for a classification model, :func:`segmentation_accuracy` for a segmentation one."""
    if task == "segmentation":
        return segmentation_accuracy(model, loader, classes, device, progress)
    return accuracy(model, loader, device, progress)


def evaluate(model: nn.Module, data: str, input_size, batch_size: int = 256, device: str = "auto", workers: int = 0,
             progress: Progress = QUIET, task: str = "classification", model_name: str = "the model") -> EvalRecord:
    """Evaluate ``model``, a ``task`` model, on the test split of the dataset ``data`` names
    (``model_name`` names it in errors)."""
    config = EvaluateConfig(data=data, batch_size=batch_size, device=device, workers=workers)
    dataset = load_dataset(config.data, input_size, split="test")
    torch_device = resolve_device(config.device)
    model = model.to(torch_device)
    outputs = output_classes(model, input_size, task, model_name)
    check_classes(dataset, outputs, data_name=config.data, task=task, model_name=model_name)
    loader = make_loader(dataset, config.batch_size, workers=config.workers)
    result = task_scores(model, loader, task, num_classes(dataset), torch_device, progress)
    result.pop("confusion", None)
    if result.get("iou") is not None:
        result["iou"] = [None if v is None else round(v, 4) for v in result["iou"]]
    return EvalRecord(data=config.data, task=task, **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
