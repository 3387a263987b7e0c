"""Which graph form of a depthwise-separable layer runs fastest, and what channel counts and dilation cost.

A rank-r layer can be one depthwise conv with depth multiplier r followed by one pointwise conv
(``multiplier``, the form it trains in), or r multiplier-1 depthwise convs each with its own
pointwise conv, summed (``split``, what dscompress runs and exports). Timed side by side
(interleaved, ``dscompress.deploy.bench``) on ONNX Runtime CPU and eager PyTorch:

1. single layers at the shapes of resnet18's stages (batch 1);
2. rank-1 layers at channel counts around pruned ones (multiples of 4, 8 and neither);
3. rank-1 layers at dilation 1, 2 and 3;
4. resnet18 at 3x224x224: original, rank 1, rank 2 in each form.

    python benchmarks/export_forms.py [--threads 1] [--iters 40]
"""

import argparse
import copy

import torch
from torch import nn

from dscompress.compress.convert import ConvertConfig, convert
from dscompress.core.util import other_load
from dscompress.deploy.bench import BenchConfig, BenchTarget, bench, machine
from dscompress.models.build import ModelSpec, build_model
from dscompress.nn.layers import DepthwiseSeparableConv2d


def multiplier_form(model: nn.Module) -> nn.Module:
    """The model with every depthwise-separable layer as (depthwise with multiplier r, pointwise)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, DepthwiseSeparableConv2d):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, nn.Sequential(module.depthwise, module.pointwise))
    return model


def time_rows(targets: list[BenchTarget], config: BenchConfig) -> dict[tuple[str, str], float]:
    records = bench(targets, config)
    return {(r.target, r.runtime): r.p50_ms for r in records if r.status == "ok"}


def layer(channels: int, rank: int | None, dilation: int = 1) -> nn.Module:
    torch.manual_seed(0)
    if rank is None:
        return nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation).eval()
    return DepthwiseSeparableConv2d(channels, channels, 3, padding=dilation, dilation=dilation, rank=rank).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=40)
    args = parser.parse_args()
    config = BenchConfig(providers="cpu", batch_sizes=[1], warmup=5, iters=args.iters, threads=args.threads, exporter="torchscript")
    print(f"machine: {machine()}; {args.threads} thread(s); other load {other_load(1.0):.2f} CPUs; p50 ms, batch 1\n")

    print("## 1. One layer, C -> C, 3x3\n")
    print("| C @ HxW | runtime | dense | rank 1 | rank 2 multiplier | rank 2 split | rank 4 multiplier | rank 4 split |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for channels, size in ((64, 56), (128, 28), (256, 14), (512, 7)):
        variants = {"dense": layer(channels, None), "rank 1": layer(channels, 1)}
        for rank in (2, 4):
            variants[f"rank {rank} multiplier"] = multiplier_form(nn.Sequential(layer(channels, rank)))
            variants[f"rank {rank} split"] = layer(channels, rank)
        times = time_rows([BenchTarget(name, (channels, size, size), model) for name, model in variants.items()], config)
        for runtime in ("ort-cpu", "torch-cpu"):
            cells = " | ".join(f"{times[name, runtime]:.3f}" for name in variants)
            print(f"| {channels} @ {size}x{size} | {runtime} | {cells} |")

    print("\n## 2. Rank 1 at pruned channel counts, 28x28\n")
    print("| C | ORT CPU ms | ms per 100 channels | torch ms |")
    print("|---:|---:|---:|---:|")
    counts = (96, 99, 100, 102, 104, 120, 125, 128)
    times = time_rows([BenchTarget(str(c), (c, 28, 28), layer(c, 1)) for c in counts], config)
    for c in counts:
        print(f"| {c} | {times[str(c), 'ort-cpu']:.3f} | {100 * times[str(c), 'ort-cpu'] / c:.3f} | {times[str(c), 'torch-cpu']:.3f} |")

    print("\n## 3. Rank 1 at dilation 1, 2, 3 (C=128 at 28x28)\n")
    print("| dilation | ORT CPU ms | torch ms |")
    print("|---:|---:|---:|")
    times = time_rows([BenchTarget(str(d), (128, 28, 28), layer(128, 1, d)) for d in (1, 2, 3)], config)
    for d in (1, 2, 3):
        print(f"| {d} | {times[str(d), 'ort-cpu']:.3f} | {times[str(d), 'torch-cpu']:.3f} |")

    print("\n## 4. resnet18 at 3x224x224\n")
    size = (3, 224, 224)
    base = build_model(ModelSpec("resnet18", input_size=size))
    rank1, _ = convert(base, size, ConvertConfig(rank=1))
    rank2, _ = convert(base, size, ConvertConfig(rank=2))
    variants = {"original": base, "rank 1": rank1, "rank 2 multiplier": multiplier_form(rank2), "rank 2 split": rank2}
    times = time_rows([BenchTarget(name, size, model) for name, model in variants.items()], config)
    print("| model | ORT CPU ms | speed-up | torch ms | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        ort, eager = times[name, "ort-cpu"], times[name, "torch-cpu"]
        print(f"| {name} | {ort:.2f} | {times['original', 'ort-cpu'] / ort:.2f}x | {eager:.2f} | {times['original', 'torch-cpu'] / eager:.2f}x |")
    print(f"\nother load at the end {other_load(1.0):.2f} CPUs")


if __name__ == "__main__":
    main()
