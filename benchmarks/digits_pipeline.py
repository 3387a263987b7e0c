"""The whole pipeline on digits, as a user types it: baseline, convert, calibrate, distill, prune, distill.

Each stage is one ``dscompress`` command, run as a separate process and timed:

    finetune resnet18 --num-classes 10 --input-size 3,32,32 --data digits --teacher none -o baseline
    convert baseline --rank 1 -o converted                     (then: evaluate converted --data digits)
    calibrate converted --data digits -o calibrated            (if dscompress has calibrate)
    finetune calibrated --data digits -o distilled             (teacher: the baseline the artifact keeps)
    prune distilled --ratio 0.3 -o pruned                      (if dscompress has prune; then evaluate)
    finetune pruned --data digits -o pruned-distilled

and prints a Markdown table (top-1 and its change from the baseline, params, MACs, wall time)
for BENCHMARKS.md. The distillations use `finetune`'s own learning rate and warm-up unless
``--kd-lr`` is given (the tables before issue 18 passed ``--kd-lr 0.02``). Fine-tuned rows give the last epoch's top-1 (``finetune`` keeps the last epoch's
weights; digits has no split besides train and test to choose another on). Run:

    python benchmarks/digits_pipeline.py [--out runs/digits] [--size 32] [--epochs 15] [--kd-epochs 15] [--threads N]
                                         [--uncalibrated]   # also distill the converted model as it is

Stages whose artifact already exists in ``--out`` are not run again (``--force`` reruns all);
their wall times are kept in ``--out/timings.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from dscompress.artifact.format import Artifact


def dscompress(args: list[str], threads: int | None) -> float:
    """Run one dscompress command in its own process; returns the wall time in seconds."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("$ dscompress " + " ".join(args), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dscompress", *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/digits", help="Folder for the artifacts.")
    parser.add_argument("--size", type=int, default=32, help="Images are upsampled to 3 x SIZE x SIZE.")
    parser.add_argument("--epochs", type=int, default=15, help="Baseline epochs.")
    parser.add_argument("--kd-epochs", type=int, default=15, help="Epochs of each distillation.")
    parser.add_argument("--kd-lr", type=float, default=None, help="Learning rate of the distillations (default: finetune's).")
    parser.add_argument("--ratio", type=float, default=0.3, help="Share of channels pruned.")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for each command (default: torch's).")
    parser.add_argument("--uncalibrated", action="store_true", help="Also distill the converted model without calibrating it first.")
    parser.add_argument("--force", action="store_true", help="Run every stage again.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON instead of Markdown.")
    args = parser.parse_args()

    if args.force and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    names = ("baseline", "converted", "calibrated", "distilled", "pruned", "pruned-distilled", "distilled-uncalibrated")
    path = {name: os.path.join(args.out, name) for name in names}
    data = ["--data", "digits"]
    kd = [*data, "--epochs", str(args.kd_epochs), *(["--lr", str(args.kd_lr)] if args.kd_lr else [])]
    stages = [
        ("baseline", ["finetune", "resnet18", "--num-classes", "10", "--input-size", f"3,{args.size},{args.size}", *data,
                      "--teacher", "none", "--epochs", str(args.epochs), "-o", path["baseline"]]),
        ("converted", ["convert", path["baseline"], "--rank", "1", "-o", path["converted"]]),
    ]
    stages.append(("calibrated", ["calibrate", path["converted"], *data, "-o", path["calibrated"]]))
    stages.append(("distilled", ["finetune", path["calibrated"], *kd, "-o", path["distilled"]]))
    stages.append(("pruned", ["prune", path["distilled"], "--ratio", str(args.ratio), "-o", path["pruned"]]))
    stages.append(("pruned-distilled", ["finetune", path["pruned"], *kd, "-o", path["pruned-distilled"]]))

    timings_path = os.path.join(args.out, "timings.json")
    timings = {}
    if os.path.isfile(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    if args.uncalibrated:
        stages.append(("distilled-uncalibrated", ["finetune", path["converted"], *kd, "--no-calibrate-first", "-o", path["distilled-uncalibrated"]]))

    rows = []
    for name, command in stages:
        if not os.path.isdir(path[name]):
            seconds = dscompress(command, args.threads)
            if command[0] != "finetune":  # finetune records the accuracy itself
                seconds += dscompress(["evaluate", path[name], *data], args.threads)
            timings[name] = seconds
            with open(timings_path, "w") as f:
                json.dump(timings, f, indent=2)
        seconds = timings.get(name)
        artifact = Artifact.open(path[name])
        step = artifact.steps[-1]
        row = {
            "stage": name,
            "command": "dscompress " + " ".join(command).replace(args.out + os.sep, ""),
            "top1": artifact.metrics["top1"],
            "params": artifact.metrics["params"],
            "macs": artifact.metrics["macs"],
            "seconds": seconds,
        }
        if step["step"] == "convert":
            record = step["record"]
            row["converted_macs_reduction"] = record["converted_macs_before"] / record["converted_macs_after"]
        rows.append(row)

    total = sum(row["seconds"] or 0 for row in rows if row["stage"] != "distilled-uncalibrated")
    base = rows[0]
    for row in rows:
        row["top1_delta"] = row["top1"] - base["top1"]
    if args.json:
        print(json.dumps({"rows": rows, "seconds": total}, indent=2))
        return
    print("| stage | top-1 % (vs baseline) | params | MACs | wall time (s) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        top1 = f"{row['top1']:.2f} ({row['top1_delta']:+.2f})"
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
        print(f"| {row['stage']} | {top1} | {row['params'] / 1e6:.2f}M | {row['macs'] / 1e6:.1f}M | {seconds} |")
    print(f"\ntotal wall time {total:.0f}s" + (" (without distilled-uncalibrated)" if args.uncalibrated else ""))
    for row in rows:
        if "converted_macs_reduction" in row:
            print(f"converted layers: {row['converted_macs_reduction']:.2f}x fewer MACs")
    for row in rows:
        print(f"{row['stage']}: {row['command']}")


if __name__ == "__main__":
    main()
