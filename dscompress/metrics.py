"""Parameters and MACs: the cost side of every comparison (size on disk is in the manifest).

MACs come from PyTorch's own counter (:class:`torch.utils.flop_counter.FlopCounterMode`), which
counts convolutions and matrix products (as 2 FLOPs per multiply-accumulate); normalisation,
activations and pooling are not counted, as in most published MAC figures.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int], per_module: bool = False):
    """Multiply-accumulates of one forward pass on a single image of ``input_size`` (C, H, W).

    Returns the total, or with ``per_module=True`` a pair (total, {module name: MACs}) with
    names as in ``model.named_modules()`` (only modules that do counted work appear).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    total = counter.get_total_flops() // 2
    if not per_module:
        return total
    root = type(model).__name__
    by_module = {}
    for name, counts in counter.get_flop_counts().items():
        if name == root or not name.startswith(root + "."):
            continue
        by_module[name[len(root) + 1 :]] = sum(counts.values()) // 2
    return total, by_module
