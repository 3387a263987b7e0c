import re

import pytest
import torch
from safetensors.torch import save_file

import dscompress
from dscompress.core.errors import DscompressError
from dscompress.models.build import ModelSpec, build_model, list_models, output_classes, parse_input_size, read_state_dict


def test_unknown_name_suggests_close_ones():
    with pytest.raises(DscompressError, match="'resnet81'.*resnet18"):
        build_model(ModelSpec("resnet81"))


def test_listing_has_the_classification_models():
    names = list_models()
    assert {"resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names  # detection models are not classifiers


def test_weights_offline_fail_with_one_clear_line(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"no route to {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached: the weights would download
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DscompressError, match="DEFAULT.*--checkpoint"):
        build_model(ModelSpec("resnet18", weights="DEFAULT"))
    with pytest.raises(DscompressError, match="'BEST'"):
        build_model(ModelSpec("resnet18", weights="BEST"))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
@pytest.mark.parametrize("wrapper", [None, "state_dict", "ddp"])
def test_checkpoint_formats_load(tmp_path, suffix, wrapper):
    model = build_model(ModelSpec("resnet18", num_classes=7))
    state = model.state_dict()
    if wrapper == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    path = str(tmp_path / f"ckpt{suffix}")
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({"state_dict": state, "epoch": 3} if wrapper == "state_dict" else state, path)
    loaded = build_model(ModelSpec("resnet18", num_classes=7, checkpoint=path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_that_does_not_fit_names_keys(tmp_path):
    path = str(tmp_path / "other.pt")
    state = build_model(ModelSpec("resnet18", num_classes=10)).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(DscompressError) as info:
        build_model(ModelSpec("resnet18", num_classes=7, checkpoint=path))
    message = str(info.value)
    assert "1 missing (layer1.0.conv1.weight)" in message
    assert "1 unexpected (extra.weight)" in message
    assert "fc.weight (10, 512) vs (7, 512)" in message
    assert "\n" not in message


def test_pickled_whole_model_is_refused(tmp_path):
    path = str(tmp_path / "whole.pt")
    torch.save(build_model(ModelSpec("resnet18", num_classes=2)), path)  # a pickled module
    with pytest.raises(DscompressError, match="whole.pt.*pickled"):
        read_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_checkpoint(tmp_path, content):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(DscompressError, match=re.escape(str(path))):
            read_state_dict(str(path))


def test_missing_checkpoint():
    with pytest.raises(DscompressError, match="/nonexistent/model.pt"):
        read_state_dict("/nonexistent/model.pt")


def test_user_factory(factory_module):
    model = build_model(ModelSpec(f"{factory_module}:make", num_classes=4))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(DscompressError, match="not_a_model returned int"):
        build_model(ModelSpec(f"{factory_module}:not_a_model"))
    with pytest.raises(DscompressError, match="'missing'"):
        build_model(ModelSpec(f"{factory_module}:missing"))
    with pytest.raises(DscompressError, match="'no_such_pkg.models'"):
        build_model(ModelSpec("no_such_pkg.models:make"))


@pytest.mark.parametrize("text,expected", [("3,224,224", (3, 224, 224)), ("1,28,28", (1, 28, 28)), ("3x32x48", (3, 32, 48))])
def test_parse_input_size(text, expected):
    assert parse_input_size(text) == expected


@pytest.mark.parametrize("text", ["a,b,c", "3,0,4", "1,2,3,4", "64", "3,32"])
def test_bad_input_size(text):
    """Only C,H,W: '3,32' once meant H=3, W=32, which nobody wants."""
    with pytest.raises(DscompressError, match=f"--input-size.*{text!r}"):
        parse_input_size(text)


def test_spec_round_trips():
    spec = ModelSpec("resnet18", num_classes=10, input_size=(3, 32, 32))
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_mnasnet_state_dict_versions_survive_artifacts(tmp_path):
    """MNASNet checks its state-dict version on load, which safetensors alone does not keep."""
    source = dscompress.resolve("mnasnet0_5", num_classes=3, input_size=(3, 32, 32))
    dscompress.convert_artifact(source, str(tmp_path / "m"), dscompress.ConvertConfig(rank=1, allow_unchanged=True))  # all its KxK convs are depthwise
    assert dscompress.load(str(tmp_path / "m"))(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_output_classes_runs_the_model_in_eval_mode_and_checks_the_output_for_the_task(tiny):
    from conftest import tiny_seg

    tiny.train()
    assert output_classes(tiny, (3, 16, 16)) == 10 and tiny.training  # its mode is given back
    assert output_classes(tiny_seg(7), (3, 32, 32), "segmentation") == 7
    with pytest.raises(DscompressError, match=r"seg returns \(1, 7, 32, 32\) \(per-pixel logits: .* --task segmentation\)"):
        output_classes(tiny_seg(7), (3, 32, 32), "classification", "seg")
    with pytest.raises(DscompressError, match=r"the model returns \(1, 10\), but a segmentation model returns one tensor \(N, classes, H, W\)"):
        output_classes(tiny, (3, 16, 16), "segmentation")
    with pytest.raises(DscompressError, match="returns tuple, but a classification model returns one tensor"):
        output_classes(torch.nn.Sequential(tiny, Pair()), (3, 16, 16))


class Pair(torch.nn.Module):
    """Two outputs where one is expected."""

    def forward(self, x):
        return x, x
