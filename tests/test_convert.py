import warnings

import pytest
import torch
from conftest import SharedAndFunctional, Untraceable
from torch import nn

import dscompress
from dscompress.compress.convert import ConvertConfig, convert, convert_
from dscompress.core.errors import DscompressError
from dscompress.nn.layers import DepthwiseSeparableConv2d

# (model, input size, overrides): small inputs, every model's convs included (min_channels=1).
TORCHVISION_MODELS = [
    ("resnet18", 32),
    ("resnet50", 32),
    ("vgg11_bn", 32),
    ("mobilenet_v2", 32),
    ("efficientnet_b0", 32),
    ("regnet_x_400mf", 32),
    ("densenet121", 32),
    ("googlenet", 32),
    ("convnext_tiny", 32),
]


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@pytest.mark.parametrize("name,size", TORCHVISION_MODELS, ids=[m for m, _ in TORCHVISION_MODELS])
def test_torchvision_full_rank_is_exact_and_reloads(name, size, tmp_path):
    source = dscompress.resolve(name, num_classes=10, input_size=(3, size, size))
    original_state = {k: v.clone() for k, v in source.model.state_dict().items()}
    artifact, record = dscompress.convert_artifact(source, str(tmp_path / "out"), ConvertConfig(rank="full", min_channels=1))
    assert record.layers, "every model here has at least one dense KxK conv"
    assert record.trace == "fx"
    converted = artifact.model()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = source.model(x)
        got = converted(x)
    assert got.shape == expected.shape == (2, 10)
    assert relative_diff(got, expected) < 1e-4
    assert all(layer.fit_error < 1e-5 for layer in record.layers)
    # The input model is untouched (conversion works on a deep copy).
    assert all(torch.equal(v, original_state[k]) for k, v in source.model.state_dict().items())
    assert not any(isinstance(m, DepthwiseSeparableConv2d) for m in source.model.modules())
    # Reloading from safetensors + manifest gives bitwise the same function.
    reloaded = dscompress.load(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(reloaded(x), got)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_low_rank_cuts_macs_and_keeps_shape(rank, tiny):
    model, record = convert(tiny, (3, 16, 16), ConvertConfig(rank=rank))
    names = [layer.name for layer in record.layers]
    assert names == ["conv1", "conv2"]
    assert {s["name"]: s["reason"] for s in record.skipped} == {"stem": "in_channels 3 < min_channels 4"}
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    for layer in record.layers:
        assert layer.rank == rank
        assert layer.macs_after < layer.macs_before
        assert 0 < layer.fit_error < 1
    assert record.macs_after < record.macs_before
    assert record.params_after < record.params_before
    # Per-layer MACs come from fx shapes; whole-model MACs from PyTorch's flop counter: they agree.
    saved = record.converted_macs_before - record.converted_macs_after
    assert record.macs_before - record.macs_after == saved


def test_layer_record_matches_the_swapped_module(tiny):
    model, record = convert(tiny, (3, 16, 16), ConvertConfig(rank=2))
    layer = model.conv2
    assert isinstance(layer, DepthwiseSeparableConv2d)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.rank) == (16, 16, (5, 5), (2, 2), (2, 2), 2)
    entry = next(r for r in record.layers if r.name == "conv2")
    assert entry.output_shape == [16, 8, 8]
    assert entry.params_after == sum(p.numel() for p in layer.parameters())
    assert entry.macs_before == 8 * 8 * 16 * 16 * 25
    assert entry.macs_after == 8 * 8 * 16 * 2 * (25 + 16)
    assert entry.followed_by == ["relu_2"]  # the fx node of the torch.relu call that consumes it
    assert next(r for r in record.layers if r.name == "conv1").followed_by == ["bn1"]
    assert type(model) is type(tiny)
    assert "conv2.depthwise.weight" in model.state_dict()


def test_energy_and_budget_choose_ranks(tiny):
    _, by_energy = convert(tiny, (3, 16, 16), ConvertConfig(energy=0.9))
    assert all(1 <= layer.rank <= layer.full_rank for layer in by_energy.layers)
    assert all(layer.fit_error ** 2 <= 0.1 + 1e-6 for layer in by_energy.layers)
    _, by_budget = convert(tiny, (3, 16, 16), ConvertConfig(macs_budget=0.3))
    assert by_budget.converted_macs_after <= 0.3 * by_budget.converted_macs_before
    with pytest.raises(DscompressError, match="too small"):
        convert(tiny, (3, 16, 16), ConvertConfig(macs_budget=0.01))


def test_dilation_rf_shrinks_large_kernels(tiny):
    model, record = convert(tiny, (3, 16, 16), ConvertConfig(dilation="rf", rank="full"))
    conv2 = next(r for r in record.layers if r.name == "conv2")
    assert (conv2.kernel_before, conv2.kernel_after, conv2.dilation_after) == ([5, 5], [3, 3], [2, 2])
    assert model.conv2.depthwise.kernel_size == (3, 3) and model.conv2.depthwise.dilation == (2, 2)
    conv1 = next(r for r in record.layers if r.name == "conv1")
    assert conv1.kernel_after == [3, 3] and conv1.fit_error < 1e-6  # 3x3 kernels are left as they are
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == tiny(x).shape


@pytest.mark.parametrize("dilation", [2, 3])
def test_explicit_dilation_keeps_output_size(dilation, tiny):
    model, record = convert(tiny, (3, 16, 16), ConvertConfig(dilation=dilation, rank="full"))
    conv1 = next(r for r in record.layers if r.name == "conv1")
    assert conv1.dilation_after == [dilation, dilation] and conv1.function_changed
    assert model.conv1.padding == (dilation, dilation)
    conv2 = next(r for r in record.layers if r.name == "conv2")
    assert conv2.dilation_after == [1, 1] and not conv2.function_changed  # only 3x3 kernels
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == tiny(x).shape


def test_include_exclude_patterns(tiny):
    _, record = convert(tiny, (3, 16, 16), ConvertConfig(include=["conv*"], exclude=["conv2"]))
    assert [layer.name for layer in record.layers] == ["conv1"]
    assert {"name": "conv2", "reason": "excluded"} in record.skipped
    _, record = convert(tiny, (3, 16, 16), ConvertConfig(include=["re:conv[12]"], min_channels=1))
    assert [layer.name for layer in record.layers] == ["conv1", "conv2"]
    with pytest.raises(DscompressError, match="'layer9.\\*'"):
        convert(tiny, (3, 16, 16), ConvertConfig(include=["layer9.*"]))


def test_in_place_conversion_and_filter_fn(tiny):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = tiny(x)
    record = convert_(tiny, (3, 16, 16), ConvertConfig(rank="full"), filter_fn=lambda module, fqn: fqn != "conv2")
    assert [layer.name for layer in record.layers] == ["conv1"]
    assert {"name": "conv2", "reason": "left out by filter_fn"} in record.skipped
    assert isinstance(tiny.conv1, DepthwiseSeparableConv2d) and type(tiny.conv2) is nn.Conv2d  # the model itself changed
    with torch.no_grad():
        assert relative_diff(tiny(x), expected) < 1e-4


def test_shared_modules_functional_convs_and_skips():
    model = SharedAndFunctional().eval()
    converted, record = convert(model, (8, 8, 8), ConvertConfig(rank="full"))
    [layer] = record.layers
    assert layer.name == "conv" and layer.calls == 2
    assert layer.macs_before == 2 * 8 * 8 * 8 * 8 * 9
    reasons = {s["name"]: s["reason"] for s in record.skipped}
    assert reasons["grouped"].startswith("grouped conv")
    assert reasons["depthwise"] == "already depthwise"
    assert reasons["unused"] == "not called by forward"
    assert any(r.startswith("functional conv2d") for r in reasons.values())
    x = torch.randn(2, 8, 8, 8)
    assert relative_diff(converted(x), model(x)) < 1e-4


def test_untraceable_model_gives_clear_error_or_falls_back():
    with pytest.raises(DscompressError, match=r"Untraceable.*conftest.py:\d+ `if x.sum\(\) > 0:"):
        convert(Untraceable(), (8, 8, 8), ConvertConfig(trace="fx"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, record = convert(Untraceable(), (8, 8, 8), ConvertConfig(rank="full"))
    assert any("falling back to forward hooks" in str(w.message) for w in caught)
    assert record.trace == "hooks" and [layer.name for layer in record.layers] == ["conv"]
    x = torch.randn(2, 8, 8, 8)
    assert relative_diff(model(x), Untraceable.forward(model, x)) < 1e-4


def test_wrong_input_size_is_a_clear_error(tiny):
    with pytest.raises(DscompressError, match="1,16,16.*3 channels.*--input-size"):
        convert(tiny, (1, 16, 16))


@pytest.mark.parametrize(
    "kwargs,message",
    [({"rank": 0}, "^--rank"), ({"rank": 2, "energy": 0.5}, "--rank.*--energy"), ({"energy": 1.5}, "^--energy"),
     ({"dilation": "wide"}, "--dilation.*'wide'"), ({"include": ["re:("]}, "'re:\\('"), ({"trace": "jit"}, "--trace.*'jit'")],
)
def test_bad_config(kwargs, message):
    with pytest.raises(DscompressError, match=message):
        ConvertConfig(**kwargs)


def test_config_round_trips():
    config = ConvertConfig(energy=0.8, dilation="rf", include=["layer4"], min_channels=8)
    assert ConvertConfig.from_dict(config.to_dict()) == config
