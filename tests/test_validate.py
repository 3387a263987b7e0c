"""Validation on ONNX Runtime: real differences are caught, missing providers are never passed off."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import GPU, ORT_LISTS_CUDA, error_line, make_tiny, tiny_seg
from torch import nn

from dscompress.cli.main import cli
from dscompress.core.errors import DscompressError
from dscompress.deploy.export import ExportConfig, export_onnx
from dscompress.deploy.ort import open_session, parse_providers
from dscompress.deploy.validate import ValidateConfig, compare_outputs, top1_agreement, validate_onnx
from dscompress.nn.metrics import IGNORE_INDEX

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small model and its ONNX file (dynamic batch, TorchScript exporter for speed)."""
    path = str(tmp_path_factory.mktemp("onnx") / "small.onnx")
    model = make_tiny()
    export_onnx(model, SIZE, path, ExportConfig(exporter="torchscript", validate=False))
    return model, path


@pytest.fixture(scope="module")
def artifact_export(tmp_path_factory):
    """A resnet18 artifact (10 classes, 3x32x32) and its ONNX file, for the command line."""
    root = tmp_path_factory.mktemp("cli")
    from dscompress.artifact.format import save
    from dscompress.models.build import ModelSpec, build_model

    spec = ModelSpec("resnet18", num_classes=10, input_size=SIZE)
    artifact = save(str(root / "r18"), build_model(spec), spec, steps=[])
    out = str(root / "r18.onnx")
    export_onnx(artifact.model(), SIZE, out, ExportConfig(exporter="torchscript", validate=False))
    return artifact.path, out


def test_matching_model_passes_at_two_batch_sizes(exported):
    model, path = exported
    record = validate_onnx(path, model, SIZE, ValidateConfig(providers="cpu", batch_sizes="1,3"))
    assert record.status == "pass" and record.passed
    result = record.providers[0]
    assert result.session_providers[0] == "CPUExecutionProvider"
    assert [d.batch_size for d in result.diffs] == [1, 3]
    for d in result.diffs:
        assert d.max_abs <= 1e-4 and d.mismatched == 0
        assert d.median_abs <= d.max_abs and d.mean_abs <= d.max_abs
    assert (record.atol, record.rtol) == (1e-4, 1e-3)


def test_perturbed_weights_fail(exported):
    model, path = exported
    perturbed = make_tiny()
    with torch.no_grad():
        perturbed.conv2.weight.add_(0.01 * torch.randn_like(perturbed.conv2.weight))
    record = validate_onnx(path, perturbed, SIZE, ValidateConfig(providers="cpu"))
    assert record.status == "fail" and not record.passed
    assert record.providers[0].status == "fail"
    assert "outside atol" in record.failure()
    assert all(d.mismatched > 0 for d in record.providers[0].diffs)


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_is_reported_truthfully(exported, provider):
    model, path = exported
    record = validate_onnx(path, model, SIZE, ValidateConfig(providers=["cpu", provider]))
    result = {r.provider: r for r in record.providers}[provider]
    if GPU and result.status == "pass":
        assert result.session_providers[0] == {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
        return
    # Without a GPU, ONNX Runtime runs the session on the CPU: that must not count as a pass.
    assert not GPU or result.status == "unavailable"
    assert result.status == "unavailable" and result.diffs == []
    assert result.reason  # why, from ONNX Runtime's log
    assert record.status == "unavailable" and not record.passed
    assert f"{provider} unavailable" in record.failure()


@pytest.mark.skipif(GPU, reason="a usable GPU is present: CUDA does not fall back")
@pytest.mark.skipif(not ORT_LISTS_CUDA, reason="this onnxruntime build has no CUDA provider to fall back from (not the onnxruntime-gpu wheel)")
def test_open_session_refuses_a_silent_cpu_fallback(exported):
    _, path = exported
    assert "CUDAExecutionProvider" in ort.get_available_providers()  # the wheel claims it...
    session, reason = open_session(path, "cuda")
    assert session is None  # ...but it cannot run here
    assert "fell back to CPUExecutionProvider" in reason


def test_auto_skips_unusable_providers_with_a_note(exported):
    model, path = exported
    record = validate_onnx(path, model, SIZE, ValidateConfig(providers="auto"))
    statuses = {r.provider: r.status for r in record.providers}
    assert statuses["cpu"] == "pass"
    assert record.status == "pass"
    for provider, status in statuses.items():
        assert status in ("pass", "skipped")
        if status == "skipped":
            assert any(note.startswith(f"auto skipped {provider}") for note in record.notes)


def test_top1_agreement_on_real_digits(exported):
    """load_digits images, resized to the input size: the ONNX model agrees with PyTorch."""
    from sklearn.datasets import load_digits

    model, path = exported
    digits = load_digits()
    images = torch.tensor(digits.images[:96], dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=SIZE[1:], mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target[:96])
    batches = [(images[i : i + 32], labels[i : i + 32]) for i in range(0, 96, 32)]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(x):
        return session.run(None, {"input": x.numpy()})[0]

    result = top1_agreement(run, model, batches, limit=80)
    assert result["images"] == 80
    assert result["agreement"] == 100.0
    assert 0 <= result["onnx_top1"] <= 100 and result["onnx_top1"] == result["torch_top1"]
    with torch.no_grad():
        right = (model(images[:80]).argmax(1) == labels[:80]).float().mean().item()
    assert result["torch_top1"] == pytest.approx(100 * right, abs=1e-4)

    # A model that ranks the classes the other way round never agrees; labels are optional.
    class Negated(nn.Module):
        def forward(self, x):
            return -model(x)

    disagreement = top1_agreement(run, Negated(), [b[0] for b in batches])
    assert disagreement["images"] == 96 and disagreement["agreement"] == 0.0
    assert "onnx_top1" not in disagreement


def test_top1_agreement_per_pixel_scores_the_labelled_pixels():
    """Masks with unlabelled (255) pixels: each runtime's pixel accuracy is over the labelled ones."""
    model = tiny_seg(4)
    images = torch.randn(6, *SIZE)
    masks = torch.randint(0, 4, (6, *SIZE[1:]))
    masks[:, :8] = IGNORE_INDEX

    def run(x):
        with torch.no_grad():
            return model(x).numpy()

    result = top1_agreement(run, model, [(images[:4], masks[:4]), (images[4:], masks[4:])])
    with torch.no_grad():
        predicted = model(images).argmax(1)
    labelled = masks != IGNORE_INDEX
    expected = 100 * (predicted == masks)[labelled].float().mean().item()
    assert result["over"] == "pixels" and result["predictions"] == 6 * SIZE[1] * SIZE[2] and result["agreement"] == 100.0
    assert result["onnx_top1"] == result["torch_top1"] == pytest.approx(expected, abs=1e-4)


def test_data_spec_adds_agreement(exported):
    model, path = exported
    record = validate_onnx(path, model, SIZE, ValidateConfig(providers="cpu", data="digits", data_limit=100))
    agreement = record.providers[0].agreement
    assert agreement["images"] == 100 and agreement["agreement"] == 100.0


def test_nan_and_tolerance_arithmetic():
    reference = np.array([[1.0, -2.0, 0.0, 100.0]], dtype=np.float32)
    close = reference + np.array([[5e-5, -5e-5, 9e-5, 0.09]], dtype=np.float32)  # 0.09 <= 1e-4 + 1e-3 * 100
    d = compare_outputs(close, reference, "logits", 1, atol=1e-4, rtol=1e-3)
    assert d.passed and d.mismatched == 0
    assert d.max_abs == pytest.approx(0.09, rel=1e-3)
    far = reference.copy()
    far[0, 2] = 2e-4
    assert compare_outputs(far, reference, "logits", 1, 1e-4, 1e-3).mismatched == 1
    broken = reference.copy()
    broken[0, 0] = np.nan
    assert not compare_outputs(broken, reference, "logits", 1, 1e-4, 1e-3).passed


def test_model_mode_is_restored(exported):
    _, path = exported
    model = make_tiny().train()
    assert validate_onnx(path, model, SIZE, ValidateConfig(providers="cpu")).passed  # compared in eval mode
    assert model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"providers": "cpu,gpu"}, "'gpu'"),
        ({"providers": "auto,cpu"}, "'auto'.*alone"),
        ({"providers": ""}, "at least one provider"),
        ({"batch_sizes": "1,0"}, "--batch-sizes.*got 0"),
        ({"batch_sizes": "one"}, "--batch-sizes.*'one'"),
        ({"atol": -1.0}, "--atol"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(DscompressError, match=message):
        ValidateConfig(**kwargs)


def test_provider_names():
    assert parse_providers("CPU, cuda,TensorrtExecutionProvider") == ["cpu", "cuda", "tensorrt"]
    assert parse_providers(["CUDAExecutionProvider", "cuda"]) == ["cuda"]


# --- command line --------------------------------------------------------------------------------


def test_cli_json_and_table(artifact_export):
    folder, onnx_path = artifact_export
    result = CliRunner().invoke(cli, ["validate", onnx_path, "--against", folder, "--providers", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "pass" and record["batch_sizes"] == [1, 3]
    result = CliRunner().invoke(cli, ["validate", onnx_path, "--against", folder, "--batch-sizes", "2,5", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "pass" and record["batch_sizes"] == [2, 5]
    table = CliRunner().invoke(cli, ["validate", onnx_path, "--against", folder])
    assert table.exit_code == 0 and table.stdout, table.output


def test_cli_cuda_request_without_gpu_exits_non_zero(artifact_export):
    if GPU:
        pytest.skip("a usable GPU is present")
    folder, onnx_path = artifact_export
    line = error_line(CliRunner().invoke(cli, ["validate", onnx_path, "--against", folder, "--providers", "cpu,cuda"]), code=1)
    assert "cuda unavailable" in line and "pass" not in line


@pytest.mark.parametrize(
    "make_args, facts",
    [
        (lambda tmp, folder, onnx_path: [str(tmp / "missing.onnx"), "--against", folder], ["missing.onnx", "does not exist"]),
        (lambda tmp, folder, onnx_path: [str(tmp / "notes.txt"), "--against", folder], ["notes.txt", "not an ONNX model"]),
        (lambda tmp, folder, onnx_path: [onnx_path, "--against", "resnet18", "--num-classes", "10"], ["--input-size 3,32,32"]),
        (lambda tmp, folder, onnx_path: [onnx_path, "--against", "resnet18", "--input-size", "3,32,32"], ["(1, 10)"]),
        (lambda tmp, folder, onnx_path: [onnx_path, "--against", folder, "--providers", "gpu"], ["'gpu'"]),
    ],
    ids=["missing-file", "not-onnx", "input-size-mismatch", "output-shape-mismatch", "unknown-provider"],
)
def test_cli_bad_input_is_one_line(artifact_export, tmp_path, make_args, facts):
    folder, onnx_path = artifact_export
    (tmp_path / "notes.txt").write_text("not a model")
    line = error_line(CliRunner().invoke(cli, ["validate", *make_args(tmp_path, folder, onnx_path)]))
    assert all(fact in line for fact in facts), line
