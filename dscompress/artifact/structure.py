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
LAYER_TYPES = {"DepthwiseSeparableConv2d": DepthwiseSeparableConv2d, "Conv2d": nn.Conv2d, "Identity": nn.Identity}


def _conv_args(conv: nn.Conv2d) -> dict:
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride), "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
            "dilation": list(conv.dilation), "groups": conv.groups, "bias": conv.bias is not None, "padding_mode": conv.padding_mode}


def _swapped(module: nn.Module, reference: nn.Module | None) -> dict | None:
    """The entry of a module swapped for another type, or for a conv that gained a bias (a
    BatchNorm folded into it: the BatchNorm is an ``nn.Identity`` now); None for any other."""
    if isinstance(module, DepthwiseSeparableConv2d):
        return {"type": type(module).__name__, "args": module.constructor_args()}
    if type(module) is nn.Identity and reference is not None and type(reference) is not nn.Identity:
        return {"type": "Identity", "args": {}}
    if type(module) is nn.Conv2d and isinstance(reference, nn.Conv2d) and (module.bias is None) != (reference.bias is None):
        return {"type": "Conv2d", "args": _conv_args(module)}
    return None


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
        reference = base_modules.get(name)
        swapped = _swapped(module, reference)
        if swapped is not None:
            structure[name] = swapped
            continue
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
            if cls is nn.Conv2d:  # a bias gained, its device and dtype those of the conv it replaces
                old = model.get_submodule(name)
                args.update(device=old.weight.device, dtype=old.weight.dtype)
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
