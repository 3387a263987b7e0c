"""Export to ONNX for ONNX Runtime (CPU, CUDA, TensorRT) and TensorRT itself.

``export_onnx(model, input_size, path, config)`` writes one graph with input ``input``
(N, C, H, W) and output ``logits``, the batch axis dynamic unless a fixed batch is asked for. It
uses the ``torch.export``-based exporter (``dynamo=True``) and falls back to the TorchScript
exporter, with a warning that says why, when ``torch.export`` cannot capture the model. The
graph is checked with ``onnx.checker`` (full check), passed through :mod:`dscompress.deploy.onnx_passes`
(nodes ONNX Runtime refuses), stamped with metadata (dscompress version, exporter, precision,
the preprocessing the model expects) and validated against the PyTorch model on ONNX Runtime
(:mod:`dscompress.deploy.validate`) before it is put at ``path``. A graph that fails validation, or
could not be validated on a provider that was asked for, is kept beside it as
``NAME.failed.onnx`` instead, so ``path`` only ever holds a validated export.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import onnx
import torch
from torch import nn

from dscompress import __version__
from dscompress.core.config import ConfigError, Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError, DscompressWarning, first_line
from dscompress.core.util import captured_output, default_permissions, eval_mode, flatten_outputs
from dscompress.data.datasets import Preprocess
from dscompress.deploy.onnx_passes import explicit_same_pads, same_pad_dilation_nodes, stamp
from dscompress.deploy.ort import onnx_input_shape, parse_providers
from dscompress.deploy.validate import ValidateConfig, ValidationRecord, validate_onnx
from dscompress.nn.layers import deploy_form

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Batch of the example input for a dynamic batch: torch.export specialises a dimension of size
# 1 to a constant, so the example must have at least 2 images.
DYNAMIC_EXAMPLE_BATCH = 2
# Protobuf cannot serialise more than 2 GiB; above this the weights go to OUT.data beside OUT.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
UNSIMPLIFIED_SUFFIX = ".unsimplified.onnx"
FAILED_SUFFIX = ".failed.onnx"

ExportStatus = Literal["pass", "fail", "unavailable", "not run"]


class ExportWarning(DscompressWarning):
    """Something the user should know about the exported graph (a fallback, a risky node)."""


@dataclass
class ExportConfig(StepConfig):
    """How to export."""

    STEP: ClassVar[str] = "export"

    opset: int = option(18, "ONNX opset of the default domain.")
    batch: int | Literal["dynamic"] = option("dynamic", "dynamic for a batch axis of any size, or a fixed batch size N.")
    fp16: bool = option(False, "Half-precision weights and activations; the graph's input and output stay float32.")
    simplify: bool = option(False, "Simplify with onnxslim; the unsimplified graph is kept as NAME.unsimplified.onnx and both are validated.")
    exporter: Literal["auto", "dynamo", "torchscript"] = option(
        "auto", "auto: torch.export, falling back to TorchScript with a warning; dynamo: fail instead; torchscript."
    )
    validate: bool = option(True, "Compare the graph with the PyTorch model on ONNX Runtime before it is called exported.")
    precision: Literal["auto", "fp32", "int8"] = option(
        "auto", "auto: the artifact's plan's (an INT8 plan is written as its QDQ graph, calibrated on the plan's images and measured "
                "as `quantize` measures it); fp32; int8: the plan's INT8 graph (other models: `dscompress quantize`).")
    providers: list[str] = option(
        factory=lambda: ["auto"], help="Providers to validate on: cpu, cuda, tensorrt (comma-separated) or auto (every one that runs here)."
    )

    def check(self):
        highest = onnx.defs.onnx_opset_version()
        check_range("opset", self.opset, 13, highest)
        if isinstance(self.batch, int):
            check_range("batch", self.batch, low=1)
        try:
            self.providers = parse_providers(self.providers)
        except DscompressError as e:
            raise ConfigError("providers", str(e)) from None


@dataclass
class ExportRecord(Record):
    """What :func:`export_onnx` wrote and how it checked out.

    Attributes:
        path: where the graph is: the requested path, or ``NAME.failed.onnx`` beside it when
            validation failed or could not run on a provider that was asked for.
        requested_path: the path that was asked for.
        exporter: ``"dynamo"`` or ``"torchscript"``, the exporter that produced the graph.
        fallback_reason: why torch.export was not used, when the TorchScript exporter was.
        input_shape: the graph input's shape, ``"batch"`` for the dynamic axis.
        same_pad_dilation: Conv nodes still combining ``auto_pad=SAME_*`` with dilation > 1
            (ONNX Runtime rejects them); ``same_pad_fixed`` lists those rewritten to explicit pads.
        validation: the :class:`~dscompress.deploy.validate.ValidationRecord` of the written graph as a
            dict; ``validation_unsimplified`` that of the graph before onnxslim.
    """

    DERIVED: ClassVar[tuple[str, ...]] = ("validation_status",)

    path: str
    exporter: str
    opset: int
    batch: str | int
    example_batch: int
    precision: str
    input_size: list[int]
    input_shape: list
    output_names: list[str]
    size_bytes: int
    nodes: int
    requested_path: str = ""
    external_data: str | None = None
    fallback_reason: str | None = None
    simplified: bool = False
    unsimplified_path: str | None = None
    nodes_unsimplified: int | None = None
    same_pad_dilation: list[str] = field(default_factory=list)
    same_pad_fixed: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    validation: dict | None = None
    validation_unsimplified: dict | None = None

    @property
    def validation_status(self) -> ExportStatus:
        """``pass``, ``fail``, ``unavailable`` (worst of both validations) or ``not run``."""
        statuses = [v["status"] for v in (self.validation_unsimplified, self.validation) if v]
        for status in ("fail", "unavailable", "pass"):
            if status in statuses:
                return status
        return "not run"

    @property
    def kept_aside(self) -> bool:
        """Whether the graph was written beside the requested path (failed or incomplete validation)."""
        return bool(self.requested_path) and os.path.abspath(self.path) != os.path.abspath(self.requested_path)

    def validations(self) -> list[tuple[str, ValidationRecord]]:
        """(label, record) of each validation run: ``unsimplified`` (before onnxslim) and ``final``."""
        pairs = [("unsimplified", self.validation_unsimplified), ("final", self.validation)]
        return [(label, ValidationRecord.from_dict(v)) for label, v in pairs if v]

    def failure(self) -> str:
        """One line saying what did not validate (empty when all passed or none ran)."""
        parts = []
        for _, record in self.validations():
            failure = record.failure()
            if failure and failure not in parts:
                parts.append(failure)
        return "; ".join(parts)

    def summary(self) -> dict:
        """The short form stored in an artifact's metrics (``onnx``)."""
        summary = {
            "path": os.path.abspath(self.path),
            "exporter": self.exporter,
            "opset": self.opset,
            "batch": self.batch,
            "precision": self.precision,
            "simplified": self.simplified,
            "validation": self.validation_status,
        }
        if self.validation:
            summary["validated"] = ValidationRecord.from_dict(self.validation).summary()
        return summary


# --- exporting -----------------------------------------------------------------------------------


class _HalfPrecision(nn.Module):
    """Runs a float16 copy of a model between float32 input and output casts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return _to_float(self.model(x.half()))


def _to_float(out):
    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return type(out)(*(_to_float(v) for v in out))
    return type(out)(_to_float(v) for v in out)


def _one_line(error: BaseException) -> str:
    """The line of an exporter's error worth showing: torch.export's exception summary if any."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("## Exception summary") and i + 1 < len(lines):
            summary = lines[i + 1]
            where = next((lines[j + 1] for j in range(i, len(lines) - 1) if lines[j].startswith("File ") and "in forward" in lines[j]), "")
            summary = re.sub(r"<class '([\w.]+\.)?(\w+)'>", r"\2", summary)
            return (summary + (f" (at `{where}`)" if where else ""))[:400]
    return (lines[0] if lines else type(error).__name__)[:400]


def _example_outputs(model: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        return len(flatten_outputs(model(example)))


def _run_exporter(module: nn.Module, example: torch.Tensor, path: str, config: ExportConfig, output_names: list[str]) -> tuple[str, str | None]:
    """Write the graph to ``path`` with the configured exporter; returns (exporter, fallback reason)."""
    dynamic = config.batch == "dynamic"
    reason = None
    if config.exporter in ("auto", "dynamo"):
        shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
        try:
            with captured_output(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (example,),
                    path,
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=output_names,
                    opset_version=config.opset,
                    dynamic_shapes=shapes,
                    external_data=True,
                    verbose=False,
                )
            return "dynamo", None
        except Exception as e:  # noqa: BLE001 - torch.export fails in many ways
            reason = _one_line(e)
            if config.exporter == "dynamo":
                raise DscompressError(f"torch.export cannot export {type(module).__name__}: {reason}; try --exporter torchscript") from None
            warnings.warn(
                f"torch.export could not export {type(module).__name__} ({reason}); "
                "fell back to the TorchScript exporter (dynamo=False)",
                ExportWarning,
                stacklevel=4,
            )
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *output_names]} if dynamic else None
    try:
        with captured_output(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                path,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=output_names,
                opset_version=config.opset,
                dynamic_axes=axes,
            )
    except Exception as e:  # noqa: BLE001
        raise DscompressError(
            f"neither exporter can export {type(module).__name__}: torch.export: {reason or 'not tried'}; "
            f"TorchScript: {_one_line(e)}"
        ) from None
    return "torchscript", reason


def _initializer_bytes(proto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)


def _write_checked(proto, path: str) -> str | None:
    """Save the graph at ``path`` (weights over 2 GB in ``NAME.data`` beside it) and run the full
    ``onnx.checker``. Returns the external data file's name, or None."""
    name = os.path.basename(path)
    external = None
    try:
        if _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD:
            external = name + ".data"
            onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=external, size_threshold=1024)
        else:
            onnx.save_model(proto, path)
    except OSError as e:
        raise DscompressError(f"cannot write {path!r}: {e.strerror}; free some space or choose another output") from None
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise DscompressError(f"the exported graph fails onnx.checker: {first_line(e)}") from None
    return external


def failed_path(path: str) -> str:
    """``model.onnx`` -> ``model.failed.onnx``: where a graph that did not validate is kept."""
    return (path[: -len(".onnx")] if path.endswith(".onnx") else path) + FAILED_SUFFIX


def unsimplified_path(path: str) -> str:
    return (path[: -len(".onnx")] if path.endswith(".onnx") else path) + UNSIMPLIFIED_SUFFIX


def export_onnx(
    model: nn.Module,
    input_size,
    path: str,
    config: ExportConfig | None = None,
    force: bool = False,
    metadata: dict | None = None,
) -> ExportRecord:
    """Export ``model`` to the ONNX file ``path`` and validate it.

    Args:
        model: takes image batches (N, C, H, W); exported in eval mode, given back as it was.
        input_size: (C, H, W) of one image.
        path: the ``.onnx`` file to write; an existing file is replaced only with ``force``, and
            only by a graph that passed validation (or with ``config.validate=False``).
        config: exporter, opset, batch, precision, simplification and validation choices.
        metadata: extra ``metadata_props`` entries (e.g. the source artifact's manifest hash).

    Returns:
        The :class:`ExportRecord`. Validation failures are recorded there, not raised: the graph
        is kept as ``NAME.failed.onnx`` for inspection (``record.path``).
    """
    config = config or ExportConfig()
    input_size = [int(v) for v in input_size]
    _check_output(path, input_size, config, force)
    proto, exporter, fallback, example_batch = _export_proto(model, input_size, config)
    fixed = explicit_same_pads(proto.graph)
    flagged = same_pad_dilation_nodes(proto.graph)
    if flagged:
        warnings.warn(
            f"{len(flagged)} Conv node(s) combine auto_pad=SAME_* with dilation > 1, which ONNX Runtime rejects: "
            f"{', '.join(flagged[:3])}; use explicit padding in the model",
            ExportWarning,
            stacklevel=2,
        )
    precision = "fp16" if config.fp16 else "fp32"
    stamped = {
        "dscompress.version": __version__,
        "dscompress.exporter": exporter,
        "dscompress.precision": precision,
        "dscompress.input_size": ",".join(map(str, input_size)),
        "dscompress.preprocess": json.dumps(Preprocess.for_input(input_size).to_dict()),
        "torch.version": torch.__version__,
        **(metadata or {}),
    }
    stamp(proto, stamped)
    record = ExportRecord(
        path=path,
        requested_path=path,
        exporter=exporter,
        opset=config.opset,
        batch=config.batch,
        example_batch=example_batch,
        precision=precision,
        input_size=input_size,
        input_shape=onnx_input_shape(proto),
        output_names=[o.name for o in proto.graph.output],
        size_bytes=0,
        nodes=len(proto.graph.node),
        fallback_reason=fallback,
        same_pad_dilation=flagged,
        same_pad_fixed=fixed,
        metadata=stamped,
    )
    validate = ValidateConfig(providers=config.providers) if config.validate else None
    if config.simplify:
        where, _, record.validation_unsimplified = _write_validated(proto, unsimplified_path(path), model, input_size, validate)
        record.unsimplified_path = where
        record.nodes_unsimplified = len(proto.graph.node)
        proto = _simplify(proto)
        stamp(proto, {**stamped, "dscompress.simplified": "onnxslim"})
        record.simplified = True
        record.nodes = len(proto.graph.node)
        record.metadata = {p.key: p.value for p in proto.metadata_props}
    record.path, record.external_data, record.validation = _write_validated(proto, path, model, input_size, validate)
    record.size_bytes = os.path.getsize(record.path)
    if record.external_data:
        record.size_bytes += os.path.getsize(os.path.join(os.path.dirname(os.path.abspath(path)), record.external_data))
    return record


def _check_output(path: str, input_size: list[int], config: ExportConfig, force: bool) -> None:
    """One line, before any work, for a bad input size or an output that cannot or may not be written."""
    if len(input_size) != 3 or min(input_size) < 1:
        raise DscompressError(f"input size must be C,H,W with positive values, got {input_size}")
    targets = [path] + ([unsimplified_path(path)] if config.simplify else [])
    for target in targets:
        if os.path.isdir(target):
            raise DscompressError(f"{target!r} is a folder; give a file name such as model.onnx")
        if os.path.exists(target) and not force:
            raise DscompressError(f"{target!r} already exists; choose another output or pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise DscompressError(f"cannot write {path!r}: {parent!r} is a file, not a folder")


def _export_proto(model: nn.Module, input_size: list[int], config: ExportConfig) -> tuple[onnx.ModelProto, str, str | None, int]:
    """The exported graph, in memory: (proto, exporter used, why the first exporter was not, example batch).

    The model runs in its deploy form (depthwise-separable layers of rank > 1 as plain conv
    pairs), in half precision with ``config.fp16``, on a seeded random example batch.
    """
    example_batch = DYNAMIC_EXAMPLE_BATCH if config.batch == "dynamic" else config.batch
    device = next(model.parameters(), torch.empty(0)).device
    example = torch.randn(example_batch, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    with eval_mode(model):
        module = deploy_form(model)
        module = _HalfPrecision(copy.deepcopy(module).half()).eval() if config.fp16 else module
        try:
            outputs = _example_outputs(module, example)
        except Exception as e:  # noqa: BLE001
            precision = " in half precision (drop --fp16?)" if config.fp16 else ""
            raise DscompressError(
                f"the model does not run{precision} on inputs of size {','.join(map(str, input_size))}: "
                f"{_one_line(e)}; check --input-size (C,H,W)"
            ) from None
        output_names = [OUTPUT_NAME] + [f"output_{i}" for i in range(1, outputs)]
        with tempfile.TemporaryDirectory(prefix="dscompress-export-") as tmp:
            raw = os.path.join(tmp, "model.onnx")
            exporter, fallback = _run_exporter(module, example, raw, config, output_names)
            proto = onnx.load(raw, load_external_data=True)
    return proto, exporter, fallback, example_batch


def _write_validated(proto, path: str, model: nn.Module, input_size, validate: ValidateConfig | None) -> tuple[str, str | None, dict | None]:
    """Write the graph, validate it, and put it at ``path`` if it passed (or was not to be
    validated), else at ``NAME.failed.onnx``. Returns (where, external data file, validation)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        staged = os.path.join(staging, os.path.basename(path))
        external = _write_checked(proto, staged)
        validation = validate_onnx(staged, model, input_size, validate).to_dict() if validate else None
        target = path if validation is None or validation["status"] == "pass" else failed_path(path)
        if target != path:
            shutil.rmtree(staging)
            staging = tempfile.mkdtemp(dir=directory, prefix=f".{os.path.basename(target)}.tmp-")
            staged = os.path.join(staging, os.path.basename(target))
            external = _write_checked(proto, staged)  # so that its weights file is named after it too
        if external:
            os.replace(os.path.join(staging, external), os.path.join(directory, external))
        os.replace(staged, target)
        default_permissions(target)
        return target, external, validation
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _simplify(proto):
    import onnxslim

    with captured_output(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return onnxslim.slim(proto)
        except Exception as e:  # noqa: BLE001 - onnxslim raises whatever its passes raise
            raise DscompressError(f"onnxslim could not simplify the graph: {_one_line(e)}; export without --simplify") from None
