"""Does a plan beat plain pruning and uniform conversion at equal measured speed? Fashion-MNIST, resnet18.

resnet18 is trained on a Fashion-MNIST subset at 3x32x32 (``--train``/``--test`` images from the
Debian package ``dataset-fashion-mnist``), then, for each target speed-up on ONNX Runtime CPU
(batch 1, one thread, timed at 3x224x224 where the convs dominate as they do in deployment):

- ``plan``: ``dscompress plan BASE --speedup S --latency-input-size 3,224,224`` (calibrated);
- ``uniform``: uniform rank 1 or 2, whichever is closest in measured speed, calibrated;
- ``prune``: Torch-Pruning through ``dscompress prune --round-to 8`` at the ratio whose measured
  speed is closest to the plan's, uncalibrated and calibrated (``--calibrate``).

Every row's top-1 is measured training-free, then after the same distillation from the baseline
(``--kd-epochs``, the last epoch's weights: never the best epoch on the test split), on all
``--eval-test`` (10,000) test images: the runs themselves report top-1 on the first ``--test``. The table also has
each row's damage (KL of its output from the baseline's on held-out training images) to check how
well training-free damage ranks the rows after distillation (Spearman), and the plans' predicted
(sum over units) against measured damage.

    apt-get install dataset-fashion-mnist
    python benchmarks/plan.py [--out runs/plan-bench] [--speedups 2,3,4] [--epochs 8] [--kd-epochs 8]

Stages are kept in OUT and skipped when run again.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from fashion import FASHION, subset

import dscompress
from dscompress.compress.calibrate import CalibrateConfig, calibration_batches
from dscompress.compress.convert import ConvertConfig
from dscompress.compress.prune import PruneConfig
from dscompress.core.util import other_load
from dscompress.deploy.bench import BenchConfig, BenchTarget, bench, machine
from dscompress.pipeline.steps import StepContext, run_step
from dscompress.planning.plan import PlanConfig, _log_probs, kl_damage
from dscompress.train.evaluate import EvaluateConfig
from dscompress.train.finetune import FinetuneConfig

LATENCY_SIZE = (3, 224, 224)


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.data = "mnist:" + subset(FASHION, os.path.join(args.out, "data"), args.train, args.test)
        # top-1 of every row on all 10,000 test images (the training runs report the first --test each
        # epoch): two models 0.7 points apart on 2,000 images cannot be told apart, on 10,000 they can
        self.eval_data = "mnist:" + subset(FASHION, os.path.join(args.out, "data-eval"), args.train, args.eval_test)
        self.state_path = os.path.join(args.out, "state.json")
        self.state = json.load(open(self.state_path)) if os.path.isfile(self.state_path) else {}

    def save(self):
        with open(self.state_path, "w") as f:
            json.dump(self.state, f, indent=2)

    def path(self, name):
        return os.path.join(self.out, name)

    def step(self, name, source, config, then=()):
        """Run a step into OUT/name once; returns the folder."""
        if not os.path.isdir(self.path(name)):
            start = time.perf_counter()
            src = dscompress.resolve(source) if isinstance(source, str) else source
            run_step(src, config, StepContext(out=self.path(name), force=True), then=list(then))
            self.state.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
            self.save()
        return self.path(name)

    def top1(self, folder):
        artifact = dscompress.Artifact.open(folder)
        if artifact.metrics.get("top1") is None or artifact.metrics.get("eval_data") != self.eval_data:
            run_step(dscompress.resolve(folder), EvaluateConfig(data=self.eval_data))
            artifact = dscompress.Artifact.open(folder)
        return artifact.metrics["top1"]

    def speed(self, folder):
        """Speed-up over the baseline at 3x224x224, batch 1, one thread, ORT CPU: the two timed side
        by side (interleaved blocks), as the machine's speed drifts over a long run."""
        key = f"speedup:{folder}"
        if folder == self.path("baseline"):
            return 1.0
        if key not in self.state:
            targets = [BenchTarget(name, (3, 32, 32), model=dscompress.load(path)) for name, path in (("baseline", self.path("baseline")), ("model", folder))]
            config = BenchConfig(providers="cpu", torch=False, batch_sizes=[1], threads=1, warmup=5, iters=40, time_at=list(LATENCY_SIZE))
            p50 = {r.target: r.p50_ms for r in bench(targets, config)}
            self.state[key] = p50["baseline"] / p50["model"]
            self.save()
        return self.state[key]

    def distill(self, name):
        # calibrate_first off: the uncalibrated rows are distilled as they are (the others are calibrated already)
        kd = FinetuneConfig(data=self.data, epochs=self.args.kd_epochs, lr=self.args.kd_lr, seed=0, calibrate_first=False)
        return self.step(f"{name}-kd", self.path(name), kd)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plan-bench")
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--eval-test", type=int, default=10000, help="test images every row's top-1 is measured on")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--kd-epochs", type=int, default=8)
    parser.add_argument("--kd-lr", type=float, default=None, help="distillation lr (default: finetune's)")
    parser.add_argument("--speedups", default="2,3,4")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and calibration (timing uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    suite = Bench(args)
    print(f"machine: {machine()}; other load {other_load(1.0):.2f} CPUs; data {suite.data}", flush=True)

    base = suite.step("baseline", dscompress.resolve("resnet18", num_classes=10, input_size=(3, 32, 32)),
                      FinetuneConfig(data=suite.data, teacher="none", epochs=args.epochs, lr=0.05, seed=0))
    calibrate = CalibrateConfig(data=suite.data)
    for rank in (1, 2):
        suite.step(f"rank{rank}", base, ConvertConfig(rank=rank), then=[calibrate])
    for ratio in np.round(np.arange(0.3, 0.81, 0.05), 2):
        suite.step(f"tp{ratio:g}-raw", base, PruneConfig(ratio=float(ratio), round_to=8))

    rows = []
    # the plans' held-out images: after the 16 calibration batches (no calibrated row has seen them)
    images = calibration_batches(suite.data, (3, 32, 32), 16 + 8, 32, seed=0)
    held_out = images[16:]
    original = dscompress.load(base)
    reference = _log_probs(original, held_out)
    for speedup in [float(s) for s in args.speedups.split(",")]:
        tag = f"{speedup:g}x"
        torch.set_num_threads(1)  # the plan's latency is for one thread, as the timings below
        planned = suite.step(f"plan{tag}", base, PlanConfig(data=suite.data, speedup=speedup, latency_input_size=list(LATENCY_SIZE)))
        torch.set_num_threads(args.threads)
        record = dscompress.Artifact.open(planned).steps[-1]["record"]
        plan_speed = suite.speed(planned)
        uniform = min(("rank1", "rank2"), key=lambda name: abs(suite.speed(suite.path(name)) - plan_speed))
        ratios = [f"tp{r:g}-raw" for r in np.round(np.arange(0.3, 0.81, 0.05), 2)]
        tp_raw = min(ratios, key=lambda name: abs(suite.speed(suite.path(name)) - plan_speed))
        tp_cal = suite.step(tp_raw.replace("-raw", "-cal"), suite.path(tp_raw), calibrate)
        for label, name in (("plan", f"plan{tag}"), (f"uniform {uniform}, calibrated", uniform),
                            (f"prune {tp_raw[2:-4]} (round 8), uncalibrated", tp_raw), (f"prune {tp_raw[2:-4]} (round 8), calibrated", os.path.basename(tp_cal))):
            folder = suite.path(name)
            model = dscompress.load(folder)
            damage, _ = kl_damage(model, reference, held_out)
            rows.append({"target": tag, "row": label, "speedup": suite.speed(folder), "macs": dscompress.Artifact.open(folder).metrics["macs"],
                         "free": suite.top1(folder), "kd": suite.top1(suite.distill(name)), "damage": damage,
                         "predicted": record["predicted_speedup"] if label == "plan" else None,
                         "damage_sum": record["damage_predicted"] if label == "plan" else None,
                         "damage_plan": record["damage_measured"] if label == "plan" else None,
                         "kept": next((c["label"] for c in record.get("candidates", []) if c["chosen"]), None) if label == "plan" else None,
                         "candidates": record.get("candidates") if label == "plan" else None})
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nbaseline top-1 {suite.top1(base):.2f}% ({args.epochs} epochs); {args.kd_epochs} distillation epochs per row, the last epoch's "
          f"weights; top-1 on {args.eval_test} test images\n")
    print("| target | row | measured speed-up | predicted | MACs | top-1 training-free | top-1 distilled | damage (KL) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        predicted = f"{r['predicted']:.2f}x" if r["predicted"] else ""
        print(f"| {r['target']} | {r['row'] + (' (' + r['kept'] + ')' if r.get('kept') else '')} | {r['speedup']:.2f}x | {predicted} | {r['macs'] / 1e6:.2f}M | {r['free']:.2f} | {r['kd']:.2f} | {r['damage']:.4f} |")
    plans = [r for r in rows if r["row"] == "plan"]
    print("\nplans: damage predicted (sum over units) vs measured (the whole plan, calibrated): "
          + "; ".join(f"{r['target']}: {r['damage_sum']:.4f} vs {r['damage_plan']:.4f}" for r in plans))
    calibrated = [r for r in rows if "uncalibrated" not in r["row"]]
    print(f"Spearman (damage, -top-1 after distillation) over {len(calibrated)} calibrated rows: "
          f"{spearman([r['damage'] for r in calibrated], [-r['kd'] for r in calibrated]):.2f}; "
          f"over all {len(rows)} rows: {spearman([r['damage'] for r in rows], [-r['kd'] for r in rows]):.2f}")
    print(f"stage seconds: {json.dumps(suite.state.get('seconds', {}))}")
    print(f"other load at the end {other_load(1.0):.2f} CPUs")


if __name__ == "__main__":
    main()
