"""Structured channel pruning with Torch-Pruning's dependency graph.

``prune(model, input_size, config)`` deep-copies the model, traces it with
:class:`torch_pruning.DependencyGraph` (which finds every layer whose channels are coupled: a
conv, its BatchNorm, the next conv's inputs, residual additions, concatenations), ranks the
channels of each coupled group by an importance score and removes the lowest ``ratio`` of them,
editing weights and ``in_channels``/``out_channels``/``groups``/``num_features`` in place.

Two things Torch-Pruning does not know are handled here:

* :class:`~dscompress.nn.layers.DepthwiseSeparableConv2d` is pruned as one unit, at any rank
  (:mod:`dscompress.compress.prune_tp`).
* The layers that produce the model's output keep their output channels (the classifier keeps
  ``num_classes``, every head of a segmentation model its classes); they are found by walking
  back from the output (:func:`output_layers`).

A model with heads that only training runs (a segmentation model's auxiliary head) says so by
defining ``all_outputs(x)``, which returns every head's output whatever the mode
(:class:`~dscompress.models.build.SegmentationNet`); pruning traces that instead of ``forward``, so such
a head keeps its classes and still fits the channels of the layers it reads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from dscompress.compress.prune_tp import DS_PRUNER, make_importance
from dscompress.core.config import Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError, does_not_run
from dscompress.core.selection import check_pattern, matches, outermost
from dscompress.core.transform import TransformContext, register_transform
from dscompress.core.util import model_device
from dscompress.nn.layers import DepthwiseSeparableConv2d, named_layers
from dscompress.nn.metrics import count_macs, count_params

# The Torch-Pruning handlers that remove a layer's output channels (recorded, for calibration).
OUT_CHANNEL_HANDLERS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_batchnorm_out_channels, DS_PRUNER.prune_out_channels)

# Random batches that give the taylor importance its gradients when no data is passed.
TAYLOR_BATCHES = 2
TAYLOR_BATCH_SIZE = 8


@dataclass
class PruneConfig(StepConfig):
    """How to prune."""

    STEP: ClassVar[str] = "prune"

    ratio: float = option(
        0.3,
        "Share (0-1) of channels removed from every prunable group of coupled layers (with --global-pruning, from all "
        "of them together); parameters and MACs fall roughly as (1 - ratio)^2.",
    )
    importance: Literal["magnitude", "taylor", "bn", "lamp"] = option(
        "magnitude",
        "How channels are ranked: magnitude (L2 norm of the group's weights), taylor (|weight x gradient|), "
        "bn (|BatchNorm scale|) or lamp (layer-adaptive magnitude).",
    )
    global_pruning: bool = option(False, "Rank the channels of all groups together instead of removing --ratio from each.")
    round_to: int | None = option(
        None, "Keep channel counts multiples of this (8 suits most runtimes); kept counts are rounded down."
    )
    ignore: list[str] = option(
        factory=list, repeat=True, help="Keep the output channels of layers matching this glob or re: pattern (repeatable)."
    )
    seed: int = option(0, "Seed of the random batches the taylor importance uses without data.")

    def check(self):
        check_range("ratio", self.ratio, 0, 1, low_open=True, high_open=True)
        check_range("round_to", self.round_to, low=1)
        for pattern in self.ignore:
            check_pattern(pattern)


@dataclass
class LayerChannels(Record):
    """One layer's shape before and after pruning. MACs are per image (0 for normalisation)."""

    name: str
    type: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups_before: int | None = None  # convs only
    groups_after: int | None = None
    rank: int | None = None  # DepthwiseSeparableConv2d only
    kept_out: list[int] | None = None  # the output channels kept, by their index before pruning

    @property
    def changed(self) -> bool:
        return (self.in_before, self.out_before) != (self.in_after, self.out_after)


@dataclass
class PruneRecord(Record):
    """What :func:`prune` did: every layer's channels before and after, and whole-model totals.

    ``kept`` lists the layers whose output channels were protected, with the reason.
    """

    DERIVED: ClassVar[tuple[str, ...]] = ("params_ratio", "macs_ratio")

    config: dict
    input_size: list[int]
    kept: list[dict]
    layers: list[LayerChannels]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def params_ratio(self) -> float:
        """Share of the parameters that remain (after / before)."""
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        """Share of the MACs that remain (after / before)."""
        return self.macs_after / max(self.macs_before, 1)

    @property
    def changed_layers(self) -> list[LayerChannels]:
        return [layer for layer in self.layers if layer.changed]


# --- which layers there are, and which feed the output -------------------------------------------


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Convs, linears and depthwise-separable layers by name (not the halves of the latter)."""
    layers = {}
    for name, module in named_layers(model):
        if isinstance(module, DepthwiseSeparableConv2d):
            layers[name] = module
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            layers[name] = module
    return layers


def _tensors_in(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in _tensors_in(o)]
    return []


def traced_forward(model: nn.Module):
    """What pruning runs: ``model.all_outputs`` where the model has heads only training runs, else the model."""
    return getattr(model, "all_outputs", model)


def output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the layers whose outputs reach the model's output without passing another layer.

    Their output channels are the model's output channels (the classifier's ``num_classes``),
    so they must not be pruned. Found by walking the autograd graph of one forward pass back
    from the outputs through parameter-free operations (pooling, flatten, dropout, additions)
    until a conv, linear or depthwise-separable layer is met.
    """
    layers = prunable_layers(model)
    produced_by: dict = {}

    def hook(name):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                produced_by[output.grad_fn] = name

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    try:
        with torch.enable_grad():
            outputs = _tensors_in(traced_forward(model)(example))
    finally:
        for handle in handles:
            handle.remove()
    found, seen = set(), set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in produced_by:
            found.add(produced_by[fn])
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return [name for name in layers if name in found]


# --- shapes for the record -----------------------------------------------------------------------


def _shapes(model: nn.Module, input_size) -> tuple[int, dict[str, dict]]:
    """Total MACs, and channels, groups and cost of every conv, linear, depthwise-separable and norm layer."""
    total, macs = count_macs(model, input_size, per_module=True)
    shapes = {}
    for name, module in named_layers(model):
        entry = None
        if isinstance(module, DepthwiseSeparableConv2d):
            entry = {"in": module.in_channels, "out": module.out_channels, "rank": module.rank}
        elif isinstance(module, nn.modules.conv._ConvNd):
            entry = {"in": module.in_channels, "out": module.out_channels, "groups": module.groups}
        elif isinstance(module, nn.Linear):
            entry = {"in": module.in_features, "out": module.out_features}
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            entry = {"in": module.num_features, "out": module.num_features}
        elif isinstance(module, nn.LayerNorm):
            entry = {"in": module.normalized_shape[-1], "out": module.normalized_shape[-1]}
        if entry is not None:
            entry["type"] = type(module).__name__
            entry["params"] = sum(p.numel() for p in module.parameters())
            entry["macs"] = macs.get(name, 0)
            shapes[name] = entry
    return total, shapes


def _layer_records(before: dict[str, dict], after: dict[str, dict], removed: dict[str, set[int]]) -> list[LayerChannels]:
    records = []
    for name, b in before.items():
        a = after[name]
        kept_out = [c for c in range(b["out"]) if c not in removed[name]] if name in removed and a["out"] != b["out"] else None
        records.append(
            LayerChannels(
                name=name,
                type=b["type"],
                in_before=b["in"],
                in_after=a["in"],
                out_before=b["out"],
                out_after=a["out"],
                params_before=b["params"],
                params_after=a["params"],
                macs_before=b["macs"],
                macs_after=a["macs"],
                groups_before=b.get("groups"),
                groups_after=a.get("groups"),
                rank=b.get("rank"),
                kept_out=kept_out,
            )
        )
    return records


# --- pruning -------------------------------------------------------------------------------------


def _kept_layers(model: nn.Module, heads: list[str], config: PruneConfig) -> list[dict]:
    """Layers whose output channels stay, with why: they feed the output, or match --ignore."""
    kept = {name: "produces the model output" for name in heads}
    names = [name for name, _ in model.named_modules() if name]
    for pattern in config.ignore:
        matched = [name for name in names if matches(name, pattern)]
        if not matched:
            example_name = next(iter(prunable_layers(model)), "layer1.0.conv1")
            raise DscompressError(
                f"--ignore pattern {pattern!r} matches no layer (layers are named like {example_name!r}; "
                "use a glob such as 'layer4.*' or a regex 're:...')"
            )
        for name in outermost(matched):  # ignoring a block ignores all inside it
            kept.setdefault(name, f"matches --ignore {pattern!r}")
    return [{"name": name, "reason": reason} for name, reason in kept.items()]


def accumulate_gradients(model: nn.Module, batches) -> None:
    """Gradients for the taylor importance: cross-entropy of each batch against the model's own
    predictions (its argmax over dimension 1: per image, or per pixel for segmentation), summed
    over ``batches`` (each (N, C, H, W)) and over every output (:func:`traced_forward`).

    Without labels this measures how much each weight supports the model's current decisions;
    random inputs (the default) make it a data-free estimate, real images a better one. The model
    stays in eval mode so BatchNorm statistics do not change.
    """
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x in batches:
            outputs = _tensors_in(traced_forward(model)(x))
            sum(F.cross_entropy(logits, logits.detach().argmax(dim=1)) for logits in outputs).backward()


def _random_batches(input_size, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(TAYLOR_BATCH_SIZE, *input_size, generator=generator) for _ in range(TAYLOR_BATCHES)]


def prune(
    model: nn.Module,
    input_size: tuple[int, int, int],
    config: PruneConfig | None = None,
    calibration_batches=None,
) -> tuple[nn.Module, PruneRecord]:
    """Return a pruned deep copy of ``model`` and the record of what was done.

    Args:
        model: any module whose forward takes one image batch (N, C, H, W); plain, converted
            (with :class:`DepthwiseSeparableConv2d` layers of any rank) or already pruned.
        input_size: (C, H, W) used to trace the model and count MACs.
        config: the pruning policy; defaults to removing 30% of channels by L2 magnitude.
        calibration_batches: input batches (N, C, H, W) for the ``taylor`` importance; seeded
            random batches when None. Ignored by the other importances.

    The input model is never modified. The copy is returned in eval mode.
    """
    config = config or PruneConfig()
    input_size = tuple(input_size)
    model = copy.deepcopy(model).eval()
    device = model_device(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():  # tracing follows autograd, so frozen weights would hide layers
        p.requires_grad_(True)
    example = torch.zeros(1, *input_size, device=device)
    try:
        heads = output_layers(model, example)
    except Exception as e:  # noqa: BLE001 - any failure means the input size does not fit
        raise does_not_run(input_size, e) from None
    kept = _kept_layers(model, heads, config)
    kept_modules = [model.get_submodule(entry["name"]) for entry in kept]
    params_before = count_params(model)
    macs_before, before = _shapes(model, input_size)

    removed = _prune_in_place(model, example, kept_modules, config, calibration_batches)
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, True))

    macs_after, after = _shapes(model, input_size)
    layers = _layer_records(before, after, removed)
    if not any(layer.changed for layer in layers):
        raise DscompressError(
            f"--ratio {config.ratio} with --importance {config.importance} removed no channel: Torch-Pruning "
            "skips a group whose scores would remove all its channels, as when scores tie (the BatchNorm scales "
            "of an untrained model are all 1) or there is nothing to score (bn on layers without BatchNorm); "
            "try another --importance or a different --ratio"
        )
    record = PruneRecord(
        config=config.to_dict(),
        input_size=list(input_size),
        kept=kept,
        layers=layers,
        params_before=params_before,
        params_after=count_params(model),
        macs_before=macs_before,
        macs_after=macs_after,
    )
    return model.eval(), record


def _prune_in_place(model: nn.Module, example: torch.Tensor, kept_modules: list[nn.Module], config: PruneConfig,
                    calibration_batches) -> dict[str, set[int]]:
    """Run Torch-Pruning's pruner on ``model`` (every parameter requiring grad, so that its trace
    sees every layer); returns the output channels removed, by layer name."""
    device = example.device
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=make_importance(config.importance),
            global_pruning=config.global_pruning,
            pruning_ratio=config.ratio,
            ignored_layers=kept_modules,
            round_to=config.round_to,
            customized_pruners={DepthwiseSeparableConv2d: DS_PRUNER},
            root_module_types=[nn.modules.conv._ConvNd, nn.Linear, DepthwiseSeparableConv2d],
            forward_fn=lambda module, inputs: traced_forward(module)(inputs),
        )
    _check_something_to_prune(pruner, config)
    if config.importance == "taylor":
        batches = calibration_batches if calibration_batches is not None else _random_batches(tuple(example.shape[1:]), config.seed)
        accumulate_gradients(model, [x.to(device) for x in batches])
    names = {module: name for name, module in model.named_modules()}
    removed: dict[str, set[int]] = {}
    for group in pruner.step(interactive=True):
        for item in group:
            if item.dep.handler in OUT_CHANNEL_HANDLERS:
                removed.setdefault(names[item.dep.target.module], set()).update(int(i) for i in item.idxs)
        group.prune()
    model.zero_grad(set_to_none=True)
    return removed


def _check_something_to_prune(pruner: tp.pruner.BasePruner, config: PruneConfig) -> None:
    """Refuse a ratio too small to remove even one channel, and models with nothing prunable."""
    channels = [
        pruner.DG.get_out_channels(group[0].dep.target.module)
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
    ]
    if not channels:
        raise DscompressError("nothing to prune: every layer either produces the model output or is ignored; drop some --ignore patterns")
    if config.global_pruning:
        total = sum(channels)
        if config.ratio * total < 1:
            raise DscompressError(
                f"--ratio {config.ratio} removes less than one of the {total} prunable channels; use --ratio of at least {1 / total:.2g}"
            )
    elif config.ratio * max(channels) < 1:
        raise DscompressError(
            f"--ratio {config.ratio} removes less than one channel from every layer (the widest prunable one has "
            f"{max(channels)}); use --ratio of at least {1 / max(channels):.2g}"
        )


@register_transform(PruneConfig)
def prune_transform(model: nn.Module, config: PruneConfig, context: TransformContext) -> tuple[nn.Module, PruneRecord]:
    """Remove MODEL's least important channels (Torch-Pruning)."""
    return prune(model, context.input_size, config)
