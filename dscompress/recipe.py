"""Recipes: a whole pipeline in one YAML file, validated before anything runs.

A recipe names the model and an ordered list of steps, each a one-key mapping from the step kind
to its options, with the same option names as the CLI (``macs-budget`` or ``macs_budget``)::

    model: {name: resnet18, num_classes: 10, input_size: [3, 32, 32]}
    data: digits                 # default --data for the steps that take one
    steps:
      - finetune: {name: baseline, teacher: none, epochs: 3}
      - convert: {rank: 1}
      - calibrate: {batches: 8}
      - finetune: {epochs: 5}
      - export: {}

Every problem (an unknown key, a wrong type, a missing value) is reported with its path in the
file and its line, e.g. ``recipe.yaml:7: steps[1].convert.rnak: unknown option (known: ...)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from dataclasses import dataclass

import yaml

from dscompress.errors import DscompressError

# Step kind -> (module, config class). Options not in the config class but listed in
# STEP_EXTRAS are handled by the pipeline itself.
STEP_CONFIGS = {
    "convert": ("dscompress.convert", "ConvertConfig"),
    "calibrate": ("dscompress.calibrate", "CalibrateConfig"),
    "prune": ("dscompress.prune", "PruneConfig"),
    "finetune": ("dscompress.train", "FinetuneConfig"),
    "export": ("dscompress.export", "ExportConfig"),
    "validate": ("dscompress.validate", "ValidateConfig"),
    "bench": ("dscompress.bench", "BenchConfig"),
    "evaluate": (None, None),
}
STEP_EXTRAS = {
    "evaluate": {"data": str, "batch_size": int},
}
# Options every step takes: a name for its output folder.
COMMON = {"name": str}
MODEL_KEYS = {"name": str, "num_classes": int, "input_size": list, "checkpoint": str, "weights": str}
TOP_KEYS = {"name", "description", "model", "data", "steps"}


@dataclass
class Step:
    """One step of a recipe: its kind, options (config field names) and output folder name."""

    kind: str
    options: dict
    name: str
    line: int = 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "options": self.options}


@dataclass
class Recipe:
    path: str
    model: dict
    steps: list[Step]
    data: str | None = None
    name: str = ""
    description: str = ""


def config_class(kind: str):
    module_name, class_name = STEP_CONFIGS[kind]
    if module_name is None:
        return None
    return getattr(importlib.import_module(module_name), class_name)


def step_fields(kind: str) -> dict[str, object]:
    """Option name -> type hint for a step kind."""
    cls = config_class(kind)
    fields = {}
    if cls is not None:
        hints = typing.get_type_hints(cls)
        fields = {f.name: hints.get(f.name, object) for f in dataclasses.fields(cls) if f.init}
    return {**fields, **STEP_EXTRAS.get(kind, {}), **COMMON}


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


def _type_ok(value, hint) -> bool:
    if hint is object or hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    return re.sub(r"typing\.|<class '([^']+)'>", r"\1", str(hint)).replace("NoneType", "None")


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
        for key, value in model.items():
            if key not in MODEL_KEYS:
                problem(("model", key), f"unknown key (known: {', '.join(MODEL_KEYS)})")
            elif value is not None and not isinstance(value, MODEL_KEYS[key]):
                problem(("model", key), f"expected {MODEL_KEYS[key].__name__}, got {type(value).__name__} {value!r}")
        if not model.get("name"):
            problem(("model",), "missing required key 'name'")
    if data.get("data") is not None and not isinstance(data["data"], str):
        problem(("data",), f"expected a dataset spec such as 'digits', got {data['data']!r}")
    steps = []
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        problem(("steps",), "missing: a list of steps such as '- convert: {rank: 1}'")
        raw_steps = []
    names = set()
    for i, raw in enumerate(raw_steps):
        at = ("steps", i)
        if not isinstance(raw, dict) or len(raw) != 1:
            problem(at, "each step is one mapping such as 'convert: {rank: 1}'")
            continue
        kind, options = next(iter(raw.items()))
        options = {} if options is None else options
        if kind not in STEP_CONFIGS:
            problem(at + (kind,), f"unknown step (known: {', '.join(STEP_CONFIGS)})")
            continue
        if not isinstance(options, dict):
            problem(at + (kind,), f"options must be a mapping, got {options!r}")
            continue
        known = step_fields(kind)
        clean = {}
        for key, value in options.items():
            name = str(key).replace("-", "_")
            if name not in known:
                problem(at + (kind, key), f"unknown option (known: {', '.join(k.replace('_', '-') for k in known)})")
            elif not _type_ok(value, known[name]):
                problem(at + (kind, key), f"expected {_type_name(known[name])}, got {type(value).__name__} {value!r}")
            else:
                clean[name] = value
        step_name = clean.pop("name", None) or f"{i + 1:02d}-{kind}"
        if step_name in names:
            problem(at + (kind,), f"step name {step_name!r} is used twice")
        names.add(step_name)
        if kind == "validate" and not any(s.kind == "export" for s in steps):
            problem(at + (kind,), "validate needs an export step before it")
        if kind in ("calibrate", "evaluate") and not (clean.get("data") or data.get("data")):
            problem(at + (kind,), "needs data: give 'data' here or at the top of the recipe")
        steps.append(Step(kind, clean, step_name, lines.get(at, 0)))
    if not problems:
        for step in steps:
            _check_config(step, data.get("data"), path, problems)
    if problems:
        raise DscompressError(("\n".join(problems)) if len(problems) > 1 else problems[0])
    return Recipe(path, model, steps, data.get("data"), data.get("name", ""), data.get("description", ""))


def step_config(step: Step, default_data: str | None):
    """The step's config dataclass instance (None for steps without one)."""
    cls = config_class(step.kind)
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    options = {k: v for k, v in step.options.items() if k in names}
    if "data" in names and options.get("data") is None and default_data:
        options["data"] = default_data
    return cls(**options)


def _check_config(step: Step, default_data, path: str, problems: list[str]) -> None:
    try:
        step_config(step, default_data)
    except DscompressError as e:
        problems.append(f"{path}:{step.line}: steps.{step.name}: {e}")
    except (TypeError, ValueError) as e:
        problems.append(f"{path}:{step.line}: steps.{step.name}: {e}")


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
