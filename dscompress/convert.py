"""Replace standard convolutions by fitted depthwise-separable ones.

``convert(model, input_size, config)`` deep-copies the model, finds its convolutions with
``torch.fx`` (shapes from ShapeProp, call counts, functional convs, followers), picks a rank per
layer, fits the new weights from the old kernel (:mod:`dscompress.decompose`) and swaps each
``nn.Conv2d`` for a :class:`~dscompress.layers.DepthwiseSeparableConv2d` on its parent module, so
the model keeps its class, methods and state-dict names (``layer1.0.conv1.depthwise.weight``).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
import re
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from dscompress import decompose
from dscompress.errors import DscompressError, does_not_run, first_line
from dscompress.layers import DepthwiseSeparableConv2d
from dscompress.metrics import count_macs, count_params


@dataclass
class ConvertConfig:
    """How to convert. Exactly one of ``rank``, ``energy`` and ``macs_budget`` chooses the ranks.

    Attributes:
        rank: the same rank for every layer, or ``"full"`` for the exact (lossless) rank.
        energy: per layer, the smallest rank keeping this share (0-1] of the squared singular values.
        macs_budget: keep this share (0-1] of the converted layers' MACs, ranks allocated across
            layers for the smallest total fit error.
        dilation: ``"keep"`` the kernel and dilation (exact at full rank); ``"rf"`` shrink odd
            kernels larger than 3 to 3 taps with the dilation that keeps the receptive field
            (5x5 -> 3x3 dilation 2); or an int N to give 3x3 kernels dilation N (this changes the
            function: fine-tuning recovers it), with padding grown to keep the output size.
        include: patterns of layer names to convert (all when empty): globs (``layer4.*``) or
            regexes (``re:layer[34]\\..*``); a pattern also matches everything below a name.
        exclude: patterns of layer names to leave alone.
        min_channels: convs with fewer input channels are skipped (the RGB stem, by default).
        trace: ``"auto"`` uses torch.fx and falls back to forward hooks with a warning when the
            model cannot be traced; ``"fx"`` fails instead; ``"hooks"`` never traces.
    """

    rank: int | str | None = None
    energy: float | None = None
    macs_budget: float | None = None
    dilation: str | int = "keep"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    min_channels: int = 4
    trace: str = "auto"

    def __post_init__(self):
        chosen = [k for k in ("rank", "energy", "macs_budget") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise DscompressError(f"choose ranks one way: give only one of {', '.join(chosen)}")
        if not chosen:
            self.rank = 1
        if self.rank is not None:
            if isinstance(self.rank, str) and self.rank.isdigit():
                self.rank = int(self.rank)
            if self.rank != "full" and not (isinstance(self.rank, int) and self.rank >= 1):
                raise DscompressError(f"rank must be a positive integer or 'full', got {self.rank!r}")
        for name in ("energy", "macs_budget"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise DscompressError(f"{name} must be in (0, 1], got {value}")
        if isinstance(self.dilation, str) and self.dilation.isdigit():
            self.dilation = int(self.dilation)
        if self.dilation not in ("keep", "rf") and not (isinstance(self.dilation, int) and self.dilation >= 1):
            raise DscompressError(f"dilation must be 'keep', 'rf' or a positive integer, got {self.dilation!r}")
        if self.trace not in ("auto", "fx", "hooks"):
            raise DscompressError(f"trace must be 'auto', 'fx' or 'hooks', got {self.trace!r}")
        if self.min_channels < 1:
            raise DscompressError(f"min_channels must be at least 1, got {self.min_channels}")
        self.include = list(self.include or [])
        self.exclude = list(self.exclude or [])
        for pattern in self.include + self.exclude:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise DscompressError(f"bad regular expression {pattern!r}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ConvertConfig:
        return cls(**d)


@dataclass
class LayerRecord:
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
class ConversionRecord:
    """What :func:`convert` did: every converted and skipped conv, and whole-model totals."""

    config: dict
    input_size: list[int]
    trace: str
    layers: list[LayerRecord]
    skipped: list[dict]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def converted_macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def converted_macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["converted_macs_before"] = self.converted_macs_before
        d["converted_macs_after"] = self.converted_macs_after
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ConversionRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["layers"] = [LayerRecord(**layer) for layer in d["layers"]]
        return cls(**d)


@dataclass
class _ConvCall:
    """What the forward pass showed about one conv module."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    calls: int = 1
    followed_by: list[str] = field(default_factory=list)


def matches(name: str, pattern: str) -> bool:
    """Whether a layer name, or one of its parents, matches a glob or ``re:`` pattern."""
    parts = name.split(".")
    candidates = [".".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.fullmatch(c) for c in candidates)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def convert(model: nn.Module, input_size: tuple[int, int, int], config: ConvertConfig | None = None) -> tuple[nn.Module, ConversionRecord]:
    """Return a converted deep copy of ``model`` and the record of what was done.

    Args:
        model: any module whose forward takes one image batch (N, C, H, W).
        input_size: (C, H, W) used to find every layer's shapes and count MACs.
        config: the conversion policy; defaults to rank 1 everywhere except the stem.

    The input model is never modified.
    """
    config = config or ConvertConfig()
    model = copy.deepcopy(model).eval()
    input_size = tuple(input_size)
    convs, functional, how = _discover(model, input_size, config.trace)

    params_before = count_params(model)
    macs_before = count_macs(model, input_size)
    candidates, skipped = _select(model, convs, functional, config)
    plans = [_plan(name, model.get_submodule(name), convs[name], config) for name in candidates]
    plans = [p for p in plans if not _skip_plan(p, skipped)]
    _choose_ranks(plans, config)

    layers = []
    for plan in plans:
        layer, record = _build(plan)
        _set_submodule(model, plan["name"], layer)
        layers.append(record)

    record = ConversionRecord(
        config=config.to_dict(),
        input_size=list(input_size),
        trace=how,
        layers=layers,
        skipped=skipped,
        params_before=params_before,
        params_after=count_params(model),
        macs_before=macs_before,
        macs_after=count_macs(model, input_size),
    )
    return model, record


# --- discovery ---------------------------------------------------------------------------------


def _discover(model: nn.Module, input_size, trace: str) -> tuple[dict[str, _ConvCall], list[str], str]:
    if trace != "hooks":
        try:
            graph_module = torch.fx.symbolic_trace(model)
        except Exception as e:  # noqa: BLE001 - fx raises many kinds of errors
            message = _trace_failure(model, e)
            if trace == "fx":
                raise DscompressError(message + "; use trace='hooks' (--trace hooks) to convert without fx") from None
            warnings.warn(message + "; falling back to forward hooks (functional convs are not detected)", stacklevel=3)
        else:
            return (*_discover_fx(graph_module, input_size), "fx")
    return _discover_hooks(model, input_size), [], "hooks"


def _trace_failure(model: nn.Module, error: Exception) -> str:
    """One line naming what torch.fx could not trace, and where in the user's code."""
    where = ""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not frame.filename.startswith(torch_dir):
            where = f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"
            break
    return f"cannot trace {type(model).__name__} with torch.fx: {first_line(error)}{where}"


def _discover_fx(graph_module: torch.fx.GraphModule, input_size) -> tuple[dict[str, _ConvCall], list[str]]:
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(torch.zeros(1, *input_size))
    except Exception as e:  # noqa: BLE001
        raise does_not_run(input_size, e) from None
    convs: dict[str, _ConvCall] = {}
    functional = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and type(graph_module.get_submodule(node.target)) is nn.Conv2d:
            followers = [str(user.target) if user.op == "call_module" else user.name for user in node.users]
            if node.target in convs:
                convs[node.target].calls += 1
                continue
            source = node.args[0]
            convs[node.target] = _ConvCall(
                input_shape=tuple(source.meta["tensor_meta"].shape),
                output_shape=tuple(node.meta["tensor_meta"].shape),
                followed_by=followers,
            )
        elif node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            functional.append(node.name)
    return convs, functional


def _discover_hooks(model: nn.Module, input_size) -> dict[str, _ConvCall]:
    convs: dict[str, _ConvCall] = {}

    def hook(name):
        def record(module, inputs, output):
            if name in convs:
                convs[name].calls += 1
            else:
                convs[name] = _ConvCall(tuple(inputs[0].shape), tuple(output.shape))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    except Exception as e:  # noqa: BLE001
        raise does_not_run(input_size, e) from None
    finally:
        for h in handles:
            h.remove()
    return convs


# --- policy ------------------------------------------------------------------------------------


def _select(model: nn.Module, convs: dict[str, _ConvCall], functional: list[str], config: ConvertConfig):
    """Names of convs to convert, and every conv left alone with its reason."""
    all_convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for pattern in config.include + config.exclude:
        if not any(matches(n, pattern) for n in all_convs):
            example = next(iter(all_convs), "layer1.0.conv1")
            raise DscompressError(
                f"pattern {pattern!r} matches no conv layer (conv layers are named like {example!r}; "
                "use a glob such as 'layer4.*' or a regex 're:...')"
            )
    chosen, skipped = [], []
    for name, module in all_convs.items():
        reason = None
        if type(module) is not nn.Conv2d:
            reason = f"{type(module).__name__} is a subclass of Conv2d with its own forward"
        elif name not in convs:
            reason = "not called by forward"
        elif module.groups == module.in_channels and module.groups > 1:
            reason = "already depthwise"
        elif module.groups > 1:
            reason = f"grouped conv (groups={module.groups})"
        elif module.kernel_size == (1, 1):
            reason = "1x1 kernel (already pointwise)"
        elif module.in_channels < config.min_channels:
            reason = f"in_channels {module.in_channels} < min_channels {config.min_channels}"
        elif config.include and not any(matches(name, p) for p in config.include):
            reason = "not included"
        elif any(matches(name, p) for p in config.exclude):
            reason = "excluded"
        if reason:
            skipped.append({"name": name, "reason": reason})
        else:
            chosen.append(name)
    skipped += [{"name": n, "reason": "functional conv2d call (no module to swap)"} for n in functional]
    return chosen, skipped


def _plan(name: str, conv: nn.Conv2d, call: _ConvCall, config: ConvertConfig) -> dict:
    """Decide the new kernel, dilation and padding of one conv and fit its taps."""
    kernel, dilation, padding = conv.kernel_size, conv.dilation, conv.padding
    weight = conv.weight.detach()
    fitted, target_effective, function_changed, problem = weight, None, False, None
    if config.dilation == "rf":
        new_kernel, new_dilation = decompose.receptive_field_dilation(kernel, dilation)
        if new_kernel != kernel:
            fitted, target_effective = decompose.fit_dilated_taps(weight, new_kernel)
    elif isinstance(config.dilation, int) and kernel == (3, 3):
        new_kernel, new_dilation = kernel, (config.dilation, config.dilation)
        function_changed = new_dilation != dilation
        if function_changed and padding != "same":
            pad = (0, 0) if padding == "valid" else padding
            padding = tuple(p + (nd - d) for p, nd, d in zip(pad, new_dilation, dilation))
            if min(padding) < 0:
                problem = f"dilation {config.dilation} would need negative padding {padding}"
    else:
        new_kernel, new_dilation = kernel, dilation
    return {
        "name": name,
        "conv": conv,
        "call": call,
        "fitted": fitted,
        "target_effective": target_effective,
        "kernel": new_kernel,
        "dilation": new_dilation,
        "padding": padding,
        "function_changed": function_changed,
        "singular_values": decompose.channel_singular_values(fitted),
        "problem": problem,
    }


def _skip_plan(plan: dict, skipped: list[dict]) -> bool:
    if plan["problem"]:
        skipped.append({"name": plan["name"], "reason": plan["problem"]})
        return True
    return False


def _out_pixels(plan: dict) -> int:
    shape = plan["call"].output_shape
    return shape[2] * shape[3] * plan["call"].calls


def _macs_per_rank(plan: dict) -> int:
    conv = plan["conv"]
    kh, kw = plan["kernel"]
    return _out_pixels(plan) * conv.in_channels * (kh * kw + conv.out_channels)


def _dense_macs(plan: dict) -> int:
    conv = plan["conv"]
    kh, kw = conv.kernel_size
    return _out_pixels(plan) * conv.out_channels * conv.in_channels // conv.groups * kh * kw


def _choose_ranks(plans: list[dict], config: ConvertConfig) -> None:
    for plan in plans:
        plan["full_rank"] = plan["singular_values"].shape[1]
    if config.macs_budget is not None and plans:
        budget_layers = [
            decompose.BudgetLayer(p["singular_values"], _macs_per_rank(p), _dense_macs(p)) for p in plans
        ]
        try:
            ranks = decompose.allocate_ranks(budget_layers, config.macs_budget)
        except ValueError as e:
            raise DscompressError(str(e)) from None
    elif config.energy is not None:
        ranks = [decompose.rank_for_energy(p["singular_values"], config.energy) for p in plans]
    else:
        ranks = [p["full_rank"] if config.rank == "full" else config.rank for p in plans]
    for plan, rank in zip(plans, ranks):
        plan["rank"] = max(1, min(rank, plan["full_rank"]))


# --- building ----------------------------------------------------------------------------------


@torch.no_grad()
def _build(plan: dict) -> tuple[DepthwiseSeparableConv2d, LayerRecord]:
    conv: nn.Conv2d = plan["conv"]
    rank = plan["rank"]
    layer = DepthwiseSeparableConv2d(
        conv.in_channels,
        conv.out_channels,
        plan["kernel"],
        stride=conv.stride,
        padding=plan["padding"],
        dilation=plan["dilation"],
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        rank=rank,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    depthwise, pointwise = decompose.factorize(plan["fitted"], rank)
    layer.depthwise.weight.copy_(depthwise)
    layer.pointwise.weight.copy_(pointwise)
    if conv.bias is not None:
        layer.pointwise.bias.copy_(conv.bias)
    layer.train(conv.training)

    weight = conv.weight.detach().double()
    approx = decompose.reconstruct(depthwise, pointwise, rank).double()
    if plan["target_effective"] is not None:  # fewer, dilated taps: compare on the original grid
        kh, kw = plan["kernel"]
        _, _, h, w = weight.shape
        step_h = (h - 1) // (kh - 1) if kh > 1 else 1
        step_w = (w - 1) // (kw - 1) if kw > 1 else 1
        placed = torch.zeros_like(weight)
        placed[:, :, ::step_h, ::step_w] = approx
        approx = placed
    fit_error = float((weight - approx).norm() / weight.norm()) if weight.norm() > 0 else 0.0

    call = plan["call"]
    record = LayerRecord(
        name=plan["name"],
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_before=list(conv.kernel_size),
        kernel_after=list(plan["kernel"]),
        stride=list(conv.stride),
        dilation_before=list(conv.dilation),
        dilation_after=list(plan["dilation"]),
        rank=rank,
        full_rank=plan["full_rank"],
        params_before=sum(p.numel() for p in conv.parameters()),
        params_after=sum(p.numel() for p in layer.parameters()),
        macs_before=_dense_macs(plan),
        macs_after=_macs_per_rank(plan) * rank,
        fit_error=round(fit_error, 6),
        calls=call.calls,
        output_shape=list(call.output_shape[1:]),
        followed_by=call.followed_by,
        function_changed=plan["function_changed"],
    )
    return layer, record


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_artifact(source, out: str, config: ConvertConfig | None = None, force: bool = False):
    """Convert a :class:`~dscompress.artifact.Source` and save the result as an artifact folder.

    Returns (artifact, record).
    """
    from dscompress.artifact import save_step

    config = config or ConvertConfig()
    model, record = convert(source.model, source.spec.input_size, config)
    artifact = save_step(
        source, out, model, "convert", config.to_dict(), record.to_dict(), metrics={"macs": record.macs_after}, force=force
    )
    return artifact, record


# --- rendering -----------------------------------------------------------------------------------


def conversion_table(record: ConversionRecord):
    """Per-layer table of a :class:`ConversionRecord`."""
    from rich.table import Table

    from dscompress.report import human

    table = Table(title=f"converted {len(record.layers)} conv layers (traced with {record.trace})")
    for title in ("layer", "kernel", "dilation", "rank", "params", "MACs", "fit error"):
        table.add_column(title, justify="left" if title == "layer" else "right")
    for layer in record.layers:
        kernel = "x".join(map(str, layer.kernel_before))
        if layer.kernel_after != layer.kernel_before:
            kernel += " -> " + "x".join(map(str, layer.kernel_after))
        dilation = str(layer.dilation_before[0]) if len(set(layer.dilation_before)) == 1 else str(layer.dilation_before)
        if layer.dilation_after != layer.dilation_before:
            dilation += " -> " + (str(layer.dilation_after[0]) if len(set(layer.dilation_after)) == 1 else str(layer.dilation_after))
        table.add_row(
            layer.name,
            kernel,
            dilation,
            f"{layer.rank}/{layer.full_rank}",
            f"{human(layer.params_before)} -> {human(layer.params_after)}",
            f"{human(layer.macs_before)} -> {human(layer.macs_after)}",
            f"{layer.fit_error:.4f}",
        )
    return table


def conversion_totals(record: ConversionRecord) -> list[str]:
    """Lines of whole-model totals for a conversion record."""
    from dscompress.report import human

    lines = [
        f"params: {human(record.params_before)} -> {human(record.params_after)} "
        f"({record.params_before / max(record.params_after, 1):.2f}x fewer)",
        f"MACs:   {human(record.macs_before)} -> {human(record.macs_after)} "
        f"({record.macs_before / max(record.macs_after, 1):.2f}x fewer)",
    ]
    if record.layers:
        lines.append(
            f"converted layers' MACs: {human(record.converted_macs_before)} -> {human(record.converted_macs_after)} "
            f"({record.converted_macs_before / max(record.converted_macs_after, 1):.2f}x fewer)"
        )
    if record.skipped:
        reasons = {}
        for s in record.skipped:
            reasons.setdefault(s["reason"], []).append(s["name"])
        lines.append("skipped: " + "; ".join(f"{', '.join(n[:3])}{' ...' if len(n) > 3 else ''} ({r})" for r, n in reasons.items()))
    return lines
