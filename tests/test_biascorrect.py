"""Bias correction: the predicted INT8 weights are ONNX Runtime's to the bit, the mean output
error of a model with those weights falls, and weights already on the grid are left exactly."""

import copy

import numpy as np
import onnx
import pytest
import torch
import torchvision
from conftest import make_tiny
from onnx import numpy_helper
from torch import nn

import dscompress
from dscompress.compress.biascorrect import BiasCorrectConfig, bias_correct, quantized_weight
from dscompress.compress.calibrate import calibration_batches
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.compress.fold import fold_batchnorms
from dscompress.deploy.quantize import QuantizeConfig, quantize_onnx
from dscompress.nn.graph import ModelGraph

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def images():
    return calibration_batches("digits", SIZE, batches=4, batch_size=32, seed=0)


def simulated(model: nn.Module, reduce_range: bool) -> nn.Module:
    """``model`` with every conv's weights replaced by their predicted INT8 values (activations in float)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Conv2d:
                module.weight.copy_(quantized_weight(module.weight, reduce_range))
    return model


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
def test_predicted_weights_are_onnx_runtimes(reduce_range, images, tmp_path):
    """Every conv of a resnet18 (layer1 converted: depthwise and pointwise halves, BatchNorms folded)
    as quantize_static leaves it in the QDQ graph, dequantized: equal to the bit."""
    model = convert(torchvision.models.resnet18(num_classes=10).eval(), SIZE, ConvertConfig(rank=1, include=["layer1.*"]))[0]
    corrected, record = bias_correct(model, BiasCorrectConfig(reduce_range=reduce_range), images[:1])
    path = str(tmp_path / "q.onnx")
    quantize_onnx(corrected, SIZE, path, QuantizeConfig(data="digits", calibrate_images=16, test_images=16, max_drop=100,
                                                        reduce_range="yes" if reduce_range else "no"))
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    convs = {name: m for name, m in corrected.named_modules() if type(m) is nn.Conv2d}
    assert len(record.layers) == len(convs) == 24
    assert {layer.name for layer in record.layers if layer.added} == {n for n in convs if n.endswith(".depthwise")}  # no bias, no BatchNorm
    for name, conv in convs.items():
        q, scale = initializers[f"{name}.weight_quantized"], initializers[f"{name}.weight_scale"]
        dequantized = q.astype(np.float32) * scale.reshape(-1, 1, 1, 1)
        np.testing.assert_array_equal(quantized_weight(conv.weight, reduce_range).numpy(), dequantized, err_msg=name)


@pytest.mark.parametrize("name, reduce_range, factor", [
    ("mobilenet_v2", False, 0.5), ("mobilenet_v2", True, 0.5), ("resnet18", True, 0.75),
], ids=["mobilenet_v2-8-bit", "mobilenet_v2-7-bit", "resnet18-7-bit"])
def test_mean_output_error_of_int8_weights_falls(name, reduce_range, factor, images):
    """Against the fp32 model, on images other than the calibration ones, the mean logit error of
    the model with INT8 weights falls by a clear margin once corrected."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    folded = copy.deepcopy(model)
    fold_batchnorms(folded, ModelGraph(folded, SIZE))
    corrected, record = bias_correct(model, BiasCorrectConfig(reduce_range=reduce_range), images)
    test = torch.cat(calibration_batches("digits", SIZE, batches=4, batch_size=32, seed=1))
    with torch.no_grad():
        reference = model(test)
        before = (simulated(folded, reduce_range)(test) - reference).mean(0).abs().mean()
        after = (simulated(corrected, reduce_range)(test) - reference).mean(0).abs().mean()
    assert after < factor * before, (float(before), float(after))
    assert record.bits == (7 if reduce_range else 8) and not record.skipped
    assert all(layer.folded for layer in record.layers)  # every conv of both has a BatchNorm after it


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
def test_weights_on_the_grid_get_no_correction(reduce_range, images):
    qmax = 64 if reduce_range else 127
    model, _ = bias_correct(make_tiny(), BiasCorrectConfig(), images[:1])  # its BatchNorm folded: nothing left to fold
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Conv2d:
                steps = torch.randint(-qmax, qmax + 1, module.weight.shape, generator=generator).float()
                steps.view(len(steps), -1)[:, 0] = qmax  # each channel's largest |w| is qmax steps: the scale is the step
                module.weight.copy_(steps * 2.0 ** -6)
    corrected, record = bias_correct(model, BiasCorrectConfig(reduce_range=reduce_range), images)
    assert [layer.largest_shift for layer in record.layers] == [0.0] * 3
    for a, b in zip(model.state_dict().values(), corrected.state_dict().values()):
        assert torch.equal(a, b)


def test_apply_runs_the_registered_transform():
    model = make_tiny()
    corrected, record = dscompress.apply(model, BiasCorrectConfig(data="digits", batches=1, exclude=["conv2"]), SIZE)
    assert [layer.name for layer in record.layers] == ["stem", "conv1"]
    assert record.skipped == [{"name": "conv2", "reason": "excluded by pattern"}]
    assert record.layers[1].folded == "bn1" and torch.equal(corrected.conv2.weight, model.conv2.weight)


def test_without_images_is_one_line():
    with pytest.raises(dscompress.DscompressError, match="--data"):
        dscompress.apply(make_tiny(), BiasCorrectConfig(), SIZE)
