"""The quickstart pipeline through the Python API, step by step.

Train a resnet18 baseline on the built-in digits, convert it to rank-1 depthwise-separable
convolutions, calibrate, distil from the baseline, prune, distil again, export to ONNX (validated
on ONNX Runtime), time the models side by side, and print the comparison report.

Every step is a config run by ``dscompress.run_step`` on a source (a model name or an artifact
folder, through ``dscompress.resolve``); steps that make a model save an artifact folder.

    python examples/pipeline.py [--out runs/example] [--epochs 6] [--size 32]
"""

import argparse
import os

import dscompress
from dscompress.bench import BenchConfig
from dscompress.calibrate import CalibrateConfig
from dscompress.evaluate import EvaluateConfig
from dscompress.export import ExportConfig
from dscompress.prune import PruneConfig
from dscompress.report import compare, comparison_markdown, plot
from dscompress.steps import StepContext
from dscompress.train import FinetuneConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
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
    distil = FinetuneConfig(data="digits", epochs=args.epochs, lr=0.02)  # teacher: the baseline kept in the artifact
    distilled = step(calibrated, distil, "distilled")
    pruned = step(distilled, PruneConfig(ratio=0.3, round_to=8), "pruned")
    final = step(pruned, distil, "pruned-distilled")

    onnx_file = os.path.join(args.out, "model.onnx")
    exported = dscompress.run_step(dscompress.resolve(final), ExportConfig(), StepContext(out=onnx_file, force=True)).record
    print(f"ONNX: {exported.path}, validation {exported.validation_status}")

    folders = [baseline, converted, calibrated, distilled, pruned, final]
    for folder in (converted, calibrated, pruned):
        dscompress.run_step(dscompress.resolve(folder), EvaluateConfig(data="digits"))
    dscompress.run_step(None, BenchConfig(batch_sizes=[1], iters=20), StepContext(targets=[baseline, final]))
    rows = compare(folders)
    print(comparison_markdown(rows))
    print("plot:", plot(rows, os.path.join(args.out, "report.png")))


if __name__ == "__main__":
    main()
