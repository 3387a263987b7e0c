"""Fitting depthwise-separable weights to a dense convolution kernel.

A dense kernel ``W`` of shape (out, in, kh, kw) computes, for each input channel j, the
``out`` spatial filters ``W[:, j]``. Stack them as a matrix ``W_j`` (out x kh*kw) and take its SVD,
``W_j = U_j S_j V_j^T``. Keeping the top ``rank`` singular triplets gives ``rank`` spatial
filters per input channel (rows of ``V_j^T``: the depthwise weights) and their mixing
coefficients ``U_j S_j`` (the pointwise weights). Summed over j this reproduces the dense
convolution exactly when ``rank >= min(out, kh*kw)`` and, below that, is the best approximation
of that rank per channel (Eckart-Young), with relative error
``sqrt(sum of the dropped S^2 / sum of all S^2)``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

# Correlation between neighbouring pixels assumed when a large kernel is refitted onto fewer,
# dilated taps (``dilation="rf"``). Natural images and CNN feature maps are spatially smooth;
# with 0 the fit would simply keep every other tap.
RF_PIXEL_CORRELATION = 0.9


def full_rank(weight: torch.Tensor) -> int:
    """The rank at which the depthwise-separable form is exact: min(out, kh*kw)."""
    out_channels, _, kh, kw = weight.shape
    return min(out_channels, kh * kw)


def _channel_spectrum(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input channel j: the slice W_j (out x kh*kw), its singular values and right vectors.

    Computed from the small Gram matrices W_j^T W_j (kh*kw x kh*kw) with ``eigh``, which is far
    faster than a batched SVD of many thin matrices. The right vectors are orthonormal, so
    projecting onto all of them reproduces W_j exactly.

    Returns (slices (in, out, k), singular values (in, m), right vectors (in, k, m)), in float64,
    sorted by decreasing singular value, with m = min(out, k).
    """
    out_channels, in_channels, kh, kw = weight.shape
    slices = weight.detach().double().permute(1, 0, 2, 3).reshape(in_channels, out_channels, kh * kw)
    eigenvalues, vectors = torch.linalg.eigh(slices.transpose(1, 2) @ slices)  # ascending
    m = min(out_channels, kh * kw)
    eigenvalues = eigenvalues.flip(-1)[:, :m].clamp_min(0)
    vectors = vectors.flip(-1)[:, :, :m]
    return slices, eigenvalues.sqrt(), vectors


def channel_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of every input channel's (out x kh*kw) slice. Shape (in, min(out, kh*kw))."""
    return _channel_spectrum(weight)[1]


def factorize(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a dense kernel into depthwise and pointwise weights of the given rank.

    Args:
        weight: (out, in, kh, kw), a convolution with ``groups=1``.
        rank: spatial filters kept per input channel; values above :func:`full_rank` are exact.

    Returns:
        depthwise: (in * rank, 1, kh, kw); output channel ``j * rank + t`` filters input channel j.
        pointwise: (out, in * rank, 1, 1).
    """
    out_channels, in_channels, kh, kw = weight.shape
    slices, singular_values, vectors = _channel_spectrum(weight)
    kept = min(rank, singular_values.shape[1])
    v = vectors[:, :, :kept]  # (in, k, kept): the depthwise filters, orthonormal
    coefficients = slices @ v  # (in, out, kept) = U S: the pointwise weights
    # Share the scale evenly between the halves so that neither gets tiny or huge weights.
    root = singular_values[:, :kept].sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    depthwise = torch.zeros(in_channels, rank, kh * kw, dtype=torch.float64)
    pointwise = torch.zeros(in_channels, out_channels, rank, dtype=torch.float64)
    depthwise[:, :kept] = (v * safe[:, None, :]).transpose(1, 2)
    pointwise[:, :, :kept] = coefficients / safe[:, None, :]
    depthwise = depthwise.reshape(in_channels * rank, 1, kh, kw)
    pointwise = pointwise.permute(1, 0, 2).reshape(out_channels, in_channels * rank, 1, 1)
    return depthwise.to(weight.dtype), pointwise.to(weight.dtype)


def reconstruct(depthwise: torch.Tensor, pointwise: torch.Tensor, rank: int) -> torch.Tensor:
    """The dense kernel (out, in, kh, kw) that a depthwise + pointwise pair of this rank computes."""
    channels_times_rank, _, kh, kw = depthwise.shape
    in_channels = channels_times_rank // rank
    out_channels = pointwise.shape[0]
    p = pointwise.double().reshape(out_channels, in_channels, rank)
    d = depthwise.double().reshape(in_channels, rank, kh * kw)
    dense = torch.einsum("ojr,jrk->ojk", p, d)
    return dense.reshape(out_channels, in_channels, kh, kw).to(depthwise.dtype)


def relative_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the rank-``rank`` fit, from per-channel singular values."""
    energy = singular_values.pow(2)
    total = energy.sum()
    if total == 0:
        return 0.0
    return float((energy[:, rank:].sum() / total).sqrt())


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose kept share of the squared singular values is at least ``energy``."""
    per_rank = singular_values.pow(2).sum(dim=0)
    total = per_rank.sum()
    if total == 0:
        return 1
    kept = per_rank.cumsum(0) / total
    reached = (kept >= energy - 1e-12).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(per_rank)


@dataclass
class BudgetLayer:
    """What the MAC-budget allocation needs to know about one layer."""

    singular_values: torch.Tensor  # (in, m)
    macs_per_rank: int  # MACs of the depthwise-separable layer per unit of rank
    macs_before: int  # MACs of the dense layer


def allocate_ranks(layers: list[BudgetLayer], budget: float) -> list[int]:
    """Ranks for several layers that keep at most ``budget`` of their MACs with least fit error.

    Minimises the sum over layers of the squared relative fit error subject to
    ``sum(rank * macs_per_rank) <= budget * sum(macs_before)``. Each extra unit of rank removes
    a shrinking amount of error (singular values are sorted), so adding rank greedily where it
    removes the most error per MAC is optimal for this separable, concave problem.
    """
    limit = budget * sum(layer.macs_before for layer in layers)
    ranks = [1] * len(layers)
    spent = sum(layer.macs_per_rank for layer in layers)
    if spent > limit:
        raise ValueError(
            f"a MAC budget of {budget:.1%} is too small: rank 1 everywhere already keeps "
            f"{spent / sum(layer.macs_before for layer in layers):.1%} of the converted layers' MACs"
        )
    gains = []  # (-error removed per MAC, layer index)
    shares = []
    for i, layer in enumerate(layers):
        energy = layer.singular_values.pow(2)
        total = float(energy.sum()) or 1.0
        shares.append((energy.sum(dim=0) / total).tolist())
        if len(shares[i]) > 1:
            heapq.heappush(gains, (-shares[i][1] / layer.macs_per_rank, i))
    while gains:
        _, i = heapq.heappop(gains)
        cost = layers[i].macs_per_rank
        if spent + cost > limit:
            continue
        spent += cost
        ranks[i] += 1
        if ranks[i] < len(shares[i]):
            heapq.heappush(gains, (-shares[i][ranks[i]] / cost, i))
    return ranks


def receptive_field_dilation(kernel_size: tuple[int, int], dilation: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Kernel and dilation with 3 taps per odd side > 3 that cover the same receptive field.

    5 -> 3 taps with dilation 2, 7 -> 3 with dilation 3, 9 -> 3 with dilation 4 (times any
    dilation already there). Even sides and sides <= 3 are kept.
    """
    new_kernel, new_dilation = [], []
    for k, d in zip(kernel_size, dilation):
        if k > 3 and k % 2 == 1:
            new_kernel.append(3)
            new_dilation.append(d * (k - 1) // 2)
        else:
            new_kernel.append(k)
            new_dilation.append(d)
    return tuple(new_kernel), tuple(new_dilation)


def _tap_fit_matrix(size: int, taps: int, correlation: float) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D least-squares map from ``size`` dense taps onto ``taps`` evenly dilated ones.

    Returns (A, S): A (taps x size) maps dense weights to dilated weights, S (size x taps)
    places dilated weights back on the dense grid.
    """
    step = (size - 1) // (taps - 1) if taps > 1 else 1
    positions = torch.arange(size, dtype=torch.float64)
    cov = correlation ** (positions[:, None] - positions[None, :]).abs()
    select = torch.zeros(size, taps, dtype=torch.float64)
    for t in range(taps):
        select[t * step, t] = 1.0
    a = torch.linalg.solve(select.T @ cov @ select, select.T @ cov)
    return a, select


def fit_dilated_taps(weight: torch.Tensor, kernel_size: tuple[int, int], correlation: float = RF_PIXEL_CORRELATION) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit a dense kernel onto fewer, dilated taps covering the same receptive field.

    Solves, per side, the least-squares problem of matching the dense filter's response on
    inputs whose neighbouring pixels correlate with ``correlation``; with 0 it keeps every
    other tap, with values near 1 it folds the skipped taps' weight into their neighbours.

    Args:
        weight: (out, in, kh, kw) dense kernel.
        kernel_size: the target (kh', kw') from :func:`receptive_field_dilation`.

    Returns:
        fitted: (out, in, kh', kw') weights for the dilated kernel.
        effective: (out, in, kh, kw) the dense kernel the fitted one places on the original grid.
    """
    kh, kw = weight.shape[-2:]
    ah, sh = _tap_fit_matrix(kh, kernel_size[0], correlation)
    aw, sw = _tap_fit_matrix(kw, kernel_size[1], correlation)
    w = weight.detach().double()
    fitted = torch.einsum("ph,oihw,qw->oipq", ah, w, aw)
    effective = torch.einsum("hp,oipq,wq->oihw", sh, fitted, sw)
    return fitted.to(weight.dtype), effective.to(weight.dtype)
