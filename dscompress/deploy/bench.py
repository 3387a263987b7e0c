"""Latency and throughput of models side by side: PyTorch eager and ONNX Runtime providers.

``bench(targets, config)`` times every target (a PyTorch model, an artifact, or an ONNX file)
on every runtime in the same run, interleaving them: each round gives every runner a short
block of runs, in alternating order, so that a slow spell of a shared machine (another
process, thermal limits) hits all of them alike instead of whichever happened to run then.
Blocks rather than single runs, because runtimes leave worker threads spinning for a moment
after a run, which would be charged to whichever runtime ran next. A model without an ONNX
file is exported to a temporary one for ONNX Runtime.

Warm-up runs (not timed) absorb one-off costs: cuDNN algorithm search (``cudnn.benchmark`` for
PyTorch, ONNX Runtime's exhaustive search), TensorRT engine builds and memory pool growth. On
CUDA and TensorRT the input and output stay on the GPU through IO binding, so host/device
copies are not timed; on the CPU, ONNX Runtime gets the same number of intra-op threads as
PyTorch, and both numbers are recorded.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from dscompress.core.config import ConfigError, Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError
from dscompress.core.util import QUIET, Progress, free_cpus, torch_threads
from dscompress.deploy.export import ExportConfig, export_onnx
from dscompress.deploy.ort import onnx_input_shape, open_session, ort_name, parse_providers, read_onnx, resolve_providers
from dscompress.deploy.quantize import int8_graph
from dscompress.deploy.validate import check_batch_sizes

BenchStatus = Literal["ok", "unavailable", "skipped"]

# The runtime whose batch-1 p50 an artifact's report shows, first found first.
HEADLINE_ORDER = ("ort-tensorrt", "ort-cuda", "ort-cpu", "torch-cuda", "torch-cpu")


@dataclass
class BenchConfig(StepConfig):
    """What to time."""

    STEP: ClassVar[str] = "bench"

    providers: list[str] = option(
        factory=lambda: ["auto"],
        help="ONNX Runtime providers: cpu, cuda, tensorrt (or full names), auto for every one that runs here, or none for PyTorch only.",
    )
    batch_sizes: list[int] = option(factory=lambda: [1, 32], help="Batch sizes to time, each in its own interleaved series.")
    warmup: int = option(10, "Untimed runs of every runner before timing, at each batch size.")
    iters: int = option(50, "Timed runs of every runner at each batch size.")
    threads: int | None = option(None, "CPU threads for PyTorch and ONNX Runtime (intra-op) [default: PyTorch's current number].")
    torch: bool = option(True, "Also time the PyTorch model eagerly (on the CPU, and on CUDA when it is among the providers).")
    block: int = option(5, "Timed runs of one runner before the next takes over.")
    exporter: Literal["auto", "dynamo", "torchscript"] = option("auto", "The exporter for models without an ONNX file.")
    time_at: list[int] | None = option(
        None, "Time every model at this C,H,W instead of its own input size (a model trained at 32x32, deployed at 224).", metavar="C,H,W"
    )

    def check(self):
        if self.providers in ([], ["none"]) or [p.lower() for p in self.providers] == ["none"]:
            self.providers = []
        else:
            try:
                self.providers = parse_providers(self.providers)
            except DscompressError as e:
                raise ConfigError("providers", str(e)) from None
        self.batch_sizes = check_batch_sizes("batch_sizes", self.batch_sizes)
        check_range("warmup", self.warmup, low=0)
        check_range("iters", self.iters, low=1)
        check_range("block", self.block, low=1)
        check_range("threads", self.threads, low=1)
        if self.time_at is not None and (len(self.time_at) != 3 or min(self.time_at) < 1):
            raise ConfigError("time_at", f"must be C,H,W with positive values, got {self.time_at}")
        if not self.providers and not self.torch:
            raise ConfigError(None, "nothing to time: give --providers or keep PyTorch timing on (--torch)")


@dataclass
class BenchTarget:
    """One thing to time: a PyTorch model, an ONNX file, or both (the file is then used for ORT).

    Attributes:
        label: the name shown in tables.
        input_size: (C, H, W) of one image.
        artifact: the artifact the model came from; the results are stored in its metrics.
        precision: ``int8`` for a model deployed as its QDQ graph (an INT8 plan): ONNX Runtime
            times that graph (ranges from random images: they do not change its speed), PyTorch
            the float model.
    """

    label: str
    input_size: tuple[int, int, int]
    model: nn.Module | None = None
    onnx_path: str | None = None
    artifact: object | None = None
    precision: str = "fp32"


@dataclass
class BenchRecord(Record):
    """Timings of one target on one runtime at one batch size (milliseconds per batch).

    ``status`` is ``ok``, ``unavailable`` (the runtime was asked for and cannot run here) or
    ``skipped`` (found by ``auto``, or a fixed-batch graph at another batch); ``reason`` says why.
    """

    target: str
    runtime: str
    batch_size: int
    status: BenchStatus = "ok"
    reason: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    images_per_s: float | None = None
    iters: int = 0
    warmup: int = 0
    torch_threads: int | None = None
    ort_threads: int | None = None
    block_spread: float | None = None  # slowest block's median / fastest block's
    precision: str = "fp32"  # the graph's: int8 for an INT8 plan's QDQ graph on ONNX Runtime


@dataclass
class BenchResults(Record):
    """Every timing of a ``bench`` run, where it was taken, and warnings about how."""

    machine: str
    results: list[BenchRecord]
    notes: list[str] = field(default_factory=list)


# A runner whose slowest block (median) is this much slower than its fastest shared the CPUs
# with something else while it was timed.
BUSY_SPREAD = 1.5


def contention_notes(records: list[BenchRecord]) -> list[str]:
    """One line each for the signs that the timings were taken on a busy machine.

    Interleaving spreads a slow spell over every runner, but it cannot undo threads that wait on
    each other: OpenMP threads that outnumber the free cores spin against other processes (eager
    resnet18 at 32x32: 8 ms alone, 530 ms with 2 threads beside another torch job, 7.5 ms with 1).
    """
    notes = []
    threads = max((r.torch_threads or r.ort_threads or 0 for r in records if r.status == "ok"), default=0)
    free = free_cpus()
    if threads > free:
        notes.append(f"{threads} threads but {free} free CPU(s): threads wait on each other; use --threads {free} or time on a quiet machine")
    spread = [r for r in records if r.block_spread and r.block_spread > BUSY_SPREAD]
    if spread:
        worst = max(spread, key=lambda r: r.block_spread)
        notes.append(f"timings varied between blocks (up to {worst.block_spread:.1f}x for {worst.target} on {worst.runtime} at batch "
                     f"{worst.batch_size}): the machine was busy; compare ratios, not milliseconds, or time again")
    return notes


def machine() -> str:
    """A one-line description of where the timings were taken."""
    text = f"{platform.machine()} {platform.system()}, {os.cpu_count()} logical CPUs"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def load_targets(names: list[str], load_source: Callable[[str], object]) -> list[BenchTarget]:
    """Targets for command-line names: ``.onnx`` files, model names and artifact folders.

    ``load_source`` turns a model name or folder into a :class:`~dscompress.artifact.source.Source`.
    An ONNX file's input size is read from its graph, which must fix C, H and W.
    """
    targets = []
    for name in names:
        if name.endswith(".onnx") or os.path.isfile(name):
            proto = read_onnx(name)
            shape = onnx_input_shape(proto)
            if len(shape) != 4 or not all(isinstance(v, int) and v > 0 for v in shape[1:]):
                raise DscompressError(f"{name!r} has input shape {shape}; bench needs fixed C,H,W dimensions")
            label = os.path.basename(name)
            targets.append(BenchTarget(label, tuple(shape[1:]), onnx_path=name))
            continue
        source = load_source(name)
        label = os.path.basename(os.path.normpath(source.artifact.path)) if source.artifact else source.spec.name
        targets.append(BenchTarget(label, tuple(source.spec.input_size), model=source.model, artifact=source.artifact))
    seen: dict[str, int] = {}
    for target in targets:
        count = seen.get(target.label, 0)
        seen[target.label] = count + 1
        if count:
            target.label = f"{target.label}#{count + 1}"
    return targets


# --- runners -------------------------------------------------------------------------------------


@dataclass
class _Runner:
    target: BenchTarget
    runtime: str
    batch_size: int
    run: Callable[[], object]
    ort_threads: int | None = None
    samples: list[float] = field(default_factory=list)


def _torch_runner(model: nn.Module, images: torch.Tensor, device: str) -> Callable[[], object]:
    if device == "cuda":
        images = images.cuda()

        def run():
            with torch.inference_mode():
                model(images)
            torch.cuda.synchronize()

        return run

    def run():
        with torch.inference_mode():
            return model(images)

    return run


def _ort_runner(session, images: np.ndarray, provider: str) -> Callable[[], object]:
    import onnxruntime as ort

    feed_name = session.get_inputs()[0].name
    if session.get_inputs()[0].type == "tensor(float16)":
        images = images.astype(np.float16)
    if ort_name(provider) == "CPUExecutionProvider":
        return lambda: session.run(None, {feed_name: images})
    # On a GPU the copies in and out would be timed too; bind device memory instead.
    binding = session.io_binding()
    binding.bind_ortvalue_input(feed_name, ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def _fixed_batch(session) -> int | None:
    first = session.get_inputs()[0].shape[0]
    return first if isinstance(first, int) and first > 0 else None


def _percentiles(record: BenchRecord, samples: list[float]) -> None:
    ms = np.asarray(samples) * 1e3
    record.p50_ms, record.p90_ms, record.p99_ms = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    record.mean_ms = float(ms.mean())
    record.images_per_s = float(record.batch_size * len(ms) / (ms.sum() / 1e3))


# The pause before each turn. ONNX Runtime's thread pools spin for a while after a run: with five
# sessions of two threads on two cores, rank-1 resnet18 at batch 1 measured 6.7 ms in every turn
# that followed another session and 2.8 ms alone, one untimed run per turn notwithstanding; 5 ms
# of pause left it at 4.2-5.5 ms, 20 ms at 2.7 ms (the spinning threads have yielded by then).
SETTLE_S = 0.02


def _time_interleaved(runners: list[_Runner], warmup: int, iters: int, block: int, progress: Progress = QUIET) -> None:
    """Warm every runner up, then time them in rounds of ``block`` runs each, order reversed every other round.

    Each turn starts with a pause of ``SETTLE_S`` and one untimed run: the runtime that ran
    before may leave threads spinning or caches cold for a moment, and that belongs to the switch,
    not to the model. A hand loop, not ``torch.utils.benchmark.Timer``: Timer times one statement
    alone, in blocks, while here PyTorch and ONNX Runtime runners take turns (so drift hits all
    alike) and every run is a sample of the percentiles.
    """
    rounds = -(-iters // block)
    progress.start(f"bench batch {runners[0].batch_size}" if runners else "bench", warmup + rounds)
    try:
        for _ in range(warmup):
            for runner in runners:
                runner.run()
            progress.advance(1, "warm-up")
        for i in range(rounds):
            for runner in runners if i % 2 == 0 else reversed(runners):
                time.sleep(SETTLE_S)
                runner.run()
                for _ in range(min(block, iters - len(runner.samples))):
                    start = time.perf_counter()
                    runner.run()
                    runner.samples.append(time.perf_counter() - start)
            progress.advance(1)
    finally:
        progress.stop()


# --- benchmarking --------------------------------------------------------------------------------


def _export_missing(targets: list[BenchTarget], folder: str, exporter: str) -> dict[str, str]:
    """Export every target that has a model but no ONNX file; returns label -> path."""
    paths = {}
    for i, target in enumerate(targets):
        if target.onnx_path:
            paths[target.label] = target.onnx_path
        elif target.model is not None:
            path = os.path.join(folder, f"target{i}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if target.precision == "int8":
                    int8_graph(target.model, target.input_size, path)
                else:
                    export_onnx(target.model, target.input_size, path, ExportConfig(exporter=exporter, validate=False))
            paths[target.label] = path
    return paths


def _at_size(target: BenchTarget, size: tuple[int, int, int]) -> BenchTarget:
    """The target to time at ``size``: a model is exported again at that size (its ONNX file, if
    any, was made for its own); an ONNX file made for another size cannot be."""
    if tuple(target.input_size) == size:
        return target
    if target.model is None:
        raise DscompressError(f"{target.label} is an ONNX file for {','.join(map(str, target.input_size))} inputs; "
                              f"it cannot be timed at --time-at {','.join(map(str, size))}")
    return replace(target, input_size=size, onnx_path=None)


def bench(targets: list[BenchTarget], config: BenchConfig | None = None, progress: Progress = QUIET) -> list[BenchRecord]:
    """Time every target on every runtime, interleaved, at each batch size.

    Returns one :class:`BenchRecord` per (batch size, target, runtime), including runtimes
    that could not run (status ``unavailable``/``skipped``). Models are put in eval mode.
    """
    config = config or BenchConfig()
    if not targets:
        raise DscompressError("give at least one model, artifact folder or ONNX file to bench")
    if config.time_at is not None:
        targets = [_at_size(target, tuple(config.time_at)) for target in targets]
    for target in targets:
        if target.model is None and not config.providers:
            raise DscompressError(f"{target.label} is an ONNX file: it needs an ONNX Runtime provider; drop --providers none")
    threads = config.threads or torch.get_num_threads()
    providers, automatic = resolve_providers(config.providers)
    cuda_torch = config.torch and torch.cuda.is_available() and "cuda" in providers
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="dscompress-bench-") as tmp:
        paths = _export_missing(targets, tmp, config.exporter) if providers else {}
        sessions, unusable = {}, []
        for provider in providers:
            for target in targets:
                if target.label not in paths:
                    continue
                session, reason = open_session(paths[target.label], provider, threads=threads)
                if session is None:
                    unusable.append((target, f"ort-{provider}", "skipped" if automatic else "unavailable", reason))
                else:
                    sessions[target.label, provider] = session
        models = {t.label: t.model.eval() for t in targets if t.model is not None and config.torch}
        cuda_models = {label: copy.deepcopy(m).cuda().eval() for label, m in models.items()} if cuda_torch else {}
        if cuda_models:
            torch.backends.cudnn.benchmark = True
        records = []
        for batch_size in config.batch_sizes:
            records += _bench_batch(targets, batch_size, config, models, cuda_models, sessions, unusable, threads, progress)
    return records


def _bench_batch(targets, batch_size, config, models, cuda_models, sessions, unusable, threads, progress) -> list[BenchRecord]:
    records, runners = [], []
    generator = torch.Generator().manual_seed(batch_size)
    for target in targets:
        images = torch.randn(batch_size, *target.input_size, generator=generator)
        if target.label in models:
            runners.append(_Runner(target, "torch-cpu", batch_size, _torch_runner(models[target.label], images, "cpu")))
        if target.label in cuda_models:
            runners.append(_Runner(target, "torch-cuda", batch_size, _torch_runner(cuda_models[target.label], images, "cuda")))
        for (label, provider), session in sessions.items():
            if label != target.label:
                continue
            fixed = _fixed_batch(session)
            if fixed is not None and fixed != batch_size:
                records.append(BenchRecord(target.label, f"ort-{provider}", batch_size, "skipped", f"the graph has a fixed batch of {fixed}"))
                continue
            runner = _ort_runner(session, images.numpy(), provider)
            runners.append(_Runner(target, f"ort-{provider}", batch_size, runner, ort_threads=threads))
    for target, runtime, status, reason in unusable:
        records.append(BenchRecord(target.label, runtime, batch_size, status, reason))
    _time_interleaved(runners, config.warmup, config.iters, config.block, progress)
    for runner in runners:
        record = BenchRecord(
            runner.target.label,
            runner.runtime,
            batch_size,
            iters=config.iters,
            warmup=config.warmup,
            torch_threads=threads if runner.runtime.startswith("torch") else None,
            ort_threads=runner.ort_threads,
            precision=runner.target.precision if runner.runtime.startswith("ort") else "fp32",
        )
        _percentiles(record, runner.samples)
        blocks = [np.median(runner.samples[i : i + config.block]) for i in range(0, len(runner.samples), config.block)]
        record.block_spread = float(max(blocks) / min(blocks)) if len(blocks) > 1 and min(blocks) > 0 else None
        records.append(record)
    order = {t.label: i for i, t in enumerate(targets)}
    return sorted(records, key=lambda r: (order[r.target], r.runtime))


def headline(results: list[dict]) -> dict | None:
    """The result an artifact's report shows: the preferred runtime at the smallest batch."""
    ok = [r for r in results if r.get("status") == "ok"]
    for runtime in HEADLINE_ORDER:
        mine = sorted((r for r in ok if r["runtime"] == runtime), key=lambda r: r["batch_size"])
        if mine:
            return {"runtime": runtime, "batch_size": mine[0]["batch_size"], "p50_ms": mine[0]["p50_ms"]}
    return None
