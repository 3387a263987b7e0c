import json
import os
import re

import pytest
import torch

import dscompress
from dscompress.artifact.format import MANIFEST, Artifact
from dscompress.artifact.source import Source, resolve, save_step
from dscompress.compress.convert import ConvertConfig
from dscompress.core.errors import DscompressError
from dscompress.pipeline.steps import convert_artifact


@pytest.fixture
def converted(tmp_path):
    source = resolve("resnet18", num_classes=10, input_size=(3, 32, 32))
    artifact, _ = convert_artifact(source, str(tmp_path / "r18"), ConvertConfig(rank=2))
    return source, artifact


def test_manifest_contents(converted):
    source, artifact = converted
    manifest = json.load(open(os.path.join(artifact.path, MANIFEST)))
    assert manifest["format"] == "dscompress-artifact" and manifest["format_version"] == 2
    assert manifest["model"] == {"name": "resnet18", "num_classes": 10, "input_size": [3, 32, 32], "weights": None, "checkpoint": None, "kwargs": {}, "task": "classification", "aux": False}
    assert manifest["preprocess"]["input_size"] == [3, 32, 32] and manifest["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert [(s["step"], s["version"]) for s in manifest["steps"]] == [("convert", 1)]
    assert manifest["steps"][0]["config"]["rank"] == 2
    assert manifest["structure"]["layer1.0.conv1"]["type"] == "DepthwiseSeparableConv2d"
    assert manifest["torch_version"] == torch.__version__ and manifest["dscompress_version"] == dscompress.__version__
    metrics = manifest["metrics"]
    assert metrics["params"] < sum(p.numel() for p in source.model.parameters())
    assert metrics["size_bytes"] == os.path.getsize(os.path.join(artifact.path, "model.safetensors"))
    assert sorted(os.listdir(artifact.path)) == ["manifest.json", "model.safetensors", "original.safetensors"]


def test_original_is_kept_as_teacher(converted):
    source, artifact = converted
    x = torch.randn(2, 3, 32, 32)
    teacher = resolve(artifact.path).teacher()
    with torch.no_grad():
        assert torch.equal(teacher(x), source.model(x))
    assert not any(p.requires_grad for p in teacher.parameters())
    # A second step keeps pointing at the same original.
    again, _ = convert_artifact(resolve(artifact.path), artifact.path + "-again", ConvertConfig(rank=1, allow_unchanged=True))
    assert [s["step"] for s in again.steps] == ["convert", "convert"]
    with torch.no_grad():
        assert torch.equal(again.original_model()(x), source.model(x))


def test_metrics_update_is_kept(converted):
    _, artifact = converted
    artifact.update_metrics(top1=97.5)
    assert Artifact.open(artifact.path).metrics["top1"] == 97.5
    assert not [f for f in os.listdir(artifact.path) if f.startswith(".tmp")]


def test_refuses_to_overwrite_then_replaces_with_force(converted):
    source, artifact = converted
    with pytest.raises(DscompressError, match="already exists.*--force"):
        convert_artifact(source, artifact.path, ConvertConfig(rank=1))
    assert Artifact.open(artifact.path).steps[0]["config"]["rank"] == 2  # nothing lost
    replaced, _ = convert_artifact(source, artifact.path, ConvertConfig(rank=1), force=True)
    assert replaced.steps[0]["config"]["rank"] == 1
    assert not [f for f in os.listdir(os.path.dirname(artifact.path)) if ".tmp-" in f]


def test_interrupted_save_leaves_nothing_behind(tmp_path, tiny, monkeypatch):
    import dscompress.artifact.format as artifact_format

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    source = Source(tiny, dscompress.ModelSpec("conftest:make_tiny", input_size=(3, 16, 16)))
    monkeypatch.setattr(artifact_format, "write_json", fail)
    with pytest.raises(KeyboardInterrupt):
        save_step(source, str(tmp_path / "out"), tiny, [])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: open(os.path.join(p, MANIFEST), "w").write("{not json"), "cannot read .*manifest.json"),
        (lambda p: open(os.path.join(p, MANIFEST), "w").write('{"format": "other"}'), "not a dscompress manifest"),
        (lambda p: os.remove(os.path.join(p, "model.safetensors")), "lacks model.safetensors"),
        (lambda p: open(os.path.join(p, "model.safetensors"), "wb").write(b"\x00" * 16), "cannot read .*model.safetensors"),
        (lambda p: os.remove(os.path.join(p, MANIFEST)), "no manifest.json"),
    ],
    ids=["bad-json", "foreign-json", "missing-weights", "corrupt-weights", "missing-manifest"],
)
def test_damaged_artifacts_give_one_line(converted, damage, message):
    _, artifact = converted
    damage(artifact.path)
    with pytest.raises(DscompressError, match=message):
        dscompress.load(artifact.path)


def test_mismatched_weights_are_named(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    _, artifact = converted
    weights = os.path.join(artifact.path, "model.safetensors")
    state = load_file(weights)
    state["fc.weight"] = torch.zeros(3, 512)
    save_file(state, weights)
    with pytest.raises(DscompressError, match="fc.weight"):
        dscompress.load(artifact.path)


def test_format_1_artifacts_of_dscompress_0_1_still_load(converted):
    _, artifact = converted
    manifest = dict(artifact.manifest, format_version=1)
    del manifest["preprocess"]
    manifest["steps"] = [{k: v for k, v in step.items() if k != "version"} for step in manifest["steps"]]
    json.dump(manifest, open(os.path.join(artifact.path, MANIFEST), "w"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dscompress.load(artifact.path)(x), artifact.model()(x))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format_version": "1"}, "'format_version'"),
        ({"model": None}, "'model'"),
        ({"model": {"num_classes": 10}}, "no name"),
        ({"steps": [42]}, re.escape("steps[0]")),
        ({"format_version": 0}, "format 0"),
    ],
    ids=["version-as-text", "null-model", "nameless-model", "bad-step", "unknown-version"],
)
def test_manifest_schema_is_checked_on_open(converted, change, message):
    _, artifact = converted
    json.dump(dict(artifact.manifest, **change), open(os.path.join(artifact.path, MANIFEST), "w"))
    with pytest.raises(DscompressError, match=message):
        resolve(artifact.path)


def test_damaged_original_is_found_before_any_work(converted):
    _, artifact = converted
    original = os.path.join(artifact.path, "original.safetensors")
    with open(original, "r+b") as f:
        f.truncate(os.path.getsize(original) // 2)
    with pytest.raises(DscompressError, match="original.safetensors"):
        resolve(artifact.path)


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        source = resolve("resnet18", num_classes=10, input_size=(3, 32, 32))
        artifact, _ = convert_artifact(source, str(tmp_path / "shared"), ConvertConfig(rank=1))
    finally:
        os.umask(old)
    assert os.stat(artifact.path).st_mode & 0o777 == 0o755
    assert all(os.stat(os.path.join(artifact.path, f)).st_mode & 0o777 == 0o644 for f in os.listdir(artifact.path))


def test_newer_format_is_refused(converted):
    _, artifact = converted
    manifest = dict(artifact.manifest, format_version=99)
    json.dump(manifest, open(os.path.join(artifact.path, MANIFEST), "w"))
    with pytest.raises(DscompressError, match="format 99.*upgrade dscompress"):
        Artifact.open(artifact.path)


def test_artifact_options_conflict(converted):
    _, artifact = converted
    with pytest.raises(DscompressError, match="has 10 classes"):
        resolve(artifact.path, num_classes=5)
    with pytest.raises(DscompressError, match="--weights"):
        resolve(artifact.path, weights="DEFAULT")
    with pytest.raises(DscompressError, match="3,32,32.*--input-size"):
        resolve(artifact.path, input_size=(3, 64, 64))
