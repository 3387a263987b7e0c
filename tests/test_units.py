import copy

import torch
from conftest import make_tiny
from torch import nn

from dscompress.compress.units import Option, Unit, apply_option


def _sliced_conv(conv: nn.Conv2d, out_keep=None, in_keep=None) -> nn.Conv2d:
    """The channel slicer units.py had before Torch-Pruning's functions: the reference."""
    weight = conv.weight.detach()
    if out_keep is not None:
        weight = weight[out_keep]
    if in_keep is not None:
        weight = weight[:, in_keep]
    new = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach()[out_keep] if out_keep is not None else conv.bias.detach())
    return new.train(conv.training)


def _sliced_norm(norm, keep):
    new = type(norm)(len(keep), eps=norm.eps, momentum=norm.momentum, affine=norm.affine, track_running_stats=norm.track_running_stats)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, attr).copy_(getattr(norm, attr).detach()[keep])
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new.train(norm.training)


def test_pruning_a_pair_matches_slicing_its_channels_bitwise():
    model = make_tiny()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.num_batches_tracked.fill_(7)
        model.conv2.bias.uniform_(-1, 1)
    unit, kept = Unit(["conv1", "conv2"], ["bn1"]), [0, 3, 4, 9, 10, 15]
    originals = copy.deepcopy(model)
    expected = copy.deepcopy(model)
    expected.conv1 = _sliced_conv(model.conv1, out_keep=kept)
    expected.conv2 = _sliced_conv(model.conv2, in_keep=kept)
    expected.bn1 = _sliced_norm(model.bn1, kept)
    replaced = {name: model.get_submodule(name) for name in ("conv1", "conv2", "bn1")}

    apply_option(model, unit, Option((None, None), 0.5), kept)

    assert model.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert (model.conv1.out_channels, model.conv2.in_channels, model.bn1.num_features) == (6, 6, 6)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), expected(x))
    # the modules replaced are left whole (planning swaps them back after measuring an option)
    for name, module in replaced.items():
        for key, tensor in originals.get_submodule(name).state_dict().items():
            assert torch.equal(module.state_dict()[key], tensor)
