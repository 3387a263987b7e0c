"""Recipes: a whole pipeline in one YAML file, validated before anything runs.

A recipe names the model and an ordered list of steps, each a one-key mapping from the step's
name to its options. The options are the step's config fields, spelt as on the command line
(``macs-budget``, or ``macs_budget``)::

    model: {name: resnet18, num_classes: 10, input_size: [3, 32, 32]}
    data: digits                 # default data for the steps that take it
    steps:
      - finetune: {name: baseline, teacher: none, epochs: 3}
      - convert: {rank: 1}
      - calibrate: {batches: 8}
      - finetune: {epochs: 5}
      - export: {}

``name`` names a step's output folder; ``from`` makes a step start from an earlier step's model
instead of the latest one (to compare branches from one baseline). Every problem (an unknown key, a wrong type, a value out
of range) is reported with its path in the file and its line, e.g.
``recipe.yaml:7: steps[1].convert.rnak: unknown option (known: ...)``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import yaml

from dscompress.core.config import ConfigError, coerce, flag_name
from dscompress.core.errors import DscompressError
from dscompress.models.build import ModelSpec
from dscompress.pipeline.steps import STEPS

# The recipe-wide defaults a step's config takes when it has the field and the step does not set it.
DEFAULTS = ("data", "device")
TOP_KEYS = {"name", "description", "model", "data", "steps"}
# Steps that cannot run without images (their config's data has no default).
NEEDS_DATA = ("calibrate", "evaluate", "plan", "quantize")
MODEL_KEYS = [f.name for f in dataclasses.fields(ModelSpec)]


@dataclass
class Step:
    """One step of a recipe: its kind, options (config field names), output folder name, and the
    earlier step whose model it starts from (None: the latest model)."""

    kind: str
    options: dict
    name: str
    line: int = 0
    start: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "options": self.options, **({"from": self.start} if self.start else {})}


@dataclass
class Recipe:
    path: str
    model: dict
    steps: list[Step]
    data: str | None = None
    name: str = ""
    description: str = ""

    def config(self, step: Step, device: str | None = None):
        """The step's config, with the recipe's data (and a device) where the step does not say."""
        cls = STEPS[step.kind].config
        options = dict(step.options)
        fields = {f.name for f in dataclasses.fields(cls)}
        defaults = {"data": self.data, "device": device}
        for name in DEFAULTS:
            if name in fields and options.get(name) is None and defaults[name] is not None:
                options[name] = defaults[name]
        return cls.from_dict(options)


def _line_map(node, path=(), lines=None) -> dict:
    """(path tuple) -> 1-based line, for every node of a composed YAML document."""
    lines = {} if lines is None else lines
    if node is None:
        return lines
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[path + (key.value,)] = key.start_mark.line + 1
            _line_map(value, path + (key.value,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), lines)
    return lines


def _where(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def parse(text: str, path: str = "<recipe>", overrides: list[str] = ()) -> Recipe:
    """Parse and validate a recipe; raise one :class:`DscompressError` listing every problem."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise DscompressError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    lines = _line_map(node)
    if not isinstance(data, dict):
        raise DscompressError(f"{path}: a recipe is a mapping with 'model' and 'steps'")
    for override in overrides:
        _apply_override(data, override)
    problems: list[str] = []

    def problem(at: tuple, message: str) -> None:
        line = next((lines[at[:i]] for i in range(len(at), -1, -1) if at[:i] in lines), None)
        problems.append(f"{path}{f':{line}' if line else ''}: {_where(at) or 'recipe'}: {message}")

    for key in data:
        if key not in TOP_KEYS:
            problem((key,), f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    model = data.get("model")
    if not isinstance(model, dict):
        problem(("model",), "missing: a mapping with at least 'name'")
        model = {}
    else:
        _check_model(model, problem)
    if data.get("data") is not None and not isinstance(data["data"], str):
        problem(("data",), f"expected a dataset spec such as 'digits', got {data['data']!r}")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        problem(("steps",), "missing: a list of steps such as '- convert: {rank: 1}'")
        raw_steps = []
    steps = _parse_steps(raw_steps, data.get("data"), lines, problem)
    recipe = Recipe(path, model, steps, data.get("data"), data.get("name", ""), data.get("description", ""))
    if not problems:
        _check_configs(recipe, problem)
    if problems:
        raise DscompressError("\n".join(problems))
    return recipe


def _parse_steps(raw_steps: list, default_data: str | None, lines: dict, problem) -> list[Step]:
    """The recipe's steps, each checked on its own and against those before it (names, ``from``,
    an export before validate, data where a step needs it); ``problem(at, message)`` collects."""
    steps, names = [], set()
    for i, raw in enumerate(raw_steps):
        at = ("steps", i)
        if not isinstance(raw, dict) or len(raw) != 1:
            problem(at, "each step is one mapping such as 'convert: {rank: 1}'")
            continue
        kind, options = next(iter(raw.items()))
        options = {} if options is None else options
        if kind not in STEPS:
            problem(at + (kind,), f"unknown step (known: {', '.join(STEPS)})")
            continue
        if not isinstance(options, dict):
            problem(at + (kind,), f"options must be a mapping, got {options!r}")
            continue
        step_name = options.get("name") or f"{i + 1:02d}-{kind}"
        if step_name in names:
            problem(at + (kind,), f"step name {step_name!r} is used twice")
        names.add(step_name)

        def option_problem(key, message, at=at, kind=kind):
            problem(at + (kind, key), message)

        start = options.get("from")
        models_before = [step.name for step in steps if STEPS[step.kind].makes_model]
        if start is not None and start not in models_before:
            problem(at + (kind, "from"), f"names no earlier step that makes a model (earlier: {', '.join(models_before) or 'none'})")
        clean = _check_options(kind, {k: v for k, v in options.items() if k not in ("name", "from")}, option_problem)
        if kind == "validate" and not any(s.kind == "export" for s in steps):
            problem(at + (kind,), "validate needs an export step before it")
        if kind in NEEDS_DATA and not (clean.get("data") or default_data):
            problem(at + (kind,), "needs data: give 'data' here or at the top of the recipe")
        steps.append(Step(kind, clean, step_name, lines.get(at, 0), start))
    return steps


def _check_configs(recipe: Recipe, problem) -> None:
    """Build every step's config, so that a value its own check rejects is found before anything runs."""
    for i, step in enumerate(recipe.steps):
        try:
            recipe.config(step)
        except ConfigError as e:
            key = flag_name(e.option)[2:] if e.option else None
            at = ("steps", i, step.kind) + ((key,) if key else ())
            problem(at, e.message)
        except DscompressError as e:
            problem(("steps", i, step.kind), str(e))


def _check_model(model: dict, problem) -> None:
    hints = typing.get_type_hints(ModelSpec)
    for key, value in model.items():
        if key not in MODEL_KEYS:
            problem(("model", key), f"unknown key (known: {', '.join(MODEL_KEYS)})")
            continue
        try:
            coerce(value, hints[key] | None, key)
        except ConfigError as e:
            problem(("model", key), e.message)
    if not model.get("name"):
        problem(("model",), "missing required key 'name'")


def _check_options(kind: str, options: dict, problem) -> dict:
    """The options with ``_`` names, after checking each one's name and type."""
    cls = STEPS[kind].config
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    clean = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            problem(key, f"unknown option (known: {', '.join(flag_name(n)[2:] for n in fields)})")
            continue
        try:
            coerce(value, hints[name], name, fields[name].metadata.get("repeat", False))
        except ConfigError as e:
            problem(key, e.message)
            continue
        clean[name] = value
    return clean


def _apply_override(data: dict, override: str) -> None:
    """``--set KIND_OR_NAME.key=value`` (every step of that kind, or the named one), ``model.key=value``
    or ``data=SPEC``."""
    target, eq, value_text = override.partition("=")
    if eq and target == "data":
        data["data"] = value_text
        return
    step, dot, key = target.partition(".")
    if not eq or not dot or not key:
        raise DscompressError(f"--set {override!r}: write STEP.key=value, model.key=value or data=SPEC, e.g. finetune.epochs=1")
    value = yaml.safe_load(value_text) if value_text else None
    if step == "model":
        data.setdefault("model", {})[key] = value
        return
    hit = False
    for i, raw in enumerate(data.get("steps") or []):
        if isinstance(raw, dict) and len(raw) == 1:
            kind, options = next(iter(raw.items()))
            options = options if isinstance(options, dict) else {}
            if step in (kind, options.get("name") or f"{i + 1:02d}-{kind}"):
                options[key] = value
                raw[kind] = options
                hit = True
    if not hit:
        raise DscompressError(f"--set {override!r}: no step of kind or name {step!r} in the recipe")


def load(path: str, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise DscompressError(f"cannot read recipe {path!r}: {e.strerror}") from None
    return parse(text, path, overrides)
