"""Structured channel pruning with Torch-Pruning's dependency graph.

``prune(model, input_size, config)`` deep-copies the model, traces it with
:class:`torch_pruning.DependencyGraph` (which finds every layer whose channels are coupled: a
conv, its BatchNorm, the next conv's inputs, residual additions, concatenations), ranks the
channels of each coupled group by an importance score and removes the lowest ``ratio`` of them,
editing weights and ``in_channels``/``out_channels``/``groups``/``num_features`` in place.

Two things Torch-Pruning does not know are handled here:

* :class:`~dscompress.layers.DepthwiseSeparableConv2d` is pruned as one unit by
  :class:`DepthwiseSeparablePruner`. Torch-Pruning only recognises depthwise convs with
  ``groups == in_channels == out_channels``; the depthwise half of a rank-r layer has
  ``out_channels = in_channels * r`` and would be treated as an ordinary grouped conv, breaking
  the link between input channel j and its r filters ``j*r .. j*r+r-1``. The importance
  estimators are shown the layer's two convs so their weights count (:func:`plain_group`).
* The layers that produce the model's output keep their output channels (the classifier keeps
  ``num_classes``); they are found by walking back from the output (:func:`output_layers`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from dscompress.convert import matches
from dscompress.errors import DscompressError, does_not_run
from dscompress.layers import DepthwiseSeparableConv2d
from dscompress.metrics import count_macs, count_params

IMPORTANCES = ("magnitude", "taylor", "bn", "lamp")

# Random batches that give the taylor importance its gradients when no data is passed.
TAYLOR_BATCHES = 2
TAYLOR_BATCH_SIZE = 8


@dataclass
class PruneConfig:
    """How to prune.

    Attributes:
        ratio: share of channels, in (0, 1), removed from every prunable group of coupled layers
            (with ``global_pruning``, from all of them together). Torch-Pruning rounds the kept
            count down, so each pruned group loses at least one channel; parameters and MACs fall
            roughly as ``(1 - ratio) ** 2`` since both a layer's inputs and outputs shrink.
        importance: how channels are ranked: ``magnitude`` (L2 norm of the group's weights),
            ``taylor`` (|weight x gradient|, see :func:`accumulate_gradients`), ``bn`` (|BatchNorm
            scale|; groups without BatchNorm are left alone) or ``lamp`` (layer-adaptive magnitude).
        global_pruning: rank all groups' channels together, so some layers lose more than
            ``ratio`` and others less, instead of ``ratio`` from each.
        round_to: keep channel counts multiples of this (8 suits most accelerators); the kept
            count is rounded down, so a group may lose a little more than ``ratio``.
        ignore: patterns of layer names whose output channels are kept: globs (``layer4.*``) or
            regexes (``re:layer[34]\\..*``), the same vocabulary as ``ConvertConfig.include``.
            The layers that produce the model's output are always kept.
        seed: seed of the random batches that the ``taylor`` importance uses without data.
    """

    ratio: float = 0.3
    importance: str = "magnitude"
    global_pruning: bool = False
    round_to: int | None = None
    ignore: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise DscompressError(f"ratio must be a number in (0, 1), the share of channels to remove; got {self.ratio!r}")
        self.ratio = float(self.ratio)
        if self.importance not in IMPORTANCES:
            raise DscompressError(f"importance must be one of {', '.join(IMPORTANCES)}; got {self.importance!r}")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1):
            raise DscompressError(f"round_to must be a positive integer (e.g. 8), got {self.round_to!r}")
        self.global_pruning = bool(self.global_pruning)
        self.ignore = list(self.ignore or [])
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise DscompressError(f"bad regular expression {pattern!r}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DscompressError(f"unknown prune option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class LayerChannels:
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

    @property
    def changed(self) -> bool:
        return (self.in_before, self.out_before) != (self.in_after, self.out_after)


@dataclass
class PruneRecord:
    """What :func:`prune` did: every layer's channels before and after, and whole-model totals.

    ``kept`` lists the layers whose output channels were protected, with the reason.
    """

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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["params_ratio"] = self.params_ratio
        d["macs_ratio"] = self.macs_ratio
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PruneRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["layers"] = [LayerChannels(**layer) for layer in d["layers"]]
        return cls(**d)


# --- the depthwise-separable layer as one prunable unit ------------------------------------------


class DepthwiseSeparablePruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning handler that prunes a :class:`DepthwiseSeparableConv2d` as one layer.

    Its channels are those of the conv it replaced: removing output channel o removes row o of
    the pointwise weight (pointwise: (out, in * rank, 1, 1)); removing input channel j removes
    the depthwise filters ``j*rank .. j*rank+rank-1`` (depthwise: (in * rank, 1, kh, kw)) and the
    matching pointwise columns, and sets the depthwise ``in_channels = groups = in`` and
    ``out_channels = in * rank``. Inputs and outputs are independent (like a dense conv), so
    ``prune_in_channels`` is not ``prune_out_channels``.
    """

    TARGET_MODULES = (DepthwiseSeparableConv2d,)

    def prune_out_channels(self, layer: DepthwiseSeparableConv2d, idxs) -> DepthwiseSeparableConv2d:
        tp.prune_conv_out_channels(layer.pointwise, list(idxs))
        return layer

    def prune_in_channels(self, layer: DepthwiseSeparableConv2d, idxs) -> DepthwiseSeparableConv2d:
        rank = layer.rank
        removed = set(int(i) for i in idxs)
        kept = [j for j in range(layer.in_channels) if j not in removed]
        kept_filters = [j * rank + t for j in kept for t in range(rank)]
        depthwise, pointwise = layer.depthwise, layer.pointwise
        depthwise.weight = self._prune_parameter_and_grad(depthwise.weight, kept_filters, 0)
        if depthwise.bias is not None:
            depthwise.bias = self._prune_parameter_and_grad(depthwise.bias, kept_filters, 0)
        depthwise.in_channels = depthwise.groups = len(kept)
        depthwise.out_channels = len(kept) * rank
        pointwise.weight = self._prune_parameter_and_grad(pointwise.weight, kept_filters, 1)
        pointwise.in_channels = len(kept) * rank
        return layer

    def get_out_channels(self, layer: DepthwiseSeparableConv2d) -> int:
        return layer.pointwise.out_channels

    def get_in_channels(self, layer: DepthwiseSeparableConv2d) -> int:
        return layer.depthwise.in_channels


DS_PRUNER = DepthwiseSeparablePruner()


def _item(module: nn.Module, handler, idxs: list[int], root_idxs: list) -> tp._helpers.GroupItem:
    node = tp.dependency.Node(module, grad_fn=None)
    item = tp._helpers.GroupItem(dep=tp.Dependency(handler, handler, source=node, target=node), idxs=idxs)
    item.root_idxs = root_idxs
    return item


def plain_group(group) -> list:
    """The items of a Torch-Pruning group, with depthwise-separable layers shown as their convs.

    Torch-Pruning's importance estimators score only standard layers (conv, linear, norms). An
    output-channel item of a depthwise-separable layer becomes one on its pointwise conv; an
    input-channel item (channel j) becomes the pointwise columns and the depthwise filters
    ``j*rank .. j*rank+rank-1``, each attributed to root channel j. Those come last, because
    the estimators size their result by the first scored item.
    """
    items, expanded = [], []
    for item in group:
        layer = item.dep.target.module
        if not isinstance(layer, DepthwiseSeparableConv2d):
            items.append(item)
        elif item.dep.handler == DS_PRUNER.prune_out_channels:
            items.append(_item(layer.pointwise, tp.prune_conv_out_channels, list(item.idxs), item.root_idxs))
        else:
            rank = layer.rank
            pairs = sorted(zip(item.idxs, item.root_idxs), key=lambda pair: pair[0])
            filters = [j * rank + t for j, _ in pairs for t in range(rank)]
            roots = [root for _, root in pairs for _ in range(rank)]
            expanded.append(_item(layer.pointwise, tp.prune_conv_in_channels, filters, roots))
            expanded.append(_item(layer.depthwise, tp.prune_conv_out_channels, list(filters), list(roots)))
    return items + expanded


class SeesDepthwiseSeparable(tp.importance.Importance):
    """Wraps a Torch-Pruning importance so that depthwise-separable layers' weights count."""

    def __init__(self, inner: tp.importance.Importance):
        self.inner = inner

    def __call__(self, group):
        return self.inner(plain_group(group))


def make_importance(name: str) -> tp.importance.Importance:
    inner = {
        "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "bn": lambda: tp.importance.BNScaleImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
    }[name]()
    return SeesDepthwiseSeparable(inner)


# --- which layers there are, and which feed the output -------------------------------------------


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Convs, linears and depthwise-separable layers by name (not the halves of the latter)."""
    layers, inside = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, DepthwiseSeparableConv2d):
            layers[name] = module
            inside.append(name)
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
            outputs = _tensors_in(model(example))
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
    inside = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        entry = None
        if isinstance(module, DepthwiseSeparableConv2d):
            inside.append(name)
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


def _layer_records(before: dict[str, dict], after: dict[str, dict]) -> list[LayerChannels]:
    records = []
    for name, b in before.items():
        a = after[name]
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
        for name in matched:  # the outermost matches: ignoring a block ignores all inside it
            if not any(name.startswith(other + ".") for other in matched):
                kept.setdefault(name, f"matches --ignore {pattern!r}")
    return [{"name": name, "reason": reason} for name, reason in kept.items()]


def accumulate_gradients(model: nn.Module, batches) -> None:
    """Gradients for the taylor importance: cross-entropy of each batch against the model's own
    predictions (its argmax), summed over ``batches``, each (N, C, H, W).

    Without labels this measures how much each weight supports the model's current decisions;
    random inputs (the default) make it a data-free estimate, real images a better one. The model
    stays in eval mode so BatchNorm statistics do not change.
    """
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x in batches:
            logits = model(x)
            target = logits.detach().argmax(dim=1)
            F.cross_entropy(logits, target).backward()


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
    device = next(model.parameters(), torch.empty(0)).device
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
        )
    _check_something_to_prune(pruner, config)
    if config.importance == "taylor":
        batches = calibration_batches if calibration_batches is not None else _random_batches(input_size, config.seed)
        accumulate_gradients(model, [x.to(device) for x in batches])
    pruner.step()
    model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, True))

    macs_after, after = _shapes(model, input_size)
    layers = _layer_records(before, after)
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


def prune_artifact(source, out: str, config: PruneConfig | None = None, force: bool = False, calibration_batches=None):
    """Prune a :class:`~dscompress.artifact.Source` and save the result as an artifact folder.

    Returns (artifact, record).
    """
    from dscompress.artifact import save_step

    config = config or PruneConfig()
    model, record = prune(source.model, source.spec.input_size, config, calibration_batches=calibration_batches)
    artifact = save_step(
        source, out, model, "prune", config.to_dict(), record.to_dict(), metrics={"macs": record.macs_after}, force=force
    )
    return artifact, record


# --- rendering -----------------------------------------------------------------------------------


def prune_table(record: PruneRecord):
    """Per-layer channels of a :class:`~dscompress.prune.PruneRecord` (norm layers follow their conv)."""
    from rich.table import Table

    from dscompress.report import human

    shown = [layer for layer in record.layers if layer.type not in ("BatchNorm2d", "BatchNorm1d", "LayerNorm")]
    changed = sum(layer.changed for layer in shown)
    how = "globally" if record.config["global_pruning"] else "per layer"
    table = Table(title=f"pruned {changed} of {len(shown)} layers ({record.config['importance']}, ratio {record.config['ratio']} {how})")
    for title in ("layer", "type", "in", "out", "params", "MACs"):
        table.add_column(title, justify="left" if title in ("layer", "type") else "right")
    for layer in shown:
        kind = layer.type + (f" r{layer.rank}" if layer.rank else "") + (f" g{layer.groups_after}" if layer.groups_after and layer.groups_after > 1 else "")
        table.add_row(
            layer.name,
            kind,
            f"{layer.in_before} -> {layer.in_after}" if layer.in_after != layer.in_before else str(layer.in_before),
            f"{layer.out_before} -> {layer.out_after}" if layer.out_after != layer.out_before else str(layer.out_before),
            f"{human(layer.params_before)} -> {human(layer.params_after)}",
            f"{human(layer.macs_before)} -> {human(layer.macs_after)}",
        )
    return table


def prune_summary(record: PruneRecord) -> list[str]:
    """Whole-model totals and the layers whose outputs were kept, one line each."""
    from dscompress.report import human

    return [
        f"params: {human(record.params_before)} -> {human(record.params_after)} ({record.params_ratio:.1%} kept); "
        f"MACs: {human(record.macs_before)} -> {human(record.macs_after)} ({record.macs_ratio:.1%} kept)",
        "outputs kept: " + ", ".join(f"{k['name']} ({k['reason']})" for k in record.kept),
    ]
