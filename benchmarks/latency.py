"""Where resnet18's time goes on ONNX Runtime CPU, and how well a latency table predicts a whole model.

1. ``dscompress profile`` of resnet18 (random weights: time does not depend on them), rank 1,
   rank 2, and rank 1 pruned 30% (round to 8) at 3x224x224, batch 1 and 32: one table with each
   convertible layer's time, the other layers together, the whole model (no profiler), the layer
   sum, and the bound (the most converting could gain).
2. Predicted vs measured whole-model latency from a latency table (``dscompress.planning.latency``):
   uniform ranks 1, 2, 4 and two mixed assignments (with pruned pairs), batch 1.

    python benchmarks/latency.py [--runtime ort-cpu] [--threads 1] [--size 224] [--batches 1,32]
"""

import argparse

import torch

from dscompress.compress.convert import ConvertConfig, convert, convertible
from dscompress.compress.prune import PruneConfig, prune
from dscompress.core.util import human, other_load
from dscompress.deploy.bench import machine
from dscompress.deploy.profile import ProfileConfig, profile
from dscompress.models.build import ModelSpec, build_model
from dscompress.nn.metrics import count_macs
from dscompress.planning.latency import Timer, latency_table
from dscompress.compress.units import Option, build, candidate_name, find_units, layout_of, pair_channels


def profiles(models: dict, size, batches: list[int], iters: int, runtime: str) -> None:
    records = {(name, b): profile(model, size, ProfileConfig(runtime=runtime, batch_size=b, iters=iters, warmup=3))
               for name, model in models.items() for b in batches}
    columns = list(records)
    print("| layer | " + " | ".join(f"{name} b{b}" for name, b in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    first = records[columns[0]]
    convertible = [layer.name for layer in first.layers if layer.convertible]
    for name in convertible:
        cells = []
        for key in columns:
            layer = next((l for l in records[key].layers if l.name == name), None)
            cells.append(f"{layer.ms:.3f}" if layer else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    rows = {
        "other layers": lambda r: sum(l.ms for l in r.layers if not l.convertible),
        "**layer sum**": lambda r: r.layer_sum_ms,
        "**whole model (no profiler)**": lambda r: r.total_ms,
        "convertible share": None,
        "**bound (x)**": lambda r: r.bound_speedup,
        "speed-up vs original (whole)": None,
    }
    for label, value in rows.items():
        if label == "convertible share":
            cells = [f"{r.convertible_ms / r.layer_sum_ms:.0%}" for r in (records[k] for k in columns)]
        elif label.startswith("speed-up"):
            cells = [f"{records[('original', k[1])].total_ms / records[k].total_ms:.2f}x" for k in columns]
        else:
            cells = [f"{value(records[k]):.3f}" if "bound" not in label else f"{value(records[k]):.2f}" for k in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")


def predictions(model, size, timer: Timer) -> None:
    """Each assignment gives every unit (a block's conv1 -> conv2 pair) an option, as a plan would."""
    table = latency_table(model, size, timer=timer, ranks=(1, 2, 4), prune_ratios=(0.5,))
    units = find_units(model, size, convertible(model, size))
    print(f"whole model {table.total_ms:.3f} ms; the rest beside the convertible layers {table.rest_ms:.3f} ms\n")
    print("| assignment | predicted ms | measured ms | predicted / measured |")
    print("|---|---:|---:|---:|")
    cases = {f"uniform rank {r}": lambda unit, r=r: Option((r, r)) for r in (1, 2, 4)}
    cases["mixed: rank 1 in layer1-2, rank 2 in layer3-4"] = lambda unit: Option((1, 1) if unit.layers[0].startswith(("layer1", "layer2")) else (2, 2))
    cases["mixed: pairs pruned 50%, conv1 rank 2, conv2 dense"] = lambda unit: Option((2, None), 0.5)
    cases["mixed: layer1 dense, layer2 rank 4, layer3 pruned 50% + rank 1, layer4 rank 2"] = lambda unit: {
        "layer1": Option((None, None)), "layer2": Option((4, 4)), "layer3": Option((1, 1), 0.5), "layer4": Option((2, 2))}[unit.layers[0][:6]]
    for label, choose in cases.items():
        options = [choose(unit) for unit in units]
        kept = [pair_channels(model, unit, option.prune, 8) for unit, option in zip(units, options)]
        chosen = {layer: candidate_name(rank, option.prune) for unit, option in zip(units, options) for layer, rank in zip(unit.layers, option.ranks)}
        predicted = table.predict(chosen)
        built, _ = build(model, layout_of(units, options, kept))
        measured = timer.time_module(built, size)
        print(f"| {label} | {predicted:.3f} | {measured:.3f} | {predicted / measured:.3f} |")
    timer.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="ort-cpu", help="ort-cpu, ort-cuda, ort-trt, torch-cpu or torch-cuda")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = (3, args.size, args.size)
    print(f"machine: {machine()}; {args.threads} thread(s); other load {other_load(1.0):.2f} CPUs; {args.runtime}\n")
    base = build_model(ModelSpec("resnet18", input_size=size))
    rank1, _ = convert(base, size, ConvertConfig(rank=1))
    rank2, _ = convert(base, size, ConvertConfig(rank=2))
    pruned, record = prune(rank1, size, PruneConfig(ratio=0.3, round_to=8))
    print(f"MACs: original {human(count_macs(base, size))}, rank 1 {human(record.macs_before)}, rank 2 {human(count_macs(rank2, size))}, "
          f"rank 1 + pruned 30% {human(record.macs_after)}\n")
    print("## Per-layer time (ms)\n")
    profiles({"original": base, "rank 1": rank1, "rank 2": rank2, "rank 1 + pruned 30%": pruned}, size,
             [int(b) for b in args.batches.split(",")], args.iters, args.runtime)
    print("\n## Predicted vs measured (batch 1)\n")
    predictions(base, size, Timer(args.runtime, 1, threads=args.threads, iters=args.iters))
    print(f"\nother load at the end {other_load(1.0):.2f} CPUs")


if __name__ == "__main__":
    main()
