"""The commands of the ``dscompress`` CLI, built from the step registry.

Each registered step (:mod:`dscompress.pipeline.steps`) becomes a command whose options are generated
from its config's fields (:func:`config_options`): one name, one default and one help text for
the CLI, recipes and manifests. A command only parses, runs the step and renders its record;
``models``, ``report`` and ``run`` are the commands that are not steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import typing
import warnings

import click

from dscompress.artifact.source import resolve
from dscompress.cli import report as reporting
from dscompress.cli.render import ConsoleProgress, render, stdout_console
from dscompress.core.config import StepConfig, describe, flag_name
from dscompress.core.errors import DscompressError, DscompressWarning
from dscompress.core.util import choose_threads, torch_threads
from dscompress.models.build import TIMM_PREFIX, model_tasks, parse_input_size
from dscompress.pipeline.recipe import load as load_recipe
from dscompress.pipeline.run import run
from dscompress.pipeline.steps import STEPS, StepContext, StepSpec, run_step

console = stdout_console()


def fail(message: str) -> None:
    """A check ran and did not pass: one line and exit status 1 (2 is for bad input)."""
    click.echo(f"failed: {message}", err=True)
    sys.exit(1)


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# --- options from configs ------------------------------------------------------------------------


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return ""
    if default is None or default == []:
        return ""
    if isinstance(default, bool):
        return f"[default: {'on' if default else 'off'}]"
    if isinstance(default, list):
        default = ",".join(map(str, default))
    return f"[default: {default}]"


def config_options(config: type[StepConfig], prefix: str = "", skip: tuple[str, ...] = ()) -> list[click.Option]:
    """One click option per config field: ``--name VALUE`` (values are checked by the config),
    ``--name/--no-name`` for a bool, repeatable for a list of patterns. Defaults stay in the config."""
    hints = typing.get_type_hints(config)
    options = []
    for f in config.options():
        if f.name in skip:
            continue
        flag = flag_name(prefix + f.name)
        help_text = " ".join(filter(None, [f.metadata.get("help", ""), _default_text(f)]))
        hint = hints[f.name]
        if hint is bool:
            options.append(click.Option([f"{flag}/--no-{flag[2:]}", prefix + f.name], default=None, help=help_text))
        elif f.metadata.get("repeat"):
            options.append(click.Option([flag, prefix + f.name], multiple=True, default=None, metavar="PATTERN", help=help_text))
        else:
            metavar = f.metadata.get("metavar") or describe(hint).replace("an integer", "N").replace("a number", "X").upper()
            if typing.get_origin(hint) is list:
                metavar = "A,B,..."
            options.append(click.Option([flag, prefix + f.name], default=None, metavar=metavar, help=help_text))
    return options


def config_values(kwargs: dict, config: type[StepConfig], prefix: str = "") -> dict:
    """The options the user gave (removed from ``kwargs``), by field name."""
    values = {}
    for f in config.options():
        value = kwargs.pop(prefix + f.name, None)
        if value is not None and value != ():
            values[f.name] = list(value) if isinstance(value, tuple) else value
    return values


MODEL_OPTIONS = [
    click.Option(["--num-classes"], default=None, type=int, help="Classifier outputs [default: the model's own]."),
    click.Option(["--input-size"], default=None, metavar="C,H,W", help="Size of one input image [default: 3,224,224]."),
    click.Option(["--checkpoint"], default=None, metavar="FILE", help="State dict to load (.pt/.pth with weights_only, or .safetensors)."),
    click.Option(["--weights"], default=None, help="Torchvision weights name, e.g. DEFAULT (these download)."),
    click.Option(["--task"], default=None, type=click.Choice(["classification", "segmentation"]),
                 help="What the model predicts [default: known for torchvision names, else classification]; a factory of "
                      "segmentation models (logits N,K,H,W) says segmentation."),
    click.Option(["--aux"], is_flag=True, default=False,
                 help="Segmentation (DeepLabV3, FCN): build the auxiliary head, trained by finetune (--aux-weight), never exported."),
]


THREADS_OPTION = click.Option(["--threads"], type=int, default=None, metavar="N",
                              help="CPU threads for torch and ONNX Runtime [default: the CPUs that are free].")


@contextlib.contextmanager
def threads_for(requested: int | None):
    """Use ``requested`` CPU threads, or those that are free, for the block (then what was set
    before); when that is fewer than all, or more than are free, a note says so once the work is done."""
    threads, note = choose_threads(requested)
    with torch_threads(threads):
        yield threads
    if note:
        click.echo(f"note: {note}", err=True)


def model_loader(kwargs: dict):
    """``load(name)`` for the model options the user gave (removed from ``kwargs``)."""
    num_classes = kwargs.pop("num_classes")
    size = kwargs.pop("input_size")
    checkpoint = kwargs.pop("checkpoint")
    weights = kwargs.pop("weights")
    task = kwargs.pop("task")
    aux = kwargs.pop("aux")
    size = parse_input_size(size) if size else None
    return functools.partial(resolve, num_classes=num_classes, input_size=size, checkpoint=checkpoint, weights=weights, task=task, aux=aux)


# --- step commands -------------------------------------------------------------------------------


def step_command(spec: StepSpec) -> click.Command:
    """The command of one registered step."""
    params: list[click.Parameter] = []
    if spec.inputs == "model":
        params.append(click.Argument(["model"], metavar="MODEL"))
    elif spec.inputs == "onnx":
        params += [click.Argument(["onnx_file"], metavar="ONNX"),
                   click.Option(["--against"], required=True, metavar="MODEL", help="MODEL or artifact folder the ONNX file was exported from.")]
    else:
        params.append(click.Argument(["targets"], nargs=-1, required=True, metavar="MODEL|DIR|ONNX..."))
    params += MODEL_OPTIONS
    if spec.output == "artifact":
        params.append(click.Option(["-o", "--output", "out"], required=True, metavar="DIR", help="Artifact folder to write."))
    elif spec.output == "file":
        params.append(click.Option(["-o", "--output", "--onnx", "out"], required=True, metavar="FILE", help="File to write."))
    params += config_options(spec.config)
    for name in spec.chains:
        chained = STEPS[name].config
        params.append(click.Option([f"--{name}", f"{name}_data"], default=None, metavar="SPEC",
                                   help=f"Then {name} on this dataset, into the same artifact; its options are those of `dscompress {name}` prefixed with {name}-."))
        params += config_options(chained, prefix=f"{name}_", skip=("data",))
    if spec.resumable:
        params.append(click.Option(["--resume"], is_flag=True, help="Continue the interrupted run in OUT.partial/."))
    if not any(f.name == "threads" for f in spec.config.options()):
        params.append(THREADS_OPTION)
    if spec.output != "none":
        params.append(click.Option(["--force"], is_flag=True, help="Replace the output if it exists."))
    params.append(click.Option(["--json", "as_json"], is_flag=True, help="Print the record as JSON."))
    return click.Command(spec.config.STEP, params=params, callback=functools.partial(_run_step_command, spec),
                         help=spec.help, short_help=spec.summary)


def _run_step_command(spec: StepSpec, **kwargs) -> None:
    load = model_loader(kwargs)
    as_json = kwargs.pop("as_json")
    own_threads = any(f.name == "threads" for f in spec.config.options())  # bench times with its own
    with threads_for(None if own_threads else kwargs.pop("threads")):
        _run(spec, load, as_json, kwargs)


def _run(spec: StepSpec, load, as_json: bool, kwargs: dict) -> None:
    chained = []
    for name in spec.chains:
        data = kwargs.pop(f"{name}_data")
        values = config_values(kwargs, STEPS[name].config, prefix=f"{name}_")
        if data is not None:
            chained.append(STEPS[name].config.from_dict({**values, "data": data}))
        elif values:
            raise DscompressError(f"{', '.join(flag_name(f'{name}_{k}') for k in values)} needs --{name} SPEC")
    config = spec.config.from_dict(config_values(kwargs, spec.config))
    context = StepContext(out=kwargs.pop("out", None), force=kwargs.pop("force", False), resume=kwargs.pop("resume", False),
                          progress=ConsoleProgress(), onnx=kwargs.pop("onnx_file", None),
                          targets=list(kwargs.pop("targets", ())), load=load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DscompressWarning)
        source = None
        if spec.inputs == "model":
            source = load(kwargs.pop("model"))
        elif spec.inputs == "onnx":
            source = load(kwargs.pop("against"))
        output = run_step(source, config, context, then=chained)
    for w in caught:
        if issubclass(w.category, DscompressWarning):
            click.echo(f"warning: {w.message}", err=True)
    if not output.save:  # under torchrun, only rank 0 writes and prints
        return
    if as_json:
        data = output.record.to_dict()
        for name, record in output.chained.items():
            data[name] = record.to_dict()
        if output.artifact is not None and spec.makes_model:
            data["output"] = output.artifact.path
        print_json(data)
    else:
        for record in [output.record, *output.chained.values()]:
            for item in render(record):
                console.print(item, highlight=False)
        if output.artifact is not None and spec.makes_model:
            console.print(f"saved {output.artifact.path}", highlight=False)
    plot_path = getattr(config, "plot", None)
    if plot_path:
        click.echo(f"plot: {reporting.PLOTS[type(output.record)](output.record, plot_path)}", err=True)
    if output.failure:
        fail(output.failure)


STEP_COMMANDS = {name: functools.partial(step_command, spec) for name, spec in STEPS.items()}


# --- commands that are not steps -----------------------------------------------------------------


@click.command()
@click.option("--task", default=None, type=click.Choice(["classification", "segmentation"]), help="Only the models of this task.")
def models(task):
    """List the models that can be named (your own: package.module:factory)."""
    tasks = {name: kind for name, kind in model_tasks().items() if task in (None, kind)}
    width = max(map(len, tasks), default=0)
    click.echo("\n".join(f"{name:<{width}}  {kind}" for name, kind in tasks.items()))
    click.echo(f"\n{len(tasks)} torchvision models; also {TIMM_PREFIX}NAME (with timm installed), package.module:factory "
               "(--task segmentation for per-pixel models), or an artifact folder", err=True)


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--baseline", default=None, help="Artifact the ratios compare against (default: the first).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
@click.option("--plot", "plot_path", default=None, help="Also write accuracy vs MACs and vs latency to this PNG.")
@click.option("--profile", "show_profiles", is_flag=True, help="Also show the per-layer profiles the artifacts keep (dscompress profile).")
def report(paths, baseline, as_json, markdown, plot_path, show_profiles):
    """Compare artifact folders, folders of them, or run folders side by side."""
    rows = reporting.compare(list(paths), baseline=baseline)
    if show_profiles:
        for record in reporting.stored_profiles(rows):
            for item in render(record):
                console.print(item, highlight=False)
    if plot_path:
        click.echo(f"plot: {reporting.plot(rows, plot_path)}", err=True)
    if as_json:
        click.echo(reporting.comparison_json(rows))
    elif markdown:
        click.echo(reporting.comparison_markdown(rows))
    else:
        console.print(reporting.comparison_table(rows))


@click.command("run")
@click.argument("recipe_path", metavar="RECIPE")
@click.option("-o", "--output", "out", default=None, help="Run folder (default: runs/<recipe name>).")
@click.option("--set", "overrides", multiple=True, help="Override an option: STEP.key=value (a kind or step name), model.key=value or data=SPEC.")
@click.option("--device", default=None, help="auto, cpu or cuda, for the steps that take a device and whose recipe does not say.")
@click.option("--plot/--no-plot", default=True, help="Write report.png in the run folder. [default: on]")
@click.option("--threads", type=int, default=None, metavar="N", help="CPU threads for torch and ONNX Runtime [default: the CPUs that are free].")
@click.option("--json", "as_json", is_flag=True, help="Print what each step did as JSON.")
def run_recipe(recipe_path, out, overrides, device, plot, threads, as_json):
    """Run a recipe end to end (continuing a stopped run) and print the comparison report."""
    recipe = load_recipe(recipe_path, list(overrides))
    with threads_for(threads):
        _run_recipe(recipe, recipe_path, out, device, plot, as_json)


def _run_recipe(recipe, recipe_path: str, out: str | None, device: str | None, plot: bool, as_json: bool) -> None:
    out = out or os.path.join("runs", recipe.name or os.path.splitext(os.path.basename(recipe_path))[0])
    log = (lambda line: click.echo(line, err=True)) if as_json else (lambda line: console.print(line, highlight=False))
    result = run(recipe, out, log=log, device=device, progress=ConsoleProgress())
    rows = reporting.compare([out])
    reporting.write_markdown(rows, os.path.join(out, "report.md"))
    plot_file = reporting.plot(rows, os.path.join(out, "report.png")) if plot else None
    if as_json:
        print_json({**result.to_dict(), "report": os.path.join(out, "report.md"), "plot": plot_file, "rows": rows})
        return
    console.print(reporting.comparison_table(rows))
    if plot_file:
        console.print(f"plot: {plot_file}", highlight=False)
    done = sum(s.status == "done" for s in result.steps)
    console.print(f"{done} steps run, {len(result.steps) - done} skipped; report: {os.path.join(out, 'report.md')}", highlight=False)


OTHER_COMMANDS = {"models": models, "report": report, "run": run_recipe}


def get_command(name: str) -> click.Command | None:
    """The command called ``name``, built on demand."""
    if name in STEP_COMMANDS:
        return STEP_COMMANDS[name]()
    return OTHER_COMMANDS.get(name)


def summaries() -> dict[str, str]:
    """Every command's one-line help, as ``dscompress --help`` lists it."""
    lines = {name: spec.summary for name, spec in STEPS.items()}
    lines.update({name: (command.help or "").strip().splitlines()[0] for name, command in OTHER_COMMANDS.items()})
    return lines
