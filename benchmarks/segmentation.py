"""Atrous separable convolution, post hoc: DeepLabV3 on digits-seg, converted, calibrated, distilled.

DeepLabv3+ (Chen et al. 2018) trained its atrous separable convolutions from scratch; here they are
fitted from a trained DeepLabV3's dense atrous convolutions, then calibrated and distilled per
pixel. Every stage is an artifact in ``--out``:

    baseline            MODEL trained from scratch on digits-seg (labels only)
    head-converted      the head's dense KxK convs (ASPP rates 12/24/36 and the 3x3 after it; FCN's
                        3x3) -> rank-R atrous separable, `--include 'classifier.*'`
    head-calibrated     + the closed-form refit of the pointwise weights (`calibrate --no-bn`)
    head-distilled      + per-pixel distillation from the baseline
    all-...             the same with every dense KxK conv converted (the dilated backbone too)

A variant that converts the same layers as one before it (deeplabv3_mobilenet_v3_large: its
backbone's KxK convs are already depthwise, so `all` is `head`) is skipped. Every artifact is
evaluated on the 250 test canvases, then all are timed side by side (interleaved) on ONNX Runtime
CPU, and a Markdown table is printed: mIoU, pixel accuracy, params, MACs per image and the p50
latency at each batch size, each with its ratio to the baseline, and the MACs of the converted
layers alone (the number that DeepLabv3+'s "33% to 41% fewer multiply-adds" is about is the whole
model's; both are shown).

    python benchmarks/segmentation.py [--model deeplabv3_mobilenet_v3_large] [--size 64] [--epochs 30]
        [--kd-epochs 10] [--rank 1] [--variants head,all] [--batch-sizes 1,16] [--threads N]
        [--out runs/seg-bench] [--force] [--json]

    # seconds, to check the script itself (the tiny model of the tests):
    PYTHONPATH=tests python benchmarks/segmentation.py --model conftest:tiny_seg --task segmentation \\
        --head 'atrous.*' --size 32 --epochs 1 --kd-epochs 1 --calib-batches 2 --iters 3 --warmup 1 --out /tmp/seg-smoke --force

Stages whose artifact already exists in ``--out`` are not run again (``--force`` reruns all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

from dscompress.artifact.format import Artifact
from dscompress.artifact.source import resolve
from dscompress.compress.calibrate import CalibrateConfig
from dscompress.compress.convert import ConvertConfig
from dscompress.core.util import human
from dscompress.deploy.bench import BenchConfig
from dscompress.pipeline.steps import StepContext, run_step
from dscompress.train.evaluate import EvaluateConfig
from dscompress.train.finetune import FinetuneConfig

DATA = "digits-seg"
CLASSES = 11
VARIANTS = ("head", "all")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def stage(out: str, name: str, force: bool, make) -> tuple[str, float]:
    """Run ``make(path)`` unless the artifact ``out/name`` exists; its path and the seconds taken."""
    path = os.path.join(out, name)
    if os.path.isdir(path) and not force:
        log(f"{name}: kept from an earlier run")
        return path, 0.0
    log(f"{name} ...")
    begin = time.perf_counter()
    make(path)
    return path, time.perf_counter() - begin


def converted_layers(path: str) -> tuple[list[str], int, int]:
    """Names of the layers the artifact's convert step converted, and their MACs before and after."""
    record = next(s["record"] for s in Artifact.open(path).steps if s["step"] == "convert")
    layers = record["layers"]
    return [layer["name"] for layer in layers], sum(layer["macs_before"] for layer in layers), sum(layer["macs_after"] for layer in layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplabv3_mobilenet_v3_large", help="A segmentation model (dscompress models --task segmentation).")
    parser.add_argument("--task", default=None, help="Pass segmentation for a package.module:factory model.")
    parser.add_argument("--size", type=int, default=64, help="Input 3 x SIZE x SIZE (digits-seg canvases are 32x32, resized).")
    parser.add_argument("--epochs", type=int, default=30, help="Baseline epochs (from scratch).")
    parser.add_argument("--lr", type=float, default=0.003, help="Baseline learning rate (AdamW, one-cycle).")
    parser.add_argument("--kd-epochs", type=int, default=10, help="Epochs of each distillation.")
    parser.add_argument("--kd-lr", type=float, default=0.001, help="Distillation learning rate (AdamW, cosine).")
    parser.add_argument("--batch-size", type=int, default=16, help="Training batch size.")
    parser.add_argument("--rank", type=int, default=1, help="Rank of the atrous separable layers.")
    parser.add_argument("--variants", default="head,all", help="Which layers to convert: head (--head), all, or both.")
    parser.add_argument("--head", default="classifier.*", help="The layers of the head variant (a glob or re: pattern).")
    parser.add_argument("--calib-batches", type=int, default=16, help="Calibration batches of 32 training images.")
    parser.add_argument("--batch-sizes", default="1,16", help="Batch sizes timed on ONNX Runtime CPU.")
    parser.add_argument("--warmup", type=int, default=10, help="Untimed runs per model and batch size.")
    parser.add_argument("--iters", type=int, default=50, help="Timed runs per model and batch size.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for training, evaluation and timing (default: torch's).")
    parser.add_argument("--out", default="runs/seg-bench", help="Folder for the artifacts.")
    parser.add_argument("--force", action="store_true", help="Run every stage again.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON instead of Markdown.")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.force and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    size = (3, args.size, args.size)
    train = {"data": DATA, "batch_size": args.batch_size, "optimizer": "adamw"}

    seconds = {}
    base, seconds["baseline"] = stage(args.out, "baseline", args.force, lambda out: run_step(
        resolve(args.model, num_classes=CLASSES, input_size=size, task=args.task),
        FinetuneConfig(teacher="none", epochs=args.epochs, lr=args.lr, schedule="onecycle", **train), StepContext(out=out)))
    rows = [("baseline", base, None)]
    seen: dict[tuple[str, ...], str] = {}
    for variant in variants:
        include = [args.head] if variant == "head" else []
        converted, seconds[f"{variant}-converted"] = stage(args.out, f"{variant}-converted", args.force, lambda out, include=include: run_step(
            resolve(base), ConvertConfig(rank=args.rank, include=include, allow_unchanged=True), StepContext(out=out)))
        names, _, _ = converted_layers(converted)
        if tuple(names) in seen:
            log(f"{variant}: converts the same {len(names)} layers as {seen[tuple(names)]}; skipped")
            continue
        seen[tuple(names)] = variant
        calibrated, seconds[f"{variant}-calibrated"] = stage(args.out, f"{variant}-calibrated", args.force, lambda out, src=converted: run_step(
            resolve(src), CalibrateConfig(data=DATA, batches=args.calib_batches, bn=False), StepContext(out=out)))
        distilled, seconds[f"{variant}-distilled"] = stage(args.out, f"{variant}-distilled", args.force, lambda out, src=calibrated: run_step(
            resolve(src), FinetuneConfig(epochs=args.kd_epochs, lr=args.kd_lr, **train), StepContext(out=out)))
        rows += [(f"{variant}-converted", converted, converted), (f"{variant}-calibrated", calibrated, converted),
                 (f"{variant}-distilled", distilled, converted)]

    for name, path, _ in rows:
        if "miou" not in Artifact.open(path).metrics:
            log(f"evaluate {name} ...")
            run_step(resolve(path), EvaluateConfig(data=DATA))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    log(f"timing {len(rows)} models side by side on ONNX Runtime CPU ...")
    run_step(None, BenchConfig(providers=["cpu"], batch_sizes=batch_sizes, warmup=args.warmup, iters=args.iters,
                               threads=args.threads, torch=False), StepContext(targets=[path for _, path, _ in rows]))

    table = []
    for name, path, conversion in rows:
        metrics = Artifact.open(path).metrics
        latency = {r["batch_size"]: r["p50_ms"] for r in (metrics.get("latency") or {}).get("results", [])
                   if r.get("status") == "ok" and r["runtime"] == "ort-cpu"}
        row = {"row": name, "miou": metrics.get("miou"), "pixel_acc": metrics.get("pixel_acc"), "params": metrics["params"],
               "macs": metrics["macs"], "p50_ms": latency, "seconds": round(seconds.get(name, 0.0), 1)}
        if conversion is not None:
            names, before, after = converted_layers(conversion)
            row.update(converted_layers=len(names), converted_macs_before=before, converted_macs_after=after)
        table.append(row)
    if args.json:
        print(json.dumps({"model": args.model, "input_size": list(size), "rank": args.rank, "threads": torch.get_num_threads(),
                          "rows": table}, indent=2))
        return
    print(markdown(table, batch_sizes))
    print(f"\n{args.model} at {args.size}x{args.size}, rank {args.rank}; ONNX Runtime CPU p50 in ms, "
          f"{torch.get_num_threads()} threads, all models timed in one interleaved run; ratios against the baseline.")


def markdown(rows: list[dict], batch_sizes: list[int]) -> str:
    base = rows[0]

    def with_ratio(value, reference, text):
        return f"{text} ({value / reference:.2f}x)" if reference and value != reference else text

    head = ["row", "mIoU %", "pixel acc %", "params", "MACs", "converted layers: MACs"] + [f"ort-cpu b{b} p50 ms" for b in batch_sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        miou = "-" if row["miou"] is None else f"{row['miou']:.2f}"
        if row["miou"] is not None and base["miou"] is not None and row is not base:
            miou += f" ({row['miou'] - base['miou']:+.2f})"
        converted = "-"
        if "converted_layers" in row:
            converted = f"{row['converted_layers']}: {human(row['converted_macs_before'])} -> {human(row['converted_macs_after'])}"
        cells = [
            row["row"], miou, "-" if row["pixel_acc"] is None else f"{row['pixel_acc']:.2f}",
            with_ratio(row["params"], base["params"], human(row["params"])),
            with_ratio(row["macs"], base["macs"], human(row["macs"])),
            converted,
        ]
        for b in batch_sizes:
            p50 = row["p50_ms"].get(b)
            cells.append("-" if p50 is None else with_ratio(p50, base["p50_ms"].get(b), f"{p50:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
