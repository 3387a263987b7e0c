"""Replace standard convolutions by fitted depthwise-separable ones.

``convert(model, input_size, config)`` deep-copies the model and converts the copy;
``convert_(model, ...)`` converts in place (torchao's ``quantize_`` style). Both find the model's
convolutions in its :class:`~dscompress.nn.graph.ModelGraph` (``torch.fx``: shapes from ShapeProp,
call counts, functional convs, followers), pick a rank per layer, fit the new weights from the old
kernel (:meth:`~dscompress.nn.layers.DepthwiseSeparableConv2d.from_conv`) and swap each
``nn.Conv2d`` for the new layer on its parent module, so the model keeps its class, methods and
state-dict names (``layer1.0.conv1.depthwise.weight``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from dscompress.compress.units import apply_layout
from dscompress.core.config import ConfigError, Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError, DscompressWarning
from dscompress.core.selection import FilterFn, check_pattern, matches_any, require_matches
from dscompress.core.transform import TransformContext, register_transform
from dscompress.nn import decompose
from dscompress.nn.graph import ConvCall, ModelGraph, UntraceableError
from dscompress.nn.layers import MIN_CHANNELS, DepthwiseSeparableConv2d, skip_reason
from dscompress.nn.metrics import conv_macs, count_macs, count_params


@dataclass
class ConvertConfig(StepConfig):
    """How to convert. At most one of ``rank``, ``energy`` and ``macs_budget`` chooses the ranks
    (rank 1 when none does)."""

    STEP: ClassVar[str] = "convert"

    rank: int | Literal["full"] | None = option(None, "Rank of every layer: a positive integer, or 'full' (exact, for checking). Default 1.")
    energy: float | None = option(None, "Per layer, the smallest rank keeping this share (0-1] of the squared singular values.")
    macs_budget: float | None = option(
        None, "Keep this share (0-1] of the converted layers' MACs, ranks allocated across layers for the least fit error."
    )
    dilation: int | Literal["keep", "rf"] = option(
        "keep",
        "keep: the kernel and dilation (exact at full rank); rf: odd kernels > 3 become 3 taps with the dilation that "
        "keeps the receptive field (5x5 -> 3x3 dilation 2); N: 3x3 kernels get dilation N (changes the function).",
    )
    include: list[str] = option(factory=list, repeat=True, help="Only convert layers matching this glob or re: pattern (repeatable).")
    exclude: list[str] = option(factory=list, repeat=True, help="Never convert layers matching this pattern (repeatable).")
    min_channels: int = option(MIN_CHANNELS, "Skip convs with fewer input channels (the RGB stem, by default).")
    trace: Literal["auto", "fx", "hooks"] = option(
        "auto", "How layers are found: fx (fail if untraceable), hooks, or auto (fx, falling back to hooks)."
    )
    allow_unchanged: bool = option(False, "Save the model even when no conv can be converted (otherwise that is an error).")
    plan: str | None = option(None, "Apply this plan (the plan.json `dscompress plan` writes) instead of choosing ranks.", metavar="PLAN.json")

    def check(self):
        chosen = [k for k in ("rank", "energy", "macs_budget") if getattr(self, k) is not None]
        if self.plan is not None and chosen:
            raise ConfigError(None, f"--plan chooses every layer itself: drop {', '.join('--' + c.replace('_', '-') for c in chosen)}")
        if len(chosen) > 1:
            raise ConfigError(None, f"choose ranks one way: give only one of {', '.join('--' + c.replace('_', '-') for c in chosen)}")
        if not chosen and self.plan is None:
            self.rank = 1
        if isinstance(self.rank, int):
            check_range("rank", self.rank, low=1)
        check_range("energy", self.energy, 0, 1, low_open=True)
        check_range("macs_budget", self.macs_budget, 0, 1, low_open=True)
        if isinstance(self.dilation, int):
            check_range("dilation", self.dilation, low=1)
        check_range("min_channels", self.min_channels, low=1)
        for pattern in self.include + self.exclude:
            check_pattern(pattern)


@dataclass
class LayerRecord(Record):
    """One converted convolution. MACs are per image, summed over all calls."""

    name: str
    in_channels: int
    out_channels: int
    kernel_before: list[int]
    kernel_after: list[int]
    stride: list[int]
    dilation_before: list[int]
    dilation_after: list[int]
    rank: int
    full_rank: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    fit_error: float
    calls: int = 1
    output_shape: list[int] = field(default_factory=list)
    followed_by: list[str] = field(default_factory=list)
    function_changed: bool = False


@dataclass
class ConversionRecord(Record):
    """What :func:`convert` did: every converted and skipped conv, and whole-model totals.

    ``trace_note`` says why torch.fx could not trace the model, when forward hooks were used.
    """

    DERIVED: ClassVar[tuple[str, ...]] = ("converted_macs_before", "converted_macs_after")

    config: dict
    input_size: list[int]
    trace: str
    layers: list[LayerRecord]
    skipped: list[dict]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    trace_note: str | None = None

    @property
    def converted_macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def converted_macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)


@dataclass
class LayerPlan:
    """How one conv will be converted: its new kernel, dilation and padding, the kernel to fit,
    and (once chosen) the rank."""

    name: str
    conv: nn.Conv2d
    call: ConvCall
    fitted: torch.Tensor  # (out, in, kh', kw'): the kernel to factorize
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    padding: object
    singular_values: torch.Tensor  # (in, full rank)
    on_original_grid: bool = False  # ``fitted`` has fewer, dilated taps than the conv
    function_changed: bool = False
    rank: int = 1

    @property
    def full_rank(self) -> int:
        return self.singular_values.shape[1]

    @property
    def macs_per_rank(self) -> int:
        return conv_macs(self.conv.in_channels, self.conv.out_channels, self.kernel, self.call.out_pixels, rank=1)

    @property
    def dense_macs(self) -> int:
        return conv_macs(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size, self.call.out_pixels,
                         groups=self.conv.groups)


def convert(
    model: nn.Module, input_size: tuple[int, int, int], config: ConvertConfig | None = None, filter_fn: FilterFn | None = None,
    *, graph: ModelGraph | None = None,
) -> tuple[nn.Module, ConversionRecord]:
    """Return a converted deep copy of ``model`` and the record of what was done.

    Args:
        model: any module whose forward takes one image batch (N, C, H, W); not modified.
        input_size: (C, H, W) used to find every layer's shapes and count MACs.
        config: the conversion policy; defaults to rank 1 everywhere except the stem.
        filter_fn: ``filter_fn(conv, fqn) -> bool``, a further say over which convs are converted
            (on top of ``config.include``/``exclude``).
        graph: the model's :class:`~dscompress.nn.graph.ModelGraph` at ``input_size``, when the
            caller has one (found now otherwise).
    """
    model = copy.deepcopy(model)
    record = convert_(model, input_size, config, filter_fn, graph=graph)
    return model, record


def convert_(
    model: nn.Module, input_size: tuple[int, int, int], config: ConvertConfig | None = None, filter_fn: FilterFn | None = None,
    *, graph: ModelGraph | None = None,
) -> ConversionRecord:
    """Convert ``model`` in place (see :func:`convert`) and return the record. The model is left in
    eval mode, and ``graph`` (of the model as it was) no longer describes it."""
    config = config or ConvertConfig()
    model.eval()
    input_size = tuple(input_size)
    graph, note = _graph_for(model, input_size, config.trace, graph)
    convs = graph.convs

    params_before = count_params(model)
    macs_before = count_macs(model, input_size)
    chosen, skipped = _select(model, convs, graph.functional, config, filter_fn)
    plans = []
    for name in chosen:
        plan = _plan(name, model.get_submodule(name), convs[name], config)
        if isinstance(plan, str):
            skipped.append({"name": name, "reason": plan})
        else:
            plans.append(plan)
    _choose_ranks(plans, config)

    layers = []
    for plan in plans:
        layer = DepthwiseSeparableConv2d.from_conv(plan.conv, plan.rank, plan.fitted, plan.kernel, plan.dilation, plan.padding)
        layers.append(_layer_record(plan, layer))
        model.set_submodule(plan.name, layer)

    return ConversionRecord(
        config=config.to_dict(),
        input_size=list(input_size),
        trace=graph.how,
        layers=layers,
        skipped=skipped,
        params_before=params_before,
        params_after=count_params(model),
        macs_before=macs_before,
        macs_after=count_macs(model, input_size),
        trace_note=note,
    )


def convertible(model: nn.Module, input_size, config: ConvertConfig | None = None, filter_fn: FilterFn | None = None,
                *, graph: ModelGraph | None = None) -> dict[str, ConvCall]:
    """The convs ``convert`` would replace, by name, with what a forward pass showed about each
    (input and output shapes for a batch of one, calls per forward); from ``graph`` when given."""
    config = config or ConvertConfig()
    graph, _ = _graph_for(model, tuple(input_size), config.trace, graph)
    chosen, _ = _select(model, graph.convs, graph.functional, config, filter_fn)
    return {name: graph.convs[name] for name in chosen}



# --- discovery ---------------------------------------------------------------------------------


def _found_as_asked(graph: ModelGraph, trace: str) -> bool:
    """Whether ``graph`` was found as ``--trace`` asks: with hooks for ``hooks``; otherwise with
    fx, or with hooks because fx could not trace the model (what ``auto`` falls back to)."""
    if trace == "hooks":
        return graph.how == "hooks"
    return graph.how == "fx" or graph.fx_failure is not None


def _graph_for(model: nn.Module, input_size, trace: str, graph: ModelGraph | None) -> tuple[ModelGraph, str | None]:
    """The model's graph as ``--trace`` asks for it (``graph`` when it fits), and why fx was not used."""
    if graph is not None and graph.input_size != tuple(input_size):
        raise ValueError(f"the graph is of inputs {graph.input_size}, not {tuple(input_size)}")
    if graph is not None and not _found_as_asked(graph, trace):
        graph = None  # hooks see no followers and no functional convs: find it again, as asked
    if graph is None:
        try:
            graph = ModelGraph(model, input_size, trace)
        except UntraceableError as e:
            raise DscompressError(f"{e}; use --trace hooks to convert without fx") from None
    if trace == "fx" and graph.fx_failure:
        raise DscompressError(f"{graph.fx_failure}; use --trace hooks to convert without fx")
    note = None
    if trace == "auto" and graph.fx_failure:
        note = graph.fx_failure + "; falling back to forward hooks (functional convs are not detected)"
        warnings.warn(note, DscompressWarning, stacklevel=3)
    return graph, note


# --- policy ------------------------------------------------------------------------------------


def _select(model: nn.Module, convs: dict[str, ConvCall], functional: list[str], config: ConvertConfig, filter_fn: FilterFn | None):
    """Names of convs to convert, and every conv left alone with its reason."""
    all_convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    require_matches(config.include, list(all_convs), "--include", "conv layer")
    require_matches(config.exclude, list(all_convs), "--exclude", "conv layer")
    chosen, skipped = [], []
    for name, module in all_convs.items():
        reason = skip_reason(module, config.min_channels)
        if reason is None and name not in convs:
            reason = "not called by forward"
        elif reason is None and config.include and not matches_any(name, config.include):
            reason = "not included"
        elif reason is None and matches_any(name, config.exclude):
            reason = "excluded"
        elif reason is None and filter_fn is not None and not filter_fn(module, name):
            reason = "left out by filter_fn"
        if reason:
            skipped.append({"name": name, "reason": reason})
        else:
            chosen.append(name)
    skipped += [{"name": n, "reason": "functional conv2d call (no module to swap)"} for n in functional]
    return chosen, skipped


def _plan(name: str, conv: nn.Conv2d, call: ConvCall, config: ConvertConfig) -> LayerPlan | str:
    """Decide the new kernel, dilation and padding of one conv and fit its taps; or why not."""
    kernel, dilation, padding = conv.kernel_size, conv.dilation, conv.padding
    fitted = conv.weight.detach()
    on_original_grid = function_changed = False
    if config.dilation == "rf":
        new_kernel, new_dilation = decompose.receptive_field_dilation(kernel, dilation)
        if new_kernel != kernel:
            fitted, _ = decompose.fit_dilated_taps(fitted, new_kernel)
            on_original_grid = True
    elif isinstance(config.dilation, int) and kernel == (3, 3):
        new_kernel, new_dilation = kernel, (config.dilation, config.dilation)
        function_changed = new_dilation != dilation
        if function_changed and padding != "same":
            pad = (0, 0) if padding == "valid" else padding
            padding = tuple(p + (nd - d) for p, nd, d in zip(pad, new_dilation, dilation))
            if min(padding) < 0:
                return f"dilation {config.dilation} would need negative padding {padding}"
    else:
        new_kernel, new_dilation = kernel, dilation
    return LayerPlan(
        name=name,
        conv=conv,
        call=call,
        fitted=fitted,
        kernel=tuple(new_kernel),
        dilation=tuple(new_dilation),
        padding=padding,
        singular_values=decompose.channel_singular_values(fitted),
        on_original_grid=on_original_grid,
        function_changed=function_changed,
    )


def _choose_ranks(plans: list[LayerPlan], config: ConvertConfig) -> None:
    if config.macs_budget is not None and plans:
        budget_layers = [decompose.BudgetLayer(p.singular_values, p.macs_per_rank, p.dense_macs) for p in plans]
        try:
            ranks = decompose.allocate_ranks(budget_layers, config.macs_budget)
        except ValueError as e:
            raise DscompressError(str(e)) from None
    elif config.energy is not None:
        ranks = [decompose.rank_for_energy(p.singular_values, config.energy) for p in plans]
    else:
        ranks = [p.full_rank if config.rank == "full" else config.rank for p in plans]
    for plan, rank in zip(plans, ranks):
        plan.rank = max(1, min(rank, plan.full_rank))


# --- the record --------------------------------------------------------------------------------


def _fit_error(plan: LayerPlan, layer: DepthwiseSeparableConv2d) -> float:
    """Relative error of the kernel the layer computes against the conv's own kernel."""
    weight = plan.conv.weight.detach().double()
    approx = decompose.reconstruct(layer.depthwise.weight.detach(), layer.pointwise.weight.detach(), plan.rank).double()
    if plan.on_original_grid:  # fewer, dilated taps: compare on the original grid
        kh, kw = plan.kernel
        _, _, h, w = weight.shape
        step_h = (h - 1) // (kh - 1) if kh > 1 else 1
        step_w = (w - 1) // (kw - 1) if kw > 1 else 1
        placed = torch.zeros_like(weight)
        placed[:, :, ::step_h, ::step_w] = approx
        approx = placed
    norm = weight.norm()
    return float((weight - approx).norm() / norm) if norm > 0 else 0.0


def _layer_record(plan: LayerPlan, layer: DepthwiseSeparableConv2d) -> LayerRecord:
    conv = plan.conv
    return LayerRecord(
        name=plan.name,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_before=list(conv.kernel_size),
        kernel_after=list(plan.kernel),
        stride=list(conv.stride),
        dilation_before=list(conv.dilation),
        dilation_after=list(plan.dilation),
        rank=plan.rank,
        full_rank=plan.full_rank,
        params_before=sum(p.numel() for p in conv.parameters()),
        params_after=sum(p.numel() for p in layer.parameters()),
        macs_before=plan.dense_macs,
        macs_after=plan.macs_per_rank * plan.rank,
        fit_error=round(_fit_error(plan, layer), 6),
        calls=plan.call.calls,
        output_shape=list(plan.call.output_shape[1:]),
        followed_by=plan.call.followed_by,
        function_changed=plan.function_changed,
    )


@register_transform(ConvertConfig)
def convert_transform(model: nn.Module, config: ConvertConfig, context: TransformContext) -> tuple[nn.Module, Record]:
    """Replace MODEL's convolutions by fitted depthwise-separable ones.

    With ``config.plan``, the model is built to a saved plan instead. A model with nothing to convert is an error unless ``config.allow_unchanged``, so that a
    pipeline does not go on with a model it did not change.
    """
    if config.plan:
        return apply_layout(model, config.plan, context.input_size)
    model, record = convert(model, context.input_size, config)
    if not record.layers and not config.allow_unchanged:
        reasons: dict[str, int] = {}
        for skipped in record.skipped:
            reasons[skipped["reason"]] = reasons.get(skipped["reason"], 0) + 1
        why = "; ".join(f"{count} {reason}" for reason, count in reasons.items()) or "it has no conv layers"
        raise DscompressError(f"nothing to convert in {context.label}: {why}; pass --allow-unchanged to save it as it is")
    return model, record
