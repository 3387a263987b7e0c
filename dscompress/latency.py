"""Per-layer latency tables: every candidate for a layer, timed in isolation on the target runtime.

For each convertible layer, its candidates are built at the layer's real input shape and batch
and timed alone on the runtime (ONNX Runtime CPU/CUDA/TensorRT, or PyTorch eager): the dense
layer; depthwise-separable at ranks 1, 2, 4 ... in the form export writes
(:func:`~dscompress.layers.deploy_form`); the dense layer with its output channels cut to a few
ratios (rounded to 8). Any other (rank, channels) can be asked for. Times are cached on disk,
keyed by runtime, device, library versions, threads, batch and the layer's shape, so asking again
is instant.

A whole model's latency is predicted as the rest (the whole model's measured time minus its
convertible layers' dense times) plus the chosen candidates' times: the rest holds what the
table does not vary (the stem, 1x1 convs, pooling, the classifier) and the per-call overhead
that timing layers one by one adds. BENCHMARKS.md checks the prediction against measurement.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dscompress._util import QUIET, Progress, eval_mode, write_json
from dscompress.config import Record
from dscompress.convert import ConvCall, convertible
from dscompress.errors import DscompressError
from dscompress.export import ExportConfig, export_onnx
from dscompress.layers import DepthwiseSeparableConv2d, deploy_form
from dscompress.ort import open_session
from dscompress.profile import ORT_PROVIDERS, RUNTIMES

CACHE_ENV = "DSCOMPRESS_CACHE"
CACHE_VERSION = 1


def default_cache() -> str:
    """``$DSCOMPRESS_CACHE``, else ``~/.cache/dscompress/latency.json``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dscompress", "latency.json")


def device_name(runtime: str) -> str:
    """What the runtime runs on, as precisely as the machine says (the CPU model or the GPU)."""
    if runtime.endswith(("cuda", "trt")) and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def round_channels(channels: int, ratio: float, multiple: int = 8) -> int:
    """``channels`` with ``ratio`` of them removed, rounded down to a multiple (at least one multiple)."""
    kept = int(channels * (1 - ratio))
    return max(multiple, kept // multiple * multiple) if channels > multiple else max(1, kept)


@dataclass(frozen=True)
class Site:
    """A conv as it runs in its model: its parameters and the input it gets (batch of one)."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple | str
    dilation: tuple[int, int]
    bias: bool
    padding_mode: str
    input_hw: tuple[int, int]
    calls: int = 1

    @classmethod
    def of(cls, name: str, conv: nn.Conv2d, call: ConvCall) -> Site:
        return cls(name, conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   conv.padding if isinstance(conv.padding, str) else tuple(conv.padding), tuple(conv.dilation),
                   conv.bias is not None, conv.padding_mode, tuple(call.input_shape[-2:]), call.calls)

    def module(self, rank: int | None, in_channels: int, out_channels: int) -> nn.Module:
        """The candidate: dense (``rank`` None) or depthwise-separable at ``rank``, in deploy form,
        with the given channels (random weights: time does not depend on them)."""
        args = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation,
                    bias=self.bias, padding_mode=self.padding_mode)
        if rank is None:
            return nn.Conv2d(in_channels, out_channels, **args).eval()
        return deploy_form(DepthwiseSeparableConv2d(in_channels, out_channels, rank=rank, **args).eval())


@dataclass(frozen=True)
class Choice:
    """A candidate for a site: dense (``rank`` None) or depthwise-separable, with its channels."""

    rank: int | None
    in_channels: int
    out_channels: int


class Timer:
    """Times candidates on one runtime, once: every result goes to a JSON cache on disk.

    Args:
        runtime: ``ort-cpu``, ``ort-cuda``, ``ort-trt``, ``torch-cpu`` or ``torch-cuda``.
        batch_size: images per run.
        threads: CPU threads (default: torch's current number).
        cache: the cache file (default :func:`default_cache`); None in ``cache=False`` keeps nothing.
        warmup, iters: untimed and timed runs; a time is the median.
    """

    def __init__(self, runtime: str = "ort-cpu", batch_size: int = 1, threads: int | None = None, cache: str | bool | None = None,
                 warmup: int = 5, iters: int = 20):
        if runtime not in RUNTIMES:
            raise DscompressError(f"unknown runtime {runtime!r}; use {', '.join(RUNTIMES)}")
        self.runtime, self.batch_size = runtime, batch_size
        self.threads = threads or torch.get_num_threads()
        self.cache_path = None if cache is False else (cache or default_cache())
        self.warmup, self.iters = warmup, iters
        self.context = {
            "runtime": runtime, "device": device_name(runtime), "threads": self.threads, "batch": batch_size,
            "torch": torch.__version__, "onnxruntime": _ort_version(), "version": CACHE_VERSION,
        }
        self.entries: dict[str, float] = {}
        self.measured = 0
        if self.cache_path and os.path.isfile(self.cache_path):
            try:
                with open(self.cache_path) as f:
                    self.entries = json.load(f)
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache is measured again

    def key(self, site: Site, choice: Choice) -> str:
        shape = {k: v for k, v in vars(site).items() if k not in ("name", "in_channels", "out_channels", "calls")}
        text = json.dumps({**self.context, **shape, "choice": vars(choice)}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def time(self, site: Site, choice: Choice) -> float:
        """Median ms per run of one call of the candidate (cached)."""
        key = self.key(site, choice)
        if key not in self.entries:
            module = site.module(choice.rank, choice.in_channels, choice.out_channels)
            self.entries[key] = round(self.time_module(module, (choice.in_channels, *site.input_hw)), 5)
            self.measured += 1
        return self.entries[key]

    def save(self) -> None:
        if self.cache_path and self.measured:
            write_json(self.cache_path, self.entries)
            self.measured = 0

    def time_module(self, module: nn.Module, input_size) -> float:
        """Median ms per run of a module (or whole model) on this runtime; not cached."""
        if self.runtime.startswith("ort"):
            return self._time_ort(module, input_size)
        return self._time_torch(module, input_size)

    def _time_ort(self, module: nn.Module, input_size) -> float:
        provider = ORT_PROVIDERS[self.runtime]
        fp16 = self.runtime == "ort-trt"
        with tempfile.TemporaryDirectory(prefix="dscompress-latency-") as tmp:
            path = os.path.join(tmp, "m.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(module, input_size, path, ExportConfig(validate=False, fp16=fp16, batch=self.batch_size, exporter="torchscript"))
            session, reason = open_session(path, provider, threads=self.threads, fp16=fp16)
            if session is None:
                raise DscompressError(f"--runtime {self.runtime} cannot run here: {reason}")
            feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((self.batch_size, *input_size), dtype=np.float32)}
            return _median_ms(lambda: session.run(None, feed), self.warmup, self.iters)

    def _time_torch(self, module: nn.Module, input_size) -> float:
        device = torch.device("cuda" if self.runtime == "torch-cuda" else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DscompressError("--runtime torch-cuda cannot run here: no usable CUDA GPU is visible")
        module = copy.deepcopy(module).to(device).eval()
        images = torch.randn(self.batch_size, *input_size, device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def run():
            with torch.inference_mode():
                module(images)
            sync()

        return _median_ms(run, self.warmup, self.iters)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _median_ms(run, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return 1e3 * float(np.median(samples))


@dataclass
class LayerLatency(Record):
    """One convertible layer's candidates: milliseconds per forward (all calls), by candidate label
    (``dense``, ``rank-2``, ``prune-0.5``: output channels cut, rounded to 8)."""

    name: str
    in_channels: int
    out_channels: int
    input_hw: list[int]
    ms: dict[str, float]


@dataclass
class LatencyRecord(Record):
    """A latency table: the whole model's time, the rest beside its convertible layers, and each
    layer's candidates, on one runtime at one batch size."""

    runtime: str
    device: str
    batch_size: int
    threads: int
    input_size: list[int]
    total_ms: float
    rest_ms: float
    layers: list[LayerLatency] = field(default_factory=list)

    def predict(self, chosen: dict[str, float] | None = None) -> float:
        """The whole model's ms with ``chosen`` per-layer times (ms by layer name; others dense)."""
        chosen = chosen or {}
        return self.rest_ms + sum(chosen.get(layer.name, layer.ms["dense"]) for layer in self.layers)

    def predict_labels(self, labels: dict[str, str]) -> float:
        """The whole model's ms with a candidate label per layer (``rank-1``; others dense)."""
        return self.predict({layer.name: layer.ms[labels[layer.name]] for layer in self.layers if layer.name in labels})


def sites(model: nn.Module, input_size) -> dict[str, Site]:
    """The convertible convs of ``model``, as :class:`Site` objects, in forward order."""
    return {name: Site.of(name, model.get_submodule(name), call) for name, call in convertible(model, input_size).items()}


def latency_table(
    model: nn.Module,
    input_size,
    runtime: str = "ort-cpu",
    batch_size: int = 1,
    ranks: Iterable[int] = (1, 2, 4),
    prune_ratios: Iterable[float] = (0.25, 0.5),
    round_to: int = 8,
    timer: Timer | None = None,
    progress: Progress = QUIET,
) -> LatencyRecord:
    """Time every convertible layer's candidates on ``runtime`` and the whole model.

    Args:
        model: a dense model (its KxK convs are the layers); not modified.
        input_size: (C, H, W).
        timer: the :class:`Timer` to use (its runtime and batch win); default one with the cache.
    """
    timer = timer or Timer(runtime, batch_size)
    input_size = tuple(int(v) for v in input_size)
    with eval_mode(model):
        found = sites(model, input_size)
        progress.start(f"latency table on {timer.runtime}", len(found) + 1)
        total = timer.time_module(deploy_form(model), input_size)
        progress.advance(1, "whole model")
        layers = []
        for site in found.values():
            ms = {"dense": site.calls * timer.time(site, Choice(None, site.in_channels, site.out_channels))}
            for rank in ranks:
                ms[f"rank-{rank}"] = site.calls * timer.time(site, Choice(rank, site.in_channels, site.out_channels))
            for ratio in prune_ratios:
                kept = round_channels(site.out_channels, ratio, round_to)
                ms[f"prune-{ratio:g}"] = site.calls * timer.time(site, Choice(None, site.in_channels, kept))
            layers.append(LayerLatency(site.name, site.in_channels, site.out_channels, list(site.input_hw), {k: round(v, 5) for k, v in ms.items()}))
            progress.advance(1, site.name)
        progress.stop()
    timer.save()
    rest = total - sum(layer.ms["dense"] for layer in layers)
    return LatencyRecord(timer.runtime, timer.context["device"], timer.batch_size, timer.threads, list(input_size),
                         round(total, 5), round(rest, 5), layers)
