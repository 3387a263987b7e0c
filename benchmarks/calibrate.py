"""Training-free calibration of a rank-1 resnet18, and the order of its two corrections.

Trains a resnet18 baseline on digits (3x32x32, 10 classes), converts every 3x3 conv past the
stem at rank 1, then calibrates on 16 x 32 train images and reports test top-1 for:

    baseline, converted, BN only, refit only, BN -> refit, refit -> BN (the default), BN -> refit -> BN

plus the MACs of the converted layers and the wall time of each calibration. Run:

    python benchmarks/calibrate.py [--epochs 8] [--threads 2] [--baseline r18-digits.pt] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torchvision
from torch import nn

from dscompress.compress.calibrate import CalibrateConfig, calibrate, calibration_batches
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.data.datasets import load_dataset, make_loader
from dscompress.train.evaluate import accuracy

INPUT_SIZE = (3, 32, 32)


def train_baseline(epochs: int, seed: int) -> nn.Module:
    """resnet18 from scratch with AdamW and a one-cycle schedule; about 99% on digits."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    loader = make_loader(load_dataset("digits", INPUT_SIZE, "train"), 32, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ridge", type=float, default=CalibrateConfig.ridge)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", default=None, help="Load the baseline's state dict from this file, or train and save it there.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    test = make_loader(load_dataset("digits", INPUT_SIZE, "test"), 256)
    start = time.perf_counter()
    if args.baseline and os.path.isfile(args.baseline):
        baseline = torchvision.models.resnet18(num_classes=10)
        baseline.load_state_dict(torch.load(args.baseline, weights_only=True))
        baseline.eval()
    else:
        baseline = train_baseline(args.epochs, args.seed)
        if args.baseline:
            torch.save(baseline.state_dict(), args.baseline)
    train_seconds = time.perf_counter() - start
    converted, conversion = convert(baseline, INPUT_SIZE, ConvertConfig(rank=args.rank))
    images = calibration_batches("digits", INPUT_SIZE, args.batches, args.batch_size, args.seed)

    log(f"baseline trained in {train_seconds:.0f}s; calibrating")
    config = CalibrateConfig(batches=args.batches, batch_size=args.batch_size, ridge=args.ridge, seed=args.seed)
    rows = [("baseline", baseline, 0.0, 0.0)]
    for label, order in [
        ("BN only", ("bn",)),
        ("refit only", ("refit",)),
        ("BN -> refit", ("bn", "refit")),
        ("refit -> BN (default)", ("refit", "bn")),
        ("BN -> refit -> BN", ("bn", "refit", "bn")),
    ]:
        model, record = calibrate(converted, baseline, images, config, order=order)
        if len(rows) == 1:
            rows.append(("converted (SVD only)", converted, record.output_error_before, 0.0))
        rows.append((label, model, record.output_error_after, record.seconds))
        log(f"{label}: {record.seconds:.0f}s")

    results = []
    for label, model, output_error, seconds in rows:
        top1 = accuracy(model, test)["top1"]
        results.append({"model": label, "top1": round(top1, 2), "output_error": round(output_error, 4), "seconds": round(seconds, 1)})

    summary = {
        "input_size": list(INPUT_SIZE),
        "rank": args.rank,
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "calibration_images": record.images,
        "converted_layers": len(conversion.layers),
        "converted_macs_before": conversion.converted_macs_before,
        "converted_macs_after": conversion.converted_macs_after,
        "macs_before": conversion.macs_before,
        "macs_after": conversion.macs_after,
        "mean_fit_error": round(sum(layer.fit_error for layer in conversion.layers) / len(conversion.layers), 4),
        "results": results,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"resnet18 on digits {'x'.join(map(str, INPUT_SIZE))}, trained {args.epochs} epochs ({train_seconds:.0f}s); "
          f"rank {args.rank}, {summary['converted_layers']} layers converted (mean fit error {summary['mean_fit_error']})")
    print(f"converted layers' MACs: {conversion.converted_macs_before:,} -> {conversion.converted_macs_after:,} "
          f"({conversion.converted_macs_before / conversion.converted_macs_after:.1f}x fewer); "
          f"whole model: {conversion.macs_before:,} -> {conversion.macs_after:,}")
    print(f"calibration: {record.images} train images; test top-1 on {len(test.dataset)} test images\n")
    print("| model | top-1 % | output error vs baseline | calibration s |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['top1']:.2f} | {r['output_error']:.4f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
