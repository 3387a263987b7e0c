"""The examples still work: a user model named package.module:factory, and the API script."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dscompress.cli.main import cli
from dscompress.pipeline import recipe

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_custom_model_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    out = tmp_path / "net-ds"
    result = CliRunner().invoke(
        cli, ["convert", "custom_model:make_net", "--num-classes", "10", "--input-size", "3,16,16", "--json", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    layers = [layer["name"] for layer in json.loads(result.stdout)["layers"]]
    assert layers == ["features.1.0", "features.2.0", "features.3.0"]  # the RGB stem is skipped
    evaluated = CliRunner().invoke(cli, ["evaluate", str(out), "--data", "digits", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert recipe.load(os.path.join(EXAMPLES, "custom_model.yaml")).model["name"] == "custom_model:make_net"


@pytest.mark.slow
def test_api_script_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(EXAMPLES), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "pipeline.py"), "--out", str(tmp_path), "--epochs", "1", "--size", "8", "--macs-budget", "0.5"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation pass" in result.stdout
    assert "| planned-distilled |" in result.stdout and "| planned |" in result.stdout
    assert (tmp_path / "report.png").exists()
