"""The quickstart pipeline through the Python API, step by step.

Train a resnet18 baseline on the built-in digits, convert it to rank-1 depthwise-separable
convolutions, calibrate, distil from the baseline, prune, distil again, export to ONNX (validated
on ONNX Runtime), time the models side by side, and print the comparison report.

    python examples/pipeline.py [--out runs/example] [--epochs 6] [--size 32]
"""

import argparse
import os

import dscompress
from dscompress.bench import BenchConfig, bench, load_targets
from dscompress.calibrate import CalibrateConfig, calibrate_artifact
from dscompress.evaluate import evaluate_source
from dscompress.export import ExportConfig, export_source
from dscompress.prune import PruneConfig, prune_artifact
from dscompress.report import compare, comparison_markdown, plot
from dscompress.train import FinetuneConfig, finetune_artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    out = lambda name: os.path.join(args.out, name)  # noqa: E731

    source = dscompress.resolve("resnet18", num_classes=10, input_size=(3, args.size, args.size))
    baseline, _ = finetune_artifact(source, out("baseline"), FinetuneConfig(data="digits", teacher="none", epochs=args.epochs, lr=0.05), force=True)

    converted, record = dscompress.convert_artifact(dscompress.resolve(baseline.path), out("converted"), dscompress.ConvertConfig(rank=1), force=True)
    print(f"converted {len(record.layers)} layers: {record.macs_before / record.macs_after:.1f}x fewer MACs")
    calibrated, _ = calibrate_artifact(dscompress.resolve(converted.path), out("calibrated"), CalibrateConfig(data="digits"), force=True)

    distil = FinetuneConfig(data="digits", epochs=args.epochs, lr=0.02)  # teacher: the baseline kept in the artifact
    distilled, _ = finetune_artifact(dscompress.resolve(calibrated.path), out("distilled"), distil, force=True)
    pruned, _ = prune_artifact(dscompress.resolve(distilled.path), out("pruned"), PruneConfig(ratio=0.3), force=True)
    final, _ = finetune_artifact(dscompress.resolve(pruned.path), out("pruned-distilled"), distil, force=True)

    exported = export_source(dscompress.resolve(final.path), out("model.onnx"), ExportConfig(), force=True)
    print(f"ONNX: {exported.path}, validation {exported.validation_status}")

    folders = [baseline.path, final.path]
    for folder in (converted.path, calibrated.path, pruned.path):
        evaluate_source(dscompress.resolve(folder), "digits")
    bench(load_targets(folders, dscompress.resolve), BenchConfig(batch_sizes=[1], iters=20))
    rows = compare([baseline.path, converted.path, calibrated.path, distilled.path, pruned.path, final.path])
    print(comparison_markdown(rows))
    print("plot:", plot(rows, out("report.png")))


if __name__ == "__main__":
    main()
