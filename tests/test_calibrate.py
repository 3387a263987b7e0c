"""Training-free calibration: refit of the pointwise weights and BatchNorm re-estimation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TinyCNN, error_line
from torch import nn

from dscompress.artifact.format import Artifact, save, step_entry
from dscompress.artifact.source import resolve, save_step
from dscompress.cli.main import cli
from dscompress.compress.calibrate import (
    CalibrateConfig,
    CalibrationRecord,
    calibrate,
    calibration_batches,
    converted_layers,
    form_grams,
    measure,
    patch_grams,
    reestimate_bn,
    refit,
    refit_from,
    refit_layer,
    solve_refit,
)
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.core.errors import DscompressError
from dscompress.core.transform import TransformContext
from dscompress.data.datasets import load_dataset, make_loader
from dscompress.models.build import ModelSpec, build_model
from dscompress.nn.layers import DepthwiseSeparableConv2d
from dscompress.pipeline.steps import StepContext, run_step
from dscompress.train.evaluate import accuracy

INPUT_SIZE = (3, 32, 32)
R18 = ["--num-classes", "10", "--input-size", "3,32,32"]


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """TinyCNN trained on digits at 3x32x32 for 3 epochs: about 96% top-1."""
    torch.manual_seed(0)
    model = TinyCNN()
    loader = make_loader(load_dataset("digits", INPUT_SIZE, "train"), 32, shuffle=True, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=3 * len(loader))
    model.train()
    for _ in range(3):
        for images, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return calibration_batches("digits", INPUT_SIZE, batches=8, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def test_loader():
    return make_loader(load_dataset("digits", INPUT_SIZE, "test"), 128)


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batches": 0},
        {"batch_size": 0},
        {"batch_size": 1},  # BatchNorm statistics need two images
        {"ridge": -1.0},
        {"ridge": float("nan")},
        {"bn": False, "refit": False},
        {"data": "nosuchdata"},
    ],
    ids=["batches", "batch_size", "bn-batch-of-one", "negative-ridge", "nan-ridge", "nothing-to-do", "bad-data"],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(DscompressError):
        CalibrateConfig(**kwargs)


def test_config_round_trips_and_rejects_unknown_keys():
    config = CalibrateConfig(data="digits", batches=3, batch_size=8, bn=False, ridge=0.01, seed=5)
    assert CalibrateConfig.from_dict(config.to_dict()) == config
    assert CalibrateConfig(batch_size=1, bn=False).batch_size == 1
    with pytest.raises(DscompressError, match="'batchs'"):
        CalibrateConfig.from_dict({"batchs": 4})


# --- the transform on a trained model ---------------------------------------------------------------


def test_calibration_lowers_every_layer_error_and_recovers_accuracy(trained, images, test_loader):
    baseline = accuracy(trained, test_loader)["top1"]
    assert baseline > 90, "the tiny baseline did not train"
    converted, conversion = convert(trained, INPUT_SIZE, ConvertConfig(rank=1))
    assert len(conversion.layers) == 4  # all but the 3-channel stem
    trained_before, converted_before = state(trained), state(converted)

    calibrated, record = calibrate(converted, trained, images, CalibrateConfig())

    assert same_state(state(trained), trained_before) and same_state(state(converted), converted_before)
    assert [layer.name for layer in record.layers] == [layer.name for layer in conversion.layers]
    for layer in record.layers:
        assert layer.error_after < layer.error_before, layer
    assert record.output_error_after < record.output_error_before
    assert record.order == ["refit", "bn"] and record.bn_reestimated and record.bn_layers == 4
    assert record.images == 8 * 32
    assert CalibrationRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record

    converted_top1 = accuracy(converted, test_loader)["top1"]
    calibrated_top1 = accuracy(calibrated, test_loader)["top1"]
    # measured: 96.1% baseline, 22.5% converted at rank 1, 94.4% calibrated
    assert calibrated_top1 > converted_top1 + 30, (converted_top1, calibrated_top1)
    assert calibrated_top1 > baseline - 5, (baseline, calibrated_top1)


@pytest.mark.parametrize("ridge", [0.0, 1e-6], ids=["lstsq", "ridge"])
def test_refit_recovers_scrambled_pointwise_weights(ridge, images):
    """At full rank the depthwise half can represent the conv exactly, so least squares must find
    pointwise weights (and the bias) that reproduce the original outputs from any starting point."""
    torch.manual_seed(0)
    original = TinyCNN().eval()
    converted, _ = convert(original, INPUT_SIZE, ConvertConfig(rank="full"))
    for module in converted.modules():
        if isinstance(module, DepthwiseSeparableConv2d):
            with torch.no_grad():
                module.pointwise.weight.normal_()
                if module.pointwise.bias is not None:
                    module.pointwise.bias.normal_()
    calibrated, record = calibrate(converted, original, images[:2], CalibrateConfig(bn=False, ridge=ridge))
    assert record.order == ["refit"] and not record.bn_reestimated
    for layer in record.layers:
        assert layer.error_before > 0.5
        assert layer.error_after < 1e-3, layer
    x = images[0]
    torch.testing.assert_close(calibrated(x), original(x), rtol=1e-3, atol=1e-3)


def test_refit_keeps_exact_weights_exact(images):
    """A ridge pulls towards the current weights, so an exact conversion stays as it is."""
    torch.manual_seed(1)
    original = TinyCNN().eval()
    converted, _ = convert(original, INPUT_SIZE, ConvertConfig(rank="full"))
    calibrated, _ = calibrate(converted, original, images[:2], CalibrateConfig(bn=False, ridge=0.1))
    for name, value in converted.state_dict().items():
        torch.testing.assert_close(calibrated.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_bn_reestimation_matches_the_data(images):
    """After re-estimation a BatchNorm's running mean is its input's mean over the images."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    bn = model.features[1][1]
    seen = []
    handle = bn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    assert reestimate_bn(model, images[:3]) == 4
    handle.remove()
    inputs = torch.cat(seen)
    torch.testing.assert_close(bn.running_mean, inputs.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not bn.training


def test_layers_are_refitted_in_forward_order_against_the_converted_inputs(trained, images):
    """Sequential refit: a later layer fitted after its predecessors beats one fitted alone."""
    converted, _ = convert(trained, INPUT_SIZE, ConvertConfig(rank=1))
    names, skipped = converted_layers(converted, trained)
    assert names == ["features.1.0", "features.2.0", "features.3.0", "features.4.0"] and skipped == []
    sequential, _ = calibrate(converted, trained, images, CalibrateConfig(bn=False))
    last_only = copy.deepcopy(converted)
    refit(last_only, trained, names[-1:], images)
    x = torch.cat(images[:4])
    with torch.no_grad():
        target = trained(x)
        error_sequential = (sequential(x) - target).norm() / target.norm()
        error_last_only = (last_only(x) - target).norm() / target.norm()
    assert error_sequential < error_last_only


# --- bad inputs ---------------------------------------------------------------------------------


def test_model_without_converted_layers_is_refused(trained, images):
    with pytest.raises(DscompressError, match="no converted"):
        calibrate(trained, trained, images)


def test_pruned_layer_is_skipped(trained, images):
    converted, _ = convert(trained, INPUT_SIZE, ConvertConfig(rank=1))
    smaller = TinyCNN()
    smaller.features[4][0] = nn.Conv2d(64, 32, 3, 1, 1)  # as if the original had other channels
    names, skipped = converted_layers(converted, smaller)
    assert "features.4.0" not in names and skipped[0]["name"] == "features.4.0"


# --- artifacts and the command line ---------------------------------------------------------------


def test_cli_convert_with_calibrate_saves_both_steps(tmp_path):
    out = tmp_path / "r18"
    result = CliRunner().invoke(
        cli, ["convert", "resnet18", *R18, "-o", str(out), "--calibrate", "digits", "--calibrate-batches", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    record = CalibrationRecord.from_dict(printed["calibrate"])
    assert record.images == 64 and record.order == ["refit", "bn"] and record.bn_layers == 20
    assert [layer.name for layer in record.layers] == [layer["name"] for layer in printed["layers"]]
    assert len(record.layers) == 16  # every 3x3 conv of layer1..layer4; not the stem
    artifact = Artifact.open(str(out))
    assert [s["step"] for s in artifact.steps] == ["convert", "calibrate"]
    assert artifact.steps[1]["config"]["batches"] == 2 and artifact.has_original
    # the saved model is the calibrated one: its errors on the same images are those recorded
    source = resolve(str(out))
    images = calibration_batches("digits", INPUT_SIZE, batches=2, batch_size=32)
    errors = measure(source.model, source.teacher(), [layer.name for layer in record.layers], images)
    for layer in record.layers:
        assert errors.layers[layer.name] == pytest.approx(layer.error_after, rel=1e-3)


def test_cli_calibrate_an_artifact(tmp_path):
    runner = CliRunner()
    converted = tmp_path / "r18"
    assert runner.invoke(cli, ["convert", "resnet18", *R18, "-o", str(converted), "--include", "layer4.*"]).exit_code == 0
    out = tmp_path / "r18-cal"
    # resnet18 is untrained here: its BatchNorm statistics do not describe digits, so only the
    # refit brings it towards its original (see the dscompress.compress.calibrate docstring)
    args = ["calibrate", str(converted), "--data", "digits", "-o", str(out), "--batches", "2", "--batch-size", "8", "--no-bn"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    artifact = Artifact.open(str(out))
    assert [s["step"] for s in artifact.steps] == ["convert", "calibrate"]
    record = CalibrationRecord.from_dict(artifact.steps[-1]["record"])
    assert record.images == 16 and record.order == ["refit"] and not record.bn_reestimated
    assert [layer.name for layer in record.layers] == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    for layer in record.layers:
        assert layer.error_after < layer.error_before, layer

    assert runner.invoke(cli, args).exit_code == 2  # exists
    result = runner.invoke(cli, [*args[:-1], "--force", "--json"])  # with BatchNorm re-estimation
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["output"] == str(out) and printed["order"] == ["refit", "bn"] and printed["bn_reestimated"]
    assert any(layer["error_after"] > layer["error_before"] for layer in printed["layers"])  # what --no-bn is for


@pytest.mark.parametrize(
    "args, facts",
    [
        (["calibrate", "resnet18", "--data", "digits", "-o", "{tmp}/x"], ["resnet18", "convert"]),
        (["calibrate", "{tmp}/nothing", "--data", "digits", "-o", "{tmp}/x"], ["nothing", "not an artifact"]),
        (["calibrate", "{conv}", "--data", "nosuch", "-o", "{tmp}/x"], ["'nosuch'"]),
        (["calibrate", "{conv}", "--data", "digits", "-o", "{tmp}/x", "--batch-size", "1"], ["--batch-size"]),
        (["calibrate", "{plain}", "--data", "digits", "-o", "{tmp}/x"], ["no original"]),
        (["convert", "resnet18", *R18, "-o", "{tmp}/x", "--calibrate-batches", "4"], ["--calibrate-batches", "--calibrate"]),
        (["convert", "resnet18", "--num-classes", "5", "--input-size", "3,32,32", "-o", "{tmp}/x", "--calibrate", "digits"], ["10 classes", "5 outputs"]),
    ],
    ids=["torchvision-name", "missing-folder", "bad-data", "batch-of-one", "artifact-without-original", "batches-alone", "class-count"],
)
def test_cli_bad_inputs_fail_in_one_line(tmp_path, args, facts):
    conv = tmp_path / "conv"
    # an artifact whose model is plain resnet18 with no original: what `save` writes without one
    spec = ModelSpec("resnet18", num_classes=10, input_size=INPUT_SIZE)
    if "{plain}" in args:
        save(str(tmp_path / "plain"), build_model(spec), spec, steps=[])
    if "{conv}" in args:
        model, record = convert(build_model(spec), INPUT_SIZE, ConvertConfig(rank=1, include=["layer4.*"]))
        source = resolve("resnet18", num_classes=10, input_size=INPUT_SIZE)
        save_step(source, str(conv), model, [step_entry(ConvertConfig(rank=1, include=["layer4.*"]), record)])
    args = [a.format(tmp=tmp_path, conv=conv, plain=tmp_path / "plain") for a in args]
    line = error_line(CliRunner().invoke(cli, args))
    assert all(fact in line for fact in facts), line
    assert not (tmp_path / "x").exists()


def test_calibrate_artifact_refuses_a_model_with_other_classes(tmp_path):
    source = resolve("resnet18", num_classes=5, input_size=INPUT_SIZE)
    model, record = convert(source.model, INPUT_SIZE, ConvertConfig(rank=1, include=["layer4.*"]))
    save_step(source, str(tmp_path / "five"), model, [step_entry(ConvertConfig(rank=1, include=["layer4.*"]), record)])
    with pytest.raises(DscompressError, match="5 outputs"):
        run_step(resolve(str(tmp_path / "five")), CalibrateConfig(data="digits"), StepContext(out=str(tmp_path / "x")))


# --- pruned models ----------------------------------------------------------------------------------


def test_calibrated_pruning_lowers_every_pruned_layer_error(trained, images, test_loader):
    from dscompress.compress.prune import PruneConfig, prune

    pruned, record = prune(trained, INPUT_SIZE, PruneConfig(ratio=0.5))
    kept = {layer.name: layer.kept_out for layer in record.layers if layer.kept_out is not None}
    assert kept and all(torch.equal(trained.get_submodule(n).weight[k], pruned.get_submodule(n).weight)
                        for n, k in kept.items() if isinstance(pruned.get_submodule(n), nn.Conv2d) and n == "features.0.0")
    calibrated, result = calibrate(pruned, trained, images, CalibrateConfig(bn=False), kept=kept)
    changed = {layer.name for layer in record.layers if layer.changed and layer.type in ("Conv2d", "Linear")}
    assert {layer.name for layer in result.layers} == changed
    for layer in result.layers:
        if layer.error_before > 1e-6:  # the first layer's kept outputs are the original's, untouched
            assert layer.error_after < layer.error_before, layer
    assert result.output_error_after < 0.5 * result.output_error_before
    assert accuracy(calibrated, test_loader)["top1"] > accuracy(pruned, test_loader)["top1"] + 10


def test_cli_prune_with_calibrate_and_kept_channels_compose(tmp_path):
    runner = CliRunner()
    base = tmp_path / "base"
    assert runner.invoke(cli, ["finetune", "conftest:TinyCNN", "--num-classes", "10", "--input-size", "3,32,32", "--data", "digits",
                               "--teacher", "none", "--epochs", "1", "-o", str(base)]).exit_code == 0
    out = tmp_path / "pruned"
    result = runner.invoke(cli, ["prune", str(base), "--ratio", "0.5", "-o", str(out), "--calibrate", "digits", "--calibrate-batches", "2",
                                 "--no-calibrate-bn", "--json"])  # one epoch leaves BatchNorm statistics that do not describe the data
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["calibrate"]["output_error_after"] < printed["calibrate"]["output_error_before"]
    assert [s["step"] for s in Artifact.open(str(out)).steps] == ["finetune", "prune", "calibrate"]
    steps = [{"step": "prune", "record": {"layers": [{"name": "a", "kept_out": [0, 2, 3, 5]}]}},
             {"step": "convert", "record": {}},
             {"step": "prune", "record": {"layers": [{"name": "a", "kept_out": [1, 3]}, {"name": "b", "kept_out": None}]}}]
    assert TransformContext((3, 8, 8), steps=steps).kept == {"a": [2, 5]}


@pytest.mark.parametrize("rank", [None, 1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("inputs", [None, [0, 2, 3, 5]])
def test_refit_from_patch_grams_is_the_refit_from_data(rank, bias, inputs):
    """form_grams turns the original conv's patch Gram matrices into any pruned or
    depthwise-separable form's: the refit from them equals the refit from the layer's inputs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, bias=bias).eval()
    xs = [torch.randn(4, 6, 9, 9) for _ in range(2)]
    ys = [torch.relu(conv(x)).detach() + 0.1 * torch.randn(4, 8, 9, 9) for x in xs]  # a target the form cannot match exactly
    outputs = [1, 2, 6]
    base = conv
    if inputs is not None:
        base = nn.Conv2d(len(inputs), 8, 3, padding=1, bias=bias)
        base.weight.data = conv.weight.data[:, inputs].clone()
        if bias:
            base.bias.data = conv.bias.data.clone()
    form = DepthwiseSeparableConv2d.from_conv(base, rank) if rank else base
    if outputs:
        form = copy.deepcopy(form)
        solved = form.pointwise if rank else form
        solved.weight.data = solved.weight.data[outputs].clone()
        solved.out_channels = len(outputs)
        if bias:
            solved.bias.data = solved.bias.data[outputs].clone()
    from_data, from_grams = copy.deepcopy(form), copy.deepcopy(form)
    pick = (lambda x: x) if inputs is None else (lambda x: x[:, inputs])
    refit_from(from_data, [(pick(x), y) for x, y in zip(xs, ys)], out_channels=outputs)
    gram, cross = (sum(parts) for parts in zip(*[patch_grams(conv, x, y) for x, y in zip(xs, ys)]))
    solve_refit(from_grams, *form_grams(from_grams, gram, cross, inputs, outputs))
    for a, b in zip(from_data.parameters(), from_grams.parameters()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(from_data.parameters(), form.parameters()))  # it did refit


def test_refit_carries_activations_layer_to_layer_as_the_plain_refit_does():
    """refit runs the model and its original once, carried from layer to layer: the weights are
    those of refitting each layer with its own forward passes (refit_layer), in forward order."""
    import torchvision

    original = torchvision.models.resnet18(num_classes=10).eval()
    converted, _ = convert(original, (3, 32, 32), ConvertConfig(rank=1))
    names, _ = converted_layers(converted, original)
    images = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    staged, plain = copy.deepcopy(converted), copy.deepcopy(converted)
    refit(staged, original, names, images)
    for name in names:
        refit_layer(plain, original, name, images)
    for (name, a), b in zip(staged.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    assert not torch.equal(staged.state_dict()["layer1.0.conv1.pointwise.weight"], converted.state_dict()["layer1.0.conv1.pointwise.weight"])
