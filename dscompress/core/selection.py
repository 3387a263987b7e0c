"""Choosing layers by name: the one pattern vocabulary of ``--include``, ``--exclude`` and ``--ignore``.

A pattern is a glob (``layer4.*``) or a regular expression (``re:layer[34]\\..*``) matched
against fully qualified module names (``layer1.0.conv1``); a pattern also matches everything
below a name it matches (``layer4`` matches ``layer4.0.conv1``). :func:`make_filter` compiles
include/exclude lists to a torchao-style ``filter_fn(module, fqn) -> bool``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from torch import nn

from dscompress.core.errors import DscompressError

FilterFn = Callable[[nn.Module, str], bool]


def check_pattern(pattern: str) -> None:
    """Raise for a ``re:`` pattern that is not a valid regular expression."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise DscompressError(f"bad regular expression {pattern!r}: {e}") from None


def matches(name: str, pattern: str) -> bool:
    """Whether a layer name, or one of its parents, matches a glob or ``re:`` pattern."""
    parts = name.split(".")
    candidates = [".".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.fullmatch(c) for c in candidates)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def require_matches(patterns: Iterable[str], names: list[str], option: str, kind: str = "layer") -> None:
    """Raise when a pattern matches none of ``names``, showing what names look like."""
    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            example = names[0] if names else "layer1.0.conv1"
            raise DscompressError(
                f"{option} pattern {pattern!r} matches no {kind} ({kind}s are named like {example!r}; "
                "use a glob such as 'layer4.*' or a regex 're:...')"
            )


def make_filter(include: Iterable[str] = (), exclude: Iterable[str] = ()) -> FilterFn:
    """``filter_fn(module, fqn)``: True for names matching an include pattern (any, if none are
    given) and no exclude pattern."""
    include, exclude = list(include), list(exclude)

    def filter_fn(module: nn.Module, fqn: str) -> bool:
        if include and not matches_any(fqn, include):
            return False
        return not matches_any(fqn, exclude)

    return filter_fn


def outermost(names: Iterable[str]) -> list[str]:
    """The names not inside another of them (``layer4`` keeps, ``layer4.0.conv1`` goes), in order."""
    names = list(names)
    return [name for name in names if not any(name.startswith(other + ".") for other in names)]
