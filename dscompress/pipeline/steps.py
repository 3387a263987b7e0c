"""Every step: those that make a model are their config's model transform (one line each), those
that measure have a handler here. Importing this module registers them all, so the CLI, recipes
and the Python API take :func:`run_step` from here.

A handler takes the :class:`~dscompress.artifact.source.Source` to measure, the config and a
:class:`StepContext`, records what it measured into the source's artifact (if it has one) and
returns a :class:`StepOutput`.
"""

from __future__ import annotations

import os

from dscompress.artifact.format import WEIGHTS, Artifact
from dscompress.artifact.source import Source, resolve
from dscompress.compress.biascorrect import BiasCorrectConfig
from dscompress.compress.calibrate import CalibrateConfig, calibration_batches
from dscompress.compress.convert import ConversionRecord, ConvertConfig
from dscompress.compress.equalize import EqualizeConfig
from dscompress.compress.prune import PruneConfig
from dscompress.core.errors import DscompressError
from dscompress.core.transform import apply
from dscompress.core.util import sha256_file
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
from dscompress.deploy.export import ExportConfig, export_onnx
from dscompress.deploy.ort import read_onnx
from dscompress.deploy.profile import ProfileConfig, profile
from dscompress.deploy.quantize import QuantizeConfig, quantize_onnx, reduces_range
from dscompress.deploy.validate import ValidateConfig, validate_onnx
from dscompress.pipeline.registry import (
    STEPS,
    StepContext,
    StepOutput,
    StepSpec,
    register_step,
    run_step,
    spec_for,
    transform_context,
    work_folder,
)
from dscompress.planning.plan import PlanConfig
from dscompress.train.evaluate import EvaluateConfig, evaluate
from dscompress.train.finetune import FinetuneConfig

__all__ = ["STEPS", "StepContext", "StepOutput", "StepSpec", "convert_artifact", "register_step", "run_step", "spec_for", "work_folder"]


def _macs(config, record) -> dict:
    return {"macs": record.macs_after}


def _scores(config: FinetuneConfig, record) -> dict:
    keys = ("miou", "pixel_acc") if record.task == "segmentation" else ("top1", "top5")
    return {**{k: getattr(record, k) for k in keys}, "eval_data": config.data, "eval_images": record.test_images}


def _planned(config: PlanConfig, record) -> dict:
    top1 = {} if record.top1_after is None else {"top1": record.top1_after, "eval_data": config.data, "eval_images": record.test_images}
    return {**_macs(config, record), **top1}


# --- steps that make a model: their transforms, run by transform_step --------------------------

register_step(ConvertConfig, chains=("calibrate",), metrics=_macs, warns_random=True)
register_step(CalibrateConfig)
register_step(PruneConfig, chains=("calibrate",), metrics=_macs, warns_random=True)
register_step(FinetuneConfig, resumable=True, metrics=_scores, trains=True)
register_step(EqualizeConfig)


# --- steps that measure ---------------------------------------------------------------------------


def evaluate_step(source: Source, config: EvaluateConfig, context: StepContext) -> StepOutput:
    """Accuracy of MODEL on the test split: top-1/top-5, or mIoU and pixel accuracy (an artifact records it)."""
    if config.data is None:
        raise DscompressError("evaluate needs a dataset: give --data SPEC (e.g. --data digits)")
    record = evaluate(source.model, config.data, source.spec.input_size, config.batch_size, config.device, config.workers,
                      context.progress, task=source.spec.task, model_name=source.label)
    if source.artifact is not None:
        source.artifact.update_metrics(**record.metrics())
    return StepOutput(record, artifact=source.artifact)


def _provenance(source: Source) -> dict:
    """The metadata an exported graph carries of its source: the model name and, for an artifact,
    the sha256 of its manifest as it was before this step (recording the step then changes the
    manifest) and of its weights file."""
    metadata = {"dscompress.model": source.spec.name}
    if source.artifact is not None:
        metadata["dscompress.artifact_manifest_sha256"] = source.artifact.manifest_sha256()
        metadata["dscompress.artifact_weights_sha256"] = sha256_file(os.path.join(source.artifact.path, WEIGHTS))
    return metadata


def planned_int8(artifact: Artifact | None) -> dict | None:
    """How the artifact's latest plan calibrated its INT8 graph (data, batches, batch_size, seed),
    where that plan chose INT8; None otherwise."""
    for step in reversed(artifact.steps if artifact is not None else []):
        if step.get("step") == "plan":
            record = step.get("record") or {}
            return record.get("int8_calibration") if record.get("precision") == "int8" else None
    return None


def export_step(source: Source, config: ExportConfig, context: StepContext) -> StepOutput:
    """Export MODEL to ONNX and validate it on ONNX Runtime.

    The graph's metadata names the artifact it came from (:func:`_provenance`). An artifact whose
    plan chose INT8 (and ``--precision int8``) is written as that plan's QDQ graph: the model as
    it is now (fine-tuned since, perhaps), quantized as the plan measured it, on the plan's own
    calibration images, and measured against fp32 on the test split as `quantize` does.
    """
    artifact = source.artifact
    calibration = planned_int8(artifact)
    if config.precision == "int8" and calibration is None:
        raise DscompressError("--precision int8 exports an artifact whose plan chose INT8; "
                              "quantize any other model with `dscompress quantize MODEL --data SPEC`")
    if calibration is not None and config.precision != "fp32":
        return _export_planned_int8(source, config, context, calibration)
    record = export_onnx(source.model, source.spec.input_size, context.out, config, force=context.force, metadata=_provenance(source))
    if artifact is not None:
        artifact.update_metrics(onnx=record.summary())
    failure = None
    if record.validation_status in ("fail", "unavailable"):
        failure = f"validation {record.validation_status}: {record.failure()}; the graph is kept at {record.path}, not at {record.requested_path}"
    return StepOutput(record, artifact=artifact, failure=failure)


def _export_planned_int8(source: Source, config: ExportConfig, context: StepContext, calibration: dict) -> StepOutput:
    if not calibration.get("data"):
        raise DscompressError("the plan's INT8 calibration images came from the Python caller, not --data: "
                              "quantize with `dscompress quantize MODEL --data SPEC`, or export --precision fp32")
    images = calibration_batches(calibration["data"], source.spec.input_size, calibration["batches"], calibration["batch_size"],
                                 calibration["seed"])
    quantize_config = QuantizeConfig(data=calibration["data"], opset=config.opset, seed=calibration["seed"])
    record = quantize_onnx(source.model, source.spec.input_size, context.out, quantize_config, force=context.force,
                           metadata=_provenance(source), task=source.spec.task, model_name=source.label, progress=context.progress,
                           calibration=images)
    record.notes.append(f"INT8 as planned: calibrated on the plan's {sum(len(x) for x in images)} images of {calibration['data']} "
                        "(--precision fp32 writes the float graph)")
    if source.artifact is not None:
        source.artifact.update_metrics(int8=record.summary())
    return StepOutput(record, artifact=source.artifact, failure=record.failure() or None)


def quantize_step(source: Source, config: QuantizeConfig, context: StepContext) -> StepOutput:
    """Quantize MODEL to an INT8 ONNX graph with ONNX Runtime's quantizer and measure it against fp32.

    With --equalize the depthwise-separable layers and conv -> conv pairs are equalized first
    (:mod:`dscompress.compress.equalize`), with --bias-correction the convs' biases are then
    corrected for their INT8 weights' mean error (:mod:`dscompress.compress.biascorrect`), the
    fp32 graph measured being the model's own. Calibrates on the data's train split, measures
    top-1 of both graphs on its test split; a graph that loses more than --max-drop points is kept
    as NAME.failed.onnx and the command fails.
    """
    model, equalized, corrected = source.model, None, None
    if config.equalize:
        model, equalized = apply(model, EqualizeConfig(data=config.data, seed=config.seed, pairs=True), transform_context(source, context))
    if config.bias_correction:
        model, corrected = apply(model, BiasCorrectConfig(data=config.data, seed=config.seed, reduce_range=reduces_range(config),
                                                          exclude=list(config.exclude)), transform_context(source, context))
    record = quantize_onnx(model, source.spec.input_size, context.out, config, force=context.force, metadata=_provenance(source),
                           task=source.spec.task, model_name=source.label, progress=context.progress, reference=source.model)
    record.equalized = len(equalized.layers) + len(equalized.pairs) if equalized else 0
    record.bias_corrected = len(corrected.layers) if corrected else 0
    if source.artifact is not None:
        source.artifact.update_metrics(int8=record.summary())
    return StepOutput(record, artifact=source.artifact, failure=record.failure() or None)


def validate_step(source: Source, config: ValidateConfig, context: StepContext) -> StepOutput:
    """Compare an ONNX file with the PyTorch model it came from, on each ONNX Runtime provider."""
    proto = read_onnx(context.onnx)
    record = validate_onnx(context.onnx, source.model, source.spec.input_size, config, task=source.spec.task)
    stamped = {p.key: p.value for p in proto.metadata_props}.get("dscompress.artifact_weights_sha256")
    if source.artifact is not None and stamped:
        here = sha256_file(os.path.join(source.artifact.path, WEIGHTS))
        if here != stamped:
            record.notes.append(f"the ONNX file was exported from other weights than {source.artifact.path}'s (sha256 {stamped[:12]} vs {here[:12]})")
    if source.artifact is not None:
        source.artifact.update_metrics(validation=record.summary())
    failure = None if record.passed else f"validation {record.status}: {record.failure() or 'no provider ran'}"
    return StepOutput(record, artifact=source.artifact, failure=failure)


def bench_step(source: Source | None, config: BenchConfig, context: StepContext) -> StepOutput:
    """Latency and throughput of models side by side, on PyTorch and ONNX Runtime."""
    targets = load_targets(list(context.targets), context.load)
    for target in targets:
        if planned_int8(target.artifact) is not None:
            target.precision = "int8"
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
        target.artifact.update_metrics(latency={
            "machine": machine(), "input_size": list(config.time_at or target.input_size), "threads": threads, "warmup": config.warmup,
            "iters": config.iters, "timed_with": [label for label in labels if label != target.label], "headline": headline(results),
            "results": results,
        })


def profile_step(source: Source, config: ProfileConfig, context: StepContext) -> StepOutput:
    """Per-layer latency of MODEL on a runtime: where the time goes, and what converting could gain."""
    record = profile(source.model, source.spec.input_size, config, context.progress)
    if source.artifact is not None:
        profiles = dict(source.artifact.metrics.get("profiles") or {})
        profiles[f"{record.runtime} b{record.batch_size}"] = record.to_dict()
        source.artifact.update_metrics(profiles=profiles)
    return StepOutput(record, artifact=source.artifact)


register_step(EvaluateConfig, evaluate_step)
register_step(ExportConfig, export_step, output="file")
register_step(QuantizeConfig, quantize_step, output="file")
register_step(ValidateConfig, validate_step, inputs="onnx")
register_step(BenchConfig, bench_step, inputs="models")
register_step(ProfileConfig, profile_step)
register_step(PlanConfig, metrics=_planned, documents=lambda record: {"plan.json": record.plan})  # a step that makes a model


def convert_artifact(source: Source | str, out: str, config: ConvertConfig | None = None, force: bool = False) -> tuple[Artifact, ConversionRecord]:
    """Convert a Source (or a model name or artifact folder) and save the result as an artifact folder."""
    source = resolve(source) if isinstance(source, str) else source
    output = run_step(source, config or ConvertConfig(), StepContext(out=out, force=force))
    return output.artifact, output.record
