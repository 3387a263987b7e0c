"""Accuracy on the test split of a dataset: top-1/top-5 for classification, mean IoU and pixel
accuracy for segmentation (the model's recorded task decides)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torchmetrics.aggregation import SumMetric

from dscompress.core.config import Record, StepConfig, check_range, option
from dscompress.core.util import QUIET, Progress, eval_mode, resolve_device
from dscompress.data.datasets import DataSpec, check_classes, load_dataset, make_loader, num_classes
from dscompress.models.build import output_classes
from dscompress.nn.metrics import IGNORE_INDEX, check_targets, in_percent, task_metrics


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
def task_scores(model: nn.Module, loader, task: str, classes: int, device: torch.device | str = "cpu", progress: Progress = QUIET) -> dict:
    """Scores in percent (:func:`~dscompress.nn.metrics.task_metrics`) and mean cross-entropy of
    ``model``, a ``task`` model with ``classes`` outputs, over ``loader`` of (images, labels), or
    for segmentation (images, masks) whose :data:`~dscompress.nn.metrics.IGNORE_INDEX` pixels are
    not scored.

    Returns ``images``, ``top1`` and ``top5``, or ``miou``, ``pixel_acc``, ``iou`` (per class) and
    ``pixels`` (scored), and ``loss`` (per image, or per scored pixel). Under torchrun each process
    passes its own share of the data and gets the scores of all shares together: torchmetrics adds
    up the processes' counts (and the loss and image sums, kept in float64 so counts stay exact).
    """
    device = torch.device(device)
    segmentation = task == "segmentation"
    ignore_index = IGNORE_INDEX if segmentation else -100
    metrics = task_metrics(task, classes).to(device)
    loss, images_seen, scored = (SumMetric(nan_strategy="disable").set_dtype(torch.float64).to(device) for _ in range(3))
    progress.start("evaluate", len(loader))
    with eval_mode(model):
        for images, labels in loader:
            progress.advance(1)
            images, labels = images.to(device), labels.to(device)
            check_targets(labels, classes, ignore_index)
            logits = model(images)
            loss.update(nn.functional.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum"))
            metrics.update(logits, labels)
            images_seen.update(len(images))
            scored.update((labels != ignore_index).sum())
    progress.stop()
    counted = int(scored.compute())
    result = {"images": int(images_seen.compute()), **in_percent(metrics.compute()), "loss": float(loss.compute()) / max(counted, 1)}
    return {**result, "pixels": counted} if segmentation else result


def accuracy(model: nn.Module, loader, device: torch.device | str = "cpu", progress: Progress = QUIET) -> dict:
    """:func:`task_scores` of a classifier of the loader's dataset's classes: ``images``, top-1/top-5
    accuracy (percent) and the mean cross-entropy ``loss``."""
    return task_scores(model, loader, "classification", num_classes(loader.dataset), device, progress)


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
    if result.get("iou") is not None:
        result["iou"] = [None if v is None else round(v, 4) for v in result["iou"]]
    return EvalRecord(data=config.data, task=task, **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
