"""The scores (torchmetrics objects) against a plain count of the same thing, over several batches."""

import pytest
import torch

from dscompress.nn.metrics import IGNORE_INDEX, in_percent, task_metrics


def reference_segmentation(logits: list[torch.Tensor], masks: list[torch.Tensor], classes: int) -> dict:
    """mIoU over the classes in the targets or the predictions, pixel accuracy, IoU per class (percent)."""
    predicted, target = torch.cat([x.argmax(1) for x in logits]).flatten(), torch.cat(masks).flatten()
    scored = target != IGNORE_INDEX
    predicted, target = predicted[scored], target[scored]
    iou = []
    for c in range(classes):
        union = int(((predicted == c) | (target == c)).sum())
        iou.append(100 * int(((predicted == c) & (target == c)).sum()) / union if union else None)
    present = [v for v in iou if v is not None]
    return {"miou": sum(present) / len(present), "pixel_acc": 100 * int((predicted == target).sum()) / len(target), "iou": iou}


def test_segmentation_scores_match_a_plain_count():
    """Random logits over three batches, a fifth of the pixels ignored; class 4 is predicted but
    never a target (IoU 0, in the mean), class 5 neither (no IoU, left out of the mean)."""
    classes, logits, masks = 6, [], []
    for n in (4, 3, 1):
        x = torch.randn(n, classes, 9, 7)
        x[:, 5] -= 100
        mask = torch.randint(0, 4, (n, 9, 7))
        mask[torch.rand(n, 9, 7) < 0.2] = IGNORE_INDEX
        logits.append(x), masks.append(mask)
    metrics = task_metrics("segmentation", classes)
    for x, mask in zip(logits, masks):
        metrics.update(x, mask)
    scores, expected = in_percent(metrics.compute()), reference_segmentation(logits, masks, classes)
    assert expected["iou"][4] == 0.0 and expected["iou"][5] is None  # the case is what it says
    assert scores["iou"][5] is None and scores["iou"][:5] == pytest.approx(expected["iou"][:5], abs=1e-4)
    assert scores["miou"] == pytest.approx(expected["miou"], abs=1e-4)
    assert scores["pixel_acc"] == pytest.approx(expected["pixel_acc"], abs=1e-4)


def test_classification_scores_match_a_plain_count():
    """Top-1/top-5 against each label's rank. The first batch is all right, so that top-1 and top-5
    start equal and must still part: torchmetrics shares one state among the metrics of a
    collection whose states are equal after the first update (its compute groups)."""
    classes = 12
    labels = [torch.randint(0, classes, (n,)) for n in (16, 40, 7)]
    logits = [torch.randn(len(y), classes) for y in labels]
    logits[0][torch.arange(16), labels[0]] += 100
    metrics = task_metrics("classification", classes)
    for x, y in zip(logits, labels):
        metrics.update(x, y)
    scores = in_percent(metrics.compute())
    x, y = torch.cat(logits), torch.cat(labels)
    rank = (x > x[torch.arange(len(y)), y][:, None]).sum(1)  # classes scored above the label's
    assert scores["top1"] == pytest.approx(100 * (rank == 0).float().mean().item(), abs=1e-4)
    assert scores["top5"] == pytest.approx(100 * (rank < 5).float().mean().item(), abs=1e-4)
    assert scores["top1"] < scores["top5"]


def test_scores_over_nothing_are_zero():
    with pytest.warns(UserWarning, match="before the ``update``"):
        scores = in_percent(task_metrics("segmentation", 3).compute())
    assert scores == {"miou": 0.0, "pixel_acc": 0.0, "iou": [None, None, None]}
