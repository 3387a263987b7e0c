"""Running a recipe: every step in order, each into its own folder, resumable.

``run(recipe, out_dir)`` executes the steps of a :class:`~dscompress.recipe.Recipe`. Steps that
make a model (``finetune``, ``convert``, ``calibrate``, ``prune``) write an artifact folder
``OUT/<step name>/`` and the next steps work on it; the others (``export``, ``validate``,
``bench``, ``evaluate``) work on the latest model and record into its metrics and into
``OUT/<step name>/``. ``OUT/run.json`` records each finished step with a key that hashes the
model spec and the config of that step and of every step before it. A rerun skips the steps
whose key is unchanged and whose output is still there, and reruns the first changed step and
everything after it; an interrupted fine-tune continues from its last checkpoint. So a run that
was stopped, or killed, continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from dscompress.artifact import Source, resolve, write_json_atomic
from dscompress.errors import DscompressError
from dscompress.recipe import Recipe, Step, step_config

MODEL_STEPS = ("finetune", "convert", "calibrate", "prune")
RUN_FILE = "run.json"


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
        return [s.output for s in self.steps if s.kind in MODEL_STEPS]


def step_key(previous: str, step: Step, default_data: str | None) -> str:
    """A hash of this step's config chained to everything before it."""
    payload = json.dumps({"previous": previous, "step": step.to_dict(), "data": default_data}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_state(out_dir: str) -> dict:
    path = os.path.join(out_dir, RUN_FILE)
    if not os.path.isfile(path):
        return {"steps": {}}
    try:
        with open(path) as f:
            state = json.load(f)
        if not isinstance(state.get("steps"), dict):
            raise ValueError("no steps")
        return state
    except (OSError, ValueError) as e:
        raise DscompressError(f"{path} is damaged ({e}); delete it to run every step again") from None


def _output(out_dir: str, step: Step) -> str:
    return os.path.join(out_dir, step.name)


def _finished(entry: dict | None, key: str, output: str) -> bool:
    return bool(entry) and entry.get("key") == key and entry.get("status") == "done" and os.path.exists(output)


def run(recipe: Recipe, out_dir: str, log=print, device: str = "auto") -> RunResult:
    """Run (or continue) a recipe into ``out_dir``; returns what each step did."""
    os.makedirs(out_dir, exist_ok=True)
    state = _read_state(out_dir)
    state["recipe"] = recipe.path
    # Entries of steps the recipe no longer has are dropped; the rest keep recipe order.
    state["steps"] = {s.name: state["steps"][s.name] for s in recipe.steps if s.name in state["steps"]}
    spec = dict(recipe.model)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    current: str | None = None  # the latest model artifact
    onnx_path: str | None = None
    models: list[str] = []
    results = []
    for index, step in enumerate(recipe.steps, 1):
        key = step_key(key, step, recipe.data)
        output = _output(out_dir, step)
        entry = state["steps"].get(step.name)
        prefix = f"[{index}/{len(recipe.steps)}] {step.name}"
        if _finished(entry, key, output):
            log(f"{prefix}: done before with the same config, skipped")
            result = StepResult(step.name, step.kind, key, output, "skipped", entry.get("seconds", 0.0), entry.get("summary", {}))
        else:
            log(f"{prefix}: {step.kind} ...")
            start = time.perf_counter()
            summary = _execute(step, recipe, output, current, onnx_path, models, log, device)
            seconds = round(time.perf_counter() - start, 2)
            result = StepResult(step.name, step.kind, key, output, "done", seconds, summary)
            state["steps"][step.name] = {"kind": step.kind, "key": key, "status": "done", "output": step.name, "seconds": seconds, "summary": summary}
            write_json_atomic(os.path.join(out_dir, RUN_FILE), state)
            log(f"{prefix}: finished in {seconds:.1f}s")
        if step.kind in MODEL_STEPS:
            current = output
            models.append(output)
        if step.kind == "export":
            onnx_path = os.path.join(output, "model.onnx")
        results.append(result)
    return RunResult(out_dir, results)


def _source(recipe: Recipe, current: str | None) -> Source:
    if current is not None:
        return resolve(current)
    model = recipe.model
    size = tuple(model["input_size"]) if model.get("input_size") else None
    return resolve(model["name"], num_classes=model.get("num_classes"), input_size=size, checkpoint=model.get("checkpoint"), weights=model.get("weights"))


def _execute(step: Step, recipe: Recipe, output: str, current: str | None, onnx_path: str | None, models: list[str], log, device: str) -> dict:
    config = step_config(step, recipe.data)
    source = _source(recipe, current)
    if step.kind == "convert":
        from dscompress.convert import convert_artifact

        artifact, record = convert_artifact(source, output, config, force=True)
        summary = {"layers": len(record.layers), "macs": record.macs_after, "params": record.params_after}
    elif step.kind == "calibrate":
        from dscompress.calibrate import calibrate_artifact

        artifact, record = calibrate_artifact(source, output, config, force=True, device=device)
        summary = {"layers": len(record.layers)}
    elif step.kind == "prune":
        from dscompress.prune import prune_artifact

        artifact, record = prune_artifact(source, output, config, force=True)
        summary = {"macs": record.macs_after, "params": record.params_after}
    elif step.kind == "finetune":
        from dscompress.train import checkpoint_path, finetune_artifact, work_folder

        resume = os.path.isfile(checkpoint_path(work_folder(output)))
        if resume:
            log(f"  continuing the interrupted fine-tune in {work_folder(output)}")
        artifact, record = finetune_artifact(source, output, config, force=True, resume=resume, progress=False)
        summary = {"top1": record.top1, "epochs": len(record.epochs)}
    elif step.kind == "export":
        from dscompress.export import export_source

        os.makedirs(output, exist_ok=True)
        record = export_source(source, os.path.join(output, "model.onnx"), config, force=True)
        _write_record(output, record)
        if record.validation_status == "fail":
            raise DscompressError(f"step {step.name}: the exported ONNX model does not match PyTorch; see {output}/record.json")
        return {"path": record.path, "validation": record.validation_status}
    elif step.kind == "validate":
        from dscompress.validate import validate_onnx

        record = validate_onnx(onnx_path, source.model, source.spec.input_size, config)
        _write_record(output, record)
        if source.artifact is not None:
            source.artifact.update_metrics(validation=record.summary())
        if record.status == "fail":
            raise DscompressError(f"step {step.name}: the ONNX model does not match PyTorch: {record.failure()}")
        return {"validation": record.status}
    elif step.kind == "bench":
        from dscompress.bench import bench, load_targets

        if not models:
            raise DscompressError(f"step {step.name}: bench needs a model step before it")
        targets = load_targets(models, resolve)  # every model of the run, timed side by side
        records = bench(targets, config)
        _write_record(output, {"results": [r.to_dict() for r in records]})
        return {"targets": [t.label for t in targets]}
    elif step.kind == "evaluate":
        from dscompress.evaluate import evaluate_source

        data = step.options.get("data") or recipe.data
        record = evaluate_source(source, data, batch_size=step.options.get("batch_size", 256), device=device)
        _write_record(output, record)
        return {"top1": record.top1, "top5": record.top5}
    else:  # pragma: no cover - recipe.parse rejects unknown kinds
        raise DscompressError(f"unknown step {step.kind!r}")
    if recipe.data and "top1" not in artifact.metrics:
        from dscompress.evaluate import evaluate_source

        evaluated = evaluate_source(resolve(artifact.path), recipe.data, device=device)
        summary["top1"] = evaluated.top1
    return summary


def _write_record(folder: str, record) -> None:
    os.makedirs(folder, exist_ok=True)
    data = record.to_dict() if hasattr(record, "to_dict") else record
    write_json_atomic(os.path.join(folder, "record.json"), data)


def load_run(out_dir: str) -> list[str]:
    """Model artifact folders of a finished or partial run, in step order."""
    folders = [os.path.join(out_dir, e["output"]) for e in _read_state(out_dir)["steps"].values() if e.get("kind") in MODEL_STEPS]
    return [f for f in folders if os.path.isdir(f)]

