"""Parameters and MACs of ResNet-18 converted at rank 1, then pruned at several ratios.

    python benchmarks/prune.py [--ratios 0.3 0.5] [--importance magnitude] [--size 224]

Untrained weights (no download): the counts depend only on the shapes, and with magnitude
importance on per-layer pruning the shapes depend only on the ratio. Prints a Markdown table
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import torchvision

from dscompress.compress.convert import ConvertConfig, convert
from dscompress.compress.prune import PruneConfig, prune
from dscompress.nn.metrics import count_macs, count_params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--importance", default="magnitude")
    parser.add_argument("--size", type=int, default=224, help="Input is 3 x SIZE x SIZE.")
    args = parser.parse_args()
    input_size = (3, args.size, args.size)

    dense = torchvision.models.resnet18().eval()
    converted, _ = convert(dense, input_size, ConvertConfig(rank=1))
    rows = [
        ("resnet18", count_params(dense), count_macs(dense, input_size), None),
        ("resnet18, converted rank 1", count_params(converted), count_macs(converted, input_size), None),
    ]
    for ratio in args.ratios:
        start = time.perf_counter()
        _, record = prune(converted, input_size, PruneConfig(ratio=ratio, importance=args.importance))
        seconds = time.perf_counter() - start
        rows.append((f"converted rank 1, pruned {ratio:g} ({args.importance})", record.params_after, record.macs_after, seconds))

    (_, dense_params, dense_macs, _), (_, ds_params, ds_macs, _) = rows[:2]
    print(
        f"| model (input {'x'.join(map(str, input_size))}) | params | MACs | params / MACs vs resnet18 "
        "| params / MACs vs converted | prune time (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, params, macs, seconds in rows:
        print(
            f"| {name} | {params / 1e6:.2f}M | {macs / 1e9:.3f}G | {params / dense_params:.3f} / {macs / dense_macs:.3f} "
            f"| {params / ds_params:.3f} / {macs / ds_macs:.3f} | {'-' if seconds is None else f'{seconds:.1f}'} |"
        )


if __name__ == "__main__":
    main()
