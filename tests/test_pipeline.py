"""The one real end-to-end run: the quickstart recipe at tiny settings, then reruns."""

import json
import os

import pytest
from click.testing import CliRunner

from dscompress.artifact.source import resolve
from dscompress.cli.main import cli
from dscompress.core.util import Progress
from dscompress.pipeline import recipe
from dscompress.pipeline.run import run
from dscompress.pipeline.steps import StepContext, run_step, work_folder
from dscompress.train.finetune import FinetuneConfig

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")
pytestmark = pytest.mark.slow  # every test here runs a whole pipeline

TINY = [
    "model.input_size=[3,8,8]",
    "finetune.epochs=1",
    "calibrate.batches=2",
    # the plan at a MAC budget (the latency plans are tested on a small model in test_plan.py)
    "plan.speedup=null",
    "plan.latency_input_size=null",
    "plan.macs_budget=0.5",
    "plan.batches=2",
    "plan.held_out=32",
    "bench.time_at=[3,16,16]",
    "validate.data_limit=64",
    "bench.batch_sizes=[1]",
    "bench.warmup=1",
    "bench.iters=3",
]

SMALL = """
model: {name: resnet18, num_classes: 10, input_size: [3, 8, 8]}
data: digits
steps:
  - finetune: {name: baseline, teacher: none, epochs: 1, lr: 0.05}
  - convert: {name: converted, rank: 1}
  - prune: {name: pruned, ratio: 0.3}
  - evaluate: {name: eval}
"""


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "quickstart"
    args = ["run", QUICKSTART, "-o", str(out)] + [a for s in TINY for a in ("--set", s)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return out, result


def step_kinds(folder) -> list[str]:
    return [s["step"] for s in json.load(open(folder / "manifest.json"))["steps"]]


def test_quickstart_runs_every_step(quickstart_run):
    out, result = quickstart_run
    assert result.exit_code == 0, result.output
    state = json.load(open(out / "run.json"))
    assert list(state["steps"]) == ["baseline", "converted", "calibrated", "planned", "planned-distilled", "onnx", "validated", "bench", "final-eval"]
    assert all(entry["status"] == "done" for entry in state["steps"].values())
    assert state["steps"]["validated"]["summary"]["validation"] == "pass"
    assert (out / "onnx" / "model.onnx").exists()
    # the plan starts from the baseline (from: baseline), not from the calibrated conversion before it,
    # and is distilled as it is (a plan is calibrated already)
    assert step_kinds(out / "planned") == ["finetune", "plan"]
    assert step_kinds(out / "planned-distilled") == ["finetune", "plan", "finetune"]
    assert (out / "planned" / "plan.json").exists()
    assert json.load(open(out / "planned-distilled" / "manifest.json"))["metrics"]["latency"]["input_size"] == [3, 16, 16]


def test_quickstart_report_and_plot(quickstart_run):
    out, _ = quickstart_run
    report = (out / "report.md").read_text()
    for name in ("baseline", "converted", "calibrated", "planned", "planned-distilled"):
        assert f"| {name} |" in report
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "report.png")).shape[2] in (3, 4)
    rows = json.loads(CliRunner().invoke(cli, ["report", str(out), "--json"]).output)
    assert [r["name"] for r in rows][0] == "baseline"
    assert all(r.get("top1") is not None for r in rows)  # every model was evaluated
    assert rows[-1]["macs"] < rows[0]["macs"] and rows[-1]["latency"]


def test_rerun_skips_everything(quickstart_run):
    out, _ = quickstart_run
    args = ["run", QUICKSTART, "-o", str(out), "--no-plot", "--json"] + [a for s in TINY for a in ("--set", s)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    steps = json.loads(result.stdout)["steps"]
    assert len(steps) == 9 and all(step["status"] == "skipped" for step in steps), steps


def test_interrupted_run_continues_and_changed_config_reruns_the_rest(tmp_path):
    parsed = recipe.parse(SMALL, "small.yaml")
    lines = []

    def stop_at_prune(line):
        lines.append(line)
        if line.startswith("[3/4] pruned: prune"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(parsed, str(tmp_path), log=stop_at_prune)
    assert list(json.load(open(tmp_path / "run.json"))["steps"]) == ["baseline", "converted"]

    result = run(parsed, str(tmp_path), log=lines.append)
    assert [s.status for s in result.steps] == ["skipped", "skipped", "done", "done"]
    first_pruned = os.path.getmtime(tmp_path / "pruned" / "manifest.json")

    changed = recipe.parse(SMALL, "small.yaml", ["prune.ratio=0.5"])
    result = run(changed, str(tmp_path), log=lines.append)
    assert [s.status for s in result.steps] == ["skipped", "skipped", "done", "done"]
    manifest = json.load(open(tmp_path / "pruned" / "manifest.json"))
    assert manifest["steps"][-1]["config"]["ratio"] == 0.5
    assert os.path.getmtime(tmp_path / "pruned" / "manifest.json") > first_pruned

    changed = recipe.parse(SMALL, "small.yaml", ["baseline.lr=0.04"])
    result = run(changed, str(tmp_path), log=lines.append)
    assert all(s.status == "done" for s in result.steps)  # the first step changed: everything reruns


class CtrlCAfterAnEpoch(Progress):
    """Ctrl-C as the first epoch's line is printed (after its checkpoint is written)."""

    def line(self, text):
        raise KeyboardInterrupt


def test_killed_finetune_resumes_from_its_checkpoint(tmp_path):
    source = resolve("resnet18", num_classes=10, input_size=(3, 8, 8))
    config = FinetuneConfig(data="digits", teacher="none", epochs=2, lr=0.05)
    with pytest.raises(KeyboardInterrupt):
        run_step(source, config, StepContext(out=str(tmp_path / "baseline"), progress=CtrlCAfterAnEpoch()))
    assert os.path.isdir(work_folder(str(tmp_path / "baseline")))
    lines = []
    trimmed = recipe.parse(SMALL.split("  - convert")[0].replace("epochs: 1", "epochs: 2"), "small.yaml")
    run(trimmed, str(tmp_path), log=lines.append)
    assert any("continuing the interrupted fine-tune" in line for line in lines)
    manifest = json.load(open(tmp_path / "baseline" / "manifest.json"))
    assert len(manifest["steps"][-1]["record"]["epochs"]) == 2
    assert not os.path.exists(work_folder(str(tmp_path / "baseline")))
