"""The drop-in layer that replaces a standard convolution."""

from __future__ import annotations

import torch
from torch import nn

from dscompress import decompose


class DepthwiseSeparableConv2d(nn.Module):
    """A KxK depthwise convolution followed by a 1x1 pointwise convolution.

    Shapes: input (N, C_in, H, W) -> depthwise (N, C_in * rank, H', W') -> output
    (N, C_out, H', W'), with H', W' exactly those of the ``nn.Conv2d`` it replaces: stride,
    padding (ints, tuples, ``'same'``, ``'valid'``), dilation and padding mode all sit on the
    depthwise half, which has ``groups=in_channels``. ``rank`` is the depth multiplier: each
    input channel gets ``rank`` spatial filters, and the pointwise half mixes all of them. The
    bias, if any, sits on the pointwise half.

    With ``rank >= min(out_channels, kh * kw)`` the pair can represent any dense convolution
    exactly (see :mod:`dscompress.decompose`); below that it is a low-rank approximation.
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
        """The layer that replaces ``conv``, fitted from its kernel (:func:`~dscompress.decompose.factorize`).

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
        return self.pointwise(self.depthwise(x))

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
