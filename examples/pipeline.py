"""The quickstart pipeline through the Python API, step by step.

Train a resnet18 baseline on the built-in digits; convert it to rank-1 depthwise-separable
convolutions everywhere and calibrate; from the same baseline, plan per layer for a measured 3x
speed-up on ONNX Runtime CPU at 224x224 (or a share of the MACs with ``--macs-budget``, which
times nothing); distil the plan from the baseline, export it to ONNX (validated on ONNX Runtime),
time the models side by side and print the comparison report.

Every step is a config run by ``dscompress.run_step`` on a source (a model name or an artifact
folder, through ``dscompress.resolve``); steps that make a model save an artifact folder.

    python examples/pipeline.py [--out runs/example] [--epochs 6] [--size 32] [--macs-budget 0.3]
"""

import argparse
import os

import dscompress
from dscompress.cli.report import compare, comparison_markdown, plot
from dscompress.compress.calibrate import CalibrateConfig
from dscompress.deploy.bench import BenchConfig
from dscompress.deploy.export import ExportConfig
from dscompress.pipeline.steps import StepContext
from dscompress.planning.plan import PlanConfig
from dscompress.train.evaluate import EvaluateConfig
from dscompress.train.finetune import FinetuneConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--macs-budget", type=float, default=None, help="plan for this share of the MACs instead of 3x on ORT CPU")
    args = parser.parse_args()

    def step(source, config, name):
        """Run one step on a source (a name or folder) into OUT/name; returns the artifact folder."""
        source = dscompress.resolve(source) if isinstance(source, str) else source
        output = dscompress.run_step(source, config, StepContext(out=os.path.join(args.out, name), force=True))
        return output.artifact.path

    source = dscompress.resolve("resnet18", num_classes=10, input_size=(3, args.size, args.size))
    baseline = step(source, FinetuneConfig(data="digits", teacher="none", epochs=args.epochs, lr=0.05), "baseline")
    converted = step(baseline, dscompress.ConvertConfig(rank=1), "converted")
    calibrated = step(converted, CalibrateConfig(data="digits"), "calibrated")
    if args.macs_budget:
        target = {"macs_budget": args.macs_budget}
    else:  # timed where a deployed model runs: 224x224, whatever size it was trained at
        target = {"speedup": 3.0, "latency_input_size": [3, 224, 224]}
    planned = step(baseline, PlanConfig(data="digits", ranks=[1, 2], prune_ratios=[0.5], **target), "planned")
    distil = FinetuneConfig(data="digits", epochs=args.epochs, lr=0.02)  # teacher: the baseline kept in the artifact
    final = step(planned, distil, "planned-distilled")

    onnx_file = os.path.join(args.out, "model.onnx")
    exported = dscompress.run_step(dscompress.resolve(final), ExportConfig(), StepContext(out=onnx_file, force=True)).record
    print(f"ONNX: {exported.path}, validation {exported.validation_status}")

    folders = [baseline, converted, calibrated, planned, final]
    for folder in (converted, calibrated):
        dscompress.run_step(dscompress.resolve(folder), EvaluateConfig(data="digits"))
    dscompress.run_step(None, BenchConfig(batch_sizes=[1], iters=20), StepContext(targets=[baseline, final]))
    rows = compare(folders)
    print(comparison_markdown(rows))
    print("plot:", plot(rows, os.path.join(args.out, "report.png")))

if __name__ == "__main__":
    main()
