"""Tables that compare artifacts and show what a step did, built from manifests and records."""

from __future__ import annotations

import json
import os

import matplotlib
from rich.table import Table

from dscompress.artifact.format import Artifact, is_artifact
from dscompress.core.errors import DscompressError
from dscompress.core.util import atomic_path, human, write_text
from dscompress.deploy.bench import HEADLINE_ORDER
from dscompress.deploy.profile import ProfileRecord
from dscompress.nn.metrics import count_macs, count_params
from dscompress.pipeline.runstate import is_run, run_models
from dscompress.pipeline.steps import planned_int8

# (metric key, column title, format); a column is shown when any row has the metric.
COLUMNS = [
    ("top1", "top-1 %", "{:.2f}"),
    ("top5", "top-5 %", "{:.2f}"),
    ("miou", "mIoU %", "{:.2f}"),  # segmentation
    ("pixel_acc", "pixel acc %", "{:.2f}"),
    ("params", "params", "{:,}"),
    ("macs", "MACs", "{:,}"),
    ("size_bytes", "size MB", None),
    ("precision", "precision", "{}"),  # an INT8 plan's: its ONNX Runtime latency is its QDQ graph's
    ("onnx_check", "ONNX", None),  # from `dscompress export`: metrics["onnx"]["validation"]
]


def find_artifacts(paths: list[str]) -> list[str]:
    """Artifact folders among ``paths``; a folder that is not one is searched one level down."""
    found = []
    for path in paths:
        if is_artifact(path):
            found.append(path)
        elif is_run(path):
            found += run_models(path)
        elif os.path.isdir(path):
            inner = sorted(os.path.join(path, d) for d in os.listdir(path) if is_artifact(os.path.join(path, d)))
            if not inner:
                raise DscompressError(f"{path!r} is not an artifact folder and holds none")
            found += inner
        elif os.path.exists(path):
            raise DscompressError(f"{path!r} is a file, not an artifact folder (report compares artifact folders and run folders)")
        else:
            raise DscompressError(f"{path!r} does not exist")
    return found


def compare(paths: list[str], baseline: str | None = None) -> list[dict]:
    """One row per artifact: its steps and metrics, and ratios to the baseline's metrics.

    The baseline is ``baseline`` if given, else the first row. A single artifact that keeps its
    uncompressed original is shown against it: the original comes first, as the baseline.
    """
    artifacts = [Artifact.open(p) for p in find_artifacts(paths)]
    if not artifacts:
        raise DscompressError(f"no artifacts to compare in {', '.join(paths)}")
    rows = [_row(artifact) for artifact in artifacts]
    if len(artifacts) == 1 and artifacts[0].has_original and baseline is None:
        rows.insert(0, _original_row(artifacts[0]))
    base = _row(Artifact.open(baseline)) if baseline else rows[0]
    for row in rows:
        _add_ratios(row, base)
    return rows


def _row(artifact: Artifact) -> dict:
    metrics = artifact.metrics
    row = {
        "name": os.path.basename(os.path.normpath(artifact.path)),
        "path": artifact.path,
        "model": artifact.spec.name,
        "task": artifact.spec.task,
        "steps": [s["step"] for s in artifact.steps],
        "precision": "int8" if planned_int8(artifact) is not None else "fp32",
        **metrics,
    }
    for runtime, batch, p50 in _latencies(metrics):
        row[f"p50:{runtime} b{batch}"] = p50
    headline = (metrics.get("latency") or {}).get("headline")
    if headline:
        row["latency_ms"] = headline["p50_ms"]
    if metrics.get("onnx"):
        row["onnx_check"] = metrics["onnx"].get("validation")
    return row


def _original_row(artifact: Artifact) -> dict:
    """The uncompressed original an artifact keeps, measured like an artifact (its accuracy from
    the records: the teacher's top-1 (mIoU) of a distillation, or the baseline's own training)."""
    model = artifact.original_model()
    size = artifact.spec.input_size
    key = SCORES[artifact.spec.task][0]
    score = None
    for step in artifact.steps:
        record = step.get("record") or {}
        if step["step"] == "finetune" and record.get("teacher") is None and score is None:
            score = record.get(key)  # the baseline, trained here
        if step["step"] == "finetune" and str(record.get("teacher", "")).endswith("(original)"):
            score = record.get(f"teacher_{key}")
    return {
        "name": f"{os.path.basename(os.path.normpath(artifact.path))} (original)",
        "path": os.path.join(artifact.path, artifact.manifest["files"]["original"]),
        "model": artifact.spec.name,
        "task": artifact.spec.task,
        "steps": [],
        "params": count_params(model),
        "macs": count_macs(model, size),
        "size_bytes": os.path.getsize(os.path.join(artifact.path, artifact.manifest["files"]["original"])),
        key: score,
    }


def _add_ratios(row: dict, base: dict) -> None:
    """``KEY_ratio`` = this / baseline for the size and cost metrics, and the top-1 change."""
    for key in ("params", "macs", "size_bytes"):
        if row.get(key) and base.get(key):
            row[f"{key}_ratio"] = row[key] / base[key]
    for key in ("top1", "miou"):
        if row.get(key) is not None and base.get(key) is not None:
            row[f"{key}_delta"] = row[key] - base[key]
    for key in [k for k in row if k.startswith("p50:") and not k.endswith("_ratio")]:
        if base.get(key):
            row[f"{key}_ratio"] = row[key] / base[key]


def _latencies(metrics: dict) -> list[tuple[str, int, float]]:
    """(runtime, batch size, p50 ms) of every successful `dscompress bench` result."""
    results = (metrics.get("latency") or {}).get("results") or []
    return [(r["runtime"], r["batch_size"], r["p50_ms"]) for r in results if r.get("status") == "ok" and r.get("p50_ms")]


def _cell(row: dict, key: str, fmt: str | None) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "size_bytes":
        text = f"{value / 1e6:.2f}"
    elif key in ("params", "macs"):
        text = human(value)
    elif key.startswith("p50:"):
        text = f"{value:.2f}"
    elif key == "onnx_check":
        text = str(value)
    else:
        text = fmt.format(value)
    ratio = row.get(f"{key}_ratio")
    if ratio is not None and abs(ratio - 1) > 1e-9:
        text += f" ({ratio:.2f}x)"
    if key in ("top1", "miou") and row.get(f"{key}_delta"):
        text += f" ({row[f'{key}_delta']:+.2f})"
    return text


def _columns(rows: list[dict]) -> list[tuple[str, str, str | None]]:
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    if all(r.get("precision", "fp32") == "fp32" for r in rows):
        columns = [c for c in columns if c[0] != "precision"]
    latency_keys = sorted({k for r in rows for k in r if k.startswith("p50:") and not k.endswith("_ratio")})
    onnx = [c for c in columns if c[0] == "onnx_check"]
    columns = [c for c in columns if c[0] != "onnx_check"]
    return columns + [(k, f"{k[4:]} p50 ms", None) for k in latency_keys] + onnx


def _made_by(row: dict) -> str:
    """The step that made an artifact, and how many came before (the full list is in --json)."""
    steps = row["steps"]
    return f"{steps[-1]} (#{len(steps)})" if steps else "-"


def comparison_table(rows: list[dict]) -> Table:
    table = Table(title="dscompress report (ratios and deltas against the first row)")
    table.add_column("artifact")
    table.add_column("last step")
    columns = _columns(rows)
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(row["name"], _made_by(row), *[_cell(row, k, f) for k, _, f in columns])
    return table


def comparison_markdown(rows: list[dict]) -> str:
    columns = _columns(rows)
    head = ["artifact", "last step"] + [title for _, title, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], _made_by(row)] + [_cell(row, k, f) for k, _, f in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(rows: list[dict], path: str) -> str:
    """Write the Markdown table to ``path`` (atomically)."""
    write_text(path, comparison_markdown(rows) + "\n")
    return path


def comparison_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, default=str)


# The accuracy a row is judged by, per task: (metric key, name).
SCORES = {"classification": ("top1", "top-1"), "segmentation": ("miou", "mIoU")}

# Points of top-1 below the best row that the plot's accuracy axis still spans.
PLOT_SPAN = 15.0


def _latency_key(rows: list[dict]) -> str | None:
    """The ``p50:RUNTIME bN`` column most rows have, preferring the deployed runtimes and batch 1."""
    keys = {k for r in rows for k in r if k.startswith("p50:") and not k.endswith("_ratio")}
    if not keys:
        return None

    def preference(key: str):
        runtime, batch = key[4:].rsplit(" b", 1)
        order = HEADLINE_ORDER.index(runtime) if runtime in HEADLINE_ORDER else len(HEADLINE_ORDER)
        return (-sum(1 for r in rows if r.get(key) is not None), order, int(batch))

    return min(keys, key=preference)


def _score(rows: list[dict]) -> tuple[str, str]:
    """(metric key, name) the rows are judged by: mIoU when they are all segmentation models."""
    tasks = {r.get("task", "classification") for r in rows}
    return SCORES["segmentation" if tasks == {"segmentation"} else "classification"]


def plot(rows: list[dict], path: str) -> str:
    """Accuracy against MACs and against latency, as a PNG (written atomically).

    One marker per artifact, named in the legend with its top-1 (so no label covers another),
    joined in row order (the order of a pipeline's steps). The accuracy axis spans the rows within
    :data:`PLOT_SPAN` points of the best, with a margin, so differences of a point show; rows far
    below (a model just converted or pruned, before calibration or training) sit on the bottom
    edge, marked as below the axis. The latency axis names its runtime and batch. Artifacts
    without a top-1 are left out (evaluate them first). Segmentation models are plotted by mIoU.
    """
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score, score_name = _score(rows)
    points = [r for r in rows if r.get(score) is not None]
    if not points:
        raise DscompressError(f"nothing to plot: no artifact has a {score_name}; run `dscompress evaluate DIR --data SPEC` first")
    latency = _latency_key(points)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = [(axes[0], "macs", "MACs per image (millions)", 1e-6, "accuracy vs compute")]
    if latency:
        runtime, batch = latency[4:].rsplit(" b", 1)
        panels.append((axes[1], latency, f"p50 latency (ms), {runtime}, batch {batch}", 1.0, "accuracy vs latency"))
    markers = "osD^vP*Xh<>p"
    colors = plt.get_cmap("tab10").colors
    best = max(r[score] for r in points)
    near = [r[score] for r in points if r[score] >= best - PLOT_SPAN]
    margin = max(0.5, 0.1 * (best - min(near)))
    low, high = min(near) - margin, best + margin
    below = low + 0.03 * (high - low)

    def shown_y(r):
        return r[score] if r[score] >= low else below

    for ax, key, label, scale, title in panels:
        shown = [r for r in points if r.get(key) is not None]
        ax.plot([r[key] * scale for r in shown], [shown_y(r) for r in shown], color="0.8", linewidth=1, zorder=1)
        for i, r in enumerate(points):
            if r.get(key) is None:
                continue
            off = r[score] < low
            name = f"{r['name']}: {r[score]:.2f}%" + (" (below the axis)" if off else "")
            ax.scatter(r[key] * scale, shown_y(r), s=60, marker=markers[i % len(markers)], color=colors[i % len(colors)],
                       label=name, zorder=2, edgecolors="red" if off else "black", linewidths=1.2 if off else 0.5)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{score_name} (%)")
        ax.set_ylim(low, high)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if not latency:
        axes[1].text(0.5, 0.5, "no latency measured\n(run dscompress bench)", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(labels) - 1) // 3), 1, 1))
    return _save_png(fig, path)


def _save_png(fig, path: str) -> str:
    """Write ``fig`` to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def plot_profile(record: ProfileRecord, path: str) -> str:
    """Each layer's time as a bar (convertible layers in their own colour), in forward order."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = record.layers
    height = max(3.0, 0.22 * len(layers) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height))
    colors = ["tab:orange" if layer.convertible else "tab:gray" for layer in layers]
    ax.barh(range(len(layers)), [layer.ms for layer in layers], color=colors)
    ax.set_yticks(range(len(layers)), [layer.name for layer in layers], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"median ms per run, {record.runtime}, batch {record.batch_size}")
    ax.set_title(f"{record.total_ms:.2f} ms in all; convertible layers (orange) {record.convertible_ms / max(record.layer_sum_ms, 1e-9):.0%}, "
                 f"bound {record.bound_speedup:.2f}x", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save_png(fig, path)


# Record type -> the function that draws it, for the commands whose config has a ``plot`` option.
PLOTS = {ProfileRecord: plot_profile}


def stored_profiles(rows: list[dict]) -> list[ProfileRecord]:
    """Every profile the compared artifacts keep (``dscompress profile`` stores them)."""
    return [ProfileRecord.from_dict(data) for row in rows for data in (row.get("profiles") or {}).values()]
