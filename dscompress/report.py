"""Tables that compare artifacts and show what a step did, built from manifests and records."""

from __future__ import annotations

import json
import os

import matplotlib
from rich.table import Table

from dscompress._util import atomic_path, human, write_text
from dscompress.artifact import Artifact, is_artifact
from dscompress.errors import DscompressError
from dscompress.runstate import is_run, run_models

# (metric key, column title, format); a column is shown when any row has the metric.
COLUMNS = [
    ("top1", "top-1 %", "{:.2f}"),
    ("top5", "top-5 %", "{:.2f}"),
    ("params", "params", "{:,}"),
    ("macs", "MACs", "{:,}"),
    ("size_bytes", "size MB", None),
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

    The baseline is ``baseline`` if given, else the first artifact.
    """
    artifacts = [Artifact.open(p) for p in find_artifacts(paths)]
    if not artifacts:
        raise DscompressError(f"no artifacts to compare in {', '.join(paths)}")
    base = Artifact.open(baseline) if baseline else artifacts[0]
    rows = []
    for artifact in artifacts:
        metrics = artifact.metrics
        row = {
            "name": os.path.basename(os.path.normpath(artifact.path)),
            "path": artifact.path,
            "model": artifact.spec.name,
            "steps": [s["step"] for s in artifact.steps],
            **metrics,
        }
        for key in ("params", "macs", "size_bytes"):
            if metrics.get(key) and base.metrics.get(key):
                row[f"{key}_ratio"] = metrics[key] / base.metrics[key]
        if metrics.get("top1") is not None and base.metrics.get("top1") is not None:
            row["top1_delta"] = metrics["top1"] - base.metrics["top1"]
        for runtime, batch, p50 in _latencies(metrics):
            key = f"p50:{runtime} b{batch}"
            row[key] = p50
            base_p50 = {(r, b): v for r, b, v in _latencies(base.metrics)}.get((runtime, batch))
            if base_p50:
                row[f"{key}_ratio"] = p50 / base_p50
        headline = (metrics.get("latency") or {}).get("headline")
        if headline:
            row["latency_ms"] = headline["p50_ms"]  # the one the plot shows
        if metrics.get("onnx"):
            row["onnx_check"] = metrics["onnx"].get("validation")
        rows.append(row)
    return rows


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
    if key == "top1" and row.get("top1_delta"):
        text += f" ({row['top1_delta']:+.2f})"
    return text


def _columns(rows: list[dict]) -> list[tuple[str, str, str | None]]:
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
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


def plot(rows: list[dict], path: str) -> str:
    """Accuracy against MACs and against latency, one labelled point per artifact, as a PNG.

    Artifacts without a top-1 are left out (evaluate them first); the latency panel shows those
    that have a ``bench`` result. Written atomically.
    """
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("top1") is not None]
    if not points:
        raise DscompressError("nothing to plot: no artifact has a top-1 accuracy; run `dscompress evaluate DIR --data SPEC` first")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [(axes[0], "macs", "MACs per image (millions)", 1e-6), (axes[1], "latency_ms", "p50 latency (ms)", 1.0)]
    for ax, key, label, scale in panels:
        shown = [r for r in points if r.get(key) is not None]
        for r in shown:
            ax.scatter(r[key] * scale, r["top1"], s=40)
            ax.annotate(r["name"], (r[key] * scale, r["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        if not shown:
            ax.text(0.5, 0.5, "no latency measured\n(run dscompress bench)", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_title("accuracy vs compute")
    axes[1].set_title("accuracy vs latency")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
