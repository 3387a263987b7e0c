import pytest
import torch

from dscompress.nn import decompose


def test_factorize_shapes_and_channel_layout():
    weight = torch.randn(10, 4, 3, 3, dtype=torch.float64)
    depthwise, pointwise = decompose.factorize(weight, 2)
    assert depthwise.shape == (8, 1, 3, 3)
    assert pointwise.shape == (10, 8, 1, 1)
    # Depthwise channel j * rank + t belongs to input channel j: zeroing input channel 1's
    # filters removes exactly its slice of the reconstruction.
    depthwise[2:4] = 0
    dense = decompose.reconstruct(depthwise, pointwise, 2)
    assert torch.count_nonzero(dense[:, 1]) == 0
    assert torch.count_nonzero(dense[:, 0]) > 0


def test_rank_above_full_is_exact_and_zero_padded():
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)  # full rank min(3, 9) = 3
    depthwise, pointwise = decompose.factorize(weight, 5)
    torch.testing.assert_close(decompose.reconstruct(depthwise, pointwise, 5), weight)


@pytest.mark.parametrize("energy", [0.3, 0.6, 0.9, 0.99, 1.0])
def test_rank_for_energy_is_smallest_sufficient(energy):
    weight = torch.randn(16, 8, 3, 3)
    s = decompose.channel_singular_values(weight)
    rank = decompose.rank_for_energy(s, energy)
    assert 1 - decompose.relative_error(s, rank) ** 2 >= energy - 1e-9
    if rank > 1:
        assert 1 - decompose.relative_error(s, rank - 1) ** 2 < energy


def test_allocate_ranks_respects_budget_and_prefers_cheap_error():
    torch.manual_seed(0)
    # Layer 0: energy in one direction (rank 1 nearly exact). Layer 1: flat spectrum.
    low = torch.randn(32, 8, 1, 1) * torch.randn(1, 1, 3, 3)
    flat = torch.randn(32, 8, 3, 3)
    layers = [
        decompose.BudgetLayer(decompose.channel_singular_values(w), macs_per_rank=8 * (9 + 32) * 100, macs_before=32 * 8 * 9 * 100)
        for w in (low, flat)
    ]
    ranks = decompose.allocate_ranks(layers, 0.5)
    spent = sum(r * layer.macs_per_rank for r, layer in zip(ranks, layers))
    assert spent <= 0.5 * sum(layer.macs_before for layer in layers)
    assert ranks[0] == 1 and ranks[1] > 1
    with pytest.raises(ValueError, match="too small"):
        decompose.allocate_ranks(layers, 0.05)


@pytest.mark.parametrize(
    "kernel,dilation,expected",
    [((5, 5), (1, 1), ((3, 3), (2, 2))), ((7, 7), (1, 1), ((3, 3), (3, 3))), ((7, 3), (1, 1), ((3, 3), (3, 1))),
     ((3, 3), (1, 1), ((3, 3), (1, 1))), ((4, 4), (1, 1), ((4, 4), (1, 1))), ((5, 5), (2, 2), ((3, 3), (4, 4)))],
)
def test_receptive_field_dilation(kernel, dilation, expected):
    new_kernel, new_dilation = decompose.receptive_field_dilation(kernel, dilation)
    assert (new_kernel, new_dilation) == expected
    for k, d, nk, nd in zip(kernel, dilation, new_kernel, new_dilation):
        assert d * (k - 1) == nd * (nk - 1)  # same receptive field


def test_fit_dilated_taps_keeps_dilated_kernels_and_smooth_responses():
    # A kernel already living on the dilated grid is kept exactly.
    sparse = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    sparse[:, :, ::2, ::2] = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    fitted, effective = decompose.fit_dilated_taps(sparse, (3, 3))
    torch.testing.assert_close(fitted, sparse[:, :, ::2, ::2])
    torch.testing.assert_close(effective, sparse)
    # On constant inputs the response (the kernel's sum) is nearly kept, unlike plain subsampling.
    dense = torch.rand(4, 4, 5, 5, dtype=torch.float64)
    fitted, _ = decompose.fit_dilated_taps(dense, (3, 3))
    kept = (fitted.sum((2, 3)) - dense.sum((2, 3))).abs().mean()
    subsampled = (dense[:, :, ::2, ::2].sum((2, 3)) - dense.sum((2, 3))).abs().mean()
    assert kept < 0.25 * subsampled
