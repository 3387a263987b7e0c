"""Does the exported ONNX model compute what the PyTorch model computes, on each runtime?

``validate_onnx(onnx_path, model, input_size, config)`` opens one ONNX Runtime session per
requested execution provider, feeds the same seeded random images to the session and to the
PyTorch model (float32, on the CPU: the reference), and compares every output element-wise
with ``|onnx - torch| <= atol + rtol * |torch|`` (numpy's ``allclose``). Optionally it also
measures top-1 agreement on real images (``data``).

ONNX Runtime quietly runs a session on the CPU when the CUDA or TensorRT provider cannot start
(no GPU, missing libraries): the onnxruntime-gpu wheel lists them as available either way.
:func:`open_session` therefore checks ``session.get_providers()`` and reports such a provider
as unavailable, with the reason ONNX Runtime logged, rather than passing off a CPU run as a
CUDA result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dscompress.errors import DscompressError

# Short names accepted on the command line; full ONNX Runtime names are accepted too.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
SHORT_NAMES = {v: k for k, v in PROVIDERS.items()}

# Default tolerances by the precision of the exported graph, (atol, rtol), for numpy's allclose
# rule |onnx - torch| <= atol + rtol * |torch|. fp32: ONNX Runtime and PyTorch differ only by
# summation order (max |diff| ~1e-7 measured on converted resnet18 logits). fp16: half-precision
# weights and activations against the float32 PyTorch model. Measured on ORT CPU with resnet18,
# -34, -50 and -101, original and converted at rank 1, logits scaled to std 5 (|logit| up to
# 12.5): max |diff| 3.6e-3 (resnet34 converted) to 2.3e-2 (resnet101), the deepest using 65% of
# a 1e-2/1e-2 bound. 2e-2/2e-2 leaves resnet101 a 3x margin; a wrong weight or node moves
# logits by 1e-1 or more.
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2)}

# Images used for top-1 agreement with ``data``, unless the config says otherwise.
DEFAULT_DATA_LIMIT = 512


@dataclass
class ValidateConfig:
    """What to validate against.

    Attributes:
        providers: ONNX Runtime execution providers: ``cpu``, ``cuda``, ``tensorrt`` (or full
            names such as ``CUDAExecutionProvider``), or ``auto`` for every provider that really
            runs here; a comma-separated string is split.
        batch_sizes: batch sizes to compare at; at least one should differ from the export
            batch (2), to show that the batch axis is really dynamic.
        atol, rtol: tolerances; None picks them from the graph's precision (:data:`TOLERANCES`).
        data: a dataset spec (``digits``, ``cifar10:DIR`` ...) for top-1 agreement on real images.
        data_limit: at most this many test images for the agreement.
        seed: seed of the random normal input images.
    """

    providers: list[str] = field(default_factory=lambda: ["cpu"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 3])
    atol: float | None = None
    rtol: float | None = None
    data: str | None = None
    data_limit: int = DEFAULT_DATA_LIMIT
    seed: int = 0

    def __post_init__(self):
        self.providers = parse_providers(self.providers)
        self.batch_sizes = parse_batch_sizes(self.batch_sizes)
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and np.isfinite(value)):
                raise DscompressError(f"{name} must be a finite number >= 0, got {value}")
        if self.data_limit < 1:
            raise DscompressError(f"data_limit must be at least 1, got {self.data_limit}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ValidateConfig:
        return cls(**d)


def parse_providers(value: str | Iterable[str]) -> list[str]:
    """'cpu,cuda' or ['cpu', 'CUDAExecutionProvider'] -> ['cpu', 'cuda']; 'auto' stays alone."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        short = item.lower()
        if short == "auto" or short in PROVIDERS:
            name = short
        elif item in SHORT_NAMES:
            name = SHORT_NAMES[item]
        elif item.endswith("ExecutionProvider"):
            name = item  # another ONNX Runtime provider, e.g. OpenVINOExecutionProvider
        else:
            raise DscompressError(
                f"unknown provider {item!r}; use {', '.join(PROVIDERS)}, auto, or a full ONNX Runtime "
                "name such as CUDAExecutionProvider"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise DscompressError("give at least one provider (cpu, cuda, tensorrt or auto)")
    if "auto" in names and len(names) > 1:
        raise DscompressError("'auto' already means every usable provider; give it alone")
    return names


def parse_batch_sizes(value: str | int | Iterable[int]) -> list[int]:
    """'1,3' or [1, 3] -> [1, 3]: positive, unique, in the given order."""
    if isinstance(value, int):
        value = [value]
    items = value.split(",") if isinstance(value, str) else list(value)
    sizes = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            size = int(item)
        except (TypeError, ValueError):
            raise DscompressError(f"batch sizes must be positive integers like 1,3, got {value!r}") from None
        if size < 1:
            raise DscompressError(f"batch sizes must be positive integers like 1,3, got {value!r}")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise DscompressError("give at least one batch size")
    return sizes


def ort_name(provider: str) -> str:
    return PROVIDERS.get(provider, provider)


# --- sessions ------------------------------------------------------------------------------------


@contextlib.contextmanager
def captured_output():
    """Collect what Python and native libraries print while the block runs.

    ONNX Runtime logs provider failures from C++ straight to file descriptor 2 and prints some
    from Python; the exporters print progress. Yields a list that receives the text on exit.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    collected: list[str] = []
    python_text = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(1), os.dup(2)
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(python_text), contextlib.redirect_stderr(python_text):
                yield collected
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            collected.append(sink.read().decode(errors="replace") + python_text.getvalue())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _fallback_reason(log: str) -> str:
    """The line of ONNX Runtime's log that says why a provider did not start."""
    log = _ANSI.sub("", log)
    for pattern in (
        r"Failed to load library \S*?([^/\s]+) with error: ([^\n]+)",
        r"EP Error [^\n]*?(\w+\.cc:\d+ )?[^\n]*?\) ([^\n]+)",
        r"(Failed to create \w+)[^\n]*?(Require [^\n.]+)",
    ):
        match = re.search(pattern, log)
        if match:
            return ": ".join(g.strip() for g in match.groups() if g and g.strip())
    return "ONNX Runtime logged no reason"


def available_providers() -> list[str]:
    """Providers this onnxruntime build was compiled with (not necessarily usable here)."""
    import onnxruntime as ort

    return ort.get_available_providers()


def open_session(onnx_path: str, provider: str, threads: int | None = None):
    """An ONNX Runtime session that really runs on ``provider``, or None and the reason why not.

    Args:
        provider: a short name (``cpu``, ``cuda``, ``tensorrt``) or a full provider name.
        threads: intra-op threads for the CPU parts (None: ONNX Runtime's default).

    Returns:
        (session, None) when ``session.get_providers()[0]`` is the requested provider, else
        (None, reason). TensorRT gets CUDA and CPU behind it for the nodes it does not take,
        CUDA gets the CPU (shape computations), as in a deployment.
    """
    import onnxruntime as ort

    name = ort_name(provider)
    if name not in ort.get_available_providers():
        return None, f"not in this onnxruntime build (it has {', '.join(ort.get_available_providers())})"
    chain = [name]
    if name == "TensorrtExecutionProvider":
        chain.append("CUDAExecutionProvider")
    if name != "CPUExecutionProvider":
        chain.append("CPUExecutionProvider")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    with captured_output() as log:
        try:
            session = ort.InferenceSession(onnx_path, sess_options=options, providers=chain)
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidArgument types
            session, error = None, e
    if session is None:
        text = _ANSI.sub("", str(error)).strip().splitlines()
        if name == "CPUExecutionProvider":
            raise DscompressError(f"ONNX Runtime cannot load {onnx_path!r}: {text[0][:300] if text else error!r}")
        return None, f"session failed: {text[0][:300] if text else type(error).__name__}"
    actual = session.get_providers()
    if actual[0] != name:
        return None, f"ONNX Runtime fell back to {actual[0]}: {_fallback_reason(log[0])}"
    return session, None


def read_onnx(onnx_path: str):
    """Load an ONNX model's graph (weights left on disk), or say why the file is not one."""
    import onnx

    if not os.path.exists(onnx_path):
        raise DscompressError(f"ONNX file {onnx_path!r} does not exist; export one with `dscompress export MODEL --onnx {onnx_path}`")
    if os.path.isdir(onnx_path):
        raise DscompressError(f"{onnx_path!r} is a folder, not an ONNX file")
    try:
        return onnx.load(onnx_path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, onnx its own errors
        raise DscompressError(f"{onnx_path!r} is not an ONNX model ({type(e).__name__}); give a .onnx file written by an exporter") from None


def onnx_precision(model_proto) -> str:
    """'fp16' when the dscompress metadata says so or any float initializer is float16, else 'fp32'."""
    import onnx

    props = {p.key: p.value for p in model_proto.metadata_props}
    if "dscompress.precision" in props:
        return props["dscompress.precision"]
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model_proto.graph.initializer):
        return "fp16"
    return "fp32"


def onnx_input_shape(model_proto) -> list:
    """The first graph input's shape: ints for fixed dims, names (str) for dynamic ones."""
    graph_inputs = {i.name for i in model_proto.graph.initializer}
    inputs = [i for i in model_proto.graph.input if i.name not in graph_inputs]
    if len(inputs) != 1:
        raise DscompressError(f"the ONNX model has {len(inputs)} inputs; dscompress validates single-image-batch models")
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def check_input_size(shape: list, input_size) -> None:
    """Raise when the ONNX input (N, C, H, W) cannot take images of ``input_size`` (C, H, W)."""
    if len(shape) != 4:
        raise DscompressError(f"the ONNX model takes a {len(shape)}-d input {shape}; expected an image batch (N, C, H, W)")
    fixed = [(want, have) for want, have in zip(input_size, shape[1:]) if isinstance(have, int) and have > 0]
    if any(want != have for want, have in fixed):
        given = ",".join(str(v) if isinstance(v, int) and v > 0 else "?" for v in shape[1:])
        raise DscompressError(
            f"the ONNX model takes {given} (C,H,W) images but the model is set up for "
            f"{','.join(map(str, input_size))}; pass --input-size {given} or validate against the model it was exported from"
        )


# --- comparing -----------------------------------------------------------------------------------


@dataclass
class OutputDiff:
    """How one output of one batch differs from PyTorch.

    The relative difference is ``|onnx - torch| / max(|torch|, atol)``, so reference values
    near zero do not blow it up. ``mismatched`` counts elements outside the tolerance.
    """

    name: str
    batch_size: int
    shape: list[int]
    max_abs: float
    mean_abs: float
    median_abs: float
    max_rel: float
    mean_rel: float
    median_rel: float
    mismatched: int
    passed: bool


@dataclass
class ProviderResult:
    """Validation on one execution provider.

    ``status``: ``pass``, ``fail``, ``unavailable`` (asked for by name but it cannot run here) or
    ``skipped`` (found by ``auto`` but not usable here); ``reason`` says why for all but ``pass``.
    """

    provider: str
    status: str
    reason: str = ""
    session_providers: list[str] = field(default_factory=list)
    diffs: list[OutputDiff] = field(default_factory=list)
    agreement: dict | None = None


@dataclass
class ValidationRecord:
    """What :func:`validate_onnx` found; ``status`` is the verdict over all providers.

    ``status``: ``pass`` when every provider that was asked for ran and passed; ``fail`` when
    any output of any provider is out of tolerance; ``unavailable`` when a provider asked for
    by name could not run here (nothing failed, but the check is incomplete).
    """

    onnx_path: str
    precision: str
    atol: float
    rtol: float
    batch_sizes: list[int]
    input_size: list[int]
    providers: list[ProviderResult]
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        statuses = [p.status for p in self.providers]
        if "fail" in statuses:
            return "fail"
        if "unavailable" in statuses or "pass" not in statuses:
            return "unavailable"
        return "pass"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def failure(self) -> str:
        """One line saying what did not pass (empty when everything passed)."""
        parts = []
        for p in self.providers:
            if p.status == "fail":
                parts.append(f"{p.provider}: {p.reason}")
            elif p.status == "unavailable":
                parts.append(f"{p.provider} unavailable: {p.reason}")
        return "; ".join(parts)

    def summary(self) -> dict:
        """The short form stored in an artifact's metrics."""
        return {
            "status": self.status,
            "precision": self.precision,
            "atol": self.atol,
            "rtol": self.rtol,
            "batch_sizes": self.batch_sizes,
            "providers": {
                p.provider: p.status if p.status == "pass" else f"{p.status}: {p.reason}" for p in self.providers
            },
            "max_abs": max((d.max_abs for p in self.providers for d in p.diffs), default=None),
        }

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["status"] = self.status
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ValidationRecord:
        d = {k: v for k, v in d.items() if k != "status"}
        providers = [
            ProviderResult(**{**p, "diffs": [OutputDiff(**x) for x in p["diffs"]]}) for p in d.pop("providers")
        ]
        return cls(providers=providers, **d)


def _flatten(outputs) -> list[torch.Tensor]:
    """A model's outputs as a list of tensors (a tensor, tuple, list, dict or named tuple)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [t for item in outputs for t in _flatten(item)]


def compare_outputs(onnx_out: np.ndarray, torch_out: np.ndarray, name: str, batch_size: int, atol: float, rtol: float) -> OutputDiff:
    """Element-wise comparison of one output; both arrays have the same shape."""
    onnx_out = onnx_out.astype(np.float64)
    torch_out = torch_out.astype(np.float64)
    diff = np.abs(onnx_out - torch_out)
    rel = diff / np.maximum(np.abs(torch_out), max(atol, 1e-12))
    outside = ~(diff <= atol + rtol * np.abs(torch_out))  # NaN counts as outside
    return OutputDiff(
        name=name,
        batch_size=batch_size,
        shape=list(torch_out.shape),
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        median_abs=float(np.median(diff)) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mean_rel=float(rel.mean()) if rel.size else 0.0,
        median_rel=float(np.median(rel)) if rel.size else 0.0,
        mismatched=int(outside.sum()),
        passed=not bool(outside.any()),
    )


def _feed(session, images: torch.Tensor) -> dict:
    spec = session.get_inputs()[0]
    array = images.numpy()
    if spec.type == "tensor(float16)":
        array = array.astype(np.float16)
    return {spec.name: array}


@torch.no_grad()
def _torch_outputs(model: nn.Module, images: torch.Tensor) -> list[np.ndarray]:
    return [t.detach().float().cpu().numpy() for t in _flatten(model(images))]


def top1_agreement(run_onnx, model: nn.Module, batches: Iterable, limit: int | None = None) -> dict:
    """How often the ONNX model's top-1 class is PyTorch's, on real images.

    Args:
        run_onnx: a function from an image batch (N, C, H, W) float32 tensor to the ONNX
            model's first output (N, classes) as a numpy array.
        model: the PyTorch model, in eval mode, on the CPU.
        batches: image batches (N, C, H, W), or (images, labels) pairs as a DataLoader gives.
        limit: stop after this many images.

    Returns:
        ``images``, ``agreement`` (percent of images where both pick the same class) and, when
        labels come with the images, each runtime's top-1 accuracy in percent.
    """
    images_seen = agree = onnx_correct = torch_correct = 0
    labelled = True
    for batch in batches:
        images, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if limit is not None:
            images = images[: limit - images_seen]
            labels = labels[: len(images)] if labels is not None else None
        if len(images) == 0:
            break
        images = images.float()
        torch_top = _torch_outputs(model, images)[0].argmax(axis=-1)
        onnx_top = np.asarray(run_onnx(images)).argmax(axis=-1)
        agree += int((torch_top == onnx_top).sum())
        if labels is None:
            labelled = False
        else:
            labels = np.asarray(labels)
            onnx_correct += int((onnx_top == labels).sum())
            torch_correct += int((torch_top == labels).sum())
        images_seen += len(images)
        if limit is not None and images_seen >= limit:
            break
    if images_seen == 0:
        raise DscompressError("no images to measure top-1 agreement on; the dataset is empty")
    result = {"images": images_seen, "agreement": 100.0 * agree / images_seen}
    if labelled:
        result["onnx_top1"] = 100.0 * onnx_correct / images_seen
        result["torch_top1"] = 100.0 * torch_correct / images_seen
    return result


def _rebatch(loader: Iterable, batch_size: int | None) -> Iterable:
    """Regroup (images, labels) batches to exactly ``batch_size`` for a fixed-batch graph."""
    if batch_size is None:
        yield from loader
        return
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(torch.as_tensor(y))
        stacked = torch.cat(images), torch.cat(labels)
        while len(stacked[0]) >= batch_size:
            yield stacked[0][:batch_size], stacked[1][:batch_size]
            stacked = stacked[0][batch_size:], stacked[1][batch_size:]
        images, labels = [stacked[0]], [stacked[1]]


def _data_batches(data: str, input_size, batch_size: int | None):
    from dscompress.data import load_dataset, make_loader

    dataset = load_dataset(data, input_size, split="test")
    return _rebatch(make_loader(dataset, batch_size or 64), batch_size)


# --- validating ----------------------------------------------------------------------------------


def validate_onnx(onnx_path: str, model: nn.Module, input_size, config: ValidateConfig | None = None) -> ValidationRecord:
    """Compare an ONNX model on each requested provider with the PyTorch model it came from.

    Args:
        onnx_path: the exported graph; its single input takes (N, C, H, W) image batches.
        model: the PyTorch model (the reference), run in float32 on the CPU in eval mode.
        input_size: (C, H, W) of one image; must fit the graph's fixed dimensions.
        config: providers, batch sizes, tolerances and optional real data.

    A graph with a fixed batch is compared at that batch only (noted in the record).
    """
    config = config or ValidateConfig()
    input_size = [int(v) for v in input_size]
    proto = read_onnx(onnx_path)
    shape = onnx_input_shape(proto)
    check_input_size(shape, input_size)
    with eval_mode(model):
        return _validate(onnx_path, proto, shape, _reference_model(model), input_size, config)


def _validate(onnx_path: str, proto, shape: list, reference: nn.Module, input_size: list[int], config: ValidateConfig) -> ValidationRecord:
    precision = onnx_precision(proto)
    default_atol, default_rtol = TOLERANCES.get(precision, TOLERANCES["fp32"])
    atol = default_atol if config.atol is None else config.atol
    rtol = default_rtol if config.rtol is None else config.rtol
    notes = []
    fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    batch_sizes = list(config.batch_sizes)
    if fixed_batch is not None and batch_sizes != [fixed_batch]:
        notes.append(f"the graph has a fixed batch of {fixed_batch}; compared at that batch only")
        batch_sizes = [fixed_batch]
    if fixed_batch is None and len(batch_sizes) < 2:
        notes.append("only one batch size compared; give two (e.g. 1,3) to check the dynamic batch axis")

    generator = torch.Generator().manual_seed(config.seed)
    inputs = {b: torch.randn(b, *input_size, generator=generator) for b in batch_sizes}
    expected = {b: _torch_outputs(reference, x) for b, x in inputs.items()}
    output_names = [o.name for o in proto.graph.output]
    if len(output_names) != len(expected[batch_sizes[0]]):
        raise DscompressError(
            f"the ONNX model has {len(output_names)} outputs but the PyTorch model returns "
            f"{len(expected[batch_sizes[0]])}; validate against the model it was exported from"
        )

    providers = config.providers
    automatic = providers == ["auto"]
    if automatic:
        providers = [SHORT_NAMES.get(p, p) for p in available_providers() if p in SHORT_NAMES]
    results = []
    for provider in providers:
        session, reason = open_session(onnx_path, provider)
        if session is None:
            status = "skipped" if automatic else "unavailable"
            results.append(ProviderResult(provider, status, reason))
            if automatic:
                notes.append(f"auto skipped {provider}: {reason}")
            continue
        result = ProviderResult(provider, "pass", session_providers=session.get_providers())
        for b in batch_sizes:
            got = session.run(None, _feed(session, inputs[b]))
            for name, onnx_out, torch_out in zip(output_names, got, expected[b]):
                if tuple(onnx_out.shape) != tuple(torch_out.shape):
                    raise DscompressError(
                        f"output {name!r} has shape {tuple(onnx_out.shape)} in the ONNX model but "
                        f"{tuple(torch_out.shape)} from PyTorch at batch {b}; validate against the model it was exported from"
                    )
                result.diffs.append(compare_outputs(onnx_out, torch_out, name, b, atol, rtol))
        failed = [d for d in result.diffs if not d.passed]
        if failed:
            worst = max(failed, key=lambda d: d.max_abs)
            result.status = "fail"
            result.reason = (
                f"{worst.name} at batch {worst.batch_size}: {worst.mismatched} of "
                f"{int(np.prod(worst.shape))} values outside atol {atol:g} + rtol {rtol:g}, max |diff| {worst.max_abs:.3g}"
            )
        if config.data:
            result.agreement = top1_agreement(
                lambda images, s=session: s.run(None, _feed(s, images))[0],
                reference,
                _data_batches(config.data, input_size, fixed_batch),
                limit=config.data_limit,
            )
        results.append(result)
    return ValidationRecord(
        onnx_path=onnx_path,
        precision=precision,
        atol=atol,
        rtol=rtol,
        batch_sizes=batch_sizes,
        input_size=input_size,
        providers=results,
        notes=notes,
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the block with ``model`` in eval mode and give it back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _reference_model(model: nn.Module) -> nn.Module:
    """The model in float32 on the CPU (a copy only when it is not already)."""
    parameter = next(model.parameters(), None)
    if parameter is not None and (parameter.dtype != torch.float32 or parameter.device.type != "cpu"):
        import copy

        model = copy.deepcopy(model).float().cpu()
    return model


# --- rendering -----------------------------------------------------------------------------------


def validation_table(record: ValidationRecord, title: str | None = None):
    """A rich table: one row per provider, batch and output; unusable providers with their reason."""
    from rich.table import Table

    table = Table(title=title or f"ONNX Runtime vs PyTorch: {record.status} ({record.precision}, atol {record.atol:g}, rtol {record.rtol:g})")
    for name in ("provider", "status", "batch", "output", "max |diff|", "mean |diff|", "median |diff|", "max rel", "outside tol"):
        table.add_column(name, justify="left" if name in ("provider", "status", "output") else "right")
    for result in record.providers:
        if not result.diffs:
            table.add_row(result.provider, result.status, "-", "-", "-", "-", "-", "-", "see below")
            continue
        for d in result.diffs:
            table.add_row(
                result.provider,
                "pass" if d.passed else "fail",
                str(d.batch_size),
                d.name,
                f"{d.max_abs:.2e}",
                f"{d.mean_abs:.2e}",
                f"{d.median_abs:.2e}",
                f"{d.max_rel:.2e}",
                f"{d.mismatched}/{int(np.prod(d.shape))}",
            )
    return table


def validation_lines(record: ValidationRecord) -> list[str]:
    """Notes and top-1 agreement, one line each, to print under the table."""
    lines = [f"{r.provider} {r.status}: {r.reason}" for r in record.providers if r.status in ("unavailable", "skipped")]
    lines += [f"note: {note}" for note in record.notes if not note.startswith("auto skipped")]
    for result in record.providers:
        a = result.agreement
        if a:
            line = f"{result.provider}: top-1 agreement with PyTorch {a['agreement']:.2f}% on {a['images']} images"
            if "onnx_top1" in a:
                line += f" (top-1 accuracy: ONNX {a['onnx_top1']:.2f}%, PyTorch {a['torch_top1']:.2f}%)"
            lines.append(line)
    return lines
