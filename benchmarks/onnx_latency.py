"""ONNX Runtime latency of resnet18: original vs converted (rank 1, rank 2) vs converted + pruned.

The pruned models are rank 1 pruned by magnitude, once with free channel counts and once with
counts rounded to multiples of 8 (``round_to=8``), which ONNX Runtime's blocked CPU kernels favour.

All models are exported to ONNX (dynamic batch, validated against PyTorch first) and timed in
one interleaved run per batch size with :func:`dscompress.deploy.bench.bench`, so they share the same
machine conditions. Weights are random: latency does not depend on their values.

    python benchmarks/onnx_latency.py                 # ORT CPU, batch 1 and 32, 224x224
    python benchmarks/onnx_latency.py --providers cuda --iters 200 --iters-large 50   # on a GPU

Prints a Markdown table with the speed-up of each model's p50 over the original's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch
import torchvision

from dscompress.compress.convert import ConvertConfig, convert
from dscompress.core.util import human
from dscompress.deploy.bench import BenchConfig, BenchTarget, bench, machine
from dscompress.deploy.export import ExportConfig, export_onnx
from dscompress.nn.metrics import count_macs, count_params


def models(input_size, prune_ratio: float) -> list[tuple[str, torch.nn.Module]]:
    torch.manual_seed(0)
    original = torchvision.models.resnet18().eval()
    out = [("resnet18 original", original)]
    for rank in (1, 2):
        converted, _ = convert(original, input_size, ConvertConfig(rank=rank))
        out.append((f"converted rank {rank}", converted))
    try:
        from dscompress.compress.prune import PruneConfig, prune
    except ImportError:
        print("dscompress.compress.prune not available: no pruned model", file=sys.stderr)
    else:
        for round_to in (None, 8):
            pruned, _ = prune(out[1][1], input_size, PruneConfig(ratio=prune_ratio, round_to=round_to))
            out.append((f"rank 1 + pruned {prune_ratio:g}" + (f" (round to {round_to})" if round_to else ""), pruned))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="cpu", help="ONNX Runtime providers (cpu, cuda, tensorrt)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--iters", type=int, default=40, help="timed runs per model at batch 1")
    parser.add_argument("--iters-large", type=int, default=8, help="timed runs per model at larger batches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prune-ratio", type=float, default=0.3)
    parser.add_argument("--torch", action="store_true", help="also time PyTorch eager")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    input_size = (3, args.size, args.size)
    start = time.time()

    named = models(input_size, args.prune_ratio)
    with tempfile.TemporaryDirectory() as tmp:
        targets = []
        for i, (label, model) in enumerate(named):
            path = os.path.join(tmp, f"model{i}.onnx")
            record = export_onnx(model, input_size, path, ExportConfig(validate=True))
            if record.validation_status != "pass":
                raise SystemExit(f"{label}: ONNX validation {record.validation_status}: {record.failure()}")
            targets.append(BenchTarget(label, input_size, model, onnx_path=path))
        print(f"exported and validated {len(targets)} models in {time.time() - start:.0f}s", file=sys.stderr)
        records = []
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            config = BenchConfig(
                providers=args.providers,
                batch_sizes=[batch],
                warmup=args.warmup,
                iters=args.iters if batch == 1 else args.iters_large,
                threads=args.threads,
                torch=args.torch,
                block=5 if batch == 1 else 2,
            )
            records += bench(targets, config)

    costs = {label: (count_params(m), count_macs(m, input_size)) for label, m in named}
    threads = next(r.ort_threads or r.torch_threads for r in records if r.status == "ok")
    print(f"\n{machine()}; {threads} threads (torch and ORT intra-op); input {'x'.join(map(str, input_size))}; "
          f"torch {torch.__version__}; total {time.time() - start:.0f}s\n")
    print("| model | params | MACs | runtime | batch | p50 ms | p90 ms | p99 ms | images/s | speed-up (p50) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    first = {}
    for r in records:
        if r.status == "ok":
            first.setdefault((r.runtime, r.batch_size), r.p50_ms)
    for r in sorted(records, key=lambda r: (r.runtime, r.batch_size)):
        params, macs = costs[r.target]
        if r.status != "ok":
            print(f"| {r.target} | {human(params)} | {human(macs)} | {r.runtime} | {r.batch_size} | {r.status}: {r.reason[:60]} |||||")
            continue
        speedup = first[r.runtime, r.batch_size] / r.p50_ms
        print(
            f"| {r.target} | {human(params)} | {human(macs)} | {r.runtime} | {r.batch_size} | {r.p50_ms:.1f} | "
            f"{r.p90_ms:.1f} | {r.p99_ms:.1f} | {r.images_per_s:.1f} | {speedup:.2f}x |"
        )


if __name__ == "__main__":
    main()
