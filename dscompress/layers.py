"""The drop-in layer that replaces a standard convolution."""

from __future__ import annotations

import torch
from torch import nn


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
