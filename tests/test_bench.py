"""Benchmarking: every runtime of every model timed side by side, results sane and stored."""

import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import GPU, ORT_LISTS_CUDA, make_tiny

from dscompress.cli.main import cli
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.core.errors import DscompressError
from dscompress.deploy.bench import BenchConfig, BenchTarget, bench, headline, load_targets
from dscompress.deploy.export import ExportConfig, export_onnx
from dscompress.pipeline.steps import StepContext, run_step

SIZE = (3, 32, 32)
FAST = {"batch_sizes": [1, 2], "warmup": 1, "iters": 6, "block": 2}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """An original and a converted model, each with its ONNX file (exported once, for speed)."""
    folder = tmp_path_factory.mktemp("bench")
    original = make_tiny()
    converted, _ = convert(original, SIZE, ConvertConfig(rank=1))
    targets = []
    for label, model in (("original", original), ("converted", converted)):
        path = str(folder / f"{label}.onnx")
        export_onnx(model, SIZE, path, ExportConfig(exporter="torchscript", validate=False))
        targets.append(BenchTarget(label, SIZE, model, onnx_path=path))
    return targets


def check_timings(record, iters):
    assert record.status == "ok", record.reason
    assert 0 < record.p50_ms <= record.p90_ms <= record.p99_ms
    assert record.mean_ms > 0 and record.images_per_s > 0
    assert record.iters == iters


def test_two_models_on_pytorch_and_ort_cpu(two_models):
    records = bench(two_models, BenchConfig(providers="cpu", **FAST))
    got = {(r.target, r.runtime, r.batch_size) for r in records}
    assert got == {(t, rt, b) for t in ("original", "converted") for rt in ("torch-cpu", "ort-cpu") for b in (1, 2)}
    threads = torch.get_num_threads()
    for record in records:
        check_timings(record, iters=6)
        if record.runtime == "ort-cpu":
            assert record.ort_threads == threads
        else:
            assert record.torch_threads == threads


def test_threads_are_set_and_restored(two_models):
    before = torch.get_num_threads()
    records = bench(two_models[:1], BenchConfig(providers="cpu", threads=1, **FAST))
    assert {r.torch_threads or r.ort_threads for r in records} == {1}
    assert torch.get_num_threads() == before


@pytest.mark.skipif(GPU, reason="a usable GPU is present")
@pytest.mark.skipif(not ORT_LISTS_CUDA, reason="this onnxruntime build has no CUDA provider to fall back from (not the onnxruntime-gpu wheel)")
def test_cuda_without_gpu_is_unavailable_not_timed(two_models):
    records = bench(two_models[:1], BenchConfig(providers="cpu,cuda", **FAST))
    cuda = [r for r in records if r.runtime == "ort-cuda"]
    assert len(cuda) == 2 and all(r.status == "unavailable" and r.p50_ms is None for r in cuda)
    assert "fell back" in cuda[0].reason
    assert not any(r.runtime == "torch-cuda" for r in records)


def test_onnx_file_and_artifact_targets(tmp_path):
    from dscompress.artifact.format import Artifact, save
    from dscompress.artifact.source import resolve
    from dscompress.models.build import ModelSpec, build_model

    spec = ModelSpec("resnet18", num_classes=10, input_size=SIZE)
    folder = save(str(tmp_path / "r18"), build_model(spec), spec, steps=[]).path
    onnx_path = str(tmp_path / "fixed.onnx")
    export_onnx(make_tiny(), SIZE, onnx_path, ExportConfig(batch=2, exporter="torchscript", validate=False))

    targets = load_targets([folder, onnx_path], resolve)
    assert [t.label for t in targets] == ["r18", "fixed.onnx"]
    config = BenchConfig(providers="cpu", exporter="torchscript", threads=1, **FAST)
    records = run_step(None, config, StepContext(targets=[folder, onnx_path])).record.results  # stores into the artifact
    by_key = {(r.target, r.runtime, r.batch_size): r for r in records}
    assert by_key["fixed.onnx", "ort-cpu", 1].status == "skipped"  # its batch is fixed at 2
    check_timings(by_key["fixed.onnx", "ort-cpu", 2], iters=6)
    assert ("fixed.onnx", "torch-cpu", 2) not in by_key  # no PyTorch model behind a bare file

    latency = Artifact.open(folder).metrics["latency"]
    assert latency["timed_with"] == ["fixed.onnx"]
    assert latency["headline"]["runtime"] == "ort-cpu" and latency["headline"]["batch_size"] == 1
    assert len(latency["results"]) == 4  # torch-cpu and ort-cpu at batch 1 and 2

    from dscompress.cli.report import compare

    row = compare([folder])[0]
    assert row["latency_ms"] == latency["headline"]["p50_ms"] == row["p50:ort-cpu b1"]
    assert row["p50:torch-cpu b2"] > 0


def test_cli_json(tmp_path):
    onnx_path = str(tmp_path / "m.onnx")
    export_onnx(make_tiny(), SIZE, onnx_path, ExportConfig(exporter="torchscript", validate=False))
    args = ["bench", onnx_path, onnx_path, "--providers", "cpu", "--batch-sizes", "1", "--warmup", "1", "--iters", "4", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    records = printed["results"]
    assert printed["machine"] and [r["target"] for r in records] == ["m.onnx", "m.onnx#2"]
    assert all(r["status"] == "ok" and r["p50_ms"] <= r["p99_ms"] for r in records)


def test_headline_prefers_onnx_runtime_at_the_smallest_batch():
    results = [
        {"runtime": "torch-cpu", "batch_size": 1, "status": "ok", "p50_ms": 1.0},
        {"runtime": "ort-cpu", "batch_size": 8, "status": "ok", "p50_ms": 4.0},
        {"runtime": "ort-cpu", "batch_size": 2, "status": "ok", "p50_ms": 2.0},
        {"runtime": "ort-cuda", "batch_size": 1, "status": "unavailable"},
    ]
    assert headline(results) == {"runtime": "ort-cpu", "batch_size": 2, "p50_ms": 2.0}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"iters": 0}, "--iters"),
        ({"warmup": -1}, "--warmup"),
        ({"threads": 0}, "--threads"),
        ({"batch_sizes": "0"}, "--batch-sizes"),
        ({"providers": "none", "torch": False}, "nothing to time"),
        ({"providers": "npu"}, "'npu'"),
        ({"exporter": "tf"}, "--exporter.*'tf'"),
        ({"time_at": [3, 224]}, "--time-at"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(DscompressError, match=message):
        BenchConfig(**kwargs)


def test_model_without_onnx_file_is_exported_for_ort():
    records = bench([BenchTarget("m", SIZE, make_tiny())], BenchConfig(providers="cpu", exporter="torchscript", **FAST))
    assert {(r.runtime, r.status) for r in records} == {("torch-cpu", "ok"), ("ort-cpu", "ok")}


def test_pytorch_only():
    records = bench([BenchTarget("m", SIZE, make_tiny())], BenchConfig(providers="none", **FAST))
    assert {r.runtime for r in records} == {"torch-cpu"}


def test_time_at_times_models_at_another_size_and_refuses_fixed_onnx_files(two_models):
    model, onnx_file = two_models[0], BenchTarget("file", SIZE, onnx_path=two_models[0].onnx_path)
    config = {"providers": "cpu", "threads": 1, **FAST, "batch_sizes": [1]}
    small = {r.runtime: r.p50_ms for r in bench([model], BenchConfig(**config))}
    large = {r.runtime: r.p50_ms for r in bench([model], BenchConfig(time_at=[3, 128, 128], **config))}
    assert model.input_size == SIZE and model.onnx_path  # the caller's target is left as it was
    for runtime in ("torch-cpu", "ort-cpu"):  # 16x the MACs: slower on both (a margin for a busy CPU), the ONNX file made again
        assert large[runtime] > 1.5 * small[runtime], (small, large)
    with pytest.raises(DscompressError, match="3,32,32.*--time-at 3,128,128"):
        bench([onnx_file], BenchConfig(time_at=[3, 128, 128], **config))


def test_every_turn_settles_then_runs_once_untimed(monkeypatch):
    """Other sessions' spinning thread pools must not be charged to the next model: each turn is a
    pause, one untimed run, then its timed block (see ``SETTLE_S``)."""
    import dscompress.deploy.bench as bench_module

    events = []
    monkeypatch.setattr(bench_module.time, "sleep", lambda s: events.append(("pause", s)))
    runners = [bench_module._Runner(None, "ort-cpu", 1, run=lambda name=name: events.append(("run", name))) for name in "ab"]
    bench_module._time_interleaved(runners, warmup=1, iters=4, block=2)
    assert [len(r.samples) for r in runners] == [4, 4]
    timed = events[2:]  # after one warm-up run each
    turns = [timed[i:i + 4] for i in range(0, len(timed), 4)]
    assert [turn[1][1] for turn in turns] == ["a", "b", "b", "a"]  # order reversed every other round
    assert all(turn[0] == ("pause", bench_module.SETTLE_S) and turn[1:] == [("run", turn[1][1])] * 3 for turn in turns), turns


def test_an_int8_target_is_timed_as_its_qdq_graph_on_onnx_runtime(tmp_path, monkeypatch):
    """An INT8 plan's model is timed on ONNX Runtime as its QDQ graph (PyTorch runs the float model)."""
    exported = []
    import dscompress.deploy.bench as bench_module

    def spy(model, input_size, path, batches=None, config=None):
        notes = int8_graph(model, input_size, path, batches, config)
        exported.append({node.op_type for node in onnx.load(path).graph.node})
        return notes

    from dscompress.deploy.quantize import int8_graph

    monkeypatch.setattr(bench_module, "int8_graph", spy)
    records = bench([BenchTarget("tiny", SIZE, make_tiny(), precision="int8")], BenchConfig(batch_sizes=[1], warmup=1, iters=3))
    by_runtime = {r.runtime: r for r in records if r.status == "ok"}
    assert by_runtime["ort-cpu"].precision == "int8" and by_runtime["torch-cpu"].precision == "fp32"
    assert len(exported) == 1 and "QuantizeLinear" in exported[0]  # the graph ONNX Runtime timed
