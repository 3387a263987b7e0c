"""Configs and records are data, defined once.

A step's config is a dataclass deriving from :class:`StepConfig`. Its fields are, at once, the
command's options (``macs_budget`` is ``--macs-budget``; a bool ``bn`` is ``--bn/--no-bn``), the
recipe keys (``macs-budget`` or ``macs_budget``) and what an artifact's manifest records, so a
default, a help text and a check live in one place. Every value, from the command line (text),
a recipe (YAML) or Python, goes through :func:`coerce` against the field's type hint: choices
are ``Literal``s, lists accept ``1,32`` as well as ``[1, 32]``, and a wrong value is a
:class:`ConfigError` naming the option as the user wrote it.

A record (what a step did) derives from :class:`Record`: ``to_dict`` for manifests and JSON,
``from_dict`` to read one back, nested records included.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass
from typing import ClassVar, Literal

from dscompress.core.errors import DscompressError


def option(default=MISSING, help: str = "", *, factory=MISSING, repeat: bool = False, metavar: str | None = None):
    """A config field with its help text.

    Args:
        default / factory: the default value, or a function that makes it (for lists).
        help: one sentence for ``--help`` and the docs.
        repeat: for list fields, the option is given once per item (``--include a --include b``)
            instead of as one comma-separated value (``--batch-sizes 1,32``).
        metavar: the placeholder ``--help`` shows.
    """
    metadata = {"help": help, "repeat": repeat, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def flag_name(name: str) -> str:
    """``macs_budget`` -> ``--macs-budget``."""
    return "--" + name.replace("_", "-")


class ConfigError(DscompressError):
    """A bad config value; ``option`` is the field it concerns (None for a combination)."""

    def __init__(self, option: str | None, message: str):
        self.option = option
        self.message = message
        super().__init__(f"{flag_name(option)} {message}" if option else message)


# --- values --------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def describe(hint) -> str:
    """A readable name of a type hint: ``int | 'full'``, ``list of int``, ``magnitude|taylor``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"list of {describe(args[0])}" if args else "list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text", dict: "a mapping"}.get(hint, str(hint))


def coerce(value, hint, name: str, repeat: bool = False):
    """``value`` converted to the type ``hint`` describes, or a :class:`ConfigError` for ``name``.

    Text is parsed (``"2"`` -> 2, ``"true"`` -> True, ``"1,32"`` -> [1, 32]); values already of
    the type pass through; a bool is never taken for a number.
    """
    origin = typing.get_origin(hint)
    if value is None:
        if hint is type(None) or _is_optional(hint):
            return None
        raise ConfigError(name, "needs a value")
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        for member in members:
            try:
                return coerce(value, member, name, repeat)
            except ConfigError:
                continue
        raise ConfigError(name, f"must be {describe(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        if isinstance(value, str):
            items = [value] if repeat else [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif not repeat and args and args[0] in (int, float):
            items = [value]
        else:
            raise ConfigError(name, f"must be a list, got {value!r}")
        return [coerce(v, args[0], name) if args else v for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(name, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(name, f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(name, f"must be text, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(name, f"must be a mapping, got {value!r}")
    return value


# --- checks shared by configs --------------------------------------------------------------------


def check_range(name: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """Raise a :class:`ConfigError` unless ``value`` is finite and within the bounds (None: no bound)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        if high is None:
            bound = f"greater than {low}" if low_open else f"at least {low}"
        elif low is None:
            bound = f"less than {high}" if high_open else f"at most {high}"
        else:
            bound = f"in {left}{low}, {high}{right}"
        raise ConfigError(name, f"must be {bound}, got {value!r}")


# --- configs -------------------------------------------------------------------------------------


@dataclass
class StepConfig:
    """Base of every step's config.

    Class attributes:
        STEP: the step's name: the command, the recipe step kind and the manifest entry.
        VERSION: raised when a field changes meaning; a manifest written with a newer version is
            refused, one with an older version is read as it is.

    Subclasses put their checks in :meth:`check`, which runs after every field was coerced.
    """

    STEP: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            repeat = f.metadata.get("repeat", False)
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name, repeat))
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` for values out of range or that contradict each other."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict, version: int | None = None):
        """Build the config from a dict (option names with ``_`` or ``-``); unknown keys are refused."""
        if version is not None and version > cls.VERSION:
            raise DscompressError(
                f"this {cls.STEP} config has version {version}, newer than this dscompress reads ({cls.VERSION}); upgrade dscompress"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                options = ", ".join(flag_name(n)[2:] for n in known)
                raise ConfigError(None, f"unknown {cls.STEP} option {key!r} (known: {options})")
            values[name] = value
        return cls(**values)

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The fields, in order: each is one option."""
        return list(dataclasses.fields(cls))


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --- records -------------------------------------------------------------------------------------


class Record:
    """Mixin for record dataclasses: ``to_dict`` (with the properties named in ``DERIVED``) and a
    ``from_dict`` that rebuilds nested records from the type hints and ignores unknown keys."""

    DERIVED: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in self.DERIVED:
            data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = _rebuild(hints[f.name], data[f.name])
        return cls(**values)


def _rebuild(hint, value):
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return _rebuild(members[0], value) if len(members) == 1 else value
    if origin is list and isinstance(value, list):
        args = typing.get_args(hint)
        return [_rebuild(args[0], v) for v in value] if args else value
    if isinstance(hint, type) and issubclass(hint, Record) and isinstance(value, dict):
        return hint.from_dict(value)
    return value
