import json

import pytest
import torch
from click.testing import CliRunner
from conftest import error_line

from dscompress.artifact.format import Artifact
from dscompress.artifact.source import resolve
from dscompress.cli.main import cli
from dscompress.compress.convert import ConvertConfig
from dscompress.data.datasets import load_dataset, make_loader
from dscompress.pipeline.steps import convert_artifact
from dscompress.train.evaluate import accuracy, evaluate


class Oracle(torch.nn.Module):
    """Reads the label off the image: digits' test images are unique, so a lookup table works."""

    def __init__(self, data):
        super().__init__()
        self.keys = torch.stack([x.flatten() for x, _ in data])
        self.labels = torch.tensor([y for _, y in data])
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        index = torch.cdist(x.flatten(1), self.keys).argmin(dim=1)
        return torch.nn.functional.one_hot(self.labels[index], 10).float() + self.dummy


def test_accuracy_is_exact_for_an_oracle_and_chance_for_a_constant():
    data = load_dataset("digits", (1, 8, 8), "test")
    loader = make_loader(data, 100)
    assert accuracy(Oracle(data), loader)["top1"] == 100.0
    constant = Oracle(data)
    constant.labels.zero_()
    result = accuracy(constant, loader)
    assert result["top1"] == pytest.approx(100 * (data.labels == 0).float().mean().item())
    assert result["top5"] == pytest.approx(100 * (data.labels < 5).float().mean().item())  # ties break by index


def test_evaluate_stores_metrics_in_artifact(tmp_path):
    source = resolve("resnet18", num_classes=10, input_size=(3, 16, 16))
    artifact, _ = convert_artifact(source, str(tmp_path / "a"), ConvertConfig(rank=1))
    result = CliRunner().invoke(cli, ["evaluate", artifact.path, "--data", "digits", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    metrics = Artifact.open(artifact.path).metrics
    expected = evaluate(artifact.model(), "digits", (3, 16, 16))
    assert metrics["eval_images"] == printed["images"] == expected.images == 360
    assert metrics["top1"] == printed["top1"] == expected.top1 and metrics["top5"] == expected.top5
    assert evaluate(source.model, "digits", (3, 16, 16)).images == 360


def test_evaluate_class_mismatch_is_one_line():
    line = error_line(CliRunner().invoke(cli, ["evaluate", "resnet18", "--input-size", "3,16,16", "--data", "digits"]))
    assert "10 classes" in line and "1000 outputs" in line
