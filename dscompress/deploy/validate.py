"""Does the exported ONNX model compute what the PyTorch model computes, on each runtime?

``validate_onnx(onnx_path, model, input_size, config)`` opens one ONNX Runtime session per
requested execution provider (:func:`~dscompress.deploy.ort.open_session`, which refuses a silent CPU
fallback), feeds the same seeded random images to the session and to the PyTorch model (float32,
on the CPU: the reference), and compares every output element-wise with
``|onnx - torch| <= atol + rtol * |torch|`` (numpy's ``allclose``). Optionally it also measures
top-1 agreement on real images (``data``): per image for a classifier, per pixel (the argmax
over classes at every pixel) for a segmentation model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dscompress.core.config import ConfigError, Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError
from dscompress.core.util import eval_mode, flatten_outputs
from dscompress.data.datasets import DataSpec, check_task, load_dataset, make_loader
from dscompress.deploy.ort import (
    check_input_size,
    onnx_input_shape,
    onnx_precision,
    open_session,
    parse_providers,
    read_onnx,
    resolve_providers,
)
from dscompress.nn.metrics import IGNORE_INDEX

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


ProviderStatus = Literal["pass", "fail", "unavailable", "skipped"]
ValidationStatus = Literal["pass", "fail", "unavailable"]


def check_batch_sizes(name: str, sizes: list[int]) -> list[int]:
    """Positive, unique, in the given order."""
    if not sizes:
        raise ConfigError(name, "needs at least one batch size")
    for size in sizes:
        check_range(name, size, low=1)
    return list(dict.fromkeys(sizes))


@dataclass
class ValidateConfig(StepConfig):
    """What to validate against."""

    STEP: ClassVar[str] = "validate"

    providers: list[str] = option(
        factory=lambda: ["auto"],
        help="ONNX Runtime execution providers: cpu, cuda, tensorrt (or full names such as CUDAExecutionProvider), "
        "or auto for every provider that really runs here.",
    )
    batch_sizes: list[int] = option(
        factory=lambda: [1, 3], help="Batch sizes to compare at; one that differs from the export batch (2) shows the batch axis is dynamic."
    )
    atol: float | None = option(None, "Absolute tolerance [default: 1e-4 for fp32, 2e-2 for fp16].")
    rtol: float | None = option(None, "Relative tolerance [default: 1e-3 for fp32, 2e-2 for fp16].")
    data: str | None = option(
        None, "Also measure top-1 agreement (per pixel for segmentation) on this dataset's test images: digits, mnist:DIR, digits-seg, ...",
        metavar="SPEC")
    data_limit: int = option(DEFAULT_DATA_LIMIT, "Test images used with --data.")
    min_agreement: float = option(95.0, "An INT8 graph (rounded, so never within a float tolerance) passes when its top-1 agrees with "
                                        "PyTorch's on at least this share (percent) of the --data test images.")
    seed: int = option(0, "Seed of the random normal input images.")

    def check(self):
        try:
            self.providers = parse_providers(self.providers)
        except DscompressError as e:
            raise ConfigError("providers", str(e)) from None
        self.batch_sizes = check_batch_sizes("batch_sizes", self.batch_sizes)
        check_range("atol", self.atol, low=0)
        check_range("rtol", self.rtol, low=0)
        check_range("data_limit", self.data_limit, low=1)
        check_range("min_agreement", self.min_agreement, low=0, high=100)
        if self.data is not None:
            self.data = str(DataSpec.parse(self.data))


# --- comparing -----------------------------------------------------------------------------------


@dataclass
class OutputDiff(Record):
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
class ProviderResult(Record):
    """Validation on one execution provider.

    ``status``: ``pass``, ``fail``, ``unavailable`` (asked for by name but it cannot run here) or
    ``skipped`` (found by ``auto`` but not usable here); ``reason`` says why for all but ``pass``.
    """

    provider: str
    status: ProviderStatus
    reason: str = ""
    session_providers: list[str] = field(default_factory=list)
    diffs: list[OutputDiff] = field(default_factory=list)
    agreement: dict | None = None


@dataclass
class ValidationRecord(Record):
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

    DERIVED: ClassVar[tuple[str, ...]] = ("status",)

    @property
    def status(self) -> ValidationStatus:
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
    return [t.detach().float().cpu().numpy() for t in flatten_outputs(model(images))]


def top1_agreement(run_onnx, model: nn.Module, batches: Iterable, limit: int | None = None) -> dict:
    """How often the ONNX model's top-1 class is PyTorch's, on real images.

    Args:
        run_onnx: a function from an image batch (N, C, H, W) float32 tensor to the ONNX
            model's first output (N, classes), or (N, classes, H, W), as a numpy array.
        model: the PyTorch model, in eval mode, on the CPU.
        batches: image batches (N, C, H, W), or (images, labels) pairs as a DataLoader gives
            (labels (N,), or masks (N, H, W) whose 255 pixels are not scored).
        limit: stop after this many images.

    Returns:
        ``images``, ``predictions`` (images, or pixels for per-pixel outputs, ``over`` says
        which), ``agreement``
        (percent of the predictions where both pick the same class, the argmax over dimension 1)
        and, when labels come with the images, each runtime's accuracy in percent (``onnx_top1``
        and ``torch_top1``: per image, or per labelled pixel, i.e. pixel accuracy).
    """
    images_seen = agree = predictions = 0
    accuracies = None  # the ONNX model's and PyTorch's top-1 against the labels (torchmetrics)
    labelled = True
    over = "images"
    for batch in batches:
        images, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if limit is not None:
            images = images[: limit - images_seen]
            labels = labels[: len(images)] if labels is not None else None
        if len(images) == 0:
            break
        images = images.float()
        torch_output = _torch_outputs(model, images)[0]
        torch_top = torch_output.argmax(axis=1)
        onnx_top = np.asarray(run_onnx(images)).argmax(axis=1)
        agree += int((torch_top == onnx_top).sum())
        predictions += torch_top.size
        over = "pixels" if torch_top.ndim > 1 else "images"
        if labels is None:
            labelled = False
        else:
            labels = torch.as_tensor(labels)
            if accuracies is None:
                ignore_index = IGNORE_INDEX if labels.ndim > 1 else None
                accuracies = [MulticlassAccuracy(torch_output.shape[1], average="micro", ignore_index=ignore_index, validate_args=False)
                              for _ in range(2)]
            for accuracy, top in zip(accuracies, (onnx_top, torch_top)):
                accuracy.update(torch.from_numpy(top), labels)
        images_seen += len(images)
        if limit is not None and images_seen >= limit:
            break
    if images_seen == 0:
        raise DscompressError("no images to measure top-1 agreement on; the dataset is empty")
    result = {"images": images_seen, "predictions": predictions, "over": over, "agreement": 100.0 * agree / predictions}
    if labelled:
        result["onnx_top1"], result["torch_top1"] = (100.0 * float(accuracy.compute()) for accuracy in accuracies)
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


def _data_batches(data: str, input_size, batch_size: int | None, task: str = "classification"):
    dataset = load_dataset(data, input_size, split="test")
    check_task(dataset, task, data)
    return _rebatch(make_loader(dataset, batch_size or 64), batch_size)


# --- validating ----------------------------------------------------------------------------------


def validate_onnx(onnx_path: str, model: nn.Module, input_size, config: ValidateConfig | None = None,
                  task: str = "classification") -> ValidationRecord:
    """Compare an ONNX model on each requested provider with the PyTorch model it came from.

    Args:
        onnx_path: the exported graph; its single input takes (N, C, H, W) image batches.
        model: the PyTorch model (the reference), run in float32 on the CPU in eval mode.
        input_size: (C, H, W) of one image; must fit the graph's fixed dimensions.
        config: providers, batch sizes, tolerances and optional real data.
        task: the model's task; real data must be of that task (masks for segmentation).

    A graph with a fixed batch is compared at that batch only (noted in the record).
    """
    config = config or ValidateConfig()
    input_size = [int(v) for v in input_size]
    proto = read_onnx(onnx_path)
    shape = onnx_input_shape(proto)
    check_input_size(shape, input_size)
    with eval_mode(model):
        return _validate(onnx_path, proto, shape, _reference_model(model), input_size, config, task)


def _validate(onnx_path: str, proto, shape: list, reference: nn.Module, input_size: list[int], config: ValidateConfig,
              task: str = "classification") -> ValidationRecord:
    precision = onnx_precision(proto)
    quantized = precision == "int8"
    if quantized and not config.data:
        raise DscompressError(f"{onnx_path} is an INT8 graph: it differs from PyTorch by rounding, not float error, "
                              "so it is validated by top-1 agreement on real images: give --data SPEC")
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
    if quantized:
        notes.append(f"INT8 graph: its outputs differ from PyTorch's by rounding (the differences are shown, not judged); "
                     f"it passes on top-1 agreement of at least {config.min_agreement:g}% on {config.data}")

    generator = torch.Generator().manual_seed(config.seed)
    inputs = {b: torch.randn(b, *input_size, generator=generator) for b in batch_sizes}
    expected = {b: _torch_outputs(reference, x) for b, x in inputs.items()}
    output_names = [o.name for o in proto.graph.output]
    if len(output_names) != len(expected[batch_sizes[0]]):
        raise DscompressError(
            f"the ONNX model has {len(output_names)} outputs but the PyTorch model returns "
            f"{len(expected[batch_sizes[0]])}; validate against the model it was exported from"
        )

    providers, automatic = resolve_providers(config.providers)
    results = []
    for provider in providers:
        session, reason = open_session(onnx_path, provider, threads=torch.get_num_threads())
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
        failed = [d for d in result.diffs if not d.passed and not quantized]
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
                _data_batches(config.data, input_size, fixed_batch, task),
                limit=config.data_limit,
            )
            if quantized and result.agreement["agreement"] < config.min_agreement:
                result.status = "fail"
                result.reason = (f"top-1 agrees with PyTorch on {result.agreement['agreement']:.1f}% of {result.agreement['predictions']} "
                                 f"{result.agreement['over']}, under --min-agreement {config.min_agreement:g}%")
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


def _reference_model(model: nn.Module) -> nn.Module:
    """The model in float32 on the CPU (a copy only when it is not already)."""
    parameter = next(model.parameters(), None)
    if parameter is not None and (parameter.dtype != torch.float32 or parameter.device.type != "cpu"):
        model = copy.deepcopy(model).float().cpu()
    return model
