"""Latency tables: every candidate timed inside the model, cached, and a whole model predicted from them."""

import os
import time

import pytest
import torch
import torchvision
from conftest import make_tiny

from dscompress.compress.convert import ConvertConfig, convert
from dscompress.compress.units import candidate_name, round_channels
from dscompress.core.errors import DscompressError
from dscompress.planning.latency import Timer, device_name, latency_table

SIZE = (3, 64, 64)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.mark.slow
def test_table_has_every_candidate_and_the_cache_is_hit(resnet, tmp_path):
    cache = str(tmp_path / "latency.json")
    first = Timer("ort-cpu", cache=cache, iters=10)
    table = latency_table(resnet, SIZE, timer=first, ranks=(1, 2), prune_ratios=(0.5,))
    convs = [n for n, m in resnet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"]
    assert [layer.name for layer in table.layers] == convs
    assert set(table.layer("layer1.0.conv1").ms) == {"dense", "rank-1", "rank-2", "prune-0.5", "rank-1+prune-0.5", "rank-2+prune-0.5"}
    assert all(v > 0 for layer in table.layers for v in layer.ms.values())
    assert table.rest_ms == pytest.approx(table.total_ms - sum(layer.ms["dense"] for layer in table.layers))
    begin = time.perf_counter()
    again = latency_table(resnet, SIZE, timer=Timer("ort-cpu", cache=cache, iters=10), ranks=(1, 2), prune_ratios=(0.5,))
    assert again.layers == table.layers and time.perf_counter() - begin < 5  # from the cache: no export, no timing
    other = Timer("ort-cpu", batch_size=2, cache=cache, iters=10)
    assert other.key(resnet, SIZE) != Timer("ort-cpu", cache=cache).key(resnet, SIZE)  # the batch is in the key


@pytest.mark.slow
def test_prediction_agrees_with_a_real_measurement(resnet):
    """The predicted speed-up (the table's whole-model time over its prediction for rank 1) against
    the speed-up measured side by side, as ``plan`` uses it, at 128x128 on one thread (at 64x64
    rank-1 resnet18 runs in 0.4 ms and the profiler's own cost per kernel made the prediction slow).

    The 15% target lives in the benchmark (BENCHMARKS.md), on a quiet machine. Here the band only
    catches a wrong prediction (every layer priced dense: 1x; the rest left out: far above): the
    table's profiles are taken one after another over seconds, and this VM's speed drifts by a
    third within a minute with nothing else running (dense resnet18 at 128x128: 27.0, 21.5, 20.1
    ms in three profiles in a row), so a try is taken again up to three times."""
    size = (3, 128, 128)
    converted, _ = convert(resnet, size, ConvertConfig(rank=1))
    tries = []
    for _ in range(3):
        timer = Timer("ort-cpu", threads=1, cache=False, iters=30)
        table = latency_table(resnet, size, timer=timer, ranks=(1,), prune_ratios=())
        predicted = table.predict({layer.name: candidate_name(1) for layer in table.layers})
        assert predicted < table.total_ms
        measured = timer.time_module(resnet, size) / timer.time_module(converted, size)
        tries.append((round(table.total_ms / predicted, 3), round(measured, 3)))
        if 0.4 < tries[-1][0] / tries[-1][1] < 2.5:
            return
    pytest.fail(f"predicted vs measured speed-up, each try: {tries}")


def test_the_profilers_own_cost_is_not_charged_to_the_layers(tmp_path):
    """On a small model the profiler's own cost per kernel is a large part of each layer's time (on
    a tiny net at 3x64x64 its two convs alone summed to 1.25x the whole model, and the rest came out
    negative). Layer times are scaled to the time measured without the profiler, so the same
    profiles with every layer 1.5x slower give the same table."""
    class Inflated(Timer):
        def layer_times(self, model, input_size, precision="fp32"):
            measured = super().layer_times(model, input_size, precision)
            return {"total": measured["total"], "layers": {k: 1.5 * v for k, v in measured["layers"].items()}}

    cache = str(tmp_path / "latency.json")
    args = dict(ranks=(1,), prune_ratios=(0.5,))
    table = latency_table(make_tiny(), SIZE, timer=Timer("ort-cpu", threads=1, cache=cache, iters=5), **args)
    inflated = latency_table(make_tiny(), SIZE, timer=Inflated("ort-cpu", threads=1, cache=cache, iters=5), **args)  # the same profiles
    assert 0 <= table.rest_ms < table.total_ms
    assert inflated.rest_ms == pytest.approx(table.rest_ms, abs=1e-4)
    assert [layer.ms for layer in inflated.layers] == [pytest.approx(layer.ms, abs=1e-4) for layer in table.layers]


def test_int8_columns_are_the_models_qdq_graph(tmp_path):
    """With ``precisions=("fp32", "int8")`` every candidate is also timed as ONNX Runtime's QDQ
    graph of the model built with it (``rank-1+int8``), with its own whole-model total and rest."""
    timer = Timer("ort-cpu", threads=1, cache=str(tmp_path / "latency.json"), iters=5)
    table = latency_table(make_tiny(), SIZE, timer=timer, ranks=(1,), prune_ratios=(), precisions=("fp32", "int8"))
    assert table.precisions == ["fp32", "int8"] and set(table.totals) == {"fp32", "int8"}
    for layer in table.layers:
        assert set(layer.ms) == {"dense", "rank-1", "dense+int8", "rank-1+int8"} and all(v > 0 for v in layer.ms.values())
    assert timer.key(make_tiny(), SIZE, "int8") != timer.key(make_tiny(), SIZE)
    dense = {layer.name: "dense" for layer in table.layers}
    assert table.predict(dense, "int8") == pytest.approx(table.totals["int8"], rel=1e-6)


@pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo"), reason="no /proc/cpuinfo to compare with")
def test_the_cpu_keeps_the_name_the_cache_keys_had():
    """The CPU's name is in every cache key: py-cpuinfo must give /proc/cpuinfo's model name, as
    the parser it replaced did, or every cached table would be measured again."""
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if not names:
        pytest.skip("/proc/cpuinfo names no model")
    assert device_name("ort-cpu") == names[0]


def test_channels_round_down_to_multiples():
    assert round_channels(64, 0.25) == 48 and round_channels(64, 0.5) == 32 and round_channels(12, 0.9) == 8
    assert round_channels(6, 0.5, 8) == 3


def test_runtimes_that_cannot_run_here_are_one_line(resnet):
    with pytest.raises(DscompressError, match="'ort-gpu'"):
        Timer("ort-gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DscompressError, match="torch-cuda cannot run here"):
            latency_table(resnet, SIZE, timer=Timer("torch-cuda", cache=False))
