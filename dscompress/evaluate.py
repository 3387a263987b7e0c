"""Accuracy on the test split of a dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dscompress._util import QUIET, Progress, eval_mode, resolve_device
from dscompress.config import Record, StepConfig, check_range, option
from dscompress.data import DataSpec, check_classes, load_dataset, make_loader


@dataclass
class EvaluateConfig(StepConfig):
    """What to evaluate on."""

    STEP: ClassVar[str] = "evaluate"

    data: str | None = option(None, "Dataset whose test split is evaluated: digits, mnist:DIR, cifar10:DIR, ...", metavar="SPEC")
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
    """Top-1 and top-5 accuracy in percent on ``images`` test images of ``data``."""

    data: str
    images: int
    top1: float
    top5: float
    loss: float


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


def evaluate(model: nn.Module, data: str, input_size, batch_size: int = 256, device: str = "auto", workers: int = 0,
             progress: Progress = QUIET) -> EvalRecord:
    """Evaluate ``model`` on the test split of the dataset ``data`` names."""
    config = EvaluateConfig(data=data, batch_size=batch_size, device=device, workers=workers)
    dataset = load_dataset(config.data, input_size, split="test")
    torch_device = resolve_device(config.device)
    model = model.to(torch_device)
    check_classes(dataset, model, input_size, data_name=config.data)
    result = accuracy(model, make_loader(dataset, config.batch_size, workers=config.workers), torch_device, progress)
    return EvalRecord(data=config.data, **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
