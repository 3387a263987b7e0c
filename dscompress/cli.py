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
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@model_options
def convert(model, out, rank, energy, macs_budget, dilation, include, exclude, min_channels, trace, force, as_json, load_source):
    """Replace MODEL's convolutions by fitted depthwise-separable ones and save an artifact."""
    from dscompress.artifact import check_output
    from dscompress.convert import ConvertConfig, convert_artifact
    from dscompress.report import conversion_table, conversion_totals

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
    check_output(out, force)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        artifact, record = convert_artifact(load_source(model), out, config, force=force)
    for w in caught:
        if "cannot trace" in str(w.message):
            click.echo(f"warning: {w.message}", err=True)
    if as_json:
        print_json({**record.to_dict(), "output": artifact.path})
        return
    console.print(conversion_table(record))
    for line in conversion_totals(record):
        console.print(line)
    console.print(f"saved {artifact.path}")


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
    from dscompress.prune import PruneConfig, prune_artifact
    from dscompress.report import human

    config = PruneConfig(ratio=ratio, importance=importance, global_pruning=global_pruning, round_to=round_to, ignore=list(ignore))
    check_output(out, force)
    artifact, record = prune_artifact(load_source(model), out, config, force=force)
    if as_json:
        print_json({**record.to_dict(), "output": artifact.path})
        return
    console.print(_prune_table(record))
    console.print(
        f"params: {human(record.params_before)} -> {human(record.params_after)} ({record.params_ratio:.1%} kept); "
        f"MACs: {human(record.macs_before)} -> {human(record.macs_after)} ({record.macs_ratio:.1%} kept)"
    )
    console.print("outputs kept: " + ", ".join(f"{k['name']} ({k['reason']})" for k in record.kept))
    console.print(f"saved {artifact.path}")


def _prune_table(record):
    """Per-layer channels of a :class:`~dscompress.prune.PruneRecord` (norm layers follow their conv)."""
    from rich.table import Table

    from dscompress.report import human

    shown = [layer for layer in record.layers if layer.type not in ("BatchNorm2d", "BatchNorm1d", "LayerNorm")]
    changed = sum(layer.changed for layer in shown)
    how = "globally" if record.config["global_pruning"] else "per layer"
    table = Table(title=f"pruned {changed} of {len(shown)} layers ({record.config['importance']}, ratio {record.config['ratio']} {how})")
    for title in ("layer", "type", "in", "out", "params", "MACs"):
        table.add_column(title, justify="left" if title in ("layer", "type") else "right")
    for layer in shown:
        kind = layer.type + (f" r{layer.rank}" if layer.rank else "") + (f" g{layer.groups_after}" if layer.groups_after and layer.groups_after > 1 else "")
        table.add_row(
            layer.name,
            kind,
            f"{layer.in_before} -> {layer.in_after}" if layer.in_after != layer.in_before else str(layer.in_before),
            f"{layer.out_before} -> {layer.out_after}" if layer.out_after != layer.out_before else str(layer.out_before),
            f"{human(layer.params_before)} -> {human(layer.params_after)}",
            f"{human(layer.macs_before)} -> {human(layer.macs_after)}",
        )
    return table


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
@click.argument("paths", nargs=-1, required=True)
@click.option("--baseline", default=None, help="Artifact the ratios compare against (default: the first).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
def report(paths, baseline, as_json, markdown):
    """Compare artifact folders (or folders of them) side by side."""
    from dscompress import report as reporting

    rows = reporting.compare(list(paths), baseline=baseline)
    if as_json:
        click.echo(reporting.comparison_json(rows))
    elif markdown:
        click.echo(reporting.comparison_markdown(rows))
    else:
        console.print(reporting.comparison_table(rows))


def main():
    cli(prog_name="dscompress")


if __name__ == "__main__":
    main()
