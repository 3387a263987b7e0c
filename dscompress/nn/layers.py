"""The drop-in layer that replaces a standard convolution."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.fx
from torch import nn

from dscompress.nn import decompose

# Convs with fewer input channels than this (the RGB stem) are left dense by default.
MIN_CHANNELS = 4


def split_pays(rank: int, pixels: int) -> bool:
    """Whether eager PyTorch runs a rank-``rank`` layer faster as r multiplier-1 pairs than as one
    multiplier-r depthwise conv, on inputs of ``pixels`` (H*W) per channel.

    Measured on a 2-core x86 CPU, one thread, batch 1 (``benchmarks/export_forms.py``): at rank 2
    the split form wins from 14x14 (0.68 vs 0.76 ms at 256 channels) up (0.96 vs 1.65 ms at 64
    channels, 56x56) and loses at 7x7 (0.99 vs 0.88 ms); at rank 4 it wins only at 56x56 and loses
    by up to 1.75x below, where its r separate pointwise calls cost more than they save.
    ONNX Runtime is another matter: there a multiplier above 1 leaves its blocked kernel, and the
    split form wins at every size (what export writes).
    """
    return pixels >= (196 if rank == 2 else 3136)


class DepthwiseSeparableConv2d(nn.Module):
    """A KxK depthwise convolution followed by a 1x1 pointwise convolution.

    Shapes: input (N, C_in, H, W) -> depthwise (N, C_in * rank, H', W') -> output
    (N, C_out, H', W'), with H', W' exactly those of the ``nn.Conv2d`` it replaces: stride,
    padding (ints, tuples, ``'same'``, ``'valid'``), dilation and padding mode all sit on the
    depthwise half, which has ``groups=in_channels``. ``rank`` is the depth multiplier: each
    input channel gets ``rank`` spatial filters, and the pointwise half mixes all of them. The
    bias, if any, sits on the pointwise half.

    With ``rank >= min(out_channels, kh * kw)`` the pair can represent any dense convolution
    exactly (see :mod:`dscompress.nn.decompose`); below that it is a low-rank approximation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        rank: int = 1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.rank = int(rank)
        self.depthwise = nn.Conv2d(
            in_channels,
            in_channels * self.rank,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            bias=False,
            padding_mode=padding_mode,
            **factory,
        )
        self.pointwise = nn.Conv2d(in_channels * self.rank, out_channels, 1, bias=bias, **factory)

    @classmethod
    @torch.no_grad()
    def from_conv(
        cls,
        conv: nn.Conv2d,
        rank: int = 1,
        weight: torch.Tensor | None = None,
        kernel_size: tuple[int, int] | None = None,
        dilation: tuple[int, int] | None = None,
        padding=None,
    ) -> DepthwiseSeparableConv2d:
        """The layer that replaces ``conv``, fitted from its kernel (:func:`~dscompress.nn.decompose.factorize`).

        Args:
            conv: a dense ``nn.Conv2d`` (``groups=1``); not modified.
            rank: spatial filters per input channel; ``>= min(out, kh*kw)`` is exact.
            weight: the (out, in, kh', kw') kernel to factorize, when it is not ``conv.weight``
                (a kernel refitted onto fewer, dilated taps); ``kernel_size``, ``dilation`` and
                ``padding`` then describe it. Each defaults to the conv's own.

        The result has the conv's device, dtype, stride, padding mode, bias and training mode.
        """
        weight = conv.weight.detach() if weight is None else weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            kernel_size or conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding if padding is None else padding,
            dilation=dilation or conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            rank=rank,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        depthwise, pointwise = decompose.factorize(weight, rank)
        layer.depthwise.weight.copy_(depthwise)
        layer.pointwise.weight.copy_(pointwise)
        if conv.bias is not None:
            layer.pointwise.bias.copy_(conv.bias)
        return layer.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``pointwise(depthwise(x))``; at rank r > 1 on large images, computed as r pairs of a
        depth-multiplier-1 depthwise conv (filters ``j*r + t``) and its pointwise columns, summed:
        the same function up to the order of float additions, and faster there in eager PyTorch
        (:func:`split_pays`). Export always writes the split form (:func:`deploy_form`), which
        ONNX Runtime runs fastest at every size.
        """
        if self.rank == 1 or not split_pays(self.rank, x.shape[-2] * x.shape[-1]):
            return self.pointwise(self.depthwise(x))
        rank, depthwise, pointwise = self.rank, self.depthwise, self.pointwise
        y = None
        for t in range(rank):
            z = depthwise._conv_forward(x, depthwise.weight[t::rank], None)
            z = nn.functional.conv2d(z, pointwise.weight[:, t::rank], pointwise.bias if t == 0 else None)
            y = z if y is None else y + z
        return y

    # The attributes of the nn.Conv2d this layer stands in for.
    @property
    def in_channels(self) -> int:
        return self.depthwise.in_channels

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.depthwise.kernel_size

    @property
    def stride(self) -> tuple[int, int]:
        return self.depthwise.stride

    @property
    def padding(self):
        return self.depthwise.padding

    @property
    def dilation(self) -> tuple[int, int]:
        return self.depthwise.dilation

    @property
    def padding_mode(self) -> str:
        return self.depthwise.padding_mode

    @property
    def bias(self) -> torch.Tensor | None:
        return self.pointwise.bias

    def constructor_args(self) -> dict:
        """The keyword arguments that rebuild this layer's structure (weights aside)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
            "rank": self.rank,
        }

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        s += f", rank={self.rank}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s



class SplitDepthwiseSeparable(nn.Module):
    """A rank-r :class:`DepthwiseSeparableConv2d` as r (depthwise, pointwise) conv pairs with
    their own weights: the graph :meth:`DepthwiseSeparableConv2d.forward` computes at rank > 1,
    as modules, so that an exported graph holds plain weights (which exporters and runtimes fold
    into their neighbours, e.g. BatchNorm into the pointwise conv) instead of slices of one.

    Pair t holds depthwise filters ``j*r + t`` (one per input channel j) and the matching
    pointwise columns; the bias sits on the first pair.
    """

    def __init__(self, layer: DepthwiseSeparableConv2d):
        super().__init__()
        rank, channels = layer.rank, layer.in_channels
        weight, columns = layer.depthwise.weight.detach(), layer.pointwise.weight.detach()
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.depthwise = nn.ModuleList()
        self.pointwise = nn.ModuleList()
        for t in range(rank):
            depthwise = nn.Conv2d(channels, channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                                  dilation=layer.dilation, groups=channels, bias=False, padding_mode=layer.padding_mode, **factory)
            pointwise = nn.Conv2d(channels, layer.out_channels, 1, bias=t == 0 and layer.bias is not None, **factory)
            with torch.no_grad():
                depthwise.weight.copy_(weight[t::rank])
                pointwise.weight.copy_(columns[:, t::rank])
                if pointwise.bias is not None:
                    pointwise.bias.copy_(layer.bias)
            self.depthwise.append(depthwise)
            self.pointwise.append(pointwise)
        self.train(layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pointwise[0](self.depthwise[0](x))
        for depthwise, pointwise in zip(self.depthwise[1:], self.pointwise[1:]):
            y = y + pointwise(depthwise(x))
        return y


def deploy_form(model: nn.Module) -> nn.Module:
    """``model`` with every depthwise-separable layer of rank > 1 as a :class:`SplitDepthwiseSeparable`
    (a copy; the model itself when it has none): what export writes.

    A BatchNorm that only ever follows such a layer is folded into its pointwise convs (and
    becomes an identity): runtimes fold a BatchNorm into the one conv before it, but not into a
    sum of convs, and on ONNX Runtime CPU the unfolded BatchNorms cost about 8% of a rank-2
    resnet18 at batch 1. Found with torch.fx; a model fx cannot trace keeps its BatchNorms.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, DepthwiseSeparableConv2d) and m.rank > 1]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:
        model.set_submodule(name, SplitDepthwiseSeparable(model.get_submodule(name)))
    for layer_name, norm_name in _followed_by_norm(model, set(names)):
        layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
        with torch.no_grad():
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
            first = layer.pointwise[0]
            bias = first.bias if first.bias is not None else torch.zeros_like(shift)
            for pointwise in layer.pointwise:
                pointwise.weight.mul_(scale[:, None, None, None])
            first.bias = nn.Parameter(bias * scale + shift)
        model.set_submodule(norm_name, nn.Identity())
    return model


def _followed_by_norm(model: nn.Module, layers: set[str]) -> list[tuple[str, str]]:
    """(layer, BatchNorm2d) pairs where the BatchNorm is called once, on that layer's output alone."""
    try:
        graph = LayerTracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model keeps its BatchNorms
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op == "call_module" and calls.get(user.target) == 1:
            norm = model.get_submodule(user.target)
            if type(norm) is nn.BatchNorm2d and norm.track_running_stats and norm.running_var is not None and norm.affine:
                pairs.append((node.target, user.target))
    return pairs


class LayerTracer(torch.fx.Tracer):
    """Traces depthwise-separable layers as single calls."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, (DepthwiseSeparableConv2d, SplitDepthwiseSeparable)) or super().is_leaf_module(module, name)



def skip_reason(module: nn.Module, min_channels: int = MIN_CHANNELS) -> str | None:
    """Why a conv cannot be made depthwise-separable whatever the selection says, or None."""
    if type(module) is not nn.Conv2d:
        return f"{type(module).__name__} is a subclass of Conv2d with its own forward"
    if module.groups == module.in_channels and module.groups > 1:
        return "already depthwise"
    if module.groups > 1:
        return f"grouped conv (groups={module.groups})"
    if module.kernel_size == (1, 1):
        return "1x1 kernel (already pointwise)"
    if module.in_channels < min_channels:
        return f"in_channels {module.in_channels} < min_channels {min_channels}"
    return None


def named_layers(model: nn.Module, whole: tuple[type, ...] = ()) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()``, but a depthwise-separable layer (and a module of a ``whole`` type)
    without the modules inside it: it is one layer, not its convs."""
    whole = (DepthwiseSeparableConv2d, *whole)
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, whole):
            inside.append(name)
        yield name, module
