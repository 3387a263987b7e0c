import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from dscompress.nn import decompose
from dscompress.nn.layers import DepthwiseSeparableConv2d, named_layers
from dscompress.nn.metrics import conv_macs, count_macs

conv_configs = st.fixed_dictionaries(
    {
        "in_channels": st.integers(1, 6),
        "out_channels": st.integers(1, 12),
        "kernel_size": st.tuples(st.integers(1, 5), st.integers(1, 5)),
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "dilation": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "padding": st.one_of(st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 3)), st.sampled_from(["same", "valid"])),
        "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
        "bias": st.booleans(),
    }
)


def build_conv(cfg) -> nn.Conv2d | None:
    if cfg["padding"] == "same" and cfg["stride"] != (1, 1):
        return None  # nn.Conv2d itself refuses this combination
    return nn.Conv2d(**cfg, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(cfg=conv_configs, rank=st.integers(1, 4), size=st.tuples(st.integers(14, 20), st.integers(14, 20)))
def test_output_shape_matches_conv(cfg, rank, size):
    conv = build_conv(cfg)
    assume(conv is not None)
    layer = DepthwiseSeparableConv2d.from_conv(conv, rank).double()
    x = torch.randn(2, cfg["in_channels"], *size, dtype=torch.float64)
    assert layer(x).shape == conv(x).shape


@settings(max_examples=60, deadline=None)
@given(cfg=conv_configs, size=st.tuples(st.integers(14, 20), st.integers(14, 20)))
def test_full_rank_is_exact(cfg, size):
    conv = build_conv(cfg)
    assume(conv is not None)
    layer = DepthwiseSeparableConv2d.from_conv(conv, decompose.full_rank(conv.weight)).double()
    x = torch.randn(2, cfg["in_channels"], *size, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(cfg=conv_configs)
def test_fit_error_decreases_with_rank(cfg):
    conv = build_conv(cfg)
    assume(conv is not None)
    singular_values = decompose.channel_singular_values(conv.weight)
    errors = [decompose.relative_error(singular_values, r) for r in range(1, decompose.full_rank(conv.weight) + 1)]
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-9
    measured = []
    for r in range(1, decompose.full_rank(conv.weight) + 1):
        dense = decompose.reconstruct(*decompose.factorize(conv.weight, r), r)
        measured.append(float((dense - conv.weight.detach()).norm() / conv.weight.detach().norm()))
    torch.testing.assert_close(torch.tensor(measured), torch.tensor(errors), atol=1e-9, rtol=1e-6)


def test_depthwise_half_is_grouped_and_dilated():
    """The widely copied version forgets groups and ignores dilation; ours does neither."""
    layer = DepthwiseSeparableConv2d(8, 16, 3, stride=2, padding=2, dilation=2, rank=2)
    assert layer.depthwise.groups == 8
    assert layer.depthwise.out_channels == 16
    assert layer.depthwise.weight.shape == (16, 1, 3, 3)  # without groups it would be (16, 8, 3, 3)
    assert layer.depthwise.dilation == (2, 2)
    assert layer.pointwise.kernel_size == (1, 1)
    assert sum(p.numel() for p in layer.parameters()) == 16 * 9 + 16 * 16 + 16


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_dilated_conv_reproduced(dilation):
    conv = nn.Conv2d(4, 6, 3, padding=dilation, dilation=dilation, dtype=torch.float64)
    layer = DepthwiseSeparableConv2d.from_conv(conv, 6).double()
    x = torch.randn(1, 4, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))
    if dilation > 1:  # ignoring dilation would give a different function
        undilated = nn.Conv2d(4, 6, 3, padding=dilation, dtype=torch.float64)
        undilated.load_state_dict(conv.state_dict())
        wrong = undilated(x)
        assert wrong.shape != conv(x).shape or not torch.allclose(wrong, conv(x))


def test_looks_like_a_conv():
    layer = DepthwiseSeparableConv2d(8, 16, (3, 5), stride=(1, 2), padding=(1, 2), dilation=1, bias=False, rank=3)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.rank) == (
        8, 16, (3, 5), (1, 2), (1, 2), (1, 1), 3,
    )
    assert layer.bias is None
    text = repr(layer)
    assert "8, 16, kernel_size=(3, 5)" in text and "rank=3" in text and "bias=False" in text
    assert DepthwiseSeparableConv2d(**{k: tuple(v) if isinstance(v, list) else v for k, v in layer.constructor_args().items()}).constructor_args() == layer.constructor_args()


def test_rank_must_be_positive():
    with pytest.raises(ValueError):
        DepthwiseSeparableConv2d(4, 4, 3, rank=0)


@pytest.mark.parametrize("rank,size", [(2, 7), (2, 28), (4, 7), (4, 56)])
def test_every_form_computes_the_same_function(rank, size):
    """Multiplier r, r split pairs (forward at large sizes, export always), BatchNorm folded: one function."""
    from dscompress.nn.layers import SplitDepthwiseSeparable, deploy_form, split_pays

    torch.manual_seed(0)
    layer = DepthwiseSeparableConv2d(8, 12, 3, padding=2, dilation=2, rank=rank).double().eval()
    nn.init.normal_(layer.pointwise.bias)
    x = torch.randn(2, 8, size, size, dtype=torch.float64)
    with torch.no_grad():
        reference = layer.pointwise(layer.depthwise(x))
        torch.testing.assert_close(layer(x), reference)
        torch.testing.assert_close(SplitDepthwiseSeparable(layer)(x), reference)
        model = nn.Sequential(layer, nn.BatchNorm2d(12).double().eval(), nn.ReLU()).eval()
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        deployed = deploy_form(model)
        assert isinstance(deployed[0], SplitDepthwiseSeparable) and isinstance(deployed[1], nn.Identity)  # the BatchNorm is folded
        torch.testing.assert_close(deployed(x), model(x))
    assert split_pays(rank, size * size) == (size >= 14 if rank == 2 else size >= 56)


@pytest.mark.parametrize("rank,kernel,stride,groups", [
    (None, (3, 3), 1, 1), (None, (5, 3), 2, 1), (None, (3, 3), 1, 2), (1, (3, 3), 1, 1), (3, (3, 3), 1, 1), (2, (5, 3), 2, 1),
])
def test_closed_form_macs_match_the_flop_counter(rank, kernel, stride, groups):
    """conv_macs (what a plan charges an option it has not built) equals what PyTorch's counter
    finds in the layer once built."""
    conv = nn.Conv2d(8, 12, kernel, stride=stride, padding=1, groups=groups, bias=False)
    layer = conv if rank is None else DepthwiseSeparableConv2d.from_conv(conv, rank)
    out_pixels = conv(torch.zeros(1, 8, 16, 16)).shape[-2:].numel()
    assert conv_macs(8, 12, kernel, out_pixels, rank, groups) == count_macs(layer, (8, 16, 16))


def test_named_layers_treats_a_depthwise_separable_layer_as_one():
    model = nn.Sequential(DepthwiseSeparableConv2d.from_conv(nn.Conv2d(4, 8, 3), 2), nn.Sequential(nn.Conv2d(8, 8, 3)))
    assert [name for name, _ in named_layers(model)] == ["", "0", "1", "1.0"]
