"""Conversion cost and savings for several torchvision models, side by side.

For each model: wall time of `convert` (tracing, fitting, swapping, counting), and parameters
and MACs before and after at rank 1, 2 and 4 and at an energy threshold. Weights are
torchvision's random initialisation (no downloads here); ranks from `--energy` depend on the
weights, so trained models give other energy ranks, while fixed ranks give the same counts.

    python benchmarks/convert.py [--models resnet18 resnet50 ...] [--size 224] [--energy 0.9]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from dscompress.compress.convert import ConvertConfig, convert
from dscompress.core.util import human
from dscompress.models.build import ModelSpec, build_model

DEFAULT_MODELS = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "regnet_x_400mf", "densenet121", "googlenet", "convnext_tiny"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--energy", type=float, default=0.9)
    args = parser.parse_args()
    torch.manual_seed(0)
    configs = [("rank 1", ConvertConfig(rank=1)), ("rank 2", ConvertConfig(rank=2)), ("rank 4", ConvertConfig(rank=4)),
               (f"energy {args.energy}", ConvertConfig(energy=args.energy))]
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, input 3x{args.size}x{args.size}")
    print("| model | config | converted layers | params before -> after | MACs before -> after | converted layers' MACs kept | time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        model = build_model(ModelSpec(name, input_size=(3, args.size, args.size)))
        for label, config in configs:
            start = time.perf_counter()
            _, record = convert(model, (3, args.size, args.size), config)
            seconds = time.perf_counter() - start
            kept = record.converted_macs_after / record.converted_macs_before if record.layers else 1.0
            print(
                f"| {name} | {label} | {len(record.layers)} | {human(record.params_before)} -> {human(record.params_after)} "
                f"({record.params_before / record.params_after:.2f}x) | {human(record.macs_before)} -> {human(record.macs_after)} "
                f"({record.macs_before / record.macs_after:.2f}x) | {kept:.1%} | {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
