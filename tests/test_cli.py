import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import error_line

from dscompress.cli.main import cli
from dscompress.core.util import human


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def test_convert_prints_table_and_totals(tmp_path):
    """The table and totals show the record's numbers (the wording is render's golden test's)."""
    out = tmp_path / "r18"
    result = run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads(run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--json", "-o", tmp_path / "j").stdout)
    assert all(layer["name"] in result.output for layer in record["layers"])
    for key in ("params", "macs"):
        assert f"{human(record[key + '_before'])} -> {human(record[key + '_after'])}" in result.output
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
    def convert(name, *extra):
        result = run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--json", "-o", tmp_path / name, *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    energy = convert("energy", "--energy", "0.5")
    assert all(layer["fit_error"] ** 2 <= 0.5 + 1e-6 and 1 <= layer["rank"] <= layer["full_rank"] for layer in energy["layers"])
    budget = convert("budget", "--macs-budget", "0.25")
    assert budget["converted_macs_after"] <= 0.25 * budget["converted_macs_before"]
    assert max(layer["rank"] for layer in budget["layers"]) > 1  # the budget buys more than rank 1 somewhere
    rf = convert("rf", "--dilation", "rf")  # resnet18's only kernel over 3x3 is the RGB stem, which is skipped
    assert all(layer["kernel_after"] == [3, 3] and layer["dilation_after"] == [1, 1] for layer in rf["layers"])
    dilated = convert("dilated", "--dilation", "2", "--include", "layer4")
    assert {layer["name"] for layer in dilated["layers"]} == {"layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"}
    assert all(layer["dilation_after"] == [2, 2] and layer["function_changed"] for layer in dilated["layers"])


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """What the bad inputs below refer to: artifacts (good and damaged), a file, user factories."""
    root = tmp_path_factory.mktemp("bad")
    art = root / "art"
    assert run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "-o", art).exit_code == 0
    for name, damage in [("short-original", "truncate"), ("text-version", "version"), ("null-model", "model")]:
        shutil.copytree(art, root / name)
        if damage == "truncate":
            original = root / name / "original.safetensors"
            os.truncate(original, os.path.getsize(original) // 2)
        else:
            manifest = json.loads((root / name / "manifest.json").read_text())
            manifest.update({"format_version": "1"} if damage == "version" else {"model": None})
            (root / name / "manifest.json").write_text(json.dumps(manifest))
    (root / "afile").write_text("not a folder")
    (root / "badfactories.py").write_text(
        "import urllib.error\n"
        "def needs_args(model_name):\n    raise AssertionError('never built')\n"
        "def downloads(num_classes=10):\n    raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')\n"
        "def segmenter(num_classes=10):\n"
        "    import torch\n"
        "    class Seg(torch.nn.Module):\n"
        "        def __init__(self):\n            super().__init__()\n            self.conv = torch.nn.Conv2d(3, num_classes, 3, padding=1)\n"
        "        def forward(self, x):\n            return {'out': self.conv(x)}\n"
        "    return Seg()\n"
    )
    return root


R18 = ["--num-classes", "10", "--input-size", "3,32,32"]
# (arguments, the key facts the one line must name: the bad value, the option).
# Every one exits with status 2 and writes nothing.
BAD_INPUTS = [
    (["convert", "resnet81", "-o", "{out}"], ["'resnet81'"]),
    (["convert", "resnet18", "--include", "layer9", "-o", "{out}"], ["'layer9'"]),
    (["convert", "resnet18", "--rank", "two", "-o", "{out}"], ["--rank", "'two'"]),
    (["convert", "resnet18", "--input-size", "3,abc", "-o", "{out}"], ["--input-size", "'3,abc'"]),
    (["convert", "resnet18", "--input-size", "3,32", "-o", "{out}"], ["--input-size", "'3,32'"]),
    (["convert", "resnet18", "--input-size", "1,32,32", "-o", "{out}"], ["1,32,32", "3 channels"]),
    (["convert", "resnet18", "--checkpoint", "/nonexistent.pt", "-o", "{out}"], ["'/nonexistent.pt'"]),
    (["convert", "/nonexistent-dir/", "-o", "{out}"], ["/nonexistent-dir/"]),
    (["convert", "mobilenet_v2", *R18, "-o", "{out}"], ["nothing to convert", "mobilenet_v2"]),
    (["convert", "resnet18", *R18, "-o", "/proc/x"], ["'/proc/x'"]),
    (["convert", "resnet18", *R18, "-o", "{root}/afile/x"], ["/afile/x'", "is a file"]),
    (["convert", "badfactories:needs_args", "-o", "{out}"], ["badfactories:needs_args", "TypeError"]),
    (["convert", "badfactories:downloads", *R18, "-o", "{out}"], ["badfactories:downloads", "URLError"]),
    (["prune", "{root}/short-original", "--ratio", "0.5", "-o", "{out}"], ["original.safetensors"]),
    (["evaluate", "{root}/text-version", "--data", "digits"], ["'format_version'"]),
    (["evaluate", "{root}/null-model", "--data", "digits"], ["'model'"]),
    (["evaluate", "{root}/art", "--data", "digits", "--batch-size", "0"], ["--batch-size"]),
    (["evaluate", "{root}/art", "--data", "digits", "--workers", "-1"], ["--workers"]),
    (["evaluate", "resnet18", "--input-size", "3,16,16", "--data", "digits"], ["10 classes", "1000 outputs"]),
    (["evaluate", "{root}/art", "--data", "cifar10:{root}"], ["cifar-10-batches-py"]),
    (["export", "{root}/art", "--input-size", "3,64,64", "-o", "{out}.onnx"], ["3,32,32", "--input-size"]),
    (["export", "{root}/art", "-o", "/proc/x.onnx"], ["'/proc/x.onnx'"]),
    (["report", "/nonexistent"], ["'/nonexistent'"]),
    (["report", "{root}/afile"], ["/afile", "is a file"]),
    (["bench", "{root}/art", "--batch-sizes", "1,x"], ["--batch-sizes", "'x'"]),
    (["prune", "{root}/art", "--ratio", "1.5", "-o", "{out}"], ["--ratio", "1.5"]),
    (["calibrate", "{root}/art", "--data", "digits", "--batch-size", "1", "-o", "{out}"], ["--batch-size"]),
    (["finetune", "{root}/art", "--data", "digits", "--epochs", "0", "-o", "{out}"], ["--epochs"]),
    (["convert", "resnet18", "--trace", "jit", "-o", "{out}"], ["--trace", "'jit'"]),
    (["convert", "resnet18", "--frobnicate", "-o", "{out}"], ["'--frobnicate'"]),
]


@pytest.mark.parametrize("args,facts", BAD_INPUTS, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_one_line_and_exit_2(args, facts, bad_inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(bad_inputs))
    out = tmp_path / "x"
    line = error_line(CliRunner().invoke(cli, [a.format(root=bad_inputs, out=out) for a in args]))
    assert all(fact in line for fact in facts), line
    assert not os.path.exists(out) and not os.path.exists(f"{out}.onnx")
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # nothing half-written


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "r18"
    args = ["convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "-o", out]
    assert run(*args).exit_code == 0
    line = error_line(CliRunner().invoke(cli, [str(a) for a in args]))
    assert str(out) in line and "--force" in line
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


def test_disk_full_during_convert_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import dscompress.artifact.format

    def full(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(dscompress.artifact.format, "save_file", full)
    line = error_line(CliRunner().invoke(cli, ["convert", "resnet18", *R18, "-o", str(tmp_path / "x")]))
    assert "no space left" in line and str(tmp_path / "x") in line
    assert os.listdir(tmp_path) == []


def test_random_weights_and_factories_from_the_current_folder(tmp_path):
    """The console script imports package.module:factory from the folder it runs in, as python -m does."""
    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    script = os.path.join(os.path.dirname(sys.executable), "dscompress")
    done = subprocess.run([script, "convert", "custom_model:make_net", "--num-classes", "10", "--input-size", "3,16,16", "-o", str(tmp_path / "net")],
                          cwd=examples, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "custom_model:make_net" in done.stderr and "random weights" in done.stderr
    assert os.path.isfile(tmp_path / "net" / "manifest.json")


def test_googlenet_checkpoint_with_auxiliary_heads_loads(tmp_path):
    import torch
    import torchvision

    trained = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=True)  # as torchvision trains it
    torch.save(trained.state_dict(), tmp_path / "googlenet.pt")
    result = CliRunner().invoke(cli, ["convert", "googlenet", *R18, "--checkpoint", str(tmp_path / "googlenet.pt"), "-o", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert "dropped" in result.stderr and "aux1." in result.stderr
