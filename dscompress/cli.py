"""The ``dscompress`` command line: option parsing and rendering over the Python API.

Each command turns its options into the config dataclass of one module, calls that module's
function, and prints the record it returns (a rich table, or JSON with ``--json``).
"""

from __future__ import annotations

import functools
import json
import sys
import warnings

import click
from rich.console import Console

from dscompress import __version__
from dscompress.errors import DscompressError

# Wide enough for per-layer tables when the output is a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 140)


class Group(click.Group):
    """Reports a :class:`DscompressError` as one line and exit status 2, Ctrl-C as status 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DscompressError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def model_options(f):
    """The options every command that takes a MODEL accepts; artifact manifests supply them."""

    @click.option("--num-classes", type=int, default=None, help="Classifier outputs (default: the model's own).")
    @click.option("--input-size", default=None, help="C,H,W of one input image (default 3,224,224).")
    @click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="State dict to load (.pt/.pth/.safetensors).")
    @click.option("--weights", default=None, help="Torchvision weights name, e.g. DEFAULT (downloads).")
    @functools.wraps(f)
    def wrapper(*args, num_classes, input_size, checkpoint, weights, **kwargs):
        from dscompress.artifact import resolve
        from dscompress.models import parse_input_size

        size = parse_input_size(input_size) if input_size else None

        def load(model):
            return resolve(model, num_classes=num_classes, input_size=size, checkpoint=checkpoint, weights=weights)

        return f(*args, load_source=load, **kwargs)

    return wrapper


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dscompress")
def cli():
    """Make trained PyTorch CNNs smaller and faster: convert, prune, fine-tune, export, report."""
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


@cli.command()
def models():
    """List the torchvision models that can be named (user models: package.module:factory)."""
    from dscompress.models import list_models

    names = list_models()
    click.echo("\n".join(names))
    click.echo(f"\n{len(names)} torchvision models; your own: package.module:factory; or an artifact folder", err=True)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=True, help="Artifact folder to write.")
@click.option("--rank", default=None, help="Rank for every layer: a positive integer, or 'full' (exact).")
@click.option("--energy", type=float, default=None, help="Per layer, keep this share (0-1] of singular-value energy.")
@click.option("--macs-budget", type=float, default=None, help="Keep this share (0-1] of the converted layers' MACs.")
@click.option("--dilation", default="keep", show_default=True, help="keep, rf (same receptive field, 3x3 taps) or N.")
@click.option("--include", multiple=True, help="Only convert layers matching this glob or re: pattern (repeatable).")
@click.option("--exclude", multiple=True, help="Never convert layers matching this pattern (repeatable).")
@click.option("--min-channels", type=int, default=4, show_default=True, help="Skip convs with fewer input channels.")
@click.option("--trace", type=click.Choice(["auto", "fx", "hooks"]), default="auto", show_default=True, help="How layers are found.")
@click.option("--calibrate", "calibrate_data", metavar="DATA", default=None, help="Then calibrate on this dataset's train split (see `dscompress calibrate`).")
@click.option("--calib-batches", type=int, default=None, help="Batches of 32 images to calibrate on (default 16).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@model_options
def convert(model, out, rank, energy, macs_budget, dilation, include, exclude, min_channels, trace, calibrate_data, calib_batches, force, as_json, load_source):
    """Replace MODEL's convolutions by fitted depthwise-separable ones and save an artifact."""
    from dscompress.artifact import check_output
    from dscompress.convert import ConvertConfig, convert_artifact
    from dscompress.convert import conversion_table, conversion_totals

    config = ConvertConfig(
        rank=rank,
        energy=energy,
        macs_budget=macs_budget,
        dilation=dilation,
        include=list(include),
        exclude=list(exclude),
        min_channels=min_channels,
        trace=trace,
    )
    calibration = None
    if calibrate_data is None and calib_batches is not None:
        raise DscompressError("--calib-batches needs --calibrate DATA")
    if calibrate_data is not None:
        from dscompress.calibrate import CalibrateConfig

        calibration = CalibrateConfig(data=calibrate_data, batches=16 if calib_batches is None else calib_batches)
    check_output(out, force)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        if calibration is None:
            artifact, record = convert_artifact(load_source(model), out, config, force=force)
        else:
            from dscompress.calibrate import convert_calibrate_artifact

            artifact, record, calibration = convert_calibrate_artifact(load_source(model), out, config, calibration, force=force)
    for w in caught:
        if "cannot trace" in str(w.message):
            click.echo(f"warning: {w.message}", err=True)
    if as_json:
        extra = {"calibration": calibration.to_dict()} if calibration else {}
        print_json({**record.to_dict(), **extra, "output": artifact.path})
        return
    print_record(record, conversion_table, conversion_totals)
    if calibration is not None:
        from dscompress.calibrate import calibration_summary, calibration_table

        print_record(calibration, calibration_table, calibration_summary)
    console.print(f"saved {artifact.path}")


def print_record(record, table, summary) -> None:
    """A step's record as its rich table, then its summary lines."""
    console.print(table(record))
    for line in summary(record):
        console.print(line)


@cli.command()
@click.argument("artifact", metavar="DIR")
@click.option("--data", required=True, help="Dataset whose train split calibrates: digits, mnist:DIR, cifar10:DIR, ...")
@click.option("-o", "--output", "out", required=True, help="Artifact folder to write.")
@click.option("--batches", type=int, default=16, show_default=True, help="Batches of calibration images.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--ridge", type=float, default=1e-3, show_default=True, help="Pull of the refit towards the current weights.")
@click.option("--no-bn", is_flag=True, help="Keep the BatchNorm statistics as they are.")
@click.option("--no-refit", is_flag=True, help="Only re-estimate the BatchNorm statistics.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which images are drawn.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def calibrate(artifact, data, out, batches, batch_size, ridge, no_bn, no_refit, seed, device, force, as_json):
    """Refit a converted artifact to its original on real images, without training.

    Refits each converted layer's pointwise weights by least squares, in forward order, then
    re-estimates the BatchNorm statistics; prints each layer's output error before and after.
    """
    import os

    from dscompress.artifact import resolve
    from dscompress.calibrate import CalibrateConfig, calibrate_artifact, calibration_summary, calibration_table

    config = CalibrateConfig(data=data, batches=batches, batch_size=batch_size, bn=not no_bn, refit=not no_refit, ridge=ridge, seed=seed)
    if not os.path.isdir(artifact):
        raise DscompressError(
            f"{artifact!r} is not an artifact folder; calibration needs a converted artifact, which carries its "
            f"original: convert first (dscompress convert MODEL -o DIR), or convert with --calibrate {data}"
        )
    artifact_out, record = calibrate_artifact(resolve(artifact), out, config, force=force, device=device)
    if as_json:
        print_json({**record.to_dict(), "output": artifact_out.path})
        return
    print_record(record, calibration_table, calibration_summary)
    console.print(f"saved {artifact_out.path}")


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=True, help="Artifact folder to write.")
@click.option("--ratio", type=float, required=True, help="Share (0-1) of channels to remove from each prunable layer.")
@click.option("--importance", type=click.Choice(["magnitude", "taylor", "bn", "lamp"]), default="magnitude", show_default=True, help="How channels are ranked.")
@click.option("--global", "global_pruning", is_flag=True, help="Rank channels across all layers instead of within each.")
@click.option("--round-to", type=int, default=None, help="Keep channel counts multiples of N (e.g. 8).")
@click.option("--ignore", multiple=True, help="Keep the output channels of layers matching this glob or re: pattern (repeatable).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@model_options
def prune(model, out, ratio, importance, global_pruning, round_to, ignore, force, as_json, load_source):
    """Remove MODEL's least important channels (Torch-Pruning) and save an artifact.

    Layers that produce the model's output always keep their output channels.
    """
    from dscompress.artifact import check_output
    from dscompress.prune import PruneConfig, prune_artifact, prune_summary, prune_table

    config = PruneConfig(ratio=ratio, importance=importance, global_pruning=global_pruning, round_to=round_to, ignore=list(ignore))
    check_output(out, force)
    artifact, record = prune_artifact(load_source(model), out, config, force=force)
    if as_json:
        print_json({**record.to_dict(), "output": artifact.path})
        return
    print_record(record, prune_table, prune_summary)
    console.print(f"saved {artifact.path}")


@cli.command()
@click.argument("model")
@click.option("--data", required=True, help="Dataset: digits, mnist:DIR, cifar10:DIR, cifar100:DIR, imagefolder:DIR.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@model_options
def evaluate(model, data, batch_size, device, workers, as_json, load_source):
    """Top-1 and top-5 accuracy of MODEL (or an artifact, which records it) on the test split."""
    from dscompress.evaluate import evaluate_source

    record = evaluate_source(load_source(model), data, batch_size=batch_size, device=device, workers=workers)
    if as_json:
        print_json(record.to_dict())
    else:
        console.print(f"{model} on {record.data} ({record.images} test images): top-1 {record.top1:.2f}%  top-5 {record.top5:.2f}%")


@cli.command()
@click.argument("model")
@click.option("--data", required=True, help="Dataset: digits, mnist:DIR, cifar10:DIR, cifar100:DIR, imagefolder:DIR.")
@click.option("-o", "--output", "out", required=True, help="Artifact folder to write (checkpoints go to OUT.partial/ meanwhile).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--teacher", default="original", show_default=True, help="'original' (the uncompressed model MODEL keeps), 'none' (labels only: a baseline), or an artifact folder / model name.")
@click.option("--alpha", type=float, default=0.9, show_default=True, help="Weight of the distillation loss; 1 - alpha goes to the labels.")
@click.option("--temperature", type=float, default=4.0, show_default=True, help="Distillation temperature.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 0.05 for sgd, 1e-3 for adamw].")
@click.option("--schedule", type=click.Choice(["cosine", "onecycle"]), default="cosine", show_default=True)
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--weight-decay", type=float, default=None, help="[default: 5e-4 for sgd, 0.05 for adamw]")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Per process under torchrun.")
@click.option("--keep", type=click.Choice(["best", "last"]), default="best", show_default=True, help="Save the best epoch's weights (by test top-1) or the last.")
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default="auto", show_default=True, help="Mixed precision on CUDA (auto: bf16 if supported, else fp16).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUT.partial/.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists, and discard an unfinished run in OUT.partial/.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@model_options
def finetune(model, data, out, epochs, teacher, alpha, temperature, optimizer, lr, schedule, label_smoothing, weight_decay, batch_size, keep, amp, seed, device, workers, resume, force, as_json, load_source):
    """Fine-tune MODEL by distillation from its original (or train it: --teacher none) and save an artifact.

    Several GPUs or machines: torchrun --nproc-per-node N -m dscompress finetune ...
    """
    from dscompress.artifact import check_output
    from dscompress.train import FinetuneConfig, FinetuneInterrupted, finetune_artifact, finetune_summary, finetune_table

    config = FinetuneConfig(
        data=data, epochs=epochs, optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule=schedule,
        label_smoothing=label_smoothing, batch_size=batch_size, teacher=teacher, alpha=alpha, temperature=temperature,
        keep=keep, amp=amp, seed=seed, device=device, workers=workers,
    )
    check_output(out, force)
    try:
        artifact, record = finetune_artifact(load_source(model), out, config, force=force, resume=resume, progress=True)
    except FinetuneInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(130)
    if artifact is None:  # not rank 0 under torchrun
        return
    if as_json:
        print_json({**record.to_dict(), "output": artifact.path})
        return
    print_record(record, finetune_table, finetune_summary)
    console.print(f"saved {artifact.path}")


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--baseline", default=None, help="Artifact the ratios compare against (default: the first).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
@click.option("--plot", "plot_path", default=None, help="Also write accuracy vs MACs and vs latency to this PNG.")
def report(paths, baseline, as_json, markdown, plot_path):
    """Compare artifact folders, folders of them, or run folders side by side."""
    from dscompress import report as reporting

    rows = reporting.compare(list(paths), baseline=baseline)
    if plot_path:
        click.echo(f"plot: {reporting.plot(rows, plot_path)}", err=True)
    if as_json:
        click.echo(reporting.comparison_json(rows))
    elif markdown:
        click.echo(reporting.comparison_markdown(rows))
    else:
        console.print(reporting.comparison_table(rows))


def exit_failed(message: str) -> None:
    """A check ran and did not pass: one line and exit status 1 (2 is for bad input)."""
    click.echo(f"failed: {message}", err=True)
    sys.exit(1)


@cli.command()
@click.argument("model")
@click.option("--onnx", "out", required=True, help="ONNX file to write.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--batch", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size N.")
@click.option("--fp16", is_flag=True, help="Half-precision weights and activations (input and output stay float32).")
@click.option("--simplify", is_flag=True, help="Simplify with onnxslim; keeps NAME.unsimplified.onnx beside it.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True, help="auto: torch.export, falling back to TorchScript.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison with PyTorch on ONNX Runtime.")
@click.option("--providers", default="cpu", show_default=True, help="Validate on: cpu, cuda, tensorrt (comma-separated) or auto.")
@click.option("--force", is_flag=True, help="Replace the ONNX file if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@model_options
def export(model, out, opset, batch, fp16, simplify, exporter, no_validate, providers, force, as_json, load_source):
    """Export MODEL (a name or an artifact folder) to ONNX and validate it on ONNX Runtime."""
    from dscompress.artifact import check_output
    from dscompress.export import ExportConfig, ExportWarning, export_lines, export_source
    from dscompress.validate import validation_lines, validation_table

    config = ExportConfig(
        opset=opset, batch=batch, fp16=fp16, simplify=simplify, exporter=exporter, validate=not no_validate, providers=providers
    )
    check_output(out, force)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        record = export_source(load_source(model), out, config, force=force)
    for w in caught:
        if issubclass(w.category, ExportWarning):
            click.echo(f"warning: {w.message}", err=True)
    if as_json:
        print_json(record.to_dict())
    else:
        for line in export_lines(record):
            console.print(line)
        for label, validation in record.validations():
            title = f"{'before onnxslim: ' if label == 'unsimplified' else ''}ONNX Runtime vs PyTorch: {validation.status}"
            console.print(validation_table(validation, title=title))
            for line in validation_lines(validation):
                console.print(line)
    if record.validation_status in ("fail", "unavailable"):
        exit_failed(f"validation {record.validation_status}: {record.failure()}")


@cli.command()
@click.argument("onnx_file", metavar="ONNX")
@click.option("--against", required=True, help="MODEL or artifact folder the ONNX file was exported from.")
@click.option("--providers", default="auto", show_default=True, help="cpu, cuda, tensorrt (comma-separated) or auto.")
@click.option("--batch-sizes", default="1,3", show_default=True, help="Batch sizes to compare at.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default 1e-4 for fp32, 2e-2 for fp16).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default 1e-3 for fp32, 2e-2 for fp16).")
@click.option("--data", default=None, help="Also measure top-1 agreement on real images: digits, mnist:DIR, cifar10:DIR, ...")
@click.option("--data-limit", type=int, default=512, show_default=True, help="Test images used with --data.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@model_options
def validate(onnx_file, against, providers, batch_sizes, atol, rtol, data, data_limit, as_json, load_source):
    """Compare an ONNX file with the PyTorch model it came from, on each ONNX Runtime provider."""
    from dscompress.validate import ValidateConfig, read_onnx, validate_onnx, validation_lines, validation_table

    config = ValidateConfig(providers=providers, batch_sizes=batch_sizes, atol=atol, rtol=rtol, data=data, data_limit=data_limit)
    read_onnx(onnx_file)
    source = load_source(against)
    record = validate_onnx(onnx_file, source.model, source.spec.input_size, config)
    if as_json:
        print_json(record.to_dict())
    else:
        console.print(validation_table(record))
        for line in validation_lines(record):
            console.print(line)
    if not record.passed:
        exit_failed(f"validation {record.status}: {record.failure() or 'no provider ran'}")


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="MODEL|DIR|ONNX...")
@click.option("--providers", default="auto", show_default=True, help="ONNX Runtime providers: cpu, cuda, tensorrt, auto, or none.")
@click.option("--batch-sizes", default="1,32", show_default=True, help="Batch sizes to time.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per runtime and batch size.")
@click.option("--iters", type=int, default=50, show_default=True, help="Timed runs per runtime and batch size.")
@click.option("--threads", type=int, default=None, help="CPU threads for PyTorch and ONNX Runtime (default: PyTorch's).")
@click.option("--no-torch", is_flag=True, help="Time ONNX Runtime only.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@model_options
def bench(targets, providers, batch_sizes, warmup, iters, threads, no_torch, as_json, load_source):
    """Latency and throughput of models side by side, on PyTorch and ONNX Runtime."""
    import torch

    from dscompress import bench as benchmarking

    config = benchmarking.BenchConfig(
        providers=providers, batch_sizes=batch_sizes, warmup=warmup, iters=iters, threads=threads, torch=not no_torch
    )
    records = benchmarking.bench(benchmarking.load_targets(list(targets), load_source), config)
    if as_json:
        print_json([r.to_dict() for r in records])
        return
    console.print(benchmarking.bench_table(records))
    console.print(f"{benchmarking.machine()}; CPU threads: {config.threads or torch.get_num_threads()}")


@cli.command("run")
@click.argument("recipe_path", metavar="RECIPE")
@click.option("-o", "--output", "out", default=None, help="Run folder (default: runs/<recipe name>).")
@click.option("--set", "overrides", multiple=True, help="Override an option: STEP.key=value (a kind or step name) or model.key=value.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write report.png in the run folder.")
def run_recipe(recipe_path, out, overrides, device, plot):
    """Run a recipe end to end (continuing a stopped run) and print the comparison report."""
    import os

    from dscompress import recipe as recipes
    from dscompress import report as reporting
    from dscompress.pipeline import run

    recipe = recipes.load(recipe_path, list(overrides))
    out = out or os.path.join("runs", recipe.name or os.path.splitext(os.path.basename(recipe_path))[0])
    result = run(recipe, out, log=lambda line: console.print(line, highlight=False), device=device)
    rows = reporting.compare([out])
    markdown = reporting.comparison_markdown(rows)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown + "\n")
    console.print(reporting.comparison_table(rows))
    if plot:
        console.print(f"plot: {reporting.plot(rows, os.path.join(out, 'report.png'))}")
    done = sum(s.status == "done" for s in result.steps)
    console.print(f"{done} steps run, {len(result.steps) - done} skipped; report: {os.path.join(out, 'report.md')}")


def main():
    cli(prog_name="dscompress")


if __name__ == "__main__":
    main()
