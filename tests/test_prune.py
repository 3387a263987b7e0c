"""Pruning: the depthwise-separable unit, whole models, artifacts and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from click.testing import CliRunner
from conftest import error_line
from torch import nn

import dscompress
from dscompress.artifact.format import step_entry
from dscompress.artifact.source import Source, save_step
from dscompress.cli.main import cli
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.compress.prune import PruneConfig, output_layers, prune
from dscompress.compress.prune_tp import DS_PRUNER
from dscompress.core.errors import DscompressError
from dscompress.models.build import ModelSpec, build_model
from dscompress.nn.layers import DepthwiseSeparableConv2d
from dscompress.pipeline.steps import StepContext, convert_artifact, run_step

INPUT = (3, 32, 32)


class GateNet(nn.Module):
    """Convs with one output channel (a spatial gate, concatenated) beside a true depthwise conv."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.gate = nn.Conv2d(16, 1, 3, padding=1)  # groups == out_channels == 1: not depthwise
        self.smooth = nn.Conv2d(1, 1, 3, padding=1)  # in == out == groups == 1
        self.mix = nn.Conv2d(17, 32, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.depthwise(x)))
        gate = torch.sigmoid(self.smooth(self.gate(x)))
        x = F.relu(self.bn2(self.mix(torch.cat([x, gate], dim=1))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def gate_net(num_classes: int = 10) -> GateNet:
    return GateNet(num_classes)


class ScaledBlock(nn.Module):
    """A block that owns a parameter beside its child layers, like ConvNeXt's layer scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.expand = nn.Conv2d(dim, 2 * dim, 1)
        self.project = nn.Conv2d(2 * dim, dim, 1)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x):
        return x + self.layer_scale * self.project(F.gelu(self.expand(self.norm(self.depthwise(x)))))


class LayerScaleNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = ScaledBlock(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def layer_scale_net(num_classes: int = 10) -> LayerScaleNet:
    return LayerScaleNet(num_classes)


def _ds_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, DepthwiseSeparableConv2d)}


def _randomize_bn(model):
    """Distinct BatchNorm statistics and scales, as in a trained model."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": 0}, {"ratio": 1}, {"ratio": -0.2}, {"ratio": 1.5}, {"ratio": "half"}, {"importance": "l1"},
     {"round_to": 0}, {"ignore": ["re:("]}],
    ids=["ratio0", "ratio1", "negative", "above1", "string", "importance", "round_to", "regex"],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(DscompressError):
        PruneConfig(**kwargs)


def test_config_round_trips_through_dict():
    config = PruneConfig(ratio=0.4, importance="lamp", global_pruning=True, round_to=8, ignore=["layer4.*"])
    assert PruneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(DscompressError, match="'sparsity'"):
        PruneConfig.from_dict({**config.to_dict(), "sparsity": 0.5})


# --- the depthwise-separable layer as one unit -----------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_ds_pruner_keeps_the_function_of_the_kept_channels(rank):
    layer = DepthwiseSeparableConv2d(6, 5, 3, padding=1, rank=rank, bias=True).eval()
    original = DepthwiseSeparableConv2d(6, 5, 3, padding=1, rank=rank, bias=True).eval()
    original.load_state_dict(layer.state_dict())
    removed_in, removed_out = [1, 4], [0, 3]
    kept_in, kept_out = [0, 2, 3, 5], [1, 2, 4]

    DS_PRUNER.prune_in_channels(layer, removed_in)
    DS_PRUNER.prune_out_channels(layer, removed_out)

    dw, pw = layer.depthwise, layer.pointwise
    assert (dw.in_channels, dw.groups, dw.out_channels) == (4, 4, 4 * rank)
    assert tuple(dw.weight.shape) == (4 * rank, 1, 3, 3)
    assert (pw.in_channels, pw.out_channels) == (4 * rank, 3)
    assert tuple(pw.weight.shape) == (3, 4 * rank, 1, 1)
    filters = [j * rank + t for j in kept_in for t in range(rank)]
    assert torch.equal(dw.weight, original.depthwise.weight[filters])
    x = torch.randn(2, 6, 8, 8)
    x_removed = x.clone()
    x_removed[:, removed_in] = 0
    with torch.no_grad():
        expected = original(x_removed)[:, kept_out]
        torch.testing.assert_close(layer(x[:, kept_in]), expected, rtol=1e-5, atol=1e-6)


class _DSChain(nn.Module):
    def __init__(self, rank):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ds = DepthwiseSeparableConv2d(8, 6, 3, padding=1, rank=rank)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.ds(F.relu(self.conv(x)))))


@pytest.mark.parametrize("rank", [1, 3])
def test_dependency_graph_prunes_ds_inputs_with_the_producer(rank):
    """Removing conv outputs 1 and 5 must remove the DS layer's inputs 1 and 5, not others."""
    model = _DSChain(rank).eval()
    reference = _DSChain(rank).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():  # the reference computes zeros on the removed channels instead
        reference.conv.weight[[1, 5]] = 0
        reference.conv.bias[[1, 5]] = 0
    graph = tp.DependencyGraph().build_dependency(
        model, torch.zeros(1, *INPUT), customized_pruners={DepthwiseSeparableConv2d: DS_PRUNER}
    )
    graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, [1, 5]).prune()

    dw = model.ds.depthwise
    assert (dw.in_channels, dw.groups, dw.out_channels, model.ds.pointwise.in_channels) == (6, 6, 6 * rank, 6 * rank)
    x = torch.randn(2, *INPUT)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_importance_counts_the_ds_weights():
    """With equal producer weights, the DS input channel with the weakest filters goes first."""
    model = _DSChain(rank=2).eval()
    with torch.no_grad():
        model.conv.weight.fill_(0.1)
        model.ds.depthwise.weight[2 * 5 : 2 * 5 + 2] *= 1e-3  # input channel 5's two filters
        model.ds.pointwise.weight[:, 2 * 5 : 2 * 5 + 2] *= 1e-3  # and the weights that mix them
    before = model.ds.depthwise.weight.detach().clone()
    pruned, record = prune(model, INPUT, PruneConfig(ratio=0.125, ignore=["ds"]))
    kept_filters = [j * 2 + t for j in range(8) if j != 5 for t in range(2)]
    assert torch.equal(pruned.ds.depthwise.weight, before[kept_filters])
    assert [k["name"] for k in record.kept] == ["head", "ds"]


# --- whole models --------------------------------------------------------------------------------

CASES = {
    "resnet18-ds-rank1": ("resnet18", 1),
    "resnet18-ds-rank2": ("resnet18", 2),
    "mobilenet_v2": ("mobilenet_v2", None),
    "resnet18": ("resnet18", None),
    "gatenet": (f"{__name__}:gate_net", None),
    "layerscale": (f"{__name__}:layer_scale_net", None),
}
RATIO = 0.5


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
    """A model, its pruned copy and record, and the pruned model saved as an artifact."""
    torch.manual_seed(0)
    name, rank = CASES[request.param]
    spec = ModelSpec(name, num_classes=10, input_size=INPUT)
    model = _randomize_bn(build_model(spec))
    if rank is not None:
        model, _ = convert(model, INPUT, ConvertConfig(rank=rank))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, record = prune(model, INPUT, PruneConfig(ratio=RATIO))
    out = str(tmp_path_factory.mktemp(request.param) / "pruned")
    save_step(Source(model, spec), out, pruned, [step_entry(PruneConfig(ratio=RATIO), record)])
    return {"name": request.param, "model": model, "state": state, "pruned": pruned, "record": record, "out": out, "rank": rank}


def test_input_model_is_untouched(case):
    after = case["model"].state_dict()
    assert after.keys() == case["state"].keys()
    assert all(torch.equal(after[k], v) for k, v in case["state"].items())


def test_pruned_model_runs_and_keeps_the_classes(case):
    pruned = case["pruned"]
    with torch.no_grad():
        assert pruned(torch.randn(2, *INPUT)).shape == (2, 10)
    kept = [k["name"] for k in case["record"].kept]
    assert len(kept) == 1
    head = pruned.get_submodule(kept[0])
    assert isinstance(head, nn.Linear) and head.out_features == 10


def test_ds_layers_stay_consistent(case):
    layers = _ds_layers(case["pruned"])
    assert bool(layers) == (case["rank"] is not None)
    for name, layer in layers.items():
        dw, pw = layer.depthwise, layer.pointwise
        assert layer.rank == case["rank"], name
        assert dw.groups == dw.in_channels, name
        assert dw.out_channels == dw.in_channels * layer.rank == dw.weight.shape[0], name
        assert pw.in_channels == dw.out_channels == pw.weight.shape[1], name
    if layers:
        before = _ds_layers(case["model"])
        assert any(layer.in_channels < before[n].in_channels for n, layer in layers.items())


def test_depthwise_convs_stay_depthwise(case):
    """Native depthwise convs keep groups == in == out; one-output convs are not taken for them."""
    before = dict(case["model"].named_modules())
    halves = {f"{n}.{half}" for n in _ds_layers(case["pruned"]) for half in ("depthwise", "pointwise")}
    for name, module in case["pruned"].named_modules():
        if name in halves:
            continue  # checked by test_ds_layers_stay_consistent
        if type(module) is nn.Conv2d and before[name].groups > 1:
            assert module.groups == module.in_channels == module.out_channels, name
            assert module.out_channels < before[name].out_channels, name
        if type(module) is nn.Conv2d and before[name].out_channels == 1:
            assert (module.out_channels, module.groups) == (1, 1), name
    if case["name"] == "layerscale":
        block = case["pruned"].block
        assert block.layer_scale.shape == (block.depthwise.out_channels, 1, 1) == (8, 1, 1)
    if case["name"] == "gatenet":
        pruned = case["pruned"]
        assert (pruned.smooth.in_channels, pruned.smooth.out_channels) == (1, 1)
        assert pruned.mix.in_channels == pruned.depthwise.out_channels + 1


def test_params_and_macs_fall_with_the_ratio(case):
    record = case["record"]
    keep = 1 - RATIO
    # Inputs and outputs both shrink, so costs fall to about keep**2; layers whose inputs are the
    # image or whose outputs are the classes only shrink on one side.
    for ratio in (record.params_ratio, record.macs_ratio):
        assert keep**2 * 0.8 < ratio < keep + 0.05
    assert record.params_after < record.params_before and record.macs_after < record.macs_before


def test_record_lists_every_layer_before_and_after(case):
    record = case["record"]
    by_name = {layer.name: layer for layer in record.layers}
    pruned = case["pruned"]
    for name, module in pruned.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            layer = by_name[name]
            assert layer.out_after == module.num_features
            assert layer.out_before == case["model"].get_submodule(name).num_features
        elif isinstance(module, (nn.Conv2d, DepthwiseSeparableConv2d)) and not name.endswith(("depthwise", "pointwise")):
            layer = by_name[name]
            assert (layer.in_after, layer.out_after) == (module.in_channels, module.out_channels)
        elif isinstance(module, nn.Linear):
            assert (by_name[name].in_after, by_name[name].out_after) == (module.in_features, module.out_features)
    assert len(record.changed_layers) > len(record.layers) // 2
    assert json.loads(json.dumps(record.to_dict()))["params_ratio"] == pytest.approx(record.params_ratio)


def test_artifact_reloads_bitwise(case):
    loaded = dscompress.load(case["out"])
    x = torch.randn(2, *INPUT)
    with torch.no_grad():
        assert torch.equal(loaded(x), case["pruned"](x))
    manifest = dscompress.Artifact.open(case["out"]).manifest
    assert manifest["steps"][-1]["step"] == "prune"
    assert manifest["metrics"]["params"] == case["record"].params_after


# --- options -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gate():
    torch.manual_seed(0)
    return _randomize_bn(GateNet()).eval()


def test_round_to_keeps_multiples(gate):
    pruned, record = prune(gate, INPUT, PruneConfig(ratio=0.3, round_to=4))
    for layer in record.changed_layers:
        if layer.out_after != layer.out_before:
            assert layer.out_after % 4 == 0, layer.name
    assert pruned.stem.out_channels == 8  # 16 * 0.7 = 11.2 -> 11 -> rounded down to 8


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "bn", "lamp"])
@pytest.mark.parametrize("global_pruning", [False, True], ids=["local", "global"])
def test_every_importance_prunes(gate, importance, global_pruning):
    pruned, record = prune(gate, INPUT, PruneConfig(ratio=0.4, importance=importance, global_pruning=global_pruning))
    with torch.no_grad():
        assert pruned(torch.randn(2, *INPUT)).shape == (2, 10)
    assert record.params_after < record.params_before
    assert all(p.grad is None for p in gate.parameters())


def test_taylor_uses_the_calibration_batches(gate):
    """Seeded random batches make taylor repeatable; other data ranks channels differently."""
    config = PruneConfig(ratio=0.5, importance="taylor")
    first, _ = prune(gate, INPUT, config)
    again, _ = prune(gate, INPUT, config)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    data = [torch.full((4, *INPUT), 3.0), -torch.rand(4, *INPUT)]
    other, _ = prune(gate, INPUT, config, calibration_batches=data)
    assert not torch.equal(other.stem.weight, first.stem.weight)


def test_ignore_keeps_outputs(gate):
    pruned, record = prune(gate, INPUT, PruneConfig(ratio=0.5, ignore=["stem"]))
    assert pruned.stem.out_channels == 16 and pruned.depthwise.out_channels == 16  # coupled through BN
    assert pruned.mix.out_channels == 16
    assert {"name": "stem", "reason": "matches --ignore 'stem'"} in record.kept


def test_output_layers_walks_through_parameter_free_ops():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout())
    assert output_layers(model.eval(), torch.zeros(1, *INPUT)) == ["2"]


def test_errors_are_one_line(gate):
    with pytest.raises(DscompressError, match="--ratio 0.01"):
        prune(gate, INPUT, PruneConfig(ratio=0.01))
    with pytest.raises(DscompressError, match="'layer4.\\*'"):
        prune(gate, INPUT, PruneConfig(ratio=0.3, ignore=["layer4.*"]))
    with pytest.raises(DscompressError, match="nothing to prune"):
        prune(gate, INPUT, PruneConfig(ratio=0.3, ignore=["*"]))
    with pytest.raises(DscompressError, match="1,32,32"):
        prune(gate, (1, 32, 32), PruneConfig(ratio=0.3))


# --- command line --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec(f"{__name__}:gate_net", num_classes=10, input_size=INPUT)
    out = str(tmp_path_factory.mktemp("cli") / "converted")
    convert_artifact(Source(build_model(spec), spec), out, ConvertConfig(rank=2))
    return out


def test_cli_prunes_an_artifact(converted_dir, tmp_path):
    out = str(tmp_path / "pruned")
    result = CliRunner().invoke(cli, ["prune", converted_dir, "-o", out, "--ratio", "0.5", "--round-to", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["output"] == out and data["params_ratio"] < 0.5
    assert "fc" in [kept["name"] for kept in data["kept"]]  # it produces the model output
    artifact = dscompress.Artifact.open(out)
    assert [s["step"] for s in artifact.steps] == ["convert", "prune"]
    assert artifact.has_original
    model = artifact.model()
    assert all(m.depthwise.out_channels == m.in_channels * m.rank == m.pointwise.in_channels for m in _ds_layers(model).values())

    table = CliRunner().invoke(cli, ["prune", out, "-o", str(tmp_path / "again"), "--ratio", "0.3"])
    assert table.exit_code == 0 and table.stdout, table.output


def test_prune_artifact_takes_a_model_name(tmp_path):
    spec = ModelSpec(f"{__name__}:gate_net", num_classes=10, input_size=INPUT)
    output = run_step(Source(build_model(spec), spec), PruneConfig(ratio=0.5), StepContext(out=str(tmp_path / "p")))
    artifact, record = output.artifact, output.record
    assert artifact.metrics["macs"] == record.macs_after
    assert artifact.steps[0]["config"]["ratio"] == 0.5


@pytest.mark.parametrize(
    "args, facts",
    [
        (["--ratio", "1.5"], ["--ratio", "1.5"]),
        (["--ratio", "0"], ["--ratio"]),
        (["--ratio", "0.001"], ["--ratio 0.001"]),
        (["--ratio", "0.3", "--ignore", "layer9.*"], ["'layer9.*'"]),
        (["--ratio", "0.3", "--round-to", "0"], ["--round-to"]),
        (["--ratio", "0.3", "--num-classes", "7"], ["10 classes"]),
    ],
    ids=["above1", "zero", "tiny", "ignore-nothing", "round-to", "num-classes"],
)
def test_cli_bad_input_is_one_line(converted_dir, tmp_path, args, facts):
    line = error_line(CliRunner().invoke(cli, ["prune", converted_dir, "-o", str(tmp_path / "x"), *args]))
    assert all(fact in line for fact in facts), line
    assert not (tmp_path / "x").exists()


def test_cli_refuses_to_overwrite(converted_dir, tmp_path):
    (tmp_path / "x").mkdir()
    line = error_line(CliRunner().invoke(cli, ["prune", converted_dir, "-o", str(tmp_path / "x"), "--ratio", "0.3"]))
    assert str(tmp_path / "x") in line and "--force" in line
