"""Where the time goes: per-layer latency of a model on the runtime it is deployed on.

``profile(model, input_size, config)`` times the whole model (no profiler running) and every
layer, on ONNX Runtime (CPU, CUDA, TensorRT in fp16) with its own profiler, or on PyTorch eager
with forward hooks, and names each layer by its module (``layer1.0.conv1``).

ONNX Runtime renames what it runs: at its highest optimisation level a Conv fused with its
BatchNorm and ReLU and converted to the blocked NCHWc layout becomes ``<output tensor>_nchwc``
(the output of the last op fused in), and layout changes get nodes of their own
(``ReorderInput``, ``ReorderOutput_token_N``). :class:`NodeModules` maps those back through the
exported graph: from ``_nchwc`` to the tensor's producer, upstream through the ops ONNX Runtime
fuses into a Conv to the Conv itself, and from a Conv to its weight's name (the dynamo exporter
keeps ``layer1.0.conv1.weight`` when it folds a BatchNorm into the Conv, whose metadata then names
the BatchNorm) or to the module scope in the node's metadata. A fused Conv's time includes its
BatchNorm, activation and residual add, which show no time of their own.

The sum of the layer times differs from the whole model's time by the profiler's own cost and by
what runs between kernels; the record shows both. Its ``bound_speedup`` is how much faster the
model could get if every convertible layer (the dense KxK convs that ``convert`` takes, and the
depthwise-separable layers already there) took no time: what the stem, 1x1 convs, pooling and
classifier leave.
"""

from __future__ import annotations

import ast
import json
import os
import re
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import median
from typing import ClassVar, Literal

import numpy as np
import onnx
import torch
from torch import nn

from dscompress.core.config import ConfigError, Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError
from dscompress.core.util import QUIET, Progress, eval_mode, model_device
from dscompress.deploy.export import ExportConfig, export_onnx
from dscompress.deploy.ort import open_session
from dscompress.deploy.quantize import QuantizeConfig, int8_graph
from dscompress.nn.layers import DepthwiseSeparableConv2d, SplitDepthwiseSeparable, named_layers, skip_reason
from dscompress.nn.metrics import count_macs

Runtime = Literal["ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda"]
RUNTIMES = ("ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda")
Precision = Literal["fp32", "int8"]
# The precisions each runtime is timed at here (ort-trt runs fp16; its INT8 needs a GPU run, benchmarks/gpu.sh).
PRECISIONS = {"ort-cpu": ("fp32", "int8"), "ort-cuda": ("fp32",), "ort-trt": ("fp32",), "torch-cpu": ("fp32",), "torch-cuda": ("fp32",)}
ORT_PROVIDERS = {"ort-cpu": "cpu", "ort-cuda": "cuda", "ort-trt": "tensorrt"}


@dataclass
class ProfileConfig(StepConfig):
    """What to time, and where."""

    STEP: ClassVar[str] = "profile"

    runtime: Runtime = option(
        "ort-cpu", "ort-cpu, ort-cuda, ort-trt (TensorRT in fp16), torch-cpu or torch-cuda; one that cannot run here is an error."
    )
    batch_size: int = option(1, "Images per run.")
    precision: Precision = option("fp32", "int8: time the QDQ graph ONNX Runtime's quantizer makes of the model (per-channel, as `quantize` "
                                          "writes it, calibrated on random images: ranges do not change its speed); ort-cpu only.")
    warmup: int = option(5, "Untimed runs first (engine builds, cuDNN search, memory pools).")
    iters: int = option(30, "Timed runs: each layer's time is its median over them.")
    plot: str | None = option(None, "Also draw the per-layer times to this PNG.", metavar="FILE.png")

    def check(self):
        check_precision(self.runtime, self.precision)
        check_range("batch_size", self.batch_size, low=1)
        check_range("warmup", self.warmup, low=0)
        check_range("iters", self.iters, low=1)
        if self.plot is not None and not self.plot.endswith(".png"):
            raise ConfigError("plot", f"must name a .png file, got {self.plot!r}")


def check_precision(runtime: str, precision: str) -> None:
    """One line when ``runtime`` is not timed at ``precision`` here."""
    if runtime in PRECISIONS and precision not in PRECISIONS[runtime]:
        raise ConfigError("precision", f"{runtime} runs {', '.join(PRECISIONS[runtime])} here, not {precision}"
                          + (" (TensorRT's INT8 is measured by benchmarks/gpu.sh where a GPU is lent)" if runtime == "ort-trt" else ""))


@dataclass
class LayerTime(Record):
    """One layer on one runtime: median milliseconds per run (for the whole batch), its share of
    the sum of layer times, MACs per run and the GMAC/s they ran at; ``op`` says what ran."""

    name: str
    op: str
    ms: float
    share: float
    macs: int
    gmacs_per_s: float | None
    convertible: bool


@dataclass
class ProfileRecord(Record):
    """Per-layer times of a model on one runtime.

    Attributes:
        total_ms: the whole model's median time per run, measured without the profiler.
        layer_sum_ms: the sum of the layer times (measured with it).
        convertible_ms: the time of the convertible layers.
        bound_speedup: ``layer_sum / (layer_sum - convertible)``: the most converting them could gain.
    """

    DERIVED: ClassVar[tuple[str, ...]] = ("unattributed_ms",)

    runtime: str
    device: str
    batch_size: int
    input_size: list[int]
    threads: int
    layers: list[LayerTime]
    total_ms: float
    layer_sum_ms: float
    convertible_ms: float
    bound_speedup: float
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"

    @property
    def unattributed_ms(self) -> float:
        """Whole-model time not in any layer (positive) or profiler cost beyond it (negative)."""
        return self.total_ms - self.layer_sum_ms


# --- which module a layer is -------------------------------------------------------------------------


def layer_units(model: nn.Module) -> dict[str, nn.Module]:
    """The modules a profile shows: depthwise-separable layers as one, and every leaf module."""
    units = {}
    for name, module in named_layers(model, whole=(SplitDepthwiseSeparable,)):
        if not name:
            continue
        if isinstance(module, (DepthwiseSeparableConv2d, SplitDepthwiseSeparable)):
            units[name] = module
        elif not list(module.children()):
            units[name] = module
    return units


def is_convertible(module: nn.Module) -> bool:
    """A layer that conversion acts on: a dense KxK conv it takes, or one it made."""
    if isinstance(module, (DepthwiseSeparableConv2d, SplitDepthwiseSeparable)):
        return True
    return isinstance(module, nn.Conv2d) and skip_reason(module) is None


def unit_of(name: str, units: dict[str, nn.Module]) -> str:
    """The unit a module name belongs to: itself, the depthwise-separable layer it is part of, or
    (for functional ops) the nearest enclosing module's name."""
    parts = name.split(".") if name else []
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in units:
            return prefix
    return name or "(model)"


# ONNX ops that ONNX Runtime fuses into a preceding Conv or Gemm, and what a fused kernel is built on.
_FUSED_INTO_CONV = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "BatchNormalization", "Add", "Sum", "Identity", "Mul", "Div"}
_ANCHORS = {"Conv": ("Conv", "BatchNormalization"), "FusedConv": ("Conv",), "NchwcConv": ("Conv",), "FusedGemm": ("Gemm",),
            "Gemm": ("Gemm", "MatMul"), "FusedMatMul": ("MatMul",)}
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_TOKEN = re.compile(r"_token_\d+$")


class NodeModules:
    """Names the module behind every node ONNX Runtime runs, from the graph as exported."""

    def __init__(self, proto: onnx.ModelProto):
        graph = proto.graph
        self.initializers = {t.name for t in graph.initializer}
        self.producer = {output: node for node in graph.node for output in node.output}
        self.module_of = {node.name: self._module(node) for node in graph.node}

    def _module(self, node) -> str:
        if node.op_type in _WEIGHTED and len(node.input) > 1:
            weight = node.input[1]
            producer = self.producer.get(weight)
            if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in self.initializers:
                weight = producer.input[0].removesuffix("_quantized")  # a QDQ graph's INT8 weight
                if weight.endswith(".weight"):
                    return weight[: -len(".weight")]
            if weight in self.initializers and weight.endswith(".weight") and not weight.startswith("onnx::"):
                return weight[: -len(".weight")]
        metadata = {p.key: p.value for p in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" in metadata:  # the dynamo exporter: [root, ..., innermost module, fx node]
            scopes = ast.literal_eval(metadata["pkg.torch.onnx.name_scopes"])
            return scopes[-2] if len(scopes) >= 2 else ""
        if node.name.startswith("/"):  # the TorchScript exporter: /layer1/layer1.0/conv1/Conv
            return _scope_to_module(node.name.split("/")[1:-1])
        return ""

    def _anchor(self, node, op: str):
        """Walk upstream from ``node`` through ops fused into a kernel to the node it is built on."""
        for wanted in _ANCHORS.get(op, (op,)):
            frontier, seen = [node], {node.name}
            for _ in range(6):
                upstream = []
                for candidate in frontier:
                    if candidate.op_type == wanted:
                        return candidate
                    if candidate.op_type in _FUSED_INTO_CONV:
                        for name in candidate.input:
                            producer = self.producer.get(name)
                            if producer is not None and producer.name not in seen:
                                seen.add(producer.name)
                                upstream.append(producer)
                frontier = upstream
        return node

    def module(self, event_name: str, op: str = "") -> str:
        """The module of a profiler event named ``<node>_kernel_time``; ``<layout change>`` for
        ONNX Runtime's own reorder nodes."""
        name = event_name[: -len("_kernel_time")] if event_name.endswith("_kernel_time") else event_name
        if name in self.module_of:
            return self.module_of[name]
        base = _TOKEN.sub("", name)
        if base.startswith(("ReorderInput", "ReorderOutput")):
            return "<layout change>"
        if base.endswith("_bn_nchwc") and base[: -len("_bn_nchwc")] in self.producer:  # a BatchNorm run as an NCHWc conv
            return self.module_of[self.producer[base[: -len("_bn_nchwc")]].name]
        if base.endswith("_nchwc"):
            producer = self.producer.get(base[: -len("_nchwc")])
            if producer is not None:
                return self.module_of[self._anchor(producer, op).name]
        return self.module_of.get(base, f"<{name}>")


def _scope_to_module(parts: list[str]) -> str:
    """TorchScript scope parts -> module name: ['layer2', 'layer2.0', 'downsample', 'downsample.0']
    -> 'layer2.0.downsample.0' (each part names a module relative to its parent, numbered children
    carrying their parent's name), without the ``_1`` of a second call."""
    atoms: list[str] = []
    for part in parts:
        part = re.sub(r"_\d+$", "", part) if not part.split(".")[-1].isdigit() else part
        pieces = part.split(".")
        if len(pieces) > 1 and all(p.isdigit() for p in pieces[1:]) and atoms and atoms[-1] == pieces[0]:
            atoms.extend(pieces[1:])
        else:
            atoms.extend(pieces)
    return ".".join(atoms)


# --- timing --------------------------------------------------------------------------------------


def _median_ms(run, warmup: int, iters: int) -> float:
    """The median ms of ``iters`` runs after ``warmup`` untimed ones (``run`` synchronizes CUDA itself).

    A hand loop, not ``torch.utils.benchmark.Timer``: ONNX Runtime's and PyTorch's totals are timed
    alike, and Timer gives means of blocks (of its own size in ``blocked_autorange``), not the median of single runs.
    """
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return 1e3 * float(np.median(samples))


def _ort_profile(model: nn.Module, input_size, config: ProfileConfig, threads: int, progress: Progress,
                 layers: bool = True) -> tuple[float, dict[str, float], dict[str, str], str]:
    """(whole-model ms, {module: ms}, {module: op}, device) on an ONNX Runtime provider (without
    ``layers``, only the first: no profiled runs)."""
    provider = ORT_PROVIDERS[config.runtime]
    fp16 = config.runtime == "ort-trt"
    with tempfile.TemporaryDirectory(prefix="dscompress-profile-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if config.precision == "int8":
                int8_graph(model, input_size, path, config=QuantizeConfig(runtime="ort-cpu"))
            else:
                export_onnx(model, input_size, path, ExportConfig(validate=False, fp16=fp16))
        session, reason = open_session(path, provider, threads=threads, fp16=fp16)
        if session is None:
            raise DscompressError(f"--runtime {config.runtime} cannot run here: {reason}")
        images = np.random.default_rng(0).standard_normal((config.batch_size, *input_size), dtype=np.float32)
        feed = {session.get_inputs()[0].name: images}
        progress.start(f"profile {config.runtime}", 2)
        total = _median_ms(lambda: session.run(None, feed), config.warmup, config.iters)
        progress.advance(1, "whole model")
        if not layers:
            progress.stop()
            return total, {}, {}, provider
        profiled, _ = open_session(path, provider, threads=threads, fp16=fp16, profile=os.path.join(tmp, "profile"))
        for _ in range(config.warmup + config.iters):
            profiled.run(None, feed)
        events = json.load(open(profiled.end_profiling()))
        progress.advance(1, "layers")
        progress.stop()
        nodes = NodeModules(onnx.load(path, load_external_data=False))
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])[config.warmup :]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run, ops = [], {}
    for run in runs:
        times: dict[str, float] = defaultdict(float)
        for event in kernels:
            if run["ts"] <= event["ts"] <= run["ts"] + run["dur"]:
                op = event.get("args", {}).get("op_name", "")
                module = nodes.module(event["name"], op)
                times[module] += event["dur"] / 1e3
                ops.setdefault(module, op)
        per_run.append(times)
    modules = {m for times in per_run for m in times}
    layer_ms = {m: float(median(times.get(m, 0.0) for times in per_run)) for m in modules}
    return total, layer_ms, ops, provider


def _torch_profile(model: nn.Module, input_size, config: ProfileConfig, units: dict[str, nn.Module], progress: Progress,
                   layers: bool = True) -> tuple[float, dict[str, float], dict[str, str], str]:
    """(whole-model ms, {module: ms}, {module: type}, device) on PyTorch eager, timed with forward
    hooks (without ``layers``, only the first)."""
    device = torch.device("cuda" if config.runtime == "torch-cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DscompressError("--runtime torch-cuda cannot run here: no usable CUDA GPU is visible")
    model = model.to(device)
    images = torch.randn(config.batch_size, *input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            model(images)
        sync()

    progress.start(f"profile {config.runtime}", 2)
    total = _median_ms(run, config.warmup, config.iters)
    progress.advance(1, "whole model")
    if not layers:
        progress.stop()
        return total, {}, {}, str(device)
    starts: dict[str, float] = {}
    samples: dict[str, list[float]] = defaultdict(list)
    current: dict[str, float] = defaultdict(float)

    def before(name):
        def hook(module, args):
            sync()
            starts[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(module, args, output):
            sync()
            current[name] += 1e3 * (time.perf_counter() - starts.pop(name))
        return hook

    handles = [m.register_forward_pre_hook(before(n)) for n, m in units.items()]
    handles += [m.register_forward_hook(after(n)) for n, m in units.items()]
    try:
        for i in range(config.warmup + config.iters):
            current.clear()
            run()
            if i >= config.warmup:
                for name, ms in current.items():
                    samples[name].append(ms)
    finally:
        for handle in handles:
            handle.remove()
    progress.advance(1, "layers")
    progress.stop()
    layer_ms = {name: float(median(values)) for name, values in samples.items()}
    return total, layer_ms, {name: type(units[name]).__name__ for name in layer_ms}, str(device)


def time_model(model: nn.Module, input_size, config: ProfileConfig | None = None) -> float:
    """The whole model's median ms per run on ``config.runtime``, as :func:`profile` measures it,
    without the profiled runs that follow (what a prediction is checked against)."""
    config = config or ProfileConfig()
    input_size = tuple(int(v) for v in input_size)
    with eval_mode(model):
        device = model_device(model)
        if config.runtime.startswith("ort"):
            total = _ort_profile(model, input_size, config, torch.get_num_threads(), QUIET, layers=False)[0]
        else:
            total = _torch_profile(model, input_size, config, {}, QUIET, layers=False)[0]
        model.to(device)
    return total


def profile(model: nn.Module, input_size, config: ProfileConfig | None = None, progress: Progress = QUIET) -> ProfileRecord:
    """Time ``model`` (on inputs of ``input_size`` (C, H, W)) and each of its layers on ``config.runtime``.

    ONNX Runtime and PyTorch use ``torch.get_num_threads()`` CPU threads. The model is put in eval
    mode and given back as it was.
    """
    config = config or ProfileConfig()
    input_size = tuple(int(v) for v in input_size)
    threads = torch.get_num_threads()
    units = layer_units(model)
    with eval_mode(model):
        device = model_device(model)
        if config.runtime.startswith("ort"):
            total, times, ops, where = _ort_profile(model, input_size, config, threads, progress)
        else:
            total, times, ops, where = _torch_profile(model, input_size, config, units, progress)
        model.to(device)
        _, macs = count_macs(model, input_size, per_module=True)
    grouped: dict[str, float] = defaultdict(float)
    op_of: dict[str, str] = {}
    for module, ms in times.items():
        unit = unit_of(module, units) if not module.startswith("<") else module
        grouped[unit] += ms
        op_of.setdefault(unit, type(units[unit]).__name__ if unit in units else ops.get(module, ""))
    order = {name: i for i, name in enumerate(units)}
    layer_sum = sum(grouped.values())
    layers = []
    for name in sorted(grouped, key=lambda n: (order.get(n, len(order)), n)):
        ms = grouped[name]
        unit_macs = macs.get(name, 0) * config.batch_size if name in units else 0
        layers.append(LayerTime(
            name=name,
            op=op_of[name],
            ms=round(ms, 4),
            share=round(ms / layer_sum, 4) if layer_sum else 0.0,
            macs=unit_macs,
            gmacs_per_s=round(unit_macs / ms / 1e6, 2) if unit_macs and ms > 0 else None,
            convertible=name in units and is_convertible(units[name]),
        ))
    convertible = sum(layer.ms for layer in layers if layer.convertible)
    notes = []
    if config.precision == "int8":
        notes.append("INT8: a QLinearConv's time includes its requantization; Q/DQ nodes at float boundaries are timed on their own (under (model))")
    if config.runtime.startswith("ort"):
        notes.append("a fused Conv's time includes its BatchNorm, activation and residual add; <layout change> is ONNX Runtime's NCHWc reordering")
    else:
        notes.append("timed with forward hooks around each layer; functional ops between layers are not attributed")
    return ProfileRecord(
        runtime=config.runtime,
        device=where,
        batch_size=config.batch_size,
        input_size=list(input_size),
        threads=threads,
        layers=layers,
        total_ms=round(total, 4),
        layer_sum_ms=round(layer_sum, 4),
        convertible_ms=round(convertible, 4),
        bound_speedup=round(layer_sum / (layer_sum - convertible), 3) if layer_sum > convertible else float("inf"),
        notes=notes,
        precision=config.precision,
    )
