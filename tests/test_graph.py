import copy

import pytest
import torch
import torch_pruning as tp
import torchvision
from conftest import SharedAndFunctional, Untraceable, make_tiny

from dscompress.compress.calibrate import CalibrateConfig, calibrate
from dscompress.compress.convert import ConvertConfig, convert, convertible
from dscompress.compress.units import find_units
from dscompress.nn.graph import ModelGraph, UntraceableError
from dscompress.nn.layers import LayerTracer

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def test_resnet18_convs_shapes_and_order(resnet):
    graph = ModelGraph(resnet, SIZE)
    assert graph.how == "fx" and graph.fx_failure is None and graph.functional == []
    assert len(graph.convs) == 20 and all(call.calls == 1 for call in graph.convs.values())
    stem, first, downsample = graph.convs["conv1"], graph.convs["layer1.0.conv1"], graph.convs["layer2.0.downsample.0"]
    assert (stem.input_shape, stem.output_shape) == ((1, 3, 32, 32), (1, 64, 16, 16))
    assert (first.input_shape, first.output_shape, first.followed_by) == ((1, 64, 8, 8), (1, 64, 8, 8), ["layer1.0.bn1"])
    assert (downsample.input_shape, downsample.output_shape) == ((1, 64, 8, 8), (1, 128, 4, 4))
    assert graph.out_pixels("layer4.1.conv2") == 1 * 1
    assert list(graph.calls)[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1"] and list(graph.calls)[-1] == "fc"
    assert graph.calls["layer1.0.relu"] == 2  # a block's ReLU runs after each of its convs
    assert list(graph.convs) == [name for name in graph.calls if name in graph.convs]  # convs in forward order


def test_hooks_see_the_same_calls_and_shapes(resnet):
    traced, hooked = ModelGraph(resnet, SIZE), ModelGraph(resnet, SIZE, trace="hooks")
    assert hooked.how == "hooks" and hooked.fx_failure is None
    assert {n: (c.input_shape, c.output_shape, c.calls) for n, c in hooked.convs.items()} == \
        {n: (c.input_shape, c.output_shape, c.calls) for n, c in traced.convs.items()}
    assert hooked.forward_order(traced.calls) == traced.calls


def test_a_shared_conv_and_a_functional_one():
    graph = ModelGraph(SharedAndFunctional().eval(), (8, 8, 8))
    assert graph.convs["conv"].calls == 2 and graph.out_pixels("conv") == 2 * 8 * 8
    assert graph.convs["conv"].followed_by == ["conv"]  # its first call feeds its second
    assert "unused" not in graph.convs and graph.calls["conv"] == 2
    assert graph.functional == ["conv2d"]
    assert graph.forward_order(["depthwise", "unused", "conv", "grouped"]) == {"conv": 2, "grouped": 1, "depthwise": 1}


def test_an_untraceable_model_is_run_with_hooks():
    model = Untraceable().train()
    graph = ModelGraph(model, (8, 8, 8))
    assert graph.how == "hooks" and graph.fx_failure.startswith("cannot trace Untraceable with torch.fx")
    assert graph.convs["conv"].output_shape == (1, 8, 8, 8) and graph.calls == {"conv": 1}
    assert model.training  # given back in its mode
    with pytest.raises(UntraceableError, match="control flow"):
        ModelGraph(model, (8, 8, 8), trace="fx")


def test_one_graph_is_traced_once_for_convert_and_units(resnet, monkeypatch):
    traces, dependency_graphs = [], []
    trace, build = LayerTracer.trace, tp.DependencyGraph.build_dependency
    monkeypatch.setattr(LayerTracer, "trace", lambda self, *a, **k: traces.append(1) or trace(self, *a, **k))
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", lambda self, *a, **k: dependency_graphs.append(1) or build(self, *a, **k))
    graph = ModelGraph(resnet, SIZE)
    calls = convertible(resnet, SIZE, graph=graph)
    _, record = convert(resnet, SIZE, ConvertConfig(rank=2), graph=graph)
    units = find_units(resnet, SIZE, calls, graph=graph)
    assert find_units(resnet, SIZE, calls, graph=graph) == units
    assert (len(traces), len(dependency_graphs)) == (1, 1)
    # the same as each finding it alone
    assert convert(resnet, SIZE, ConvertConfig(rank=2))[1] == record
    assert find_units(resnet, SIZE, convertible(resnet, SIZE)) == units
    assert ["layer1.0.conv1", "layer1.0.conv2"] in [u.layers for u in units]


def test_a_graph_of_another_size_is_refused(resnet):
    with pytest.raises(ValueError, match="not"):
        convertible(resnet, (3, 64, 64), graph=ModelGraph(resnet, SIZE))


def test_convert_finds_the_graph_again_when_it_was_found_another_way():
    model, size = SharedAndFunctional().eval(), (8, 8, 8)
    traced, hooked = ModelGraph(model, size), ModelGraph(model, size, trace="hooks")
    assert convert(model, size, graph=hooked)[1] == convert(model, size)[1]  # auto: fx, which sees the functional conv
    assert convert(model, size, ConvertConfig(trace="hooks"), graph=traced)[1] == convert(model, size, ConvertConfig(trace="hooks"))[1]


def test_calibrate_takes_the_order_from_the_original_graph():
    original = make_tiny()
    converted, _ = convert(original, (3, 16, 16), ConvertConfig(rank=1))
    images = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    config = CalibrateConfig(batches=2, batch_size=4, device="cpu")
    _, alone = calibrate(converted, original, images, config)
    _, shared = calibrate(converted, original, images, config, graph=ModelGraph(original, (3, 16, 16)))
    alone.seconds = shared.seconds = 0.0
    assert shared == alone and [layer.name for layer in shared.layers] == ["conv1", "conv2"]


@pytest.mark.parametrize("name,cut", [("resnet18", "layer2.0.conv1"), ("vgg11", "features.3")])
def test_stages_resume_from_a_cut(name, cut):
    """Running to a cut and on from there gives the model's output; a run that keeps its
    environment leaves it usable again, even with in-place ReLUs after the cut (vgg11)."""
    from dscompress.nn.graph import Stages

    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    stages = Stages(torch.fx.GraphModule(model, LayerTracer().trace(model)))
    env = stages.run(stages.start(x), stages.position(cut))
    assert len(env["values"]) < len(stages.nodes) // 4  # only what is still used after the cut
    with torch.no_grad():
        expected = model(x)
    for _ in range(2):
        assert torch.equal(stages.output(stages.run(env, keep=True)), expected)
    # a module swapped after the cut changes what runs from it
    changed = copy.deepcopy(stages.graph_module.get_submodule(cut))
    changed.weight.data.mul_(2)
    stages.graph_module.set_submodule(cut, changed)
    assert not torch.equal(stages.output(stages.run(env, keep=True)), expected)
