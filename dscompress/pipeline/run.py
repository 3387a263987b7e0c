"""Running a recipe: every step in order, each into its own folder, resumable.

``run(recipe, out_dir)`` executes the steps of a :class:`~dscompress.pipeline.recipe.Recipe` through
:func:`~dscompress.pipeline.steps.run_step`. Steps that make a model write an artifact folder
``OUT/<step name>/`` and the next steps work on it; the others work on the latest model, record
into its metrics and write ``OUT/<step name>/record.json`` (``export`` writes
``OUT/<step name>/model.onnx``, which a later ``validate`` checks; ``bench`` times every model of
the run side by side). ``OUT/run.json`` (:mod:`dscompress.pipeline.runstate`) records each finished step
with a key that hashes the model spec and the config of that step and of every step before it. A
rerun skips the steps whose key is unchanged and whose output is still there, and reruns the
first changed step and everything after it; an interrupted fine-tune continues from its last
checkpoint. So a run that was stopped, or killed, continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from dscompress.artifact.source import Source, resolve
from dscompress.core.errors import DscompressError
from dscompress.core.util import QUIET, Progress, write_json
from dscompress.deploy.bench import BenchResults
from dscompress.deploy.export import ExportRecord
from dscompress.deploy.quantize import QuantizeRecord
from dscompress.deploy.validate import ValidationRecord
from dscompress.pipeline.recipe import Recipe, Step
from dscompress.pipeline.runstate import chain_key, finished, read_state, write_state
from dscompress.pipeline.steps import STEPS, StepContext, run_step, work_folder
from dscompress.train.checkpoint import checkpoint_path
from dscompress.train.evaluate import EvalRecord, EvaluateConfig

ONNX_FILE = "model.onnx"
RECORD_FILE = "record.json"


@dataclass
class StepResult:
    """One step of a run: what it was, where it wrote, and whether this run did it."""

    name: str
    kind: str
    key: str
    output: str
    status: str  # "done" (run now) or "skipped" (finished before with the same key)
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)


@dataclass
class RunResult:
    out_dir: str
    steps: list[StepResult]

    @property
    def artifacts(self) -> list[str]:
        """The model artifacts of the run, in step order."""
        return [s.output for s in self.steps if STEPS[s.kind].makes_model]

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "steps": [vars(s) for s in self.steps]}


def run(recipe: Recipe, out_dir: str, log=print, device: str | None = None, progress: Progress = QUIET) -> RunResult:
    """Run (or continue) a recipe into ``out_dir``; returns what each step did.

    ``device`` is used by the steps that take one where the recipe does not say.
    """
    os.makedirs(out_dir, exist_ok=True)
    state = read_state(out_dir)
    state["recipe"] = recipe.path
    # Entries of steps the recipe no longer has are dropped; the rest keep recipe order.
    state["steps"] = {s.name: state["steps"][s.name] for s in recipe.steps if s.name in state["steps"]}
    key = hashlib.sha256(json.dumps(recipe.model, sort_keys=True).encode()).hexdigest()[:16]
    current: str | None = None  # the latest model artifact
    onnx_path: str | None = None
    models: list[str] = []
    results = []
    for index, step in enumerate(recipe.steps, 1):
        key = chain_key(key, {"step": step.to_dict(), "data": recipe.data})
        output = os.path.join(out_dir, step.name)
        entry = state["steps"].get(step.name)
        prefix = f"[{index}/{len(recipe.steps)}] {step.name}"
        makes_model = STEPS[step.kind].makes_model
        if step.start:
            current = os.path.join(out_dir, step.start)
        if finished(entry, key, output):
            log(f"{prefix}: done before with the same config, skipped")
            result = StepResult(step.name, step.kind, key, output, "skipped", entry.get("seconds", 0.0), entry.get("summary", {}))
        else:
            log(f"{prefix}: {step.kind} ...")
            start = time.perf_counter()
            summary = _execute(step, recipe, output, current, onnx_path, models, log, device, progress)
            seconds = round(time.perf_counter() - start, 2)
            result = StepResult(step.name, step.kind, key, output, "done", seconds, summary)
            state["steps"][step.name] = {
                "kind": step.kind, "makes_model": makes_model, "key": key, "status": "done", "output": step.name,
                "seconds": seconds, "summary": summary,
            }
            write_state(out_dir, state)
            log(f"{prefix}: finished in {seconds:.1f}s")
        if makes_model:
            current = output
            models.append(output)
        if step.kind == "export":
            onnx_path = result.summary.get("path") or os.path.join(output, ONNX_FILE)
        results.append(result)
    return RunResult(out_dir, results)


def _source(recipe: Recipe, current: str | None) -> Source:
    if current is not None:
        return resolve(current)
    model = recipe.model
    size = tuple(model["input_size"]) if model.get("input_size") else None
    return resolve(model["name"], num_classes=model.get("num_classes"), input_size=size, checkpoint=model.get("checkpoint"),
                   weights=model.get("weights"), task=model.get("task"), aux=bool(model.get("aux")))


def _execute(step: Step, recipe: Recipe, output: str, current: str | None, onnx_path: str | None, models: list[str],
             log, device: str | None, progress: Progress) -> dict:
    config = recipe.config(step, device)
    spec = STEPS[step.kind]
    source = None if spec.inputs == "models" else _source(recipe, current)
    context = StepContext(force=True, progress=progress, targets=list(models), onnx=onnx_path)
    if spec.output == "artifact":
        context.out = output
        context.resume = spec.resumable and os.path.isfile(checkpoint_path(work_folder(output)))
        if context.resume:
            log(f"  continuing the interrupted fine-tune in {work_folder(output)}")
    elif spec.output == "file":
        os.makedirs(output, exist_ok=True)
        context.out = os.path.join(output, ONNX_FILE)
    if spec.inputs == "models" and not models:
        raise DscompressError(f"step {step.name}: {step.kind} needs a step that makes a model before it")
    result = run_step(source, config, context)
    record = result.record
    if not spec.makes_model:
        os.makedirs(output, exist_ok=True)
        write_json(os.path.join(output, RECORD_FILE), record.to_dict())
        _check(step, record, output)
        return _summary(record)
    metrics = result.artifact.metrics
    score = "miou" if result.artifact.spec.task == "segmentation" else "top1"
    summary = {k: metrics[k] for k in (score, "macs", "params") if metrics.get(k) is not None}
    if recipe.data and score not in summary:  # every model of a run gets an accuracy for the report
        evaluated = run_step(resolve(result.artifact.path), EvaluateConfig(data=recipe.data, device=device or "auto"))
        summary[score] = getattr(evaluated.record, score)
    return summary


def _summary(record) -> dict:
    """What run.json keeps of a step that measures."""
    if isinstance(record, ExportRecord):
        return {"path": record.path, "validation": record.validation_status}
    if isinstance(record, ValidationRecord):
        return {"validation": record.status}
    if isinstance(record, QuantizeRecord):
        return {"path": record.path, "fp32_top1": record.fp32_top1, "int8_top1": record.int8_top1}
    if isinstance(record, EvalRecord):
        return {"miou": record.miou, "pixel_acc": record.pixel_acc} if record.task == "segmentation" else {"top1": record.top1, "top5": record.top5}
    if isinstance(record, BenchResults):
        return {"targets": sorted({r.target for r in record.results})}
    return {}


def _check(step: Step, record, output: str) -> None:
    """A run stops at an export or validation whose graph does not match PyTorch (or could not be checked)."""
    if isinstance(record, ExportRecord) and record.validation_status in ("fail", "unavailable"):
        raise DscompressError(
            f"step {step.name}: the exported ONNX model {'does not match PyTorch' if record.validation_status == 'fail' else 'could not be validated'}: "
            f"{record.failure()}; see {output}/{RECORD_FILE}"
        )
    if isinstance(record, ValidationRecord) and record.status == "fail":
        raise DscompressError(f"step {step.name}: the ONNX model does not match PyTorch: {record.failure()}")
    if isinstance(record, QuantizeRecord) and not record.passed:
        raise DscompressError(f"step {step.name}: {record.failure()}")
