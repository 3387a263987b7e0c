"""dscompress: make trained PyTorch CNNs smaller and faster with depthwise-separable convolutions.

The names below are loaded on first use, so that ``import dscompress`` (and ``dscompress
--help``) does not import torch. Submodules load on first use too: ``dscompress.prune.prune``,
``dscompress.train.finetune`` work after a plain ``import dscompress``.
"""

import importlib
import sys
import types

__version__ = "0.2.0"

# Public name -> the module that defines it.
_API = {
    "Artifact": "dscompress.artifact",
    "Source": "dscompress.artifact",
    "load": "dscompress.artifact",
    "resolve": "dscompress.artifact",
    "save": "dscompress.artifact",
    "ConversionRecord": "dscompress.convert",
    "ConvertConfig": "dscompress.convert",
    "convert": "dscompress.convert",
    "convert_": "dscompress.convert",
    "DepthwiseSeparableConv2d": "dscompress.layers",
    "DscompressError": "dscompress.errors",
    "ModelSpec": "dscompress.models",
    "build_model": "dscompress.models",
    "convert_artifact": "dscompress.steps",
    "run_step": "dscompress.steps",
}
# Names that are both a function here and a submodule: the package attribute stays the function.
_FUNCTIONS = {"convert"}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """Keeps ``dscompress.convert`` the function when the submodule of that name is imported."""

    def __setattr__(self, name, value):
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
