"""Module surgery: how a model differs in structure from a fresh build of its spec, and giving a
fresh model that structure.

An artifact stores weights, not modules, so it records what a fresh ``build_model(spec)`` lacks:
swapped layers by type with their constructor arguments, and resized layers (after pruning) with
their new attributes. :func:`structure_of` writes that record (the manifest's ``structure``,
:mod:`dscompress.artifact.format`) and :func:`apply_structure` replays it before the weights load.
It works on modules alone, no files, so the folder format and the sources build on it.
"""

from __future__ import annotations

import torch
from torch import nn

from dscompress.core.errors import DscompressError
from dscompress.nn.layers import DepthwiseSeparableConv2d, named_layers

# Module attributes that structural changes (pruning) edit; recorded when they differ.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "normalized_shape")
LAYER_TYPES = {"DepthwiseSeparableConv2d": DepthwiseSeparableConv2d}


def _shape_attrs(module: nn.Module) -> dict:
    out = {}
    for attr in SHAPE_ATTRS:
        value = module.__dict__.get(attr)
        if value is not None:
            out[attr] = list(value) if isinstance(value, tuple) else value
    return out


def structure_of(model: nn.Module, base: nn.Module) -> dict:
    """How ``model`` differs in structure from ``base``, a fresh build of the same spec."""
    base_modules = dict(base.named_modules())
    structure = {}
    for name, module in named_layers(model):  # not inside a swapped layer (a resized block is looked into)
        if isinstance(module, DepthwiseSeparableConv2d):
            structure[name] = {"type": type(module).__name__, "args": module.constructor_args()}
            continue
        reference = base_modules.get(name)
        if reference is None:
            raise DscompressError(f"module {name!r} has no counterpart in the spec's model; cannot save it")
        attrs = _shape_attrs(module)
        if attrs != _shape_attrs(reference) or _tensor_shapes(module) != _tensor_shapes(reference):
            structure[name] = {"attrs": attrs}
    return structure


def _tensor_shapes(module: nn.Module) -> dict:
    """Shapes of a module's own parameters and buffers (not its children's)."""
    tensors = {**module._parameters, **module._buffers}
    return {k: tuple(v.shape) for k, v in tensors.items() if v is not None}


def apply_structure(model: nn.Module, structure: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """Give a fresh model the recorded structure and tensors of the stored shapes."""
    for name, entry in structure.items():
        if "type" in entry:
            cls = LAYER_TYPES.get(entry["type"])
            if cls is None:
                raise DscompressError(f"artifact names an unknown layer type {entry['type']!r}; upgrade dscompress")
            args = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["args"].items()}
            model.set_submodule(name, cls(**args))
        else:
            module = model.get_submodule(name)
            for attr, value in entry["attrs"].items():
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        if owner_name not in structure or "attrs" not in structure[owner_name]:
            continue  # only recorded modules change shape; anything else is a mismatch to report
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            continue  # reported by check_state_dict
        current = getattr(owner, attr, None)
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            replacement = torch.empty(tensor.shape, dtype=current.dtype)
            if isinstance(current, nn.Parameter):
                setattr(owner, attr, nn.Parameter(replacement, requires_grad=current.requires_grad))
            else:
                owner._buffers[attr] = replacement
    return model
