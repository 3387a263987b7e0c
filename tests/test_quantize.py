"""INT8 quantization with ONNX Runtime's quantizer: what is quantized, which kernels run it, and
the accuracy check that keeps a bad graph away from OUT."""

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import error_line
from onnx import TensorProto, numpy_helper
from PIL import Image
from torch import nn

from dscompress.artifact.format import Artifact
from dscompress.cli.main import cli
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.deploy.export import ExportConfig, export_onnx
from dscompress.deploy.quantize import INT8_CONV_KERNELS, QuantizeConfig, cpu_has_vnni, module_names, quantize_onnx, reduces_range
from dscompress.nn.layers import DepthwiseSeparableConv2d

SIZE = "3,16,16"
TINY = ["conftest:TinyCNN", "--num-classes", "10", "--input-size", SIZE]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """TinyCNN trained on digits at 3x16x16 for 3 epochs (about 90% top-1), as an artifact."""
    out = tmp_path_factory.mktemp("quantize") / "base"
    result = invoke("finetune", *TINY, "--data", "digits", "--teacher", "none", "--epochs", "3", "-o", out)
    assert result.exit_code == 0, result.output
    return str(out)


def weighted_modules(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_ort_cpu_int8_is_within_max_drop_and_runs_every_conv_in_int8(base, tmp_path):
    out = tmp_path / "int8.onnx"
    result = invoke("quantize", base, "--data", "digits", "--runtime", "ort-cpu", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["passed"] and record["drop"] <= 1.0 and record["agreement"] > 90
    assert 0 < record["logit_shift"] <= record["logit_error"] < 0.5
    assert out.exists() and not (tmp_path / "int8.failed.onnx").exists()
    model = Artifact.open(base).model()
    assert {n["module"] for n in record["nodes"] if n["quantized"]} == weighted_modules(model)
    convs = [n for n in record["nodes"] if n["op"] == "Conv"]
    assert convs and all(n["kernel"].split(".")[-1] in INT8_CONV_KERNELS for n in convs), convs
    assert record["kernels"].get("QLinearConv") == len(convs)
    assert record["int8_bytes"] < 0.5 * record["fp32_bytes"]
    assert Artifact.open(base).metrics["int8"]["int8_top1"] == record["int8_top1"]


def test_ort_trt_graph_is_symmetric_qdq_with_zero_point_0(base, tmp_path):
    artifact = Artifact.open(base)
    path = str(tmp_path / "trt.onnx")
    record = quantize_onnx(artifact.model(), artifact.spec.input_size, path,
                           QuantizeConfig(data="digits", runtime="ort-trt", calibrate_images=32, test_images=64, max_drop=100))
    graph = onnx.load(path).graph
    initializers = {t.name: t for t in graph.initializer}
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    for node in quantizers:
        zero_point = initializers[node.input[2]]
        assert zero_point.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero_point).any(), node.name
    weights = [t for name, t in initializers.items() if name.endswith("weight_quantized")]
    assert weights and all(t.data_type == TensorProto.INT8 for t in weights)
    dequantized = [initializers[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert dequantized and all(t.data_type == TensorProto.INT8 for t in dequantized)  # no int32 bias: TensorRT refuses it
    biases = [initializers[n.input[2]] for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert biases and all(t.data_type == TensorProto.FLOAT for t in biases)
    assert all(n.quantized for n in record.nodes) and not record.kernels and not record.reduce_range


def test_exclude_leaves_the_matching_modules_in_float(base, tmp_path):
    artifact = Artifact.open(base)
    config = QuantizeConfig(data="digits", exclude=["features.0", "head.*"], calibrate_images=32, test_images=64, max_drop=100)
    record = quantize_onnx(artifact.model(), artifact.spec.input_size, str(tmp_path / "x.onnx"), config)
    left = {n.module: n.reason for n in record.nodes if not n.quantized}
    assert left == {"features.0.0": "excluded by pattern", "head.2": "excluded by pattern"}
    assert {n.module for n in record.nodes if n.quantized} == {f"features.{i}.0" for i in range(1, 5)}


@pytest.mark.parametrize("rank", [1, 2])
def test_depthwise_separable_layers_are_named_and_run_in_int8(base, rank, tmp_path):
    """What convert makes (rank 2: the split deploy form) quantizes layer by layer, each conv a QLinearConv."""
    artifact = Artifact.open(base)
    converted, _ = convert(artifact.model(), artifact.spec.input_size, ConvertConfig(rank=rank))
    config = QuantizeConfig(data="digits", calibrate_images=32, test_images=64, max_drop=100)
    record = quantize_onnx(converted, artifact.spec.input_size, str(tmp_path / "ds.onnx"), config)
    convs = [n for n in record.nodes if n.op == "Conv"]
    parts = {part for n in convs if n.module != "features.0.0" for part in n.module.split(".")}
    assert {"depthwise", "pointwise"} <= parts, [n.module for n in convs]
    assert all(n.quantized and n.kernel.split(".")[-1] in INT8_CONV_KERNELS for n in convs), convs
    assert not record.notes


def test_equalize_runs_first_and_keeps_the_fp32_graph(base, tmp_path):
    """--equalize equalizes a converted artifact's layers before export: the fp32 graph scores as
    without it (the same function), and the record says how many layers were equalized."""
    converted = str(tmp_path / "r1")
    assert invoke("convert", base, "--rank", "1", "-o", converted).exit_code == 0
    records = {}
    for flag in ("--no-equalize", "--equalize"):
        result = invoke("quantize", converted, "--data", "digits", "--calibrate-images", "32", "--test-images", "64", "--max-drop", "100",
                        flag, "-o", tmp_path / f"q{flag}.onnx", "--json")
        assert result.exit_code == 0, result.output
        records[flag] = json.loads(result.stdout)
    layers = sum(isinstance(m, DepthwiseSeparableConv2d) for m in Artifact.open(converted).model().modules())
    assert records["--equalize"]["equalized"] == layers > 0 and records["--no-equalize"]["equalized"] == 0
    assert records["--equalize"]["fp32_top1"] == records["--no-equalize"]["fp32_top1"]


def test_bias_correction_after_pair_equalization_measures_against_the_models_own_fp32(base, tmp_path):
    """--equalize --bias-correction on a dense model: its conv -> BN -> ReLU -> conv pairs are
    equalized, every conv's bias corrected, and the fp32 top-1 is still the model's own."""
    records = {}
    for flags in ([], ["--equalize", "--bias-correction"]):
        result = invoke("quantize", base, "--data", "digits", "--calibrate-images", "32", "--test-images", "64", "--max-drop", "100",
                        *flags, "-o", tmp_path / f"q{len(flags)}.onnx", "--json")
        assert result.exit_code == 0, result.output
        records[len(flags)] = json.loads(result.stdout)
    assert records[2]["equalized"] == 4 and records[2]["bias_corrected"] == 5  # TinyCNN: 4 pairs, 5 convs
    assert records[0]["bias_corrected"] == records[0]["equalized"] == 0
    assert records[2]["fp32_top1"] == records[0]["fp32_top1"]
    assert all(n["quantized"] for n in records[2]["nodes"])


def test_weights_get_7_bits_only_for_ort_cpu_without_vnni():
    assert reduces_range(QuantizeConfig()) is not cpu_has_vnni()
    assert reduces_range(QuantizeConfig(reduce_range="yes")) and not reduces_range(QuantizeConfig(reduce_range="no"))
    assert not reduces_range(QuantizeConfig(runtime="ort-trt", reduce_range="yes"))


@pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo"), reason="reads Linux's /proc/cpuinfo to check py-cpuinfo's flags")
def test_vnni_is_read_from_the_cpus_flags():
    with open("/proc/cpuinfo") as f:
        flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    assert cpu_has_vnni() == any(flag in flags for flag in ("avx512_vnni", "avx_vnni"))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_graph_nodes_are_named_after_their_modules(exporter, tmp_path):
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    path = str(tmp_path / "r18.onnx")
    export_onnx(model, (3, 16, 16), path, ExportConfig(exporter=exporter, validate=False))
    names = module_names(onnx.load(path).graph)
    assert set(names.values()) == weighted_modules(model)  # BatchNorms folded into their convs keep the conv's name


def test_calibration_on_black_images_fails_and_leaves_nothing_at_out(base, tmp_path):
    """A genuinely broken calibration: the train split is black images, so the activation ranges
    are those of the biases alone and real test images saturate them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        for split in ("train", "test"):
            (tmp_path / "data" / split / str(label)).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "data" / "train" / str(label) / "black.png")
        for i in np.flatnonzero(digits.target == label)[:20]:
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(tmp_path / "data" / "test" / str(label) / f"{i}.png")
    out = tmp_path / "int8.onnx"
    result = invoke("quantize", base, "--data", f"imagefolder:{tmp_path / 'data'}", "-o", out)
    line = error_line(result, 1)
    assert "int8.failed.onnx" in line
    assert not out.exists() and (tmp_path / "int8.failed.onnx").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no staging file left behind


@pytest.mark.parametrize("args, key", [
    ([*TINY, "-o", "{out}"], "--data"),
    ([*TINY, "--data", "digits", "--runtime", "ort-gpu", "-o", "{out}"], "ort-gpu"),
    (["conftest:TinyCNN", "--num-classes", "5", "--input-size", SIZE, "--data", "digits", "-o", "{out}"], "10 classes"),
    ([*TINY, "--data", "digits"], "-o"),
    ([*TINY, "--data", "digits", "--exclude", "layer9.*", "-o", "{out}"], "layer9.*"),
    ([*TINY, "--data", "digits", "--calibrate-method", "mse", "-o", "{out}"], "mse"),
    (["conftest:tiny_seg", "--task", "segmentation", "--input-size", SIZE, "--data", "digits-seg", "-o", "{out}"], "segmentation"),
], ids=["no-data", "unknown-runtime", "wrong-classes", "no-output", "exclude-matches-nothing", "unknown-method", "segmentation"])
def test_bad_input_is_one_line(args, key, tmp_path):
    out = tmp_path / "int8.onnx"
    result = invoke("quantize", *[a.format(out=out) for a in args])
    assert key in error_line(result, 2)
    assert not out.exists()


@pytest.mark.slow
def test_a_recipe_quantizes_its_model_and_records_it(tmp_path):
    from dscompress.pipeline import recipe
    from dscompress.pipeline.run import run

    text = ("model: {name: 'conftest:TinyCNN', num_classes: 10, input_size: [3, 16, 16]}\ndata: digits\nsteps:\n"
            "  - finetune: {name: baseline, teacher: none, epochs: 3}\n  - quantize: {name: int8, calibrate_images: 64}\n")
    (tmp_path / "r.yaml").write_text(text)
    result = run(recipe.load(str(tmp_path / "r.yaml")), str(tmp_path / "run"))
    assert [s.status for s in result.steps] == ["done", "done"]
    assert (tmp_path / "run" / "int8" / "model.onnx").exists()
    assert Artifact.open(str(tmp_path / "run" / "baseline")).metrics["int8"]["passed"]


def _plan(base, out, precisions: str) -> dict:
    """`plan --json` of ``base`` under a budget every candidate meets, at ``precisions``."""
    result = invoke("plan", base, "--data", "digits", "--latency-ms", "1000", "--precisions", precisions, "--batches", "2",
                    "--batch-size", "16", "--held-out", "32", "--ranks", "1", "--prune-ratios", "0.5", "--round-to", "4",
                    "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_an_int8_plan_is_checked_against_int8_alone_and_exported_as_its_qdq_graph(base, tmp_path):
    """A plan over INT8 measures every INT8 candidate's damage on ONNX Runtime, INT8 alone among
    them; `export` of the INT8 plan writes its QDQ graph, calibrated on the plan's own images
    (the same graph each time), measured against fp32, and `validate` passes it on agreement."""
    record = _plan(base, tmp_path / "planned", "fp32,int8")
    by_label = {c["label"]: c for c in record["candidates"]}
    assert {"plan", "plan+int8", "uniform rank-1", "uniform rank-1+int8"} <= set(by_label), sorted(by_label)
    assert all(c["precision"] == ("int8" if "int8" in c["label"] else "fp32") for c in record["candidates"])
    assert by_label["plan"]["damage"] == 0  # a budget this loose keeps every layer dense in fp32: nothing is lost
    int8 = [c for c in record["candidates"] if c["precision"] == "int8"]
    assert all(c["damage"] > 0 for c in int8)  # rounding costs something, measured on the QDQ graph
    assert record["precision"] == "fp32" and record["int8_calibration"] is None

    # the same, INT8 only: the plan is INT8, and says how its graph was calibrated
    int8_planned = tmp_path / "int8-planned"
    record = _plan(base, int8_planned, "int8")
    chosen = next(c for c in record["candidates"] if c["chosen"])
    assert record["precision"] == "int8" and chosen["precision"] == "int8"
    assert chosen["damage"] == min(c["damage"] for c in record["candidates"])
    assert record["int8_calibration"] == {"data": "digits", "batches": 2, "batch_size": 16, "seed": 0, "images": 32, "method": "minmax"}
    assert 0 <= record["top1_after"] <= 100

    graphs = []
    for name in ("a.onnx", "b.onnx"):
        result = invoke("export", int8_planned, "-o", tmp_path / name, "--json")
        assert result.exit_code == 0, result.output
        exported = json.loads(result.stdout)
        assert exported["passed"] and exported["calibrate_images"] == 32 and exported["int8_top1"] is not None
        proto = onnx.load(str(tmp_path / name))
        assert {p.key: p.value for p in proto.metadata_props}["dscompress.precision"] == "int8"
        assert "QuantizeLinear" in {n.op_type for n in proto.graph.node}
        graphs.append(proto.graph.SerializeToString())
    assert graphs[0] == graphs[1]  # rebuilt from the plan's record alone, bitwise
    result = invoke("validate", tmp_path / "a.onnx", "--against", int8_planned, "--data", "digits", "--data-limit", "128", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "pass"
    line = error_line(invoke("validate", tmp_path / "a.onnx", "--against", int8_planned))
    assert "INT8 graph" in line and "--data" in line
    result = invoke("export", int8_planned, "--precision", "fp32", "-o", tmp_path / "fp32.onnx", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["validation_status"] == "pass", result.output
    line = error_line(invoke("export", base, "--precision", "int8", "-o", tmp_path / "c.onnx"))
    assert "plan chose INT8" in line and "dscompress quantize" in line
