"""Per-layer latency tables: what each convertible layer would cost on the target runtime, by candidate.

For each convertible layer the candidates are: keep it dense; depthwise-separable at ranks 1, 2,
4 ... (in the form export writes); and, for a pair (:mod:`dscompress.compress.units`), the pair's channels
pruned by a few ratios (rounded to 8), alone or with a rank. A layer's time is measured inside
the model it runs in: the model is built with every unit at one candidate (all dense, all rank 2,
all rank 1 with the pairs pruned 25% ...) and profiled on the runtime
(:func:`~dscompress.deploy.profile.profile`: ONNX Runtime's profiler, or hooks in PyTorch), which gives
every layer's time at that candidate at once.

Why not time each candidate alone? Measured on resnet18 at 3x224x224 on ONNX Runtime CPU, a conv
timed in isolation ran 15-25% faster than the same conv inside the model (its weights stay in
cache between runs, and the model's fused BatchNorm, ReLU and residual add are not there), and
the error does not cancel between dense and depthwise-separable candidates: predictions from
isolated timings were 18-60% too slow. Inside the model the prediction is within a few percent
(BENCHMARKS.md). Profiles are cached on disk, keyed by runtime, device, library versions,
threads, batch and the built model's architecture, so asking again is instant.

A whole model's latency is predicted as the rest (the dense model's measured time minus its
convertible layers' times) plus the chosen candidates' times. Each profile's layer times are
scaled to sum to that model's time measured without the profiler: the profiler's own cost per
kernel (a large part of small layers, and depthwise-separable layers run twice the kernels) would
otherwise be charged to the layers, and on a small model the rest came out negative (a tiny net
at 3x64x64 then "reached" a 50x target).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from dscompress.compress.convert import convertible
from dscompress.compress.units import Option, Unit, build, candidate_name, find_units, layout_of, pair_channels
from dscompress.core.config import Record
from dscompress.core.errors import DscompressError
from dscompress.core.util import QUIET, JsonCache, Progress, cpu_info, eval_mode, torch_threads
from dscompress.deploy.profile import RUNTIMES, ProfileConfig, profile, time_model
from dscompress.nn.graph import ModelGraph

CACHE_ENV = "DSCOMPRESS_CACHE"
CACHE_VERSION = 3


def default_cache() -> str:
    """``$DSCOMPRESS_CACHE``, else ``~/.cache/dscompress/latency.json``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dscompress", "latency.json")


def device_name(runtime: str) -> str:
    """What the runtime runs on, as precisely as the machine says (the CPU model or the GPU)."""
    if runtime.endswith(("cuda", "trt")) and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return _cpu_name()


def _cpu_name() -> str:
    """The CPU's model (/proc/cpuinfo's ``model name`` on Linux)."""
    return cpu_info().get("brand_raw") or platform.processor() or platform.machine()


def architecture(model: nn.Module) -> str:
    """A digest of the model's modules and tensor shapes (not their values)."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__name__}:{module.extra_repr()}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
    return digest.hexdigest()[:24]


class Timer:
    """Times models and profiles their layers on one runtime; profiles are cached on disk.

    Args:
        runtime: ``ort-cpu``, ``ort-cuda``, ``ort-trt``, ``torch-cpu`` or ``torch-cuda``.
        batch_size: images per run.
        threads: CPU threads (default: torch's current number).
        cache: the cache file (default :func:`default_cache`); ``False`` keeps nothing.
        warmup, iters: untimed and timed runs; a time is the median.
    """

    def __init__(self, runtime: str = "ort-cpu", batch_size: int = 1, threads: int | None = None, cache: str | bool | None = None,
                 warmup: int = 5, iters: int = 30):
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
        self.cache = JsonCache(self.cache_path)

    def key(self, model: nn.Module, input_size, precision: str = "fp32") -> str:
        extra = {} if precision == "fp32" else {"precision": precision}  # fp32 keys as before precisions were timed
        text = json.dumps({**self.context, **extra, "architecture": architecture(model), "input": list(input_size)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def layer_times(self, model: nn.Module, input_size, precision: str = "fp32") -> dict:
        """``{"total": ms, "layers": {name: ms}}``: the model's time (no profiler) and each layer's
        inside it (cached), at ``precision`` (``int8``: its QDQ graph)."""
        key = self.key(model, input_size, precision)
        if key not in self.cache:
            with torch_threads(self.threads):
                record = profile(model, input_size, self.config(precision))
            self.cache[key] = {"total": record.total_ms, "layers": {layer.name: layer.ms for layer in record.layers}}
        return self.cache[key]

    def time_module(self, model: nn.Module, input_size, precision: str = "fp32") -> float:
        """The model's median ms per run, measured now (not cached, no profiler): for checking a prediction."""
        with torch_threads(self.threads):
            return time_model(model, input_size, self.config(precision))

    def config(self, precision: str = "fp32") -> ProfileConfig:
        return ProfileConfig(runtime=self.runtime, batch_size=self.batch_size, warmup=self.warmup, iters=self.iters, precision=precision)

    def save(self) -> None:
        self.cache.save()


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


@dataclass
class LayerLatency(Record):
    """One convertible layer's candidates: milliseconds per run (all its calls) inside the model, by
    :func:`~dscompress.compress.units.candidate_name`."""

    name: str
    in_channels: int
    out_channels: int
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
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    totals: dict[str, float] = field(default_factory=dict)  # the dense model's ms by precision (fp32's is total_ms)
    rests: dict[str, float] = field(default_factory=dict)  # and its rest beside the layers, by precision

    def predict(self, chosen: dict[str, str] | None = None, precision: str = "fp32") -> float:
        """The whole model's ms at ``precision`` with a candidate per layer
        (:func:`~dscompress.compress.units.candidate_name` by layer name; others dense)."""
        chosen = chosen or {}
        rest = self.rests.get(precision, self.rest_ms)
        return rest + sum(layer.ms[at_precision(chosen.get(layer.name, "dense"), precision)] for layer in self.layers)

    def layer(self, name: str) -> LayerLatency:
        return next(layer for layer in self.layers if layer.name == name)


def at_precision(candidate: str, precision: str) -> str:
    """A latency table's key of a candidate at a precision: ``rank-2``, ``rank-2+int8``."""
    return candidate if precision == "fp32" else f"{candidate}+{precision}"


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
    *,
    graph: ModelGraph | None = None,
    precisions: Iterable[str] = ("fp32",),
) -> LatencyRecord:
    """Every convertible layer's candidates, timed inside the model on ``runtime``.

    Args:
        model: a dense model (its KxK convs are the layers); not modified.
        input_size: (C, H, W) the model runs at.
        timer: the :class:`Timer` to use (its runtime and batch win); default one with the cache.
        graph: the model's :class:`~dscompress.nn.graph.ModelGraph` at ``input_size``, when the
            caller has one (its convertible layers and units come from it; found now otherwise).
        precisions: ``fp32`` and/or ``int8`` (the model's QDQ graph, :mod:`dscompress.deploy.quantize`):
            each layer's candidates at ``int8`` are keyed ``rank-2+int8`` (:func:`at_precision`).

    The model is built and profiled once per (rank, prune ratio, precision): with ranks (1, 2, 4),
    two prune ratios and one precision, 12 profiles.
    """
    precisions = list(precisions)
    timer = timer or Timer(runtime, batch_size)
    input_size = tuple(int(v) for v in input_size)
    ranks, prune_ratios = list(ranks), [0.0] + list(prune_ratios)
    with eval_mode(model):
        graph = graph or ModelGraph(model, input_size)
        calls = convertible(model, input_size, graph=graph)
        units = find_units(model, input_size, calls, graph=graph)
        pairs = any(unit.is_pair for unit in units)
        times: dict[str, dict[str, float]] = {name: {} for unit in units for name in unit.layers}  # a pair's consumer may not be convertible
        kinds = [(rank, ratio) for ratio in prune_ratios for rank in [None] + ranks if ratio == 0 or pairs]
        progress.start(f"latency table on {timer.runtime}", len(kinds) * len(precisions))
        totals = {}
        for rank, ratio in kinds:
            options = [_uniform(unit, calls, rank, ratio) for unit in units]
            kept = [pair_channels(model, unit, option.prune, round_to) if unit.is_pair else None for unit, option in zip(units, options)]
            built, _ = build(model, layout_of(units, options, kept))
            for precision in precisions:
                measured = timer.layer_times(built, input_size, precision)
                scale = measured["total"] / max(sum(measured["layers"].values()), 1e-12)  # to the time without the profiler
                if rank is None and ratio == 0:
                    totals[precision] = measured["total"]
                for unit, option in zip(units, options):
                    if ratio and not unit.is_pair:
                        continue
                    for layer, layer_rank in zip(unit.layers, option.ranks):
                        if layer in times:
                            times[layer][at_precision(candidate_name(layer_rank, option.prune), precision)] = measured["layers"][layer] * scale
                progress.advance(1, at_precision(candidate_name(rank, ratio), precision))
        progress.stop()
    timer.save()
    layers = [LayerLatency(name, model.get_submodule(name).in_channels, model.get_submodule(name).out_channels,
                           {k: round(v, 5) for k, v in times[name].items()}) for name in times]
    rests = {p: round(totals[p] - sum(layer.ms[at_precision("dense", p)] for layer in layers), 5) for p in precisions}
    total = totals.get("fp32", next(iter(totals.values())))
    return LatencyRecord(timer.runtime, timer.context["device"], timer.batch_size, timer.threads, list(input_size),
                         round(total, 5), rests.get("fp32", next(iter(rests.values()))), layers, precisions,
                         {p: round(v, 5) for p, v in totals.items()}, rests)


def _uniform(unit: Unit, calls: dict, rank: int | None, ratio: float) -> Option:
    """The option giving every convertible layer of the unit ``rank`` and a pair ``ratio``."""
    return Option(tuple(rank if layer in calls else None for layer in unit.layers), ratio if unit.is_pair else 0.0)
