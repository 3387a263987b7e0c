"""Export to ONNX for GPU runtimes (ONNX Runtime CUDA/TensorRT, TensorRT itself).

``export_onnx(model, input_size, path, config)`` writes one graph with input ``input``
(N, C, H, W) and output ``logits`` (N, classes), the batch axis dynamic unless a fixed batch
is asked for. It uses the ``torch.export``-based exporter (``dynamo=True``) and falls back to
the TorchScript exporter, with a warning that says why, when ``torch.export`` cannot capture
the model. The graph is checked with ``onnx.checker`` (full check), scanned for Conv nodes that
ONNX Runtime rejects (``auto_pad=SAME_*`` with dilation > 1, which the TorchScript exporter
writes for ``padding="same"`` dilated convolutions: rewritten to explicit pads when the stride
is 1), stamped with dscompress metadata, written atomically and, unless told not to, validated
against the PyTorch model on ONNX Runtime (:mod:`dscompress.validate`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from dscompress import __version__
from dscompress.errors import DscompressError, first_line
from dscompress.validate import (
    ValidateConfig,
    ValidationRecord,
    captured_output,
    eval_mode,
    onnx_input_shape,
    parse_providers,
    validate_onnx,
)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTERS = ("auto", "dynamo", "torchscript")
# Batch of the example input for a dynamic batch: torch.export specialises a dimension of size
# 1 to a constant, so the example must have at least 2 images.
DYNAMIC_EXAMPLE_BATCH = 2
# Protobuf cannot serialise more than 2 GiB; above this the weights go to OUT.data beside OUT.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
UNSIMPLIFIED_SUFFIX = ".unsimplified.onnx"


class ExportWarning(UserWarning):
    """Something the user should know about the exported graph (a fallback, a risky node)."""


@dataclass
class ExportConfig:
    """How to export.

    Attributes:
        opset: ONNX opset of the default domain.
        batch: ``"dynamic"`` for a batch axis of any size, or a fixed batch size N.
        fp16: export the model in half precision (weights and activations float16); the graph
            input and output stay float32 with a Cast at each end, so callers feed the same
            arrays, and validation uses the fp16 tolerances.
        simplify: run onnxslim on the graph; the unsimplified graph is kept beside it as
            ``NAME.unsimplified.onnx`` and both are validated.
        exporter: ``"auto"`` (torch.export, falling back to TorchScript with a warning),
            ``"dynamo"`` (fail instead of falling back) or ``"torchscript"``.
        validate: compare the graph with the PyTorch model on ONNX Runtime after export.
        providers: execution providers to validate on (see :class:`~dscompress.validate.ValidateConfig`).
    """

    opset: int = 18
    batch: str | int = "dynamic"
    fp16: bool = False
    simplify: bool = False
    exporter: str = "auto"
    validate: bool = True
    providers: list[str] = field(default_factory=lambda: ["cpu"])

    def __post_init__(self):
        import onnx

        highest = onnx.defs.onnx_opset_version()
        if not (isinstance(self.opset, int) and 13 <= self.opset <= highest):
            raise DscompressError(f"opset must be an integer from 13 to {highest}, got {self.opset!r}")
        if isinstance(self.batch, str) and self.batch.strip().isdigit():
            self.batch = int(self.batch)
        if self.batch != "dynamic" and not (isinstance(self.batch, int) and not isinstance(self.batch, bool) and self.batch >= 1):
            raise DscompressError(f"batch must be 'dynamic' or a positive integer, got {self.batch!r}")
        if self.exporter not in EXPORTERS:
            raise DscompressError(f"exporter must be one of {', '.join(EXPORTERS)}, got {self.exporter!r}")
        self.providers = parse_providers(self.providers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExportConfig:
        return cls(**d)


@dataclass
class ExportRecord:
    """What :func:`export_onnx` wrote and how it checked out.

    Attributes:
        exporter: ``"dynamo"`` or ``"torchscript"``, the exporter that produced the graph.
        fallback_reason: why torch.export was not used, when the TorchScript exporter was.
        input_shape: the graph input's shape, ``"batch"`` for the dynamic axis.
        same_pad_dilation: Conv nodes still combining ``auto_pad=SAME_*`` with dilation > 1
            (ONNX Runtime rejects them); ``same_pad_fixed`` lists those rewritten to explicit pads.
        validation: the :class:`~dscompress.validate.ValidationRecord` of the written graph as a
            dict; ``validation_unsimplified`` that of the graph before onnxslim.
    """

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
    def validation_status(self) -> str:
        """``pass``, ``fail``, ``unavailable`` (worst of both validations) or ``not run``."""
        statuses = [v["status"] for v in (self.validation_unsimplified, self.validation) if v]
        for status in ("fail", "unavailable", "pass"):
            if status in statuses:
                return status
        return "not run"

    def validations(self) -> list[tuple[str, ValidationRecord]]:
        """(label, record) of each validation run: ``unsimplified`` (before onnxslim) and ``final``."""
        pairs = [("unsimplified", self.validation_unsimplified), ("final", self.validation)]
        return [(label, ValidationRecord.from_dict(v)) for label, v in pairs if v]

    def failure(self) -> str:
        """One line saying what did not validate (empty when all passed or none ran)."""
        parts = []
        for label, record in self.validations():
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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["validation_status"] = self.validation_status
        return d


# --- checks on the graph -------------------------------------------------------------------------


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _same_pad_dilated(node) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return False
    attrs = _attributes(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad.startswith("SAME") and any(d > 1 for d in attrs.get("dilations", []))


def same_pad_dilation_nodes(graph) -> list[str]:
    """Names of Conv nodes that combine ``auto_pad=SAME_UPPER/LOWER`` with a dilation > 1.

    ONNX allows them; ONNX Runtime's CPU Conv refuses them at run time ("Dilation not supported
    for AutoPadType::SAME_UPPER or AutoPadType::SAME_LOWER"). Subgraphs (If/Loop bodies) are
    searched too.
    """
    import onnx

    flagged = []
    for node in graph.node:
        if _same_pad_dilated(node):
            flagged.append(node.name or f"Conv({', '.join(node.input)})")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                flagged += same_pad_dilation_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    flagged += same_pad_dilation_nodes(g)
    return flagged


def explicit_same_pads(graph) -> list[str]:
    """Rewrite stride-1 ``auto_pad=SAME_*`` Convs with dilation > 1 to explicit ``pads``.

    With stride 1 the "same" padding does not depend on the input size: each spatial side gets
    ``dilation * (kernel - 1)`` in total, the odd one extra at the end (SAME_UPPER) or the
    beginning (SAME_LOWER). Only the top-level graph is rewritten. Returns the names of the
    rewritten nodes; strided ones are left (and stay flagged by :func:`same_pad_dilation_nodes`).
    """
    import onnx

    weights = {t.name: list(t.dims) for t in graph.initializer}
    fixed = []
    for node in graph.node:
        if not _same_pad_dilated(node):
            continue
        attrs = _attributes(node)
        kernel = list(attrs.get("kernel_shape") or weights.get(node.input[1], [])[2:])
        strides = attrs.get("strides", [1] * len(kernel))
        if not kernel or any(s != 1 for s in strides):
            continue
        dilations = attrs["dilations"]
        upper = attrs["auto_pad"] in (b"SAME_UPPER", "SAME_UPPER")
        totals = [d * (k - 1) for d, k in zip(dilations, kernel)]
        begins = [t // 2 if upper else t - t // 2 for t in totals]
        ends = [t - b for t, b in zip(totals, begins)]
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("pads", begins + ends))
        fixed.append(node.name)
    return fixed


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
    from dscompress.validate import _flatten

    with torch.no_grad():
        return len(_flatten(model(example)))


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
                stacklevel=3,
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


def _write_atomic(proto, path: str) -> str | None:
    """Write a model (and its external data, when over 2 GB) through a temporary folder and renames.

    Returns the external data file's name, or None when the weights are inside the model file.
    """
    import onnx

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    tmp = tempfile.mkdtemp(dir=directory, prefix=f".{name}.tmp-")
    try:
        external = None
        if _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD:
            external = name + ".data"
            onnx.save_model(proto, os.path.join(tmp, name), save_as_external_data=True, all_tensors_to_one_file=True, location=external, size_threshold=1024)
        else:
            onnx.save_model(proto, os.path.join(tmp, name))
        try:
            onnx.checker.check_model(os.path.join(tmp, name), full_check=True)
        except onnx.checker.ValidationError as e:
            raise DscompressError(f"the exported graph fails onnx.checker: {first_line(e)}") from None
        if external:
            os.replace(os.path.join(tmp, external), os.path.join(directory, external))
        os.replace(os.path.join(tmp, name), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return external


def _stamp(proto, metadata: dict) -> None:
    import onnx

    existing = {p.key: p.value for p in proto.metadata_props}
    existing.update({k: str(v) for k, v in metadata.items()})
    onnx.helper.set_model_props(proto, existing)


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
        path: the ``.onnx`` file to write; an existing file is replaced only with ``force``.
        config: exporter, opset, batch, precision, simplification and validation choices.
        metadata: extra ``metadata_props`` entries (e.g. the source artifact's manifest hash).

    Returns:
        The :class:`ExportRecord`. Validation failures are recorded there, not raised: the file
        stays for inspection.
    """
    import onnx

    config = config or ExportConfig()
    input_size = [int(v) for v in input_size]
    if len(input_size) != 3 or min(input_size) < 1:
        raise DscompressError(f"input size must be C,H,W with positive values, got {input_size}")
    unsimplified = path[: -len(".onnx")] + UNSIMPLIFIED_SUFFIX if path.endswith(".onnx") else path + UNSIMPLIFIED_SUFFIX
    for target in [path] + ([unsimplified] if config.simplify else []):
        if os.path.exists(target) and not force:
            raise DscompressError(f"{target!r} already exists; choose another output or pass --force to replace it")
        if os.path.isdir(target):
            raise DscompressError(f"{target!r} is a folder; give a file name such as model.onnx")

    example_batch = DYNAMIC_EXAMPLE_BATCH if config.batch == "dynamic" else config.batch
    device = next(model.parameters(), torch.empty(0)).device
    example = torch.randn(example_batch, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    with eval_mode(model):
        module = _HalfPrecision(copy.deepcopy(model).half()).eval() if config.fp16 else model
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
    stamp = {
        "dscompress.version": __version__,
        "dscompress.exporter": exporter,
        "dscompress.precision": precision,
        "dscompress.input_size": ",".join(map(str, input_size)),
        "torch.version": torch.__version__,
        **(metadata or {}),
    }
    _stamp(proto, stamp)
    record = ExportRecord(
        path=path,
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
        metadata=stamp,
    )
    validate = ValidateConfig(providers=config.providers)
    if config.simplify:
        record.external_data = _write_atomic(proto, unsimplified)
        record.unsimplified_path = unsimplified
        record.nodes_unsimplified = len(proto.graph.node)
        if config.validate:
            record.validation_unsimplified = validate_onnx(unsimplified, model, input_size, validate).to_dict()
        proto = _simplify(proto)
        _stamp(proto, {**stamp, "dscompress.simplified": "onnxslim"})
        record.simplified = True
        record.nodes = len(proto.graph.node)
        record.metadata = {p.key: p.value for p in proto.metadata_props}
    record.external_data = _write_atomic(proto, path)
    record.size_bytes = os.path.getsize(path)
    if record.external_data:
        record.size_bytes += os.path.getsize(os.path.join(os.path.dirname(os.path.abspath(path)), record.external_data))
    if config.validate:
        record.validation = validate_onnx(path, model, input_size, validate).to_dict()
    return record


def _simplify(proto):
    import onnxslim

    with captured_output(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return onnxslim.slim(proto)
        except Exception as e:  # noqa: BLE001 - onnxslim raises whatever its passes raise
            raise DscompressError(f"onnxslim could not simplify the graph: {_one_line(e)}; export without --simplify") from None


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_source(source, path: str, config: ExportConfig | None = None, force: bool = False) -> ExportRecord:
    """Export a :class:`~dscompress.artifact.Source`; for an artifact, record the result in its metrics.

    The graph's metadata names the artifact by the sha256 of its manifest as it was before this
    export (recording the export then changes the manifest) and of its weights file, which
    nothing after conversion rewrites.
    """
    from dscompress.artifact import WEIGHTS

    metadata = {"dscompress.model": source.spec.name}
    artifact = source.artifact
    if artifact is not None:
        metadata["dscompress.artifact_manifest_sha256"] = artifact.manifest_sha256()
        metadata["dscompress.artifact_weights_sha256"] = sha256_file(os.path.join(artifact.path, WEIGHTS))
    record = export_onnx(source.model, source.spec.input_size, path, config, force=force, metadata=metadata)
    if artifact is not None:
        artifact.update_metrics(onnx=record.summary())
    return record


# --- rendering -----------------------------------------------------------------------------------


def export_lines(record: ExportRecord) -> list[str]:
    """What was written, one line each, to print above the validation tables."""
    shape = "x".join(str(v) for v in record.input_shape)
    lines = [
        f"wrote {record.path}: {record.size_bytes / 1e6:.2f} MB, {record.nodes} nodes, opset {record.opset}, "
        f"exporter {record.exporter}, input {shape}, {record.precision}"
    ]
    if record.external_data:
        lines.append(f"weights in {record.external_data} beside it (over 2 GB)")
    if record.fallback_reason:
        lines.append(f"torch.export failed ({record.fallback_reason}); used the TorchScript exporter")
    if record.same_pad_fixed:
        lines.append(f"rewrote {len(record.same_pad_fixed)} SAME-padded dilated Conv node(s) to explicit pads")
    if record.same_pad_dilation:
        lines.append(f"warning: ONNX Runtime will reject {len(record.same_pad_dilation)} SAME-padded dilated Conv node(s): {', '.join(record.same_pad_dilation[:3])}")
    if record.unsimplified_path:
        lines.append(f"onnxslim: {record.nodes_unsimplified} -> {record.nodes} nodes; unsimplified graph kept at {record.unsimplified_path}")
    if record.validation_status == "not run":
        lines.append("not validated (--no-validate)")
    return lines
