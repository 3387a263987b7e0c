"""Cross-layer equalization: the fp32 function is kept exactly, the channels' ranges meet their
columns' weights, and 8-bit rounding of the depthwise outputs then costs less."""

import json

import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import error_line, make_tiny

import dscompress
from dscompress.artifact.format import Artifact
from dscompress.cli.main import cli
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.compress.equalize import EqualizeConfig, equalize
from dscompress.nn.layers import DepthwiseSeparableConv2d

SIZE = (3, 32, 32)


def _converted(rank, size=SIZE):
    model = torchvision.models.resnet18(num_classes=10).eval()
    return convert(model, size, ConvertConfig(rank=rank))[0]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("with_data", [False, True], ids=["data-free", "activations"])
def test_the_fp32_function_is_kept(rank, with_data):
    model = _converted(rank)
    images = [torch.randn(4, *SIZE)] if with_data else None
    equalized, record = equalize(model, images=images)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(equalized(x), model(x), rtol=1e-5, atol=1e-5)
    assert record.ranges == ("activations" if with_data else "weights")
    assert len(record.layers) == sum(isinstance(m, DepthwiseSeparableConv2d) for m in model.modules())
    assert all(layer.spread_after <= layer.spread_before + 1e-6 for layer in record.layers)


def test_ranges_come_from_layers_that_run_split():
    """At rank 2 on large images the layer runs as split pairs (split_pays) and never calls its
    depthwise half: the ranges must still be the activations'."""
    size = (3, 64, 64)
    model = _converted(2, size)
    images = [torch.randn(2, *size)]
    _, record = equalize(model, images=images)
    _, free = equalize(model)
    assert record.ranges == "activations"
    split = "layer1.0.conv1"  # 16x16 inputs at rank 2: run as pairs
    assert next(e for e in record.layers if e.name == split).spread_before != next(e for e in free.layers if e.name == split).spread_before


def _imbalanced():
    """A converted tiny model whose first layer's depthwise channels are scaled by 1/100..100 and
    its pointwise columns back: the same function, a poor one for 8 bits."""
    model = convert(make_tiny(), SIZE, ConvertConfig(rank=1))[0]
    layer = model.conv1
    scale = torch.logspace(-2, 2, layer.depthwise.out_channels)
    with torch.no_grad():
        layer.depthwise.weight.mul_(scale.view(-1, 1, 1, 1))
        layer.pointwise.weight.div_(scale.view(1, -1, 1, 1))
    return model, layer


def _rounded_depthwise_error(layer, x):
    """Output error of ``layer`` when its depthwise outputs are rounded to 8 bits with one scale."""
    with torch.no_grad():
        middle = layer.depthwise(x)
        step = float(middle.abs().max()) / 127
        rounded = torch.fake_quantize_per_tensor_affine(middle, step, 0, -128, 127)
        return float((layer.pointwise(rounded) - layer.pointwise(middle)).norm() / layer.pointwise(middle).norm())


def test_ranges_meet_their_columns_and_rounding_costs_less():
    model, layer = _imbalanced()
    x = torch.randn(8, 8, *SIZE[1:])
    images = [torch.randn(8, *SIZE)]
    equalized, record = equalize(model, images=images)
    after = equalized.conv1
    with torch.no_grad():
        inputs = []
        handle = after.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        equalized(images[0])
        handle.remove()
        ranges = after.depthwise(inputs[0]).abs().amax(dim=(0, 2, 3))
    columns = after.pointwise.weight.abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(ranges, columns, rtol=1e-4, atol=1e-6)
    entry = next(e for e in record.layers if e.name == "conv1")
    assert entry.spread_before > 100 > entry.spread_after
    assert _rounded_depthwise_error(after, x) < _rounded_depthwise_error(layer, x) / 5


def test_apply_runs_the_registered_transform():
    model, _ = _imbalanced()
    by_apply, record = dscompress.apply(model, EqualizeConfig(), SIZE)
    direct, _ = equalize(model)
    for a, b in zip(by_apply.state_dict().values(), direct.state_dict().values()):
        assert torch.equal(a, b)
    assert record.ranges == "weights"


def test_cli_equalizes_an_artifact(tmp_path):
    runner = CliRunner()
    converted = str(tmp_path / "r1")
    assert runner.invoke(cli, ["convert", "conftest:make_tiny", "--input-size", "3,32,32", "--rank", "1", "-o", converted]).exit_code == 0
    out = str(tmp_path / "eq")
    result = runner.invoke(cli, ["equalize", converted, "--data", "digits", "--batches", "1", "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ranges"] == "activations"
    artifact = Artifact.open(out)
    assert [s["step"] for s in artifact.steps] == ["convert", "equalize"]
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(artifact.model()(x), Artifact.open(converted).model()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args, fact",
    [
        (["conftest:make_tiny", "--input-size", "3,32,32", "-o", "{tmp}/x"], "convert it first"),
        (["{tmp}/r1", "--data", "nosuchdata", "-o", "{tmp}/x"], "nosuchdata"),
        (["{tmp}/r1", "--batches", "0", "-o", "{tmp}/x"], "--batches"),
    ],
)
def test_cli_bad_input_is_one_line(args, fact, tmp_path):
    runner = CliRunner()
    runner.invoke(cli, ["convert", "conftest:make_tiny", "--input-size", "3,32,32", "--rank", "1", "-o", str(tmp_path / "r1")])
    result = runner.invoke(cli, ["equalize", *[a.format(tmp=tmp_path) for a in args]])
    assert fact in error_line(result)


def _with_statistics(model):
    """``model`` with BatchNorm statistics and affine terms away from the identity, as training leaves them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in ((module.running_mean, -0.5, 0.5), (module.running_var, 0.5, 2.0),
                                          (module.weight, 0.2, 2.0), (module.bias, -0.3, 0.3)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model.eval()


@pytest.mark.parametrize("name, pairs, relu6", [("resnet18", 8, 0), ("mobilenet_v2", 2, 34)])
def test_conv_pairs_are_equalized_through_batchnorm_and_relu_exactly(name, pairs, relu6):
    """DFQ's conv -> conv pairs: resnet18's conv1 -> bn1 -> relu -> conv2 of each block; in
    mobilenet_v2 only the projection -> expansion pairs with nothing between (its ReLU6s clip)."""
    model = _with_statistics(getattr(torchvision.models, name)(num_classes=10))
    equalized, record = equalize(model, EqualizeConfig(pairs=True), input_size=SIZE)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(equalized(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert len(record.pairs) == pairs and len(record.skipped) == relu6
    assert all("ReLU6" in s["reason"] for s in record.skipped)
    for pair in record.pairs:
        assert pair.folded and isinstance(equalized.get_submodule(pair.folded), torch.nn.Identity)
        first, second = equalized.get_submodule(pair.producer), equalized.get_submodule(pair.consumer)
        ranges = first.weight.abs().flatten(1).amax(1)
        columns = second.weight.abs().amax(dim=(0, 2, 3)) if second.groups == 1 else second.weight.abs().flatten(1).amax(1)
        torch.testing.assert_close(ranges, columns, rtol=1e-5, atol=1e-7)  # each channel's two ranges meet
        assert pair.spread_after <= max(pair.spread_before, pair.consumer_spread_before)
    assert not record.layers


def test_equalized_pairs_save_and_load_as_an_artifact(tmp_path):
    """Folding a BatchNorm gives a conv a bias and leaves an Identity: the artifact records both,
    and both kinds (a converted layer, conv pairs) are equalized in one step."""
    runner = CliRunner()
    converted, out = str(tmp_path / "r1"), str(tmp_path / "eq")
    result = runner.invoke(cli, ["convert", "conftest:TinyCNN", "--num-classes", "10", "--input-size", "3,16,16", "--rank", "1",
                                 "--include", "features.4.0", "-o", converted])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["equalize", converted, "--pairs", "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [p["producer"] for p in record["pairs"]] == ["features.0.0", "features.1.0", "features.2.0"] and len(record["layers"]) == 1
    reloaded = Artifact.open(out).model()
    assert isinstance(reloaded.features[0][1], torch.nn.Identity) and reloaded.features[0][0].bias is not None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), Artifact.open(converted).model()(x), rtol=1e-5, atol=1e-5)
