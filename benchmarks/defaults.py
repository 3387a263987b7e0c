"""What a user gets from `finetune` with its defaults: rank 1 and Torch-Pruning recovered by distillation, three seeds.

Every command is the CLI with only the options a new user gives (`--epochs`, `--seed`, `--keep
last`; no learning rate, no warm-up), on a Fashion-MNIST subset (``--train``/``--test`` images of
the Debian package ``dataset-fashion-mnist``), resnet18 at 3x32x32:

    finetune resnet18 --num-classes 10 --input-size 3,32,32 --data D --teacher none --epochs 8 --seed S -o base
    convert base -o rank1
    finetune rank1 --data D --epochs 8 --seed S -o rank1-kd     (calibrates first: its start is the calibrated row)
    prune base --ratio 0.57 --round-to 8 -o tp && finetune tp --data D --epochs 8 --seed S -o tp-kd

Top-1 is the last epoch's on the test images (as the runs report it), per seed, with the mean and
the spread (min-max) over seeds, and each row's change from its seed's baseline, and the top-1 on the
held-out training share (``--val-share``, 10%) before and after, marked ``!`` where ``finetune``
warned that the run ended below its start.

    apt-get install dataset-fashion-mnist
    python benchmarks/defaults.py [--out runs/defaults] [--seeds 0,1,2] [--epochs 8] [--threads 2]

Stages whose artifact exists in OUT are not run again.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from fashion import FASHION, subset

CLI = [sys.executable, "-m", "dscompress"]


def dscompress(*args: str, threads: int) -> dict:
    """Run one CLI command with --json; its record. Stops the benchmark on a failure."""
    done = subprocess.run([*CLI, *args, "--json", "--threads", str(threads)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: dscompress {' '.join(args)}\n{done.stderr[-2000:]}")
    for line in done.stderr.splitlines():
        if "warning" in line:
            print("   ", line.strip(), flush=True)
    return json.loads(done.stdout)


def stage(out: str, name: str, args: list[str], threads: int) -> dict:
    """``args`` written to OUT/name once; the record kept in OUT/name.json."""
    folder, saved = os.path.join(out, name), os.path.join(out, name + ".json")
    if not (os.path.isdir(folder) and os.path.isfile(saved)):
        begin = time.perf_counter()
        record = dscompress(*args, "-o", folder, "--force", threads=threads)
        record["wall_s"] = round(time.perf_counter() - begin, 1)
        with open(saved + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(saved + ".tmp", saved)
        print(f"  {name}: {record.get('top1')} ({record['wall_s']} s)", flush=True)
    with open(saved) as f:
        return json.load(f)


def _held_out(record: dict) -> str:
    """``start -> last`` on the held-out training share, ``!`` where ``finetune`` warned (below_start)."""
    last = record["epochs"][-1]["val_top1"]
    return f"{record['start_val_top1']:.1f} -> {last:.1f}{' !' if record['below_start'] else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/defaults")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.57, help="Torch-Pruning ratio (0.57: the rank-1 model's speed on ORT CPU)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = "mnist:" + subset(FASHION, os.path.join(args.out, "data"), args.train, args.test)
    epochs = ["--epochs", str(args.epochs), "--keep", "last"]
    rows: dict[str, list] = {"baseline": [], "rank 1, calibrated": [], "rank 1 + finetune": [], f"Torch-Pruning {args.ratio:g} + finetune": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        print(f"seed {seed}", flush=True)
        run = lambda name, *a: stage(args.out, f"{name}-s{seed}", list(a), args.threads)  # noqa: E731
        path = lambda name: os.path.join(args.out, f"{name}-s{seed}")  # noqa: E731
        seeded = [*epochs, "--seed", str(seed), "--data", data]
        base = run("base", "finetune", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--teacher", "none", *seeded)
        run("rank1", "convert", path("base"))
        rank1 = run("rank1-kd", "finetune", path("rank1"), *seeded)
        run("tp", "prune", path("base"), "--ratio", str(args.ratio), "--round-to", "8")
        tp = run("tp-kd", "finetune", path("tp"), *seeded)
        rows["baseline"].append((base["top1"], base["top1"], base))
        rows["rank 1, calibrated"].append((rank1["start_top1"], base["top1"], None))
        rows["rank 1 + finetune"].append((rank1["top1"], base["top1"], rank1))
        rows[f"Torch-Pruning {args.ratio:g} + finetune"].append((tp["top1"], base["top1"], tp))

    print(f"\nresnet18, Fashion-MNIST {args.train} train / {args.test} test at 3x32x32, {args.epochs} epochs, "
          f"last epoch, finetune defaults; seeds {args.seeds}\n")
    print("| row | top-1 per seed | mean | spread | vs baseline (mean, min-max) | held-out top-1: start -> last, per seed |")
    print("|---|---|---:|---:|---|---|")
    for name, values in rows.items():
        top1 = [v[0] for v in values]
        delta = [v[0] - v[1] for v in values]
        below = "-" if name == "rank 1, calibrated" else " / ".join(_held_out(v[2]) for v in values)
        change = "" if name == "baseline" else f"{sum(delta) / len(delta):+.2f} ({min(delta):+.2f} to {max(delta):+.2f})"
        print(f"| {name} | {' / '.join(f'{t:.2f}' for t in top1)} | {sum(top1) / len(top1):.2f} | "
              f"{max(top1) - min(top1):.2f} | {change} | {below} |")


if __name__ == "__main__":
    main()
