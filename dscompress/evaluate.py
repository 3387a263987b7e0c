"""Accuracy on the test split of a dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dscompress.data import check_classes, load_dataset, make_loader
from dscompress.device import resolve_device


@dataclass
class EvalRecord:
    """Top-1 and top-5 accuracy in percent on ``images`` test images of ``data``."""

    data: str
    images: int
    top1: float
    top5: float
    loss: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def accuracy(model: nn.Module, loader, device: torch.device | str = "cpu") -> dict:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=-1).sum())
        total += len(labels)
    model.train(was_training)
    total = max(total, 1)
    return {"images": total, "top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss / total}


def evaluate(model: nn.Module, data: str, input_size, batch_size: int = 256, device: str = "auto", workers: int = 0) -> EvalRecord:
    """Evaluate ``model`` on the test split of the dataset ``data`` names."""
    dataset = load_dataset(data, input_size, split="test")
    torch_device = resolve_device(device)
    model = model.to(torch_device)
    check_classes(dataset, model, input_size, data_name=data)
    result = accuracy(model, make_loader(dataset, batch_size, workers=workers), torch_device)
    return EvalRecord(data=str(data), **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})


def evaluate_source(source, data: str, batch_size: int = 256, device: str = "auto", workers: int = 0) -> EvalRecord:
    """Evaluate a :class:`~dscompress.artifact.Source`; for an artifact, store the result in its metrics."""
    record = evaluate(source.model, data, source.spec.input_size, batch_size, device, workers)
    if source.artifact is not None:
        source.artifact.update_metrics(top1=record.top1, top5=record.top5, eval_data=record.data, eval_images=record.images)
    return record
