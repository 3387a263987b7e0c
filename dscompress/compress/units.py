"""Units of a model: the layers a plan chooses for together, their options, and applying them (a
plan's layout is a transform like any other, so it lives beside convert and prune).

A unit is a conv whose output channels feed one other conv alone (a pair: ``layer1.0.conv1`` ->
``layer1.0.conv2`` in a ResNet block), so that the pair's channels can be pruned without touching
the rest of the model; or a single convertible conv. An :class:`Option` gives each of a unit's
layers a rank (or keeps it dense) and a pair a share of channels to prune. A *layout* (the
content of ``plan.json``) records an option per unit and the channels kept, enough to build the
planned model again bitwise (:func:`build`).
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field

import torch_pruning as tp
from torch import nn

from dscompress.core.config import Record
from dscompress.core.errors import DscompressError
from dscompress.nn.graph import ConvCall, ModelGraph
from dscompress.nn.layers import DepthwiseSeparableConv2d
from dscompress.nn.metrics import count_macs, count_params

PLAN_FORMAT = "dscompress-plan"
PLAN_VERSION = 1


def round_channels(channels: int, ratio: float, multiple: int = 8) -> int:
    """``channels`` with ``ratio`` of them removed, rounded down to a multiple (at least one multiple)."""
    kept = int(channels * (1 - ratio))
    return max(multiple, kept // multiple * multiple) if channels > multiple else max(1, kept)


@dataclass
class Unit:
    """Layers chosen together: a producer conv and the conv that alone consumes its outputs (whose
    channels, and their BatchNorms', can be pruned), or one convertible conv."""

    layers: list[str]
    norms: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "+".join(self.layers)

    @property
    def is_pair(self) -> bool:
        return len(self.layers) == 2


@dataclass(frozen=True)
class Option:
    """What a unit becomes: a rank (None: dense) per layer, and the share of a pair's channels pruned."""

    ranks: tuple[int | None, ...]
    prune: float = 0.0

    def label(self, index: int) -> str:
        """The choice for the unit's ``index``-th layer (a pair's prune share is named on its first)."""
        return candidate_name(self.ranks[index], self.prune if index == 0 else 0.0)


def candidate_name(rank: int | None, prune: float = 0.0) -> str:
    """``dense``, ``rank-2``, ``prune-0.5``, ``rank-1+prune-0.25``: what one layer becomes (``prune``
    the share of its pair's channels removed, on its outputs or on its inputs)."""
    parts = [] if rank is None else [f"rank-{rank}"]
    if prune:
        parts.append(f"prune-{prune:g}")
    return "+".join(parts) or "dense"


def find_units(model: nn.Module, input_size, convertible: dict[str, ConvCall], *, graph: ModelGraph | None = None) -> list[Unit]:
    """The units of ``model``: pairs found with Torch-Pruning's dependency graph (a group whose
    only layers are one convertible conv's outputs, its BatchNorms and one conv's inputs), and
    every other convertible conv alone, in forward order. The dependency graph is ``graph``'s
    (the model's :class:`~dscompress.nn.graph.ModelGraph` at ``input_size``), built now when not given."""
    graph = graph or ModelGraph(model, input_size)
    model, dependencies = graph.dependency_graph()
    names = {module: name for name, module in model.named_modules()}
    units, paired = [], set()
    for name, call in convertible.items():
        if name in paired or call.calls != 1:
            continue
        group = dependencies.get_pruning_group(model.get_submodule(name), tp.prune_conv_out_channels, idxs=[0])
        outs, ins, norms = set(), set(), []
        for item in group:
            module = item.dep.target.module
            if module not in names:
                continue  # an operation (ReLU, add), not a layer
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                norms.append(names[module])
            elif item.dep.handler == tp.prune_conv_in_channels:
                ins.add(names[module])
            else:
                outs.add(names[module])
        consumer = next(iter(ins)) if len(ins) == 1 else None
        if outs == {name} and consumer is not None and type(model.get_submodule(consumer)) is nn.Conv2d and model.get_submodule(consumer).groups == 1:
            units.append(Unit([name, consumer], sorted(set(norms))))
            paired.update((name, consumer))
        else:
            units.append(Unit([name]))
    # a consumer that is also convertible on its own is in its pair; drop its single unit
    return [u for u in units if u.is_pair or u.layers[0] not in {layer for p in units if p.is_pair for layer in p.layers}]


def unit_options(unit: Unit, convertible: dict, ranks: list[int], prune_ratios: list[float]) -> list[Option]:
    choices = [[None] + list(ranks) if layer in convertible else [None] for layer in unit.layers]
    ratios = [0.0] + list(prune_ratios) if unit.is_pair else [0.0]
    return [Option(tuple(combo), ratio) for combo in itertools.product(*choices) for ratio in ratios]


def pair_channels(model: nn.Module, unit: Unit, ratio: float, round_to: int) -> list[int] | None:
    """The pair's channels kept at ``ratio``: the largest by the group's L2 norm (the producer's
    output filters and the consumer's input columns, each relative to its mean)."""
    if not ratio:
        return None
    producer, consumer = (model.get_submodule(n) for n in unit.layers)
    channels = producer.out_channels
    keep = round_channels(channels, ratio, round_to)
    out_norm = producer.weight.detach().flatten(1).pow(2).sum(1)
    in_norm = consumer.weight.detach().transpose(0, 1).flatten(1).pow(2).sum(1)
    score = out_norm / out_norm.mean() + in_norm / in_norm.mean()
    return sorted(score.argsort(descending=True)[:keep].tolist())


def apply_option(model: nn.Module, unit: Unit, option: Option, kept: list[int] | None) -> None:
    """Give ``model`` (in place) the unit's option: prune the pair's channels to ``kept`` (sorted
    channel indices), then convert each layer with a rank, fitted from its (pruned) kernel. The
    pruned layers are new modules: the ones replaced are left as they were."""
    if kept is not None:
        producer, consumer = unit.layers
        removed = sorted(set(range(model.get_submodule(producer).out_channels)) - set(kept))
        _prune_copy(model, producer, tp.prune_conv_out_channels, removed)
        _prune_copy(model, consumer, tp.prune_conv_in_channels, removed)
        for norm in unit.norms:
            _prune_copy(model, norm, tp.prune_batchnorm_out_channels, removed)
    for layer, rank in zip(unit.layers, option.ranks):
        if rank is not None:
            model.set_submodule(layer, DepthwiseSeparableConv2d.from_conv(model.get_submodule(layer), rank))


def _prune_copy(model: nn.Module, name: str, prune_fn, removed: list[int]) -> None:
    """Swap the module ``name`` for a copy with Torch-Pruning's ``prune_fn`` applied to channels ``removed``."""
    module = copy.deepcopy(model.get_submodule(name))
    prune_fn(module, removed)
    model.set_submodule(name, module)


def option_channels(model: nn.Module, unit: Unit, option: Option, round_to: int) -> list[tuple[int, int]]:
    """(in, out) channels of each of the unit's layers under the option (the model is dense)."""
    first = model.get_submodule(unit.layers[0])
    if not unit.is_pair:
        return [(first.in_channels, first.out_channels)]
    second = model.get_submodule(unit.layers[1])
    middle = round_channels(first.out_channels, option.prune, round_to) if option.prune else first.out_channels
    return [(first.in_channels, middle), (middle, second.out_channels)]


def build(model: nn.Module, layout: dict) -> tuple[nn.Module, dict[str, list[int]]]:
    """A copy of ``model`` with a saved plan (``plan.json``'s content) applied: pairs pruned to
    their recorded channels, layers converted at their ranks. Returns it and the kept output
    channels of the pruned layers (for calibration)."""
    if layout.get("format") != PLAN_FORMAT or not isinstance(layout.get("units"), list):
        raise DscompressError("not a dscompress plan: write one with `dscompress plan` (its plan.json)")
    if layout.get("version", 0) > PLAN_VERSION:
        raise DscompressError(f"this plan has version {layout['version']}, newer than this dscompress reads ({PLAN_VERSION}); upgrade dscompress")
    model = copy.deepcopy(model).eval()
    kept = {}
    known = {name for name, _ in model.named_modules()}
    for entry in layout["units"]:
        unit = Unit(list(entry["layers"]), list(entry.get("norms", [])))
        missing = [n for n in unit.layers + unit.norms if n not in known]
        if missing:
            raise DscompressError(f"the plan names {missing[0]!r}, which this model does not have; plan this model again")
        option = Option(tuple(entry["ranks"]), float(entry.get("prune", 0.0)))
        apply_option(model, unit, option, entry.get("kept"))
        if entry.get("kept") is not None:
            kept[unit.layers[0]] = list(entry["kept"])
    return model, kept


def layout_of(units: list[Unit], options: list[Option], kept: list[list[int] | None]) -> dict:
    """What ``plan.json`` holds: enough to build the planned model again (:func:`build`)."""
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "units": [
            {"layers": unit.layers, "norms": unit.norms if channels is not None else [], "ranks": list(option.ranks),
             "prune": option.prune, "kept": channels}
            for unit, option, channels in zip(units, options, kept)
        ],
    }


@dataclass
class PlannedConversion(Record):
    """What ``convert --plan`` did: each planned layer's choice, and the pruned layers' kept channels."""

    plan: str
    layers: dict[str, str]
    kept: dict[str, list[int]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


def read_layout(path: str) -> dict:
    """The layout in a ``plan.json`` file, or one line saying why it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DscompressError(f"plan {path!r} does not exist; `dscompress plan` writes plan.json into its output folder") from None
    except (OSError, ValueError) as e:
        raise DscompressError(f"cannot read plan {path!r}: {e}") from None


def apply_layout(model: nn.Module, path: str, input_size) -> tuple[nn.Module, PlannedConversion]:
    """A copy of ``model`` built to the plan saved at ``path`` (:func:`build`), and its record."""
    layout = read_layout(path)
    planned, kept = build(model, layout)
    layers = {}
    for unit in layout["units"]:
        for position, layer in enumerate(unit["layers"]):
            layers[layer] = Option(tuple(unit["ranks"]), float(unit.get("prune", 0.0))).label(position)
    record = PlannedConversion(path, layers, kept, count_params(model), count_params(planned),
                               count_macs(model, input_size), count_macs(planned, input_size))
    return planned, record
