"""Showing records: bench tables that never cut names, one note for runtimes that cannot run, and
progress that prints plain lines where there is no terminal."""

import io

import torchvision
from rich.console import Console

from dscompress.cli.render import ConsoleProgress, render, stdout_console
from dscompress.compress.convert import convert
from dscompress.deploy.bench import BenchRecord, BenchResults

LONG = "runs/quickstart/planned-distilled-with-a-long-name"


def shown(items, width=200) -> str:
    """What a pipe or a file gets: ``stdout_console`` is 200 columns wide when stdout is not a terminal."""
    out = io.StringIO()
    console = Console(file=out, width=width, soft_wrap=True, force_terminal=False)
    for item in items:
        console.print(item, highlight=False)
    return out.getvalue()


def test_bench_names_are_never_cut_and_unusable_runtimes_are_one_line():
    ok = dict(status="ok", p50_ms=2.0, p90_ms=2.1, p99_ms=2.2, mean_ms=2.0, images_per_s=500.0, ort_threads=1)
    results = BenchResults("x86_64, 2 CPUs", [
        BenchRecord("baseline", "ort-cpu", 1, **ok),
        BenchRecord(LONG, "ort-cpu", 1, **{**ok, "p50_ms": 1.0}),
        *[BenchRecord(target, runtime, 1, status="skipped", reason=f"{runtime} is not in this onnxruntime build (a long reason)")
          for target in ("baseline", LONG) for runtime in ("ort-cuda", "ort-trt", "torch-cuda")],
    ])
    text = shown(render(results))
    assert LONG in text and "…" not in text
    narrow = shown(render(results), width=90)  # too narrow for the table: the name folds, never cut
    first_column = "".join(line.split("│")[1].strip() for line in narrow.splitlines() if line.startswith("│"))
    assert LONG in first_column and "…" not in narrow, narrow
    assert "0.50x" in text  # ratio to the first model, as the header says
    notes = [line for line in text.splitlines() if "cannot run here" in line]
    assert notes == ["auto: ort-cuda, ort-trt, torch-cuda cannot run here (the --json records have each reason)"]
    assert "not in this onnxruntime build" not in text


def test_results_console_is_wide_outside_a_terminal():
    assert stdout_console().width >= 200 or stdout_console().is_terminal


def test_progress_prints_plain_lines_without_a_terminal():
    out = io.StringIO()
    progress = ConsoleProgress(Console(file=out, force_terminal=False, width=120), every=0.0)
    progress.start("calibrate", 4)
    for step in range(4):
        progress.advance(status=f"layer {step}")
    progress.stop()
    progress.line("epoch 1/1: loss 0.31")
    lines = out.getvalue().splitlines()
    assert lines[:3] == [f"  calibrate: {n}/4 layer {n - 1} (about {lines[n - 1].split('about ')[1]}" for n in (1, 2, 3)]
    assert lines[-1] == "epoch 1/1: loss 0.31" and len(lines) == 4  # nothing at 4/4: the step's result follows


def test_convert_golden_totals():
    """The one test of convert's wording: a real resnet18 at rank 1, its totals as printed."""
    _, record = convert(torchvision.models.resnet18(num_classes=10), (3, 32, 32))
    text = shown(render(record))
    assert "params: 11.18M -> 1.45M (0.13x of the original)" in text
    assert "MACs:   37.02M -> 6.87M (0.19x" in text
