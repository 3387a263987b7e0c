"""How a step runs on an artifact: its registration, its context, and the one adapter that runs a
model transform on an artifact's model.

A step is a config class (:class:`~dscompress.core.config.StepConfig`), its registration here
(:func:`register_step`: what it takes, what it writes, how the CLI shows it) and a renderer for its
record (:mod:`dscompress.cli.render`). A step that makes a model has no handler of its own: its
config's model transform (:mod:`dscompress.core.transform`) runs through :func:`transform_step`,
which resolves the source's history into a :class:`~dscompress.core.transform.TransformContext`;
:func:`run_step` then saves the result as an artifact holding one more step entry. Only the steps
that measure (evaluate, export, validate, bench, profile) have handlers, in
:mod:`dscompress.pipeline.steps`, which registers every step: import ``run_step`` from there.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from dscompress.artifact.format import Artifact, check_output, step_entry
from dscompress.artifact.source import Source, resolve, save_step
from dscompress.compress.calibrate import CalibrateConfig
from dscompress.core.config import Record, StepConfig
from dscompress.core.errors import DscompressError, DscompressWarning
from dscompress.core.transform import TransformContext, apply, transform_for
from dscompress.core.util import QUIET, Progress
from dscompress.models.build import build_model
from dscompress.train.distributed import World


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
        before: step entries run before its own (a fine-tune's calibration of an uncalibrated model).
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


def _no_metrics(config: StepConfig, record: Record) -> dict:
    return {}


@dataclass
class StepSpec:
    """A registered step.

    Attributes:
        config: its config class; ``config.STEP`` is its name.
        handler: runs it (:func:`transform_step` for a step that makes a model).
        makes_model: whether it returns a new model to save as an artifact.
        inputs: what it works on: a ``model`` (name or artifact folder), an ``onnx`` file checked
            against a model, or several ``models`` side by side.
        output: what it writes at ``out``: an ``artifact`` folder, a ``file``, or ``none``.
        resumable: whether an interrupted run can be continued (``--resume``).
        chains: steps that may follow it in the same command and artifact (``--calibrate SPEC``).
        summary: one line for ``dscompress --help``.
        help: the command's help (the first paragraph of its handler's or transform's docstring).
        metrics: what the new artifact's metrics keep of the record, ``metrics(config, record)``.
        documents: JSON documents the new artifact keeps, ``documents(record)`` by file name.
        warns_random: warn that a named model without weights is random (meaningless for accuracy).
        trains: a plain model it trains becomes its own original (what is converted from it later
            distills from it).
    """

    config: type[StepConfig]
    handler: Handler
    makes_model: bool
    inputs: Literal["model", "onnx", "models"]
    output: Literal["artifact", "file", "none"]
    resumable: bool
    chains: tuple[str, ...]
    summary: str
    help: str
    metrics: Callable[[StepConfig, Record], dict] = _no_metrics
    documents: Callable[[Record], dict] | None = None
    warns_random: bool = False
    trains: bool = False


STEPS: dict[str, StepSpec] = {}


def register_step(config: type[StepConfig], handler: Handler | None = None, *, inputs="model", output=None, resumable: bool = False,
                  chains: tuple[str, ...] = (), **options) -> StepSpec:
    """Register ``config``'s step: with a ``handler`` for a step that measures, without one for a
    step that makes a model (its config's registered transform runs through :func:`transform_step`).
    ``options`` are :class:`StepSpec`'s (``metrics``, ``documents``, ``warns_random``, ``trains``)."""
    makes_model = handler is None
    doc = ((handler or transform_for(config)).__doc__ or "").strip().split("\n\n")[0]
    summary = doc.splitlines()[0] + (" Saves an artifact." if makes_model else "")
    spec = StepSpec(config, handler or transform_step, makes_model, inputs, output or ("artifact" if makes_model else "none"),
                    resumable, chains, summary, " ".join(doc.split()), **options)
    STEPS[config.STEP] = spec
    return spec


def spec_for(config: StepConfig) -> StepSpec:
    spec = STEPS.get(config.STEP)
    if spec is None or not isinstance(config, spec.config):
        raise TypeError(f"no step is registered for {type(config).__name__}")
    return spec


def work_folder(out: str) -> str:
    """Where the checkpoints of the run that writes ``out`` live until the artifact is saved."""
    return os.path.normpath(out) + ".partial"


def transform_context(source: Source, context: StepContext, resumable: bool = False) -> TransformContext:
    """What a transform knows of ``source``: its spec, its history and its original."""
    plain = source.artifact is None and not source.pending
    has_original = (source.artifact is not None and source.artifact.has_original) or bool(source.pending)
    return TransformContext(
        input_size=tuple(source.spec.input_size), task=source.spec.task, num_classes=source.spec.num_classes, label=source.label,
        original=source.teacher if has_original else None, steps=list(source.steps),
        rebuild=(lambda: build_model(source.spec)) if plain else None, load=context.load,
        work_dir=work_folder(context.out) if resumable and context.out else None, resume=context.resume, force=context.force,
        progress=context.progress,
    )


def transform_step(source: Source, config: StepConfig, context: StepContext) -> StepOutput:
    """Apply ``config``'s model transform to ``source``'s model.

    A config with ``calibrate_first`` set (a fine-tune) calibrates a converted or pruned model
    that was not calibrated, recorded as a step before its own, and warns that it did.
    """
    spec = spec_for(config)
    plain = source.artifact is None and not source.pending
    if spec.warns_random and plain and not (source.spec.weights or source.spec.checkpoint):
        warnings.warn(f"{source.spec.name} has random weights (no --checkpoint or --weights): fine to try dscompress out, "
                      "meaningless for accuracy", DscompressWarning, stacklevel=3)
    transform_context_ = transform_context(source, context, spec.resumable)
    model, before = source.model, []
    if getattr(config, "calibrate_first", False) and not plain and transform_context_.uncalibrated:
        calibration = CalibrateConfig(data=config.data, device=config.device)
        model, calibrated = apply(model, calibration, transform_context_)
        before = [step_entry(calibration, calibrated)]
        transform_context_.steps.append(before[0])
        warnings.warn(
            f"{source.label} was converted or pruned and not calibrated: calibrated it on {config.data} first (output error "
            f"{calibrated.output_error_before} -> {calibrated.output_error_after}); --no-calibrate-first trains it as it is",
            DscompressWarning, stacklevel=3,
        )
    model, record = apply(model, config, transform_context_)
    return StepOutput(record, model.cpu(), metrics=spec.metrics(config, record), save=World.launched().writer,
                      cleanup=transform_context_.work_dir, is_original=spec.trains and plain, before=before,
                      documents=spec.documents(record) if spec.documents else {})


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
