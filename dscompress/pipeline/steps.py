"""Steps: one registry from a config type to the handler that runs it on a model.

A step is a config class (:class:`~dscompress.core.config.StepConfig`), a handler registered for it
with :func:`register_step`, and a renderer for its record (:mod:`dscompress.cli.render`). The command
line, recipes and the Python API all run steps through :func:`run_step`, which dispatches on the
config's type; the CLI builds each step's command from its registration.

A handler takes the :class:`~dscompress.artifact.format.Source` to work on, the config and a
:class:`StepContext`, and returns a :class:`StepOutput`. Steps that make a model return it, and
:func:`run_step` saves it as an artifact (one more step entry on the source's); the others
record what they measured into the source's artifact themselves.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dscompress.artifact.format import WEIGHTS, Artifact, Source, check_output, resolve, save_step, step_entry
from dscompress.compress.calibrate import CalibrateConfig, CalibrationRecord, calibrate, calibration_batches
from dscompress.compress.convert import ConversionRecord, ConvertConfig, convert
from dscompress.compress.prune import PruneConfig, PruneRecord, prune
from dscompress.core.config import Record, StepConfig
from dscompress.core.errors import DscompressError, DscompressWarning
from dscompress.core.util import QUIET, Progress, resolve_device, sha256_file
from dscompress.data.datasets import check_classes, check_task, load_dataset, make_loader
from dscompress.deploy.bench import (
    BenchConfig,
    BenchRecord,
    BenchResults,
    BenchTarget,
    bench,
    contention_notes,
    headline,
    load_targets,
    machine,
)
from dscompress.deploy.export import ExportConfig, ExportRecord, export_onnx
from dscompress.deploy.ort import read_onnx
from dscompress.deploy.profile import ProfileConfig, profile
from dscompress.deploy.validate import ValidateConfig, ValidationRecord, validate_onnx
from dscompress.models.build import build_model, output_classes
from dscompress.nn.metrics import count_macs, count_params
from dscompress.planning.plan import PlanConfig, plan
from dscompress.compress.units import Option
from dscompress.compress.units import build as build_plan
from dscompress.train.checkpoint import checkpoint_path
from dscompress.train.distributed import World, barrier, destroy, init_distributed
from dscompress.train.evaluate import EvalRecord, EvaluateConfig, evaluate
from dscompress.train.finetune import TEACHER_NONE, TEACHER_ORIGINAL, FinetuneConfig, FinetuneRecord, finetune


@dataclass
class StepContext:
    """What a step needs besides its source and config.

    Attributes:
        out: the artifact folder (or file, for ``export``) to write; None for steps that write none.
        force: replace ``out`` if it exists.
        resume: continue an interrupted run (``finetune``).
        progress: where long work reports.
        onnx: the ONNX file to check (``validate``).
        targets: model names, artifact folders and ONNX files to time side by side (``bench``).
        load: turns a name or folder into a Source (for teachers and bench targets).
    """

    out: str | None = None
    force: bool = False
    resume: bool = False
    progress: Progress = QUIET
    onnx: str | None = None
    targets: list[str] = field(default_factory=list)
    load: Callable[[str], Source] = resolve


@dataclass
class StepOutput:
    """What a step produced.

    Attributes:
        record: what it did.
        model: the new model (steps that make one), saved by :func:`run_step`.
        metrics: measured values to store with the new model.
        artifact: the artifact written (or, for steps that measure, the one they recorded into).
        save: False where this process must not write (torchrun ranks other than 0).
        cleanup: a folder to remove once the artifact is saved (a fine-tune's checkpoints).
        chained: the records of the steps run after it into the same artifact, by step name.
        failure: why a check the step ran did not pass (the CLI exits with status 1), or None.
        is_original: the new model is its own original (a plain model trained from scratch: what
            is converted from it later distills from it).
        documents: JSON documents to keep in the artifact, by file name (a plan's ``plan.json``).
        before: step entries the handler ran itself before its own (a fine-tune's calibration).
    """

    record: Record
    model: nn.Module | None = None
    metrics: dict = field(default_factory=dict)
    artifact: Artifact | None = None
    save: bool = True
    cleanup: str | None = None
    chained: dict[str, Record] = field(default_factory=dict)
    failure: str | None = None
    is_original: bool = False
    documents: dict[str, dict] = field(default_factory=dict)
    before: list[dict] = field(default_factory=list)


Handler = Callable[[Source, StepConfig, StepContext], StepOutput]


@dataclass
class StepSpec:
    """A registered step.

    Attributes:
        config: its config class; ``config.STEP`` is its name.
        handler: runs it.
        makes_model: whether it returns a new model to save as an artifact.
        inputs: what it works on: a ``model`` (name or artifact folder), an ``onnx`` file checked
            against a model, or several ``models`` side by side.
        output: what it writes at ``out``: an ``artifact`` folder, a ``file``, or ``none``.
        resumable: whether an interrupted run can be continued (``--resume``).
        chains: steps that may follow it in the same command and artifact (``--calibrate SPEC``).
        summary: one line for ``dscompress --help``.
    """

    config: type[StepConfig]
    handler: Handler
    makes_model: bool
    inputs: Literal["model", "onnx", "models"]
    output: Literal["artifact", "file", "none"]
    resumable: bool
    chains: tuple[str, ...]
    summary: str


STEPS: dict[str, StepSpec] = {}


def register_step(config: type[StepConfig], *, makes_model: bool = True, inputs="model", output=None,
                  resumable: bool = False, chains: tuple[str, ...] = ()):
    """Register the decorated function as the handler of ``config``'s step."""

    def register(handler: Handler) -> Handler:
        summary = (handler.__doc__ or "").strip().splitlines()[0]
        STEPS[config.STEP] = StepSpec(
            config, handler, makes_model, inputs, output or ("artifact" if makes_model else "none"), resumable, chains, summary
        )
        return handler

    return register


def spec_for(config: StepConfig) -> StepSpec:
    spec = STEPS.get(config.STEP)
    if spec is None or not isinstance(config, spec.config):
        raise TypeError(f"no step is registered for {type(config).__name__}")
    return spec


def run_step(source: Source | None, config: StepConfig, context: StepContext | None = None, then: list[StepConfig] = ()) -> StepOutput:
    """Run the step ``config`` describes on ``source`` (and the ``then`` steps after it, in memory).

    A step that makes a model is saved as an artifact at ``context.out`` holding one step entry
    per config. Returns the output of the first step; ``chained`` has the records of the others.
    """
    context = context or StepContext()
    spec = spec_for(config)
    if spec.output in ("artifact", "file"):
        if not context.out:
            raise DscompressError(f"{config.STEP} needs an output: give -o PATH")
        check_output(context.out, context.force)
    if source is not None and source.artifact is not None:
        source.artifact.check_files()
    output = spec.handler(source, config, context)
    if not spec.makes_model:
        return output
    entries = output.before + [step_entry(config, output.record)]
    metrics = dict(output.metrics)
    current = source.then(output.model, entries[0])
    for follower in then:
        result = spec_for(follower).handler(current, follower, context)
        entries.append(step_entry(follower, result.record))
        output.chained[follower.STEP] = result.record
        metrics.update(result.metrics)
        current = current.then(result.model, entries[-1])
    model = current.model
    if output.is_original:
        source = Source(model, source.spec)
    if output.save:
        output.artifact = save_step(source, context.out, model.cpu(), entries, metrics=metrics, force=context.force, documents=output.documents)
        if output.cleanup:
            shutil.rmtree(output.cleanup, ignore_errors=True)
    return output


# --- steps that make a model ---------------------------------------------------------------------


@register_step(ConvertConfig, chains=("calibrate",))
def convert_step(source: Source, config: ConvertConfig, context: StepContext) -> StepOutput:
    """Replace MODEL's convolutions by fitted depthwise-separable ones and save an artifact."""
    _warn_if_random(source)
    if config.plan:
        return _convert_by_plan(source, config)
    model, record = convert(source.model, source.spec.input_size, config)
    if not record.layers and not config.allow_unchanged:
        reasons: dict[str, int] = {}
        for skipped in record.skipped:
            reasons[skipped["reason"]] = reasons.get(skipped["reason"], 0) + 1
        why = "; ".join(f"{count} {reason}" for reason, count in reasons.items()) or "it has no conv layers"
        raise DscompressError(f"nothing to convert in {source.label}: {why}; pass --allow-unchanged to save it as it is")
    return StepOutput(record, model, metrics={"macs": record.macs_after})


def _read_plan(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DscompressError(f"plan {path!r} does not exist; `dscompress plan` writes plan.json into its output folder") from None
    except (OSError, ValueError) as e:
        raise DscompressError(f"cannot read plan {path!r}: {e}") from None


@dataclass
class PlannedConversion(Record):
    """What ``convert --plan`` did: each planned layer's choice, and the pruned layers' kept channels."""

    plan: str
    layers: dict[str, str]
    kept: dict[str, list[int]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


def _convert_by_plan(source: Source, config: ConvertConfig) -> StepOutput:
    layout = _read_plan(config.plan)
    model, kept = build_plan(source.model, layout)
    size = source.spec.input_size
    layers = {}
    for unit in layout["units"]:
        for position, layer in enumerate(unit["layers"]):
            layers[layer] = Option(tuple(unit["ranks"]), float(unit.get("prune", 0.0))).label(position)
    record = PlannedConversion(config.plan, layers, kept, count_params(source.model), count_params(model),
                               count_macs(source.model, size), count_macs(model, size))
    return StepOutput(record, model, metrics={"macs": record.macs_after})


def _warn_if_random(source: Source) -> None:
    """A named model built without weights is randomly initialised: say so once."""
    if source.artifact is None and not source.pending and not (source.spec.weights or source.spec.checkpoint):
        warnings.warn(
            f"{source.spec.name} has random weights (no --checkpoint or --weights): fine to try dscompress out, meaningless for accuracy",
            DscompressWarning,
            stacklevel=2,
        )


def calibration_images(source: Source, config: CalibrateConfig) -> list[torch.Tensor]:
    """The calibration batches for ``source``, after checking they fit its model."""
    if config.data is None:
        raise DscompressError("calibration needs images: give a dataset with --data (e.g. --data digits)")
    dataset = load_dataset(config.data, source.spec.input_size, split="train")
    outputs = output_classes(source.model, source.spec.input_size, source.spec.task, source.label)
    check_classes(dataset, outputs, data_name=config.data, task=source.spec.task, model_name=source.label)
    return calibration_batches(config.data, source.spec.input_size, config.batches, config.batch_size, config.seed)


@register_step(CalibrateConfig)
def calibrate_step(source: Source, config: CalibrateConfig, context: StepContext) -> StepOutput:
    """Refit a converted or pruned model to its original on real images, without training."""
    has_original = (source.artifact is not None and source.artifact.has_original) or source.pending
    if not has_original:
        raise DscompressError(
            f"{source.label!r} has no original model to calibrate against (calibration fits a converted model back to "
            f"the model it came from); convert it first: dscompress convert {source.label} -o DIR --calibrate DATA"
        )
    images = calibration_images(source, config)
    model, record = calibrate(source.model, source.teacher(), images, config, device=resolve_device(config.device),
                              progress=context.progress, kept=kept_channels(source.steps))
    return StepOutput(record, model.cpu())


def kept_channels(steps: list[dict]) -> dict[str, list[int]]:
    """For every layer whose outputs the steps pruned, the original's output channels it kept
    (composed over several prune steps: the later ones index the channels the earlier kept)."""
    kept: dict[str, list[int]] = {}
    for step in steps:
        record = step.get("record") or {}
        now = dict(record.get("kept") or {})  # a plan's, or a conversion by a plan
        if step["step"] == "prune":
            now.update({layer["name"]: layer["kept_out"] for layer in record.get("layers", []) if layer.get("kept_out") is not None})
        for name, channels in now.items():
            earlier = kept.get(name)
            kept[name] = [earlier[i] for i in channels] if earlier else list(channels)
    return kept


@register_step(PruneConfig, chains=("calibrate",))
def prune_step(source: Source, config: PruneConfig, context: StepContext) -> StepOutput:
    """Remove MODEL's least important channels (Torch-Pruning) and save an artifact."""
    _warn_if_random(source)
    model, record = prune(source.model, source.spec.input_size, config)
    return StepOutput(record, model, metrics={"macs": record.macs_after})


def work_folder(out: str) -> str:
    """Where the checkpoints of the fine-tune that writes ``out`` live until the artifact is saved."""
    return os.path.normpath(out) + ".partial"


def _teacher(source: Source, config: FinetuneConfig, load: Callable[[str], Source]) -> tuple[nn.Module | None, str | None]:
    """The frozen teacher the config names, and a label for it."""
    if config.teacher == TEACHER_NONE:
        return None, None
    if config.teacher == TEACHER_ORIGINAL:
        if source.artifact is None and not source.pending:
            raise DscompressError(
                f"{source.label} is a plain model, so its default teacher would be a copy of itself; "
                "pass --teacher none to train it on labels (a baseline), or --teacher DIR to distill from a trained artifact"
            )
        return source.teacher(), f"{source.label} (original)"
    other = load(config.teacher)
    if other.spec.task != source.spec.task:
        raise DscompressError(f"the teacher {config.teacher} is a {other.spec.task} model and {source.label} a {source.spec.task} one; choose a teacher of the same task")
    if other.spec.num_classes not in (None, source.spec.num_classes) and source.spec.num_classes is not None:
        raise DscompressError(f"the teacher {config.teacher} has {other.spec.num_classes} classes, the model {source.spec.num_classes}")
    teacher = other.model
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), other.label


@register_step(FinetuneConfig, resumable=True)
def finetune_step(source: Source, config: FinetuneConfig, context: StepContext) -> StepOutput:
    """Fine-tune MODEL by distillation from its original (or train it: --teacher none) and save an artifact.

    The artifact's original is the source's original; for a plain model, the trained model
    itself (a baseline trained here is then the teacher of what is converted from it).
    Checkpoints live in ``OUT.partial/`` until the artifact is written. Under torchrun only
    rank 0 writes.
    """
    partial = work_folder(context.out)
    has_checkpoint = os.path.isfile(checkpoint_path(partial))
    if context.resume and not has_checkpoint:
        raise DscompressError(f"--resume: no checkpoint to resume from in {partial}; run without --resume to start")
    if not context.resume and has_checkpoint and not context.force:
        raise DscompressError(f"{partial} holds an unfinished run of this output; continue it with --resume, or start over with --force")
    teacher, teacher_label = _teacher(source, config, context.load)
    model = source.model
    plain = source.artifact is None and not source.pending
    if plain:
        # A plain model starts from its constructor's random init (or loads its weights): build it
        # again so that the init, too, is a function of the seed and the run can be repeated.
        torch.manual_seed(config.seed)
        model = build_model(source.spec)
    train_data = load_dataset(config.data, source.spec.input_size, split="train")
    test_data = load_dataset(config.data, source.spec.input_size, split="test")
    check_task(train_data, source.spec.task, config.data, source.label)
    before = []
    if config.calibrate_first and not plain and uncalibrated(source.steps):
        calibration = CalibrateConfig(data=config.data, device=config.device)
        model, calibrated = calibrate(model, source.teacher(), calibration_images(source, calibration), calibration,
                                      kept=kept_channels(source.steps), progress=context.progress)
        before = [step_entry(calibration, calibrated)]
        warnings.warn(
            f"{source.label} was converted or pruned and not calibrated: calibrated it on {config.data} first (output error "
            f"{calibrated.output_error_before} -> {calibrated.output_error_after}); --no-calibrate-first trains it as it is",
            DscompressWarning, stacklevel=2,
        )
    started = init_distributed(config.device)
    try:
        world = World.current()
        if world.writer and not context.resume and os.path.isdir(partial):
            shutil.rmtree(partial)
        model, record = finetune(
            model, teacher, train_data, test_data, config, checkpoint_dir=partial, resume=context.resume,
            progress=context.progress, teacher_label=teacher_label, task=source.spec.task,
        )
        barrier(world)
    finally:
        if started:
            destroy()
    scores = {"miou": record.miou, "pixel_acc": record.pixel_acc} if record.task == "segmentation" else {"top1": record.top1, "top5": record.top5}
    metrics = {**scores, "eval_data": config.data, "eval_images": record.test_images}
    return StepOutput(record, model.cpu(), metrics=metrics, save=world.writer, cleanup=partial, is_original=plain, before=before)


def uncalibrated(steps: list[dict]) -> bool:
    """Whether the last step that changed the model's layers (convert, prune) was not followed by a
    calibration or a fine-tune (a plan calibrates itself)."""
    for step in reversed(steps):
        if step["step"] in ("calibrate", "finetune", "plan"):
            return False
        if step["step"] in ("convert", "prune"):
            return True
    return False


# --- steps that measure --------------------------------------------------------------------------


@register_step(EvaluateConfig, makes_model=False)
def evaluate_step(source: Source, config: EvaluateConfig, context: StepContext) -> StepOutput:
    """Accuracy of MODEL on the test split: top-1/top-5, or mIoU and pixel accuracy (an artifact records it)."""
    if config.data is None:
        raise DscompressError("evaluate needs a dataset: give --data SPEC (e.g. --data digits)")
    record = evaluate(source.model, config.data, source.spec.input_size, config.batch_size, config.device, config.workers,
                      context.progress, task=source.spec.task, model_name=source.label)
    if source.artifact is not None:
        source.artifact.update_metrics(**record.metrics())
    return StepOutput(record, artifact=source.artifact)


@register_step(ExportConfig, makes_model=False, output="file")
def export_step(source: Source, config: ExportConfig, context: StepContext) -> StepOutput:
    """Export MODEL to ONNX and validate it on ONNX Runtime.

    The graph's metadata names the artifact by the sha256 of its manifest as it was before this
    export (recording the export then changes the manifest) and of its weights file.
    """
    metadata = {"dscompress.model": source.spec.name}
    artifact = source.artifact
    if artifact is not None:
        metadata["dscompress.artifact_manifest_sha256"] = artifact.manifest_sha256()
        metadata["dscompress.artifact_weights_sha256"] = sha256_file(os.path.join(artifact.path, WEIGHTS))
    record = export_onnx(source.model, source.spec.input_size, context.out, config, force=context.force, metadata=metadata)
    if artifact is not None:
        artifact.update_metrics(onnx=record.summary())
    failure = None
    if record.validation_status in ("fail", "unavailable"):
        failure = f"validation {record.validation_status}: {record.failure()}; the graph is kept at {record.path}, not at {record.requested_path}"
    return StepOutput(record, artifact=artifact, failure=failure)


@register_step(ValidateConfig, makes_model=False, inputs="onnx")
def validate_step(source: Source, config: ValidateConfig, context: StepContext) -> StepOutput:
    """Compare an ONNX file with the PyTorch model it came from, on each ONNX Runtime provider."""
    proto = read_onnx(context.onnx)
    record = validate_onnx(context.onnx, source.model, source.spec.input_size, config, task=source.spec.task)
    props = {p.key: p.value for p in proto.metadata_props}
    stamped = props.get("dscompress.artifact_weights_sha256")
    if source.artifact is not None and stamped:
        here = sha256_file(os.path.join(source.artifact.path, WEIGHTS))
        if here != stamped:
            record.notes.append(f"the ONNX file was exported from other weights than {source.artifact.path}'s (sha256 {stamped[:12]} vs {here[:12]})")
    if source.artifact is not None:
        source.artifact.update_metrics(validation=record.summary())
    failure = None if record.passed else f"validation {record.status}: {record.failure() or 'no provider ran'}"
    return StepOutput(record, artifact=source.artifact, failure=failure)


@register_step(BenchConfig, makes_model=False, inputs="models")
def bench_step(source: Source | None, config: BenchConfig, context: StepContext) -> StepOutput:
    """Latency and throughput of models side by side, on PyTorch and ONNX Runtime."""
    targets = load_targets(list(context.targets), context.load)
    records = bench(targets, config, context.progress)
    _store_latency(targets, records, config)
    return StepOutput(BenchResults(machine(), records, contention_notes(records)))


def _store_latency(targets: list[BenchTarget], records: list[BenchRecord], config: BenchConfig) -> None:
    """Each artifact's results go into its metrics, with the machine and what was timed alongside."""
    labels = [t.label for t in targets]
    for target in targets:
        if target.artifact is None:
            continue
        results = [{k: v for k, v in r.to_dict().items() if k != "target"} for r in records if r.target == target.label]
        threads = next((r.torch_threads or r.ort_threads for r in records if r.target == target.label and r.status == "ok"), config.threads)
        target.artifact.update_metrics(
            latency={
                "machine": machine(),
                "input_size": list(config.time_at or target.input_size),
                "threads": threads,
                "warmup": config.warmup,
                "iters": config.iters,
                "timed_with": [label for label in labels if label != target.label],
                "headline": headline(results),
                "results": results,
            }
        )


@register_step(ProfileConfig, makes_model=False)
def profile_step(source: Source, config: ProfileConfig, context: StepContext) -> StepOutput:
    """Per-layer latency of MODEL on a runtime: where the time goes, and what converting could gain."""
    record = profile(source.model, source.spec.input_size, config, context.progress)
    if source.artifact is not None:
        profiles = dict(source.artifact.metrics.get("profiles") or {})
        profiles[f"{record.runtime} b{record.batch_size}"] = record.to_dict()
        source.artifact.update_metrics(profiles=profiles)
    return StepOutput(record, artifact=source.artifact)


@register_step(PlanConfig, chains=())
def plan_step(source: Source, config: PlanConfig, context: StepContext) -> StepOutput:
    """Choose per layer dense / depthwise-separable / pruned for a target speed-up on a runtime, and build it.

    The artifact keeps the plan as ``plan.json``, which ``convert --plan`` applies again.
    """
    if config.data is None:
        raise DscompressError("plan needs images to calibrate and to measure damage: give --data SPEC (e.g. --data digits)")
    size = source.spec.input_size
    train = load_dataset(config.data, size, split="train")
    outputs = output_classes(source.model, size, source.spec.task, source.label)
    check_classes(train, outputs, data_name=config.data, task=source.spec.task, model_name=source.label)
    count = config.batches + math.ceil(config.held_out / config.batch_size)
    batches = calibration_batches(config.data, size, count, config.batch_size, config.seed)
    test = load_dataset(config.data, size, split="test")
    labelled = source.spec.task == "classification"
    model, record = plan(source.model, size, config, batches, make_loader(test, 256) if labelled else None, progress=context.progress)
    metrics = {"macs": record.macs_after}
    if record.top1_after is not None:
        metrics.update(top1=record.top1_after, eval_data=config.data, eval_images=len(test))
    return StepOutput(record, model, metrics=metrics, documents={"plan.json": record.plan})


# --- the Python API's shorthands -----------------------------------------------------------------


def convert_artifact(source: Source, out: str, config: ConvertConfig | None = None, force: bool = False) -> tuple[Artifact, ConversionRecord]:
    """Convert a :class:`~dscompress.artifact.format.Source` and save the result as an artifact folder."""
    output = run_step(source, config or ConvertConfig(), StepContext(out=out, force=force))
    return output.artifact, output.record


def calibrate_artifact(source: Source, out: str, config: CalibrateConfig, force: bool = False) -> tuple[Artifact, CalibrationRecord]:
    """Calibrate a converted artifact against the original it carries and save the result."""
    output = run_step(source, config, StepContext(out=out, force=force))
    return output.artifact, output.record


def prune_artifact(source: Source, out: str, config: PruneConfig | None = None, force: bool = False) -> tuple[Artifact, PruneRecord]:
    """Prune a :class:`~dscompress.artifact.format.Source` and save the result as an artifact folder."""
    output = run_step(source, config or PruneConfig(), StepContext(out=out, force=force))
    return output.artifact, output.record


def finetune_artifact(source: Source | str, out: str, config: FinetuneConfig | None = None, force: bool = False,
                      resume: bool = False, progress: Progress = QUIET) -> tuple[Artifact | None, FinetuneRecord]:
    """Fine-tune a Source (or a model name or artifact folder) and save an artifact (None on torchrun ranks > 0)."""
    source = resolve(source) if isinstance(source, str) else source
    output = run_step(source, config or FinetuneConfig(), StepContext(out=out, force=force, resume=resume, progress=progress))
    return output.artifact, output.record


def export_source(source: Source, path: str, config: ExportConfig | None = None, force: bool = False) -> ExportRecord:
    """Export a Source to ONNX; for an artifact, record the result in its metrics."""
    return run_step(source, config or ExportConfig(), StepContext(out=path, force=force)).record


def evaluate_source(source: Source, data: str, batch_size: int = 256, device: str = "auto", workers: int = 0) -> EvalRecord:
    """Evaluate a Source; for an artifact, store the result in its metrics."""
    return run_step(source, EvaluateConfig(data=data, batch_size=batch_size, device=device, workers=workers)).record


def validate_source(onnx_path: str, source: Source, config: ValidateConfig | None = None) -> ValidationRecord:
    """Validate an ONNX file against a Source; for an artifact, store the result in its metrics."""
    return run_step(source, config or ValidateConfig(), StepContext(onnx=onnx_path)).record
