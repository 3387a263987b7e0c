"""ONNX export: the graph runs on ONNX Runtime with a dynamic batch and matches PyTorch."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import error_line, large_kernel_net, make_tiny
from onnx import TensorProto, helper
from torch import nn

from dscompress.artifact.format import Artifact
from dscompress.cli.main import cli
from dscompress.cli.report import compare
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.compress.prune import PruneConfig, prune
from dscompress.core.errors import DscompressError
from dscompress.deploy import export as exporting
from dscompress.deploy.export import ExportConfig, ExportWarning, explicit_same_pads, export_onnx, same_pad_dilation_nodes
from dscompress.deploy.validate import TOLERANCES
from dscompress.models.build import ModelSpec
from dscompress.pipeline.steps import convert_artifact

SIZE = (3, 32, 32)


def run_onnx(path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images.numpy()})[0]


# --- resnet18 converted at rank 1, exported through the CLI from an artifact ---------------------


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory):
    """An artifact of resnet18 converted at rank 1, exported with --simplify through the CLI."""
    root = tmp_path_factory.mktemp("resnet")
    from dscompress.artifact.source import Source
    from dscompress.models.build import build_model

    spec = ModelSpec("resnet18", num_classes=10, input_size=SIZE)
    source = Source(build_model(spec), spec)
    artifact, _ = convert_artifact(source, str(root / "r18"), ConvertConfig(rank=1))
    manifest_sha = artifact.manifest_sha256()
    out = str(root / "r18.onnx")
    result = CliRunner().invoke(cli, ["export", artifact.path, "--onnx", out, "--simplify", "--json"])
    assert result.exit_code == 0, result.output
    return {"artifact": artifact.path, "onnx": out, "record": json.loads(result.stdout), "manifest_sha": manifest_sha}


def test_resnet18_dynamic_batch_matches_pytorch(resnet_export):
    record = resnet_export["record"]
    assert record["exporter"] == "dynamo"
    assert record["input_shape"] == ["batch", 3, 32, 32]
    assert record["example_batch"] == 2
    validation = record["validation"]
    assert validation["status"] == "pass"
    diffs = validation["providers"][0]["diffs"]
    assert {d["batch_size"] for d in diffs} == {1, 3}  # neither is the export batch
    assert all(d["max_abs"] <= 1e-4 for d in diffs)
    # And independently of dscompress's own validation:
    model = Artifact.open(resnet_export["artifact"]).model()
    images = torch.randn(5, *SIZE)
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(run_onnx(resnet_export["onnx"], images), expected, atol=1e-4, rtol=1e-3)


def test_graph_is_named_checked_and_stamped(resnet_export):
    proto = onnx.load(resnet_export["onnx"])
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    props = {p.key: p.value for p in proto.metadata_props}
    from dscompress import __version__

    assert props["dscompress.version"] == __version__
    assert props["dscompress.artifact_manifest_sha256"] == resnet_export["manifest_sha"]
    assert props["dscompress.simplified"] == "onnxslim"


def test_simplify_keeps_and_validates_the_unsimplified_graph(resnet_export):
    record = resnet_export["record"]
    unsimplified = resnet_export["onnx"].replace(".onnx", ".unsimplified.onnx")
    assert record["unsimplified_path"] == unsimplified and os.path.isfile(unsimplified)
    assert record["validation_unsimplified"]["status"] == "pass"
    assert record["simplified"] and record["nodes"] <= record["nodes_unsimplified"]
    images = torch.randn(2, *SIZE)
    np.testing.assert_allclose(run_onnx(unsimplified, images), run_onnx(resnet_export["onnx"], images), atol=1e-5)


def test_export_is_recorded_in_the_artifact_and_report(resnet_export):
    onnx_metrics = Artifact.open(resnet_export["artifact"]).metrics["onnx"]
    assert onnx_metrics["exporter"] == "dynamo"
    assert onnx_metrics["validation"] == "pass"
    assert onnx_metrics["path"] == os.path.abspath(resnet_export["onnx"])
    original, row = compare([resnet_export["artifact"]])  # one artifact is shown against the original it keeps
    assert original["name"] == "r18 (original)" and row["name"] == "r18"
    assert row["onnx_check"] == "pass" and "onnx_check" not in original
    assert row["macs_ratio"] == pytest.approx(row["macs"] / original["macs"]) and row["macs_ratio"] < 0.25
    result = CliRunner().invoke(cli, ["report", resnet_export["artifact"], "--markdown"])
    assert result.exit_code == 0 and "| ONNX |" in result.output and "pass" in result.output


def test_perturbed_weights_fail_validation_through_the_cli(resnet_export, tmp_path):
    from safetensors.torch import save_file

    model = Artifact.open(resnet_export["artifact"]).model()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["fc.weight"] += 0.05 * torch.randn_like(state["fc.weight"])
    save_file(state, str(tmp_path / "perturbed.safetensors"))
    args = ["validate", resnet_export["onnx"], "--against", resnet_export["artifact"], "--providers", "cpu"]
    line = error_line(CliRunner().invoke(cli, args + ["--checkpoint", str(tmp_path / "perturbed.safetensors")]), code=1)
    assert "validation fail" in line and "cpu" in line and "logits" in line
    assert CliRunner().invoke(cli, args).exit_code == 0


def test_existing_output_is_refused_without_force(resnet_export):
    before = os.path.getmtime(resnet_export["onnx"])
    line = error_line(CliRunner().invoke(cli, ["export", resnet_export["artifact"], "--onnx", resnet_export["onnx"]]))
    assert resnet_export["onnx"] in line and "--force" in line
    assert os.path.getmtime(resnet_export["onnx"]) == before


# --- dilated conversions, fp16, fallbacks --------------------------------------------------------


@pytest.mark.parametrize(
    "make, dilation, exporter",
    [
        (large_kernel_net, "rf", "auto"),
        (lambda: large_kernel_net("same"), "rf", "torchscript"),  # writes SAME_UPPER + dilation
        (make_tiny, 2, "auto"),
    ],
    ids=["rf-5x5-7x7", "rf-same-padding-torchscript", "dilation2-3x3"],
)
def test_dilated_conversions_export_and_validate(make, dilation, exporter, tmp_path):
    converted, conversion = convert(make(), SIZE, ConvertConfig(dilation=dilation))
    assert any(max(layer.dilation_after) > 1 for layer in conversion.layers)
    path = str(tmp_path / "dilated.onnx")
    record = export_onnx(converted, SIZE, path, ExportConfig(exporter=exporter))
    assert record.exporter == ("torchscript" if exporter == "torchscript" else "dynamo")
    assert record.validation_status == "pass", record.failure()
    assert record.same_pad_dilation == []
    if exporter == "torchscript":
        assert len(record.same_pad_fixed) == 2  # both dilated depthwise convs had padding="same"
    assert same_pad_dilation_nodes(onnx.load(path).graph) == []


def test_fp16_export_validates_at_fp16_tolerance(tmp_path):
    converted, _ = convert(large_kernel_net(), SIZE, ConvertConfig(dilation="rf"))
    path = str(tmp_path / "half.onnx")
    record = export_onnx(converted, SIZE, path, ExportConfig(fp16=True))
    assert record.precision == "fp16"
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 IO
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer)
    validation = record.validation
    assert validation["status"] == "pass"
    assert (validation["atol"], validation["rtol"]) == TOLERANCES["fp16"]
    assert max(d["max_abs"] for d in validation["providers"][0]["diffs"]) > 1e-6  # really half precision


def test_torch_export_failure_falls_back_to_torchscript_with_a_reason(tmp_path):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            y = self.conv(x)
            if y.abs().sum() >= 0:  # always true, but torch.export cannot branch on data
                y = y * 2
            return self.fc(y.mean((2, 3)))

    model = DataDependent().eval()
    with pytest.warns(ExportWarning, match="TorchScript"):
        record = export_onnx(model, SIZE, str(tmp_path / "a.onnx"), ExportConfig())
    assert record.exporter == "torchscript"
    assert "data-dependent" in record.fallback_reason
    assert record.validation_status == "pass"
    with pytest.raises(DscompressError, match="torch.export.*DataDependent"):
        export_onnx(model, SIZE, str(tmp_path / "b.onnx"), ExportConfig(exporter="dynamo"))


def test_fixed_batch_export(tmp_path):
    record = export_onnx(make_tiny(), SIZE, str(tmp_path / "b4.onnx"), ExportConfig(batch=4, exporter="torchscript"))
    assert record.input_shape == [4, 3, 32, 32]
    assert record.validation["batch_sizes"] == [4]
    assert "fixed batch of 4" in record.validation["notes"][0]


def test_external_data_when_over_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(exporting, "EXTERNAL_DATA_THRESHOLD", 0)
    path = str(tmp_path / "big.onnx")
    record = export_onnx(make_tiny(), SIZE, path, ExportConfig(exporter="torchscript"))
    assert record.external_data == "big.onnx.data"
    assert os.path.isfile(path + ".data")
    assert os.path.getsize(path) < os.path.getsize(path + ".data")
    assert record.validation_status == "pass"


def test_writes_nothing_when_export_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(DscompressError, match="already exists"):
        export_onnx(make_tiny(), SIZE, str(path), ExportConfig(exporter="torchscript"))
    assert path.read_bytes() == b"keep me"
    export_onnx(make_tiny(), SIZE, str(path), ExportConfig(exporter="torchscript"), force=True)
    onnx.checker.check_model(str(path))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary files left


def test_model_is_given_back_in_training_mode(tmp_path):
    model = make_tiny().train()
    export_onnx(model, SIZE, str(tmp_path / "m.onnx"), ExportConfig(exporter="torchscript"))
    assert model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"opset": 7}, "^--opset"),
        ({"batch": 0}, "^--batch"),
        ({"batch": "many"}, "--batch.*'many'"),
        ({"exporter": "onnx"}, "--exporter.*'onnx'"),
        ({"providers": "gpu"}, "'gpu'"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(DscompressError, match=message):
        ExportConfig(**kwargs)


# --- Conv nodes that ONNX Runtime rejects: auto_pad=SAME_* with dilation > 1 ---------------------


def conv_graph(auto_pad: str | None, dilation: int, stride: int = 1):
    """One depthwise 3x3 Conv on (1, 2, 9, 9), built with onnx.helper."""
    weight = np.random.default_rng(0).standard_normal((2, 1, 3, 3)).astype(np.float32)
    attrs = {"dilations": [dilation, dilation], "group": 2, "kernel_shape": [3, 3], "strides": [stride, stride]}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = [dilation] * 4
    node = helper.make_node("Conv", ["input", "w"], ["logits"], name="conv", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 9, 9])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2, "h", "w"])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)  # valid ONNX, all of them
    return model, weight


@pytest.mark.parametrize(
    "auto_pad, dilation, stride, flagged",
    [
        ("SAME_UPPER", 2, 1, True),
        ("SAME_LOWER", 3, 1, True),
        ("SAME_UPPER", 2, 2, True),
        ("SAME_UPPER", 1, 1, False),
        (None, 2, 1, False),
        ("VALID", 2, 1, False),
    ],
)
def test_same_pad_with_dilation_is_flagged(auto_pad, dilation, stride, flagged):
    model, _ = conv_graph(auto_pad, dilation, stride)
    assert same_pad_dilation_nodes(model.graph) == (["conv"] if flagged else [])


def test_flagged_node_is_rejected_by_ort_and_explicit_pads_fix_it(tmp_path):
    model, weight = conv_graph("SAME_UPPER", 2)
    images = np.random.default_rng(1).standard_normal((1, 2, 9, 9)).astype(np.float32)
    path = str(tmp_path / "same.onnx")
    onnx.save(model, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="Dilation not supported"):
        session.run(None, {"input": images})

    assert explicit_same_pads(model.graph) == ["conv"]
    assert same_pad_dilation_nodes(model.graph) == []
    onnx.save(model, path)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    conv = nn.Conv2d(2, 2, 3, padding="same", dilation=2, groups=2, bias=False)
    conv.weight.data = torch.from_numpy(weight)
    with torch.no_grad():
        np.testing.assert_allclose(got, conv(torch.from_numpy(images)).numpy(), atol=1e-5)


def test_strided_same_pad_is_left_flagged():
    model, _ = conv_graph("SAME_UPPER", 2, stride=2)
    assert explicit_same_pads(model.graph) == []
    assert same_pad_dilation_nodes(model.graph) == ["conv"]


# --- pruned models -------------------------------------------------------------------------------


def test_pruned_model_exports_and_validates(tmp_path):
    converted, _ = convert(large_kernel_net(), SIZE, ConvertConfig(rank=2, dilation="rf"))
    pruned, record = prune(converted, SIZE, PruneConfig(ratio=0.5))
    assert record.params_after < record.params_before
    exported = export_onnx(pruned, SIZE, str(tmp_path / "pruned.onnx"), ExportConfig())
    assert exported.exporter == "dynamo"
    assert exported.validation_status == "pass", exported.failure()


def test_a_graph_that_fails_validation_never_replaces_a_validated_one(tmp_path, monkeypatch):
    path = str(tmp_path / "m.onnx")
    first = export_onnx(make_tiny(), SIZE, path, ExportConfig(exporter="torchscript", providers=["cpu"]))
    assert first.validation_status == "pass" and first.path == path
    good = open(path, "rb").read()

    def disagree(onnx_path, model, input_size, config):  # as if ONNX Runtime computed something else
        record = real_validate(onnx_path, model, input_size, config)
        record.providers[0].status, record.providers[0].reason = "fail", "logits at batch 1: 10 of 10 values outside tolerance"
        return record

    real_validate = exporting.validate_onnx
    monkeypatch.setattr(exporting, "validate_onnx", disagree)
    line = error_line(CliRunner().invoke(cli, ["export", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "-o", path, "--force",
                                               "--providers", "cpu"]), code=1)
    assert "validation fail" in line and "m.failed.onnx" in line
    assert open(path, "rb").read() == good  # the validated export is still there
    assert os.path.isfile(tmp_path / "m.failed.onnx")


def test_preprocessing_travels_in_the_metadata(resnet_export):
    props = {p.key: p.value for p in onnx.load(resnet_export["onnx"]).metadata_props}
    preprocess = json.loads(props["dscompress.preprocess"])
    assert preprocess["input_size"] == [3, 32, 32] and preprocess["mean"] == [0.485, 0.456, 0.406]
    assert preprocess["value_range"] == [0.0, 1.0]


def test_disk_full_during_export_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporting.onnx, "save_model", full)
    with pytest.raises(DscompressError, match="m.onnx.*No space left"):
        export_onnx(make_tiny(), SIZE, str(tmp_path / "m.onnx"), ExportConfig(exporter="torchscript"))
    assert os.listdir(tmp_path) == []


def test_validate_says_when_the_onnx_came_from_another_artifact(resnet_export, tmp_path):
    """The export stamps the artifact's weights sha256 in the graph; validating against an artifact
    with other weights (the same architecture) says so beside the failure."""
    from dscompress.artifact.source import Source
    from dscompress.models.build import build_model

    spec = ModelSpec("resnet18", num_classes=10, input_size=SIZE)
    model = build_model(spec)
    with torch.no_grad():  # other weights, whatever the random state
        model.fc.weight.add_(torch.randn(model.fc.weight.shape, generator=torch.Generator().manual_seed(1)))
    other, _ = convert_artifact(Source(model, spec), str(tmp_path / "other"), ConvertConfig(rank=1))
    args = ["validate", resnet_export["onnx"], "--providers", "cpu", "--json", "--against"]
    result = CliRunner().invoke(cli, args + [other.path])
    assert result.exit_code == 1
    notes = json.loads(result.stdout)["notes"]
    assert any("the ONNX file was exported from other weights than" in note and "other" in note for note in notes), notes
    same = json.loads(CliRunner().invoke(cli, args + [resnet_export["artifact"]]).stdout)
    assert not [note for note in same["notes"] if "other weights" in note]
