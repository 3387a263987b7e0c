"""Per-layer latency: every conv named, the layers summing to the whole, runtimes that cannot run refused."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import error_line, make_tiny

from dscompress.cli.main import cli
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.core.errors import DscompressError
from dscompress.deploy.profile import ProfileConfig, profile

SIZE = (3, 32, 32)
FAST = {"warmup": 3, "iters": 15}


@pytest.fixture(autouse=True)
def one_thread():
    """Profile on one thread: two threads beside another job crawl (a whole torch-cpu run went from
    0.3 ms to 60 ms here), which no tolerance on the layer sum survives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    tiny = make_tiny()
    rank2, _ = convert(tiny, SIZE, ConvertConfig(rank=2))
    return {"dense": tiny, "rank2": rank2}


@pytest.mark.parametrize("runtime", ["ort-cpu", "torch-cpu"])
@pytest.mark.parametrize("kind", ["dense", "rank2"])
def test_every_conv_is_named_and_timed(models, runtime, kind):
    record = profile(models[kind], SIZE, ProfileConfig(runtime=runtime, **FAST))
    names = {layer.name for layer in record.layers}
    assert {"stem", "conv1", "conv2", "fc"} <= names, names
    assert not [n for n in names if n.startswith("<") and n != "<layout change>"], names  # every kernel mapped
    by_name = {layer.name: layer for layer in record.layers}
    assert by_name["conv1"].convertible and by_name["conv2"].convertible and not by_name["stem"].convertible
    assert by_name["conv2"].op == ("DepthwiseSeparableConv2d" if kind == "rank2" else "Conv2d")
    assert by_name["conv2"].macs == (16 * 16 * 16 * 2 * (25 + 16) if kind == "rank2" else 16 * 16 * 16 * 16 * 25)  # 16x16 out
    assert record.total_ms > 0 and record.layer_sum_ms > 0
    assert record.layer_sum_ms == pytest.approx(sum(layer.ms for layer in record.layers), abs=1e-3)  # no layer dropped or counted twice
    # Times land on the right layers. Timing, so only an order a busy CPU cannot swap: the layer with the
    # most MACs (over 1000x the classifier's 160) is slower than the classifier in the medians. (These layers
    # are too small for their sum to say much about the whole run: the resnet18 test below checks that.)
    heaviest = max(record.layers, key=lambda layer: layer.macs)
    assert heaviest.macs > 1000 * by_name["fc"].macs and heaviest.ms > by_name["fc"].ms, (heaviest, by_name["fc"])
    assert sum(layer.share for layer in record.layers) == pytest.approx(1, abs=0.01)
    assert record.bound_speedup >= 1 and record.convertible_ms == pytest.approx(by_name["conv1"].ms + by_name["conv2"].ms, abs=1e-3)


def test_resnet18_names_every_conv_through_onnx_runtime_fusions():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    record = profile(model, SIZE, ProfileConfig(**FAST))
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    names = {layer.name for layer in record.layers}
    assert convs <= names, convs - names  # fused with BatchNorm, ReLU and the residual add, still named
    assert not [n for n in names if n.startswith("<") and n != "<layout change>"]
    # The layers account for the run (no kernel lost), within what timing two runs on a shared CPU allows.
    assert 0.5 < record.layer_sum_ms / record.total_ms < 2, (record.layer_sum_ms, record.total_ms)
    assert 3 < record.bound_speedup


def test_int8_profile_names_every_conv_of_the_qdq_graph():
    """An INT8 profile times ONNX Runtime's QDQ graph of the model; its convs (INT8 weights behind
    DequantizeLinear, fused into QLinearConv) keep their module names."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    record = profile(model, SIZE, ProfileConfig(precision="int8", **FAST))
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    names = {layer.name for layer in record.layers}
    assert record.precision == "int8" and convs <= names, convs - names
    assert record.total_ms > 0 and any("INT8" in note for note in record.notes)


def test_cli_json_report_and_unavailable_runtimes(tmp_path):
    runner = CliRunner()
    folder = str(tmp_path / "tiny")
    assert runner.invoke(cli, ["convert", "conftest:make_tiny", "--input-size", "3,32,32", "-o", folder]).exit_code == 0
    result = runner.invoke(cli, ["profile", folder, "--iters", "5", "--warmup", "1", "--json", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total_ms"] > 0 and all({"name", "ms", "macs"} <= set(layer) for layer in data["layers"])
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    rows = json.loads(runner.invoke(cli, ["report", folder, "--json"]).stdout)
    assert [(p["runtime"], p["total_ms"]) for p in rows[-1]["profiles"].values()] == [("ort-cpu", data["total_ms"])]  # stored
    shown = runner.invoke(cli, ["report", folder, "--profile"])
    assert shown.exit_code == 0 and shown.stdout, shown.output
    for runtime in ("ort-cuda", "torch-cuda"):
        if torch.cuda.is_available():
            continue
        line = error_line(runner.invoke(cli, ["profile", folder, "--runtime", runtime]))
        assert runtime in line and "cannot run here" in line
    line = error_line(runner.invoke(cli, ["profile", folder, "--runtime", "ort-gpu"]))
    assert "--runtime" in line and "'ort-gpu'" in line


def test_config():
    with pytest.raises(DscompressError, match="--iters"):
        ProfileConfig(iters=0)
    with pytest.raises(DscompressError, match="--plot.*p.svg"):
        ProfileConfig(plot="p.svg")
    with pytest.raises(DscompressError, match="--precision.*torch-cpu runs fp32 here, not int8"):
        ProfileConfig(runtime="torch-cpu", precision="int8")
