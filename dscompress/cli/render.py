"""Showing records: one renderer per record type, and progress on the console.

``render(record)`` returns what the CLI prints for a step's record: rich tables and lines, from
the renderer registered for the record's type with :func:`renders`. ``--json`` prints
``record.to_dict()`` instead. Ratios follow one convention everywhere: ``this / reference``
(``0.25x`` is a quarter of the reference), with the reference named in the table's title.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dscompress.compress.calibrate import CalibrationRecord
from dscompress.compress.convert import ConversionRecord
from dscompress.compress.equalize import EqualizeRecord
from dscompress.compress.prune import PruneRecord
from dscompress.compress.units import PlannedConversion
from dscompress.core.config import Record
from dscompress.core.util import Progress as ProgressBase
from dscompress.core.util import human
from dscompress.deploy.bench import BenchResults
from dscompress.deploy.export import ExportRecord
from dscompress.deploy.profile import ProfileRecord
from dscompress.deploy.quantize import QuantizeRecord
from dscompress.deploy.validate import ValidationRecord
from dscompress.planning.plan import PlanRecord
from dscompress.train.evaluate import EvalRecord
from dscompress.train.finetune import FinetuneRecord

Renderer = Callable[[Record], list]
RENDERERS: dict[type, Renderer] = {}


def renders(record_type: type):
    """Register the decorated function as the renderer of ``record_type``."""

    def register(renderer: Renderer) -> Renderer:
        RENDERERS[record_type] = renderer
        return renderer

    return register


def render(record: Record) -> list:
    """Rich tables and lines that show ``record`` (its type's registered renderer)."""
    for cls in type(record).__mro__:
        if cls in RENDERERS:
            return RENDERERS[cls](record)
    raise TypeError(f"no renderer is registered for {type(record).__name__}")


def ratio(after: float, before: float) -> str:
    """``after / before`` as ``0.25x``."""
    return f"{after / before:.2f}x" if before else "-"


def table(title: str, columns: list[str], left: tuple[str, ...] = ()) -> Table:
    """A table whose named columns are left-aligned and the rest right-aligned; names are never cut."""
    result = Table(title=title)
    for name in columns:
        result.add_column(name, justify="left" if name in left else "right", overflow="fold")
    return result


# --- one renderer per record --------------------------------------------------------------------


def _dims(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else str(values)


@renders(ConversionRecord)
def _conversion(record: ConversionRecord) -> list:
    shown = table(f"converted {len(record.layers)} conv layers (traced with {record.trace})",
                  ["layer", "kernel", "dilation", "rank", "params", "MACs", "fit error"], left=("layer",))
    for layer in record.layers:
        kernel = "x".join(map(str, layer.kernel_before))
        if layer.kernel_after != layer.kernel_before:
            kernel += " -> " + "x".join(map(str, layer.kernel_after))
        dilation = _dims(layer.dilation_before)
        if layer.dilation_after != layer.dilation_before:
            dilation += " -> " + _dims(layer.dilation_after)
        shown.add_row(layer.name, kernel, dilation, f"{layer.rank}/{layer.full_rank}",
                      f"{human(layer.params_before)} -> {human(layer.params_after)}",
                      f"{human(layer.macs_before)} -> {human(layer.macs_after)}", f"{layer.fit_error:.4f}")
    lines = [
        f"params: {human(record.params_before)} -> {human(record.params_after)} ({ratio(record.params_after, record.params_before)} of the original)",
        f"MACs:   {human(record.macs_before)} -> {human(record.macs_after)} ({ratio(record.macs_after, record.macs_before)} of the original)",
    ]
    if record.layers:
        lines.append(
            f"converted layers' MACs: {human(record.converted_macs_before)} -> {human(record.converted_macs_after)} "
            f"({ratio(record.converted_macs_after, record.converted_macs_before)})"
        )
    if record.skipped:
        reasons: dict[str, list[str]] = {}
        for s in record.skipped:
            reasons.setdefault(s["reason"], []).append(s["name"])
        lines.append("skipped: " + "; ".join(f"{', '.join(n[:3])}{' ...' if len(n) > 3 else ''} ({r})" for r, n in reasons.items()))
    if record.trace_note:
        lines.append(f"note: {record.trace_note}")
    return [shown, *lines]


@renders(CalibrationRecord)
def _calibration(record: CalibrationRecord) -> list:
    shown = table(f"calibrated {len(record.layers)} layers on {record.images} images ({' then '.join(record.order)}); change = after / before - 1",
                  ["layer", "error before", "error after", "change"], left=("layer",))
    for layer in record.layers:
        change = f"{layer.error_after / layer.error_before - 1:+.1%}" if layer.error_before else "-"
        shown.add_row(layer.name, f"{layer.error_before:.4f}", f"{layer.error_after:.4f}", change)
    lines = []
    if record.output_error_before is not None:
        lines.append(f"output error vs the original: {record.output_error_before:.4f} -> {record.output_error_after:.4f}")
    if record.agreement_before is not None:
        lines.append(f"same top-1 class as the original: {record.agreement_before:.1f}% -> {record.agreement_after:.1f}% of {record.agreement_over}")
    if record.config.get("bn"):
        lines.append(f"BatchNorm statistics re-estimated in {record.bn_layers} layers" if record.bn_reestimated else "no BatchNorm layers to re-estimate")
    worse = [layer.name for layer in record.layers if layer.error_after > layer.error_before]
    if worse and record.bn_reestimated:
        lines.append(
            f"{len(worse)} layers moved away from the original: if it was not trained on this data, its BatchNorm "
            "statistics do not describe it; calibrate with --no-bn"
        )
    if record.skipped:
        lines.append("skipped: " + "; ".join(f"{s['name']} ({s['reason']})" for s in record.skipped))
    lines.append(f"took {record.seconds:.1f}s")
    return [shown, *lines]


@renders(EqualizeRecord)
def _equalize(record: EqualizeRecord) -> list:
    shown = table(f"equalized {len(record.layers)} layers and {len(record.pairs)} conv pairs (ranges of the {record.ranges}"
                  + (f", {record.images} images)" if record.images else ")"),
                  ["layer", "channels", "spread", "scales"], left=("layer",))
    for layer in record.layers:
        shown.add_row(layer.name, str(layer.channels), f"{layer.spread_before:g} -> {layer.spread_after:g}",
                      f"{layer.smallest_scale:g} .. {layer.largest_scale:g}")
    for pair in record.pairs:
        shown.add_row(f"{pair.producer} -> {pair.consumer}", str(pair.channels), f"{pair.spread_before:g} -> {pair.spread_after:g}",
                      f"{pair.smallest_scale:g} .. {pair.largest_scale:g}")
    entries = [*record.layers, *record.pairs]
    worst = max((entry.spread_before for entry in entries), default=1.0)
    after = max((entry.spread_after for entry in entries), default=1.0)
    lines = [shown, f"largest channel spread: {worst:g} -> {after:g} (largest / smallest channel range; the fp32 function is unchanged)"]
    reasons: dict[str, list[str]] = {}
    for skipped in record.skipped:
        reasons.setdefault(skipped["reason"], []).append(skipped["name"])
    for reason, names in reasons.items():
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        lines.append(f"{len(names)} conv pairs left alone: {reason} ({', '.join(names[:2])}{more})")
    return lines


@renders(PruneRecord)
def _prune(record: PruneRecord) -> list:
    layers = [layer for layer in record.layers if layer.type not in ("BatchNorm2d", "BatchNorm1d", "LayerNorm")]
    changed = sum(layer.changed for layer in layers)
    how = "globally" if record.config["global_pruning"] else "per layer"
    shown = table(f"pruned {changed} of {len(layers)} layers ({record.config['importance']}, ratio {record.config['ratio']} {how})",
                  ["layer", "type", "in", "out", "params", "MACs"], left=("layer", "type"))
    for layer in layers:
        groups = f" g{layer.groups_after}" if layer.groups_after and layer.groups_after > 1 else ""
        kind = layer.type + (f" r{layer.rank}" if layer.rank else "") + groups
        shown.add_row(
            layer.name, kind,
            f"{layer.in_before} -> {layer.in_after}" if layer.in_after != layer.in_before else str(layer.in_before),
            f"{layer.out_before} -> {layer.out_after}" if layer.out_after != layer.out_before else str(layer.out_before),
            f"{human(layer.params_before)} -> {human(layer.params_after)}",
            f"{human(layer.macs_before)} -> {human(layer.macs_after)}",
        )
    return [
        shown,
        f"params: {human(record.params_before)} -> {human(record.params_after)} ({ratio(record.params_after, record.params_before)}); "
        f"MACs: {human(record.macs_before)} -> {human(record.macs_after)} ({ratio(record.macs_after, record.macs_before)})",
        "outputs kept: " + ", ".join(f"{k['name']} ({k['reason']})" for k in record.kept),
    ]


# Per task: (title, EpochRecord field) of the training, validation and test score columns, and
# (title, FinetuneRecord field) of the start, kept and teacher scores.
_EPOCH_COLUMNS = {
    "classification": [("train top-1", "train_top1"), ("val top-1", "val_top1"), ("test top-1", "test_top1"), ("test top-5", "test_top5")],
    "segmentation": [("train pixel acc", "train_pixel_acc"), ("val mIoU", "val_miou"), ("test mIoU", "test_miou"),
                     ("test pixel acc", "test_pixel_acc")],
}
_HEADLINES = {"classification": ("top-1", "start_top1", "top1", "teacher_top1"), "segmentation": ("mIoU", "start_miou", "miou", "teacher_miou")}


@renders(FinetuneRecord)
def _finetune(record: FinetuneRecord) -> list:
    how = f"distilled from {record.teacher}" if record.teacher else "trained on labels"
    validation = record.val_images > 0
    scores = [(title, key) for title, key in _EPOCH_COLUMNS[record.task] if validation or not key.startswith("val_")]
    columns = ["epoch", "lr", "train loss"] + [title for title, _ in scores] + ["img/s", "seconds"]
    shown = table(f"fine-tuned for {len(record.epochs)} epochs, {how} ({record.device}, {record.precision})", columns)
    for e in record.epochs:
        mark = " *" if e.epoch == record.kept_epoch else ""
        cells = [f"{getattr(e, key):.2f}" if getattr(e, key) is not None else "-" for _, key in scores]
        shown.add_row(f"{e.epoch}{mark}", f"{e.lr:.3g}", f"{e.train_loss:.4f}", *cells, f"{e.images_per_s:,.0f}", f"{e.seconds:.1f}")
    chosen = f"best on {record.val_images} held-out training images" if record.keep == "best" else "the last"
    name, start, kept, teacher = _HEADLINES[record.task]
    lines = [f"test {name}: {getattr(record, start):.2f}% before -> {getattr(record, kept):.2f}% (epoch {record.kept_epoch}, {chosen}; * above)"]
    start_val = getattr(record, "start_val_" + kept)
    kept_epoch = next((e for e in record.epochs if e.epoch == record.kept_epoch), None)
    if start_val is not None and kept_epoch is not None and getattr(kept_epoch, "val_" + kept) is not None:
        kept_val = getattr(kept_epoch, "val_" + kept)
        below = "  BELOW ITS START" if record.below_start else ""
        lines.append(f"val {name} ({record.val_images} held-out training images): {start_val:.2f}% before -> {kept_val:.2f}%{below}")
    if getattr(record, teacher) is not None:
        lines.append(f"teacher {name}: {getattr(record, teacher):.2f}%")
    extra = f", resumed after epoch {', '.join(map(str, record.resumed_at))}" if record.resumed_at else ""
    lines.append(f"took {record.seconds:.1f}s on {record.world_size} process(es){extra}")
    return [shown, *lines]


@renders(EvalRecord)
def _evaluation(record: EvalRecord) -> list:
    if record.task == "segmentation":
        return [f"{record.data} ({record.images} test images, {record.pixels:,} scored pixels): mIoU {record.miou:.2f}%  "
                f"pixel accuracy {record.pixel_acc:.2f}%"]
    return [f"{record.data} ({record.images} test images): top-1 {record.top1:.2f}%  top-5 {record.top5:.2f}%"]


@renders(ValidationRecord)
def _validation(record: ValidationRecord, title: str | None = None) -> list:
    shown = table(title or f"ONNX Runtime vs PyTorch: {record.status} ({record.precision}, atol {record.atol:g}, rtol {record.rtol:g})",
                  ["provider", "status", "batch", "output", "max |diff|", "mean |diff|", "median |diff|", "max rel", "outside tol"],
                  left=("provider", "status", "output"))
    for result in record.providers:
        for d in result.diffs:
            size = 1
            for v in d.shape:
                size *= v
            shown.add_row(result.provider, "pass" if d.passed else "fail", str(d.batch_size), d.name, f"{d.max_abs:.2e}",
                          f"{d.mean_abs:.2e}", f"{d.median_abs:.2e}", f"{d.max_rel:.2e}", f"{d.mismatched}/{size}")
    lines = []
    unusable = [r for r in record.providers if r.status in ("unavailable", "skipped")]
    asked = [r for r in unusable if r.status == "unavailable"]
    lines += [f"{r.provider} unavailable: {r.reason}" for r in asked]
    skipped = [r.provider for r in unusable if r.status == "skipped"]
    if skipped:
        lines.append(f"auto: {', '.join(skipped)} cannot run here (the --json record has each reason)")
    lines += [f"note: {note}" for note in record.notes if not note.startswith("auto skipped")]
    for result in record.providers:
        a = result.agreement
        if a and a.get("over") == "pixels":
            line = f"{result.provider}: per-pixel argmax agreement with PyTorch {a['agreement']:.2f}% on {a['predictions']:,} pixels of {a['images']} images"
            if "onnx_top1" in a:
                line += f" (pixel accuracy: ONNX {a['onnx_top1']:.2f}%, PyTorch {a['torch_top1']:.2f}%)"
            lines.append(line)
        elif a:
            line = f"{result.provider}: top-1 agreement with PyTorch {a['agreement']:.2f}% on {a['images']} images"
            if "onnx_top1" in a:
                line += f" (top-1 accuracy: ONNX {a['onnx_top1']:.2f}%, PyTorch {a['torch_top1']:.2f}%)"
            lines.append(line)
    return [shown, *lines]


@renders(ExportRecord)
def _export(record: ExportRecord) -> list:
    shape = "x".join(str(v) for v in record.input_shape)
    lines = [
        f"wrote {record.path}: {record.size_bytes / 1e6:.2f} MB, {record.nodes} nodes, opset {record.opset}, "
        f"exporter {record.exporter}, input {shape}, {record.precision}"
    ]
    if record.kept_aside:
        lines.append(f"not validated, so kept beside the requested {record.requested_path} (which is left as it was)")
    if record.external_data:
        lines.append(f"weights in {record.external_data} beside it (over 2 GB)")
    if record.fallback_reason:
        lines.append(f"torch.export failed ({record.fallback_reason}); used the TorchScript exporter")
    if record.same_pad_fixed:
        lines.append(f"rewrote {len(record.same_pad_fixed)} SAME-padded dilated Conv node(s) to explicit pads")
    if record.same_pad_dilation:
        lines.append(f"warning: ONNX Runtime will reject {len(record.same_pad_dilation)} SAME-padded dilated Conv node(s): {', '.join(record.same_pad_dilation[:3])}")
    if record.unsimplified_path:
        lines.append(f"onnxslim: {record.nodes_unsimplified} -> {record.nodes} nodes; unsimplified graph kept at {record.unsimplified_path}")
    if record.validation_status == "not run":
        lines.append("not validated (--no-validate)")
    out = list(lines)
    for label, validation in record.validations():
        title = f"{'before onnxslim: ' if label == 'unsimplified' else ''}ONNX Runtime vs PyTorch: {validation.status}"
        out += _validation(validation, title=title)
    return out


@renders(QuantizeRecord)
def _quantize(record: QuantizeRecord) -> list:
    shown = table(f"INT8 for {record.runtime}: {len(record.quantized)} of {len(record.nodes)} weighted layers quantized",
                  ["layer", "op", "int8", "kernel", "why float"], left=("layer", "op", "int8", "kernel", "why float"))
    for row in record.nodes:
        shown.add_row(row.module, row.op, "yes" if row.quantized else "no", row.kernel or "-", row.reason)
    verdict = "within" if record.passed else "over"
    lines = [
        f"{record.data} ({record.test_images} test images, ONNX Runtime CPU): top-1 fp32 {record.fp32_top1:.2f}%  int8 {record.int8_top1:.2f}%  "
        f"drop {record.drop:.2f} points ({verdict} --max-drop {record.max_drop:g})  agreement {record.agreement:.2f}%  "
        f"logit error {record.logit_error:.4f} (mean {record.logit_shift:.4f}) of their spread",
        f"calibrated on {record.calibrate_images} train images ({record.calibrate_method}"
        f"{', 7-bit weights for a CPU without VNNI' if record.reduce_range else ''}"
        f"{f', {record.equalized} layers equalized first' if record.equalized else ''}"
        f"{f', {record.bias_corrected} biases corrected' if record.bias_corrected else ''}); fp32 {record.fp32_bytes / 1e6:.2f} MB -> "
        f"int8 {record.int8_bytes / 1e6:.2f} MB ({ratio(record.int8_bytes, record.fp32_bytes)}) in {record.seconds:.1f}s",
        f"wrote {record.path}" + ("" if record.passed else f" (not at {record.requested_path})"),
    ]
    lines += [f"note: {note}" for note in record.notes]
    return [shown, *lines]


@renders(BenchResults)
def _bench(results: BenchResults) -> list:
    records = results.results
    first: dict[tuple[str, int], float] = {}
    for r in records:
        if r.status == "ok":
            first.setdefault((r.runtime, r.batch_size), r.p50_ms)
    shown = table("latency per batch (ms) and throughput; vs first = this p50 / the first model's (same runtime and batch)",
                  ["model", "runtime", "batch", "p50", "p90", "p99", "images/s", "vs first"], left=("model", "runtime"))
    for r in sorted(records, key=lambda r: (r.batch_size, r.runtime)):
        if r.status != "ok":
            continue
        shown.add_row(r.target, r.runtime + (f" {r.precision}" if r.precision != "fp32" else ""), str(r.batch_size), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
                      f"{r.images_per_s:,.1f}", ratio(r.p50_ms, first[r.runtime, r.batch_size]))
    lines = []
    unusable = sorted({(r.runtime, r.status, r.reason) for r in records if r.status != "ok"})
    skipped = sorted({runtime for runtime, status, _ in unusable if status == "skipped" and "fixed batch" not in _})
    if skipped:
        lines.append(f"auto: {', '.join(skipped)} cannot run here (the --json records have each reason)")
    lines += [f"{runtime} {status}: {reason}" for runtime, status, reason in unusable if status != "skipped" or "fixed batch" in reason]
    threads = next((r.torch_threads or r.ort_threads for r in records if r.status == "ok"), None)
    lines.append(f"{results.machine}; CPU threads: {threads}")
    lines += [f"warning: {note}" for note in results.notes]
    return [shown, *lines]


@renders(ProfileRecord)
def _profile(record: ProfileRecord) -> list:
    shown = table(f"per-layer time on {record.runtime}{' INT8 (QDQ)' if record.precision == 'int8' else ''} ({record.device}), batch {record.batch_size}, "
                  f"{'x'.join(map(str, record.input_size))}, {record.threads} thread(s); median over runs",
                  ["layer", "op", "ms", "share", "MACs", "GMAC/s", "convertible"], left=("layer", "op"))
    for layer in record.layers:
        shown.add_row(layer.name, layer.op, f"{layer.ms:.3f}", f"{layer.share:.1%}", human(layer.macs) if layer.macs else "-",
                      f"{layer.gmacs_per_s:.1f}" if layer.gmacs_per_s else "-", "yes" if layer.convertible else "")
    difference = record.unattributed_ms
    return [
        shown,
        f"whole model: {record.total_ms:.3f} ms (no profiler); layers sum to {record.layer_sum_ms:.3f} ms "
        f"({'+' if difference >= 0 else ''}{difference:.3f} ms between them{'' if difference >= 0 else ': the profiler costs more than what it leaves out'})",
        f"convertible layers: {record.convertible_ms:.3f} ms ({record.convertible_ms / record.layer_sum_ms:.1%} of the layers' time); "
        f"the bound: at most {record.bound_speedup:.2f}x faster if they took no time",
        *[f"note: {note}" for note in record.notes],
    ]


@renders(PlanRecord)
def _plan(record: PlanRecord) -> list:
    timed = record.original_ms is not None
    unit_of = {layer: unit for unit in record.units for layer in unit.layers}
    shown = table(f"plan for {record.target} on {record.runtime} ({record.device}); damage = KL of the output with the unit's option alone, refitted",
                  ["layer", "choice", "in", "out", "MACs", "predicted ms" if timed else "", "unit damage"], left=("layer", "choice"))
    for layer in record.layers:
        unit = unit_of[layer.name]
        first = unit.layers[0] == layer.name
        shown.add_row(layer.name, layer.choice, str(layer.in_channels), str(layer.out_channels), human(layer.macs),
                      f"{layer.predicted_ms:.4f}" if layer.predicted_ms is not None else "",
                      (f"{unit.damage:.4f}" if unit.damage is not None else "-") if first else "")
    lines = []
    if timed:
        measured = f"{record.measured_ms:.3f} ms, {record.measured_speedup:.2f}x" if record.measured_ms else "not measured"
        lines.append(f"original {record.original_ms:.3f} ms; planned: predicted {record.predicted_ms:.3f} ms ({record.predicted_speedup:.2f}x), "
                     f"measured {measured} (side by side, {record.config['latency_batch']} image(s) per run)")
    lines.append(f"MACs: {human(record.macs_before)} -> {human(record.macs_after)} ({ratio(record.macs_after, record.macs_before)})")
    predicted = f"predicted {record.damage_predicted:.4f} (sum over units)" if record.damage_predicted is not None else "not predicted"
    lines.append(f"damage: {predicted}, measured {record.damage_measured:.4f} "
                 f"({record.agreement_measured:.1f}% same top class as the original) once calibrated")
    if record.options_measured is not None:
        lines.append(f"options' damage measured: {record.options_measured} on all held-out images, {record.options_screened} on the first "
                     f"batch only (far behind another at no more cost), {record.options_slower} not at all (predicted no faster than dense)")
    if record.precision != "fp32":
        images = (record.int8_calibration or {}).get("images")
        lines.append(f"precision: {record.precision}, ONNX Runtime's QDQ graph of the plan"
                     + (f" calibrated on {images} of the calibration images" if images else "")
                     + "; `export` writes it so (--precision fp32: the float graph)")
    if record.top1_before is not None:
        lines.append(f"top-1 on the test split: {record.top1_before:.2f}% original -> {record.top1_after:.2f}% planned and calibrated"
                     f"{' (its INT8 graph on ONNX Runtime)' if record.precision == 'int8' else ''}, no training")
    checked = [c for c in record.candidates if c.damage is not None]
    if len(checked) > 1:
        lines.append("checked as whole models, calibrated: " + "; ".join(
            f"{c.label} {f'{c.measured:.3f} ms' if timed else human(c.measured) + ' MACs'}, damage {c.damage:.4f}{' (kept)' if c.chosen else ''}"
            for c in checked))
    if len(record.rounds) > 1:
        lines.append("rounds: " + "; ".join(f"budget {r.budget_ms:.3f}: predicted {r.predicted_ms:.3f}, measured {r.measured_ms:.3f}" for r in record.rounds))
    lines += [f"note: {note}" for note in record.notes]
    lines.append(f"took {record.seconds:.1f}s")
    return [shown, *lines]


@renders(PlannedConversion)
def _planned_conversion(record: PlannedConversion) -> list:
    changed = {name: choice for name, choice in record.layers.items() if choice != "dense"}
    return [
        f"applied {record.plan}: " + (", ".join(f"{name} {choice}" for name, choice in changed.items()) or "every layer stays dense"),
        f"params: {human(record.params_before)} -> {human(record.params_after)} ({ratio(record.params_after, record.params_before)}); "
        f"MACs: {human(record.macs_before)} -> {human(record.macs_after)} ({ratio(record.macs_after, record.macs_before)})",
    ]


# --- progress -----------------------------------------------------------------------------------


class ConsoleProgress(ProgressBase):
    """A rich progress bar on a terminal; otherwise a plain line every ``every`` seconds (for logs)."""

    def __init__(self, console: Console | None = None, every: float = 30.0):
        self.console = console or Console(stderr=True)
        self.every = every
        self.bar = self.task = None
        self.description = ""
        self.total = self.done = 0
        self.started = self.last = 0.0

    def start(self, description: str, total: int) -> None:
        self.description, self.total, self.done = description, total, 0
        self.started = self.last = time.perf_counter()
        if self.console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                                TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(description, total=total, status="")

    def advance(self, steps: int = 1, status: str = "") -> None:
        self.done += steps
        if self.bar is not None:
            self.bar.update(self.task, advance=steps, status=status)
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate if rate else 0
            self.console.print(f"  {self.description}: {self.done}/{self.total} {status} (about {left:.0f}s left)", highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = self.task = None

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    """The console for results: as wide as the terminal, and never cutting text in files or pipes."""
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=not sys.stdout.isatty())
