import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dscompress.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def test_convert_prints_table_and_totals(tmp_path):
    out = tmp_path / "r18"
    result = run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "-o", out)
    assert result.exit_code == 0, result.output
    assert "layer1.0.conv1" in result.output and "fit error" in result.output
    assert "params: 11.18M -> 1.45M (0.13x of the original)" in result.output and "MACs:   37.02M -> 6.87M (0.19x" in result.output
    assert (out / "manifest.json").exists()


def test_convert_json(tmp_path):
    result = run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--rank", "full", "--json", "-o", tmp_path / "a")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    for key in ("params_before", "params_after", "macs_before", "macs_after", "layers", "skipped"):
        assert key in data
    assert all("name" in layer and "fit_error" in layer for layer in data["layers"])
    assert data["macs_after"] > data["macs_before"]  # full rank with K*K=9 costs more than it saves


def test_convert_energy_budget_and_dilation_options(tmp_path):
    for i, extra in enumerate([["--energy", "0.5"], ["--macs-budget", "0.25"], ["--dilation", "rf"], ["--dilation", "2", "--include", "layer4"]]):
        result = run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--json", "-o", tmp_path / str(i), *extra)
        assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {layer["name"] for layer in data["layers"]} == {"layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["convert", "resnet81", "-o", "x"], "unknown model 'resnet81'; did you mean"),
        (["convert", "resnet18", "--include", "layer9", "-o", "x"], "matches no conv layer"),
        (["convert", "resnet18", "--rank", "two", "-o", "x"], "rank must be"),
        (["convert", "resnet18", "--input-size", "3,abc", "-o", "x"], "--input-size"),
        (["convert", "resnet18", "--checkpoint", "/nonexistent.pt", "-o", "x"], "does not exist"),
        (["convert", "/nonexistent-dir/", "-o", "x"], "is not an artifact folder (no such folder)"),
        (["report", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "r18"
    args = ["convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "-o", out]
    assert run(*args).exit_code == 0
    again = CliRunner().invoke(cli, [str(a) for a in args])
    assert again.exit_code == 2 and "already exists" in again.output
    assert run(*args, "--force").exit_code == 0


def test_report_compares_artifacts(tmp_path):
    for rank in (1, 2):
        run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--rank", rank, "-o", tmp_path / f"rank{rank}")
    table = run("report", tmp_path / "rank1", tmp_path / "rank2")
    assert table.exit_code == 0 and "rank1" in table.output and "rank2" in table.output
    rows = json.loads(run("report", tmp_path, "--json").stdout)  # a folder of artifacts
    assert [r["name"] for r in rows] == ["rank1", "rank2"]
    assert rows[1]["macs_ratio"] > 1 and rows[1]["params"] > rows[0]["params"]
    markdown = run("report", tmp_path / "rank1", tmp_path / "rank2", "--markdown").output
    assert markdown.startswith("| artifact | last step |") and "| rank2 | convert (#1) |" in markdown


def test_models_lists_names():
    result = run("models")
    assert "resnet18" in result.output.split()


def test_python_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "dscompress", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "dscompress" in result.stdout
