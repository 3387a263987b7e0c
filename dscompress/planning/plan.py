"""Planning: for a target speed-up on a runtime, choose what each layer becomes.

``plan(model, input_size, config, batches)`` chooses per *unit*, minimising the predicted damage
subject to the predicted latency meeting the budget. A unit is a conv whose output channels feed
one other conv alone (a pair: ``layer1.0.conv1`` -> ``layer1.0.conv2`` in a ResNet block), where
the pair's channels can be pruned without touching the rest of the model; or a single convertible
conv. A unit's options are every combination of keep dense / depthwise-separable at rank r for
each of its layers, and, for a pair, pruning its channels by a ratio (rounded to ``round_to``):
``dense``, ``rank-2``, ``prune-0.5``, ``rank-1+prune-0.25`` per layer.

* **Latency** of an option: its layers' times inside the model built with every unit at that
  option, on the runtime (:class:`~dscompress.planning.latency.Timer`, cached on disk) and scaled to the
  original as timed when planning; the model's latency is the rest (what the table does not
  vary) plus its units' (:mod:`dscompress.planning.latency`).
* **Damage** of an option: the option applied alone to the model, its layers refitted to the
  original's outputs by least squares (:func:`~dscompress.compress.calibrate.refit_layer`), and the KL
  divergence of the model's output from the original's, averaged over held-out images (the
  training images after those used for calibration). Damages are taken as additive over units;
  BENCHMARKS.md checks how well that, and training-free damage, predict accuracy.
* **The solver** is a multiple-choice knapsack solved exactly by dynamic programming over the
  latency budget discretised into :data:`RESOLUTION` steps (costs rounded up, so a plan never
  exceeds its budget by rounding). A Lagrangian search would be faster for many units, but
  CNNs have tens of units and a few dozen options each: the exact solution costs milliseconds,
  and it has no duality gap to explain.

The plan is then built and timed side by side with the original on the runtime. If the measured
latency is off the target by more than :data:`TOLERANCE` either way (slower misses it; faster gives
away accuracy), the units' times are scaled by what was measured and the plan solved again (at
most ``rounds`` times, :func:`search`). Because damages are not quite additive, the plan is then
checked against the uniform plans a user would otherwise pick (every layer at one rank, every pair
pruned by one ratio) that also meet the target, measured: each is calibrated as a whole
(:func:`~dscompress.compress.calibrate.calibrate`) and the least damaging on the held-out images is kept
(the record lists them all). If the candidates cannot reach the target, the error says how fast
the fastest plan would be.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from dscompress.compress.calibrate import (
    CalibrateConfig,
    CalibrationRecord,
    calibrate,
    fitting_batches,
    form_grams,
    patch_grams,
    refit_from,
    refit_layer,
    solve_refit,
)
from dscompress.compress.convert import convertible
from dscompress.compress.units import (
    Option,
    Unit,
    apply_option,
    build,
    candidate_name,
    find_units,
    layout_of,
    option_channels,
    pair_channels,
    unit_options,
)
from dscompress.core.config import ConfigError, Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError
from dscompress.core.transform import TransformContext, register_transform
from dscompress.core.util import QUIET, JsonCache, Progress
from dscompress.data.datasets import DataSpec, load_dataset, make_loader
from dscompress.deploy.export import INPUT_NAME
from dscompress.deploy.ort import open_session
from dscompress.deploy.profile import PRECISIONS, Runtime, check_precision
from dscompress.deploy.quantize import int8_graph
from dscompress.nn.graph import ModelGraph, Stages
from dscompress.nn.layers import LayerTracer
from dscompress.nn.metrics import conv_macs, count_macs
from dscompress.planning.latency import Timer, at_precision, default_cache, latency_table
from dscompress.train.evaluate import accuracy

# The latency (or MAC) budget is split into this many steps for the solver.
RESOLUTION = 2000
# A measured speed-up this much below the target makes the plan be solved again.
TOLERANCE = 0.10
# An option whose damage on the first held-out batch is this many times another's that costs no
# more is not measured on the rest. (A local proxy, the unit's own output error, was tried first:
# it misranked options of equal damage by more than 3x, and a test caught it dropping the best.)
SCREEN_MARGIN = 2.0
# An INT8 plan's activation ranges are calibrated on the first batches of the calibration images
# holding this many (what `quantize` calibrates on by default).
CALIBRATION_INT8_IMAGES = 256


@dataclass
class PlanConfig(StepConfig):
    """What to plan for. Exactly one of ``speedup``, ``latency_ms`` and ``macs_budget`` is the target."""

    STEP: ClassVar[str] = "plan"

    data: str | None = option(None, "Images: the train split calibrates and measures damage, the test split gives top-1.", metavar="SPEC")
    runtime: Runtime = option("ort-cpu", "Where the model will run: ort-cpu, ort-cuda, ort-trt (fp16), torch-cpu or torch-cuda.")
    speedup: float | None = option(None, "Target: this many times faster than the original on the runtime (measured).")
    latency_ms: float | None = option(None, "Target: at most this many milliseconds per run on the runtime.")
    macs_budget: float | None = option(None, "Target: keep this share (0-1] of the model's MACs (no timing).")
    latency_batch: int = option(1, "Images per run on the runtime: the latency target is for this batch.")
    latency_input_size: list[int] | None = option(
        None, "C,H,W of the images the model will run on, if not those it was trained at: latency is timed at this size.", metavar="C,H,W"
    )
    precisions: list[str] | None = option(
        None, "Precisions to plan over: fp32, int8 (ONNX Runtime's QDQ graph of the plan, calibrated on the calibration images) "
              "[default: every one the runtime runs fast here: ort-cpu fp32,int8; others fp32].", metavar="P,P")
    ranks: list[int] = option(factory=lambda: [1, 2, 4], help="Depthwise-separable ranks to choose from.")
    prune_ratios: list[float] = option(factory=lambda: [0.25, 0.5], help="Shares of a pair's channels that may be pruned.")
    round_to: int = option(8, "Pruned channel counts are multiples of this (ONNX Runtime's fast kernels need multiples of 4).")
    batches: int = option(16, "Batches of calibration images for the planned model (as calibrate --batches).")
    damage_batches: int = option(8, "Of those, the batches that refit each option when its damage is measured alone (fewer: faster, coarser).")
    screen: bool = option(True, "Measure on all held-out images only the options whose damage on the first batch is near the best for "
                                "their cost (the rest could not enter a plan); --no-screen measures every option on all.")
    batch_size: int = option(32, "Images per calibration batch.")
    held_out: int = option(256, "Training images after the calibration ones on which damage is measured.")
    bn: bool = option(True, "Re-estimate the BatchNorm statistics when calibrating the planned model.")
    rounds: int = option(3, "Plans solved again, with the measured latency, when the measured speed-up misses the target.")
    seed: int = option(0, "Which images are drawn.")
    device: str = option("auto", "Where calibration computes: auto, cpu or cuda.")

    def check(self):
        chosen = [k for k in ("speedup", "latency_ms", "macs_budget") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ConfigError(None, "give one target: --speedup S, --latency-ms L or --macs-budget F")
        check_range("speedup", self.speedup, low=1, low_open=True)
        check_range("latency_ms", self.latency_ms, low=0, low_open=True)
        check_range("macs_budget", self.macs_budget, 0, 1, low_open=True)
        check_range("latency_batch", self.latency_batch, low=1)
        if self.latency_input_size is not None and (len(self.latency_input_size) != 3 or min(self.latency_input_size) < 1):
            raise ConfigError("latency_input_size", f"must be C,H,W with positive values, got {self.latency_input_size}")
        for rank in self.ranks:
            check_range("ranks", rank, low=1)
        for ratio in self.prune_ratios:
            check_range("prune_ratios", ratio, 0, 1, low_open=True, high_open=True)
        check_range("round_to", self.round_to, low=1)
        check_range("batches", self.batches, low=1)
        check_range("damage_batches", self.damage_batches, low=1)
        check_range("batch_size", self.batch_size, low=2 if self.bn else 1)
        check_range("held_out", self.held_out, low=1)
        check_range("rounds", self.rounds, low=1)
        for precision in self.precisions or []:
            if precision not in ("fp32", "int8"):
                raise ConfigError("precisions", f"unknown precision {precision!r}; use fp32 or int8")
            if precision != "fp32" and self.macs_budget is not None:
                raise ConfigError("precisions", f"{precision} changes time, not MACs: plan it with --speedup or --latency-ms")
            check_precision(self.runtime, precision)
        if self.data is not None:
            self.data = str(DataSpec.parse(self.data))

    def planned_precisions(self) -> list[str]:
        """The precisions planned over: those given, else every one the runtime is timed at here (fp32 for a MAC budget)."""
        if self.macs_budget is not None:
            return ["fp32"]
        return list(dict.fromkeys(self.precisions or PRECISIONS[self.runtime]))


# --- damage --------------------------------------------------------------------------------------


@torch.no_grad()
def _log_probs(model: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.log_softmax(model(x).double(), dim=1) for x in images]


@torch.no_grad()
def kl_damage(model: nn.Module, reference: list[torch.Tensor], images: list[torch.Tensor]) -> tuple[float, float]:
    """Mean KL(original || model) of the outputs (per image, or per pixel for per-pixel logits),
    and the share (percent) of them where both pick the same class."""
    total = agree = count = 0.0
    for ref, x in zip(reference, images):
        out = F.log_softmax(model(x).double(), dim=1)
        kl = (ref.exp() * (ref - out)).sum(1)
        total += float(kl.sum())
        agree += float((ref.argmax(1) == out.argmax(1)).sum())
        count += kl.numel()
    return total / count, 100.0 * agree / count


def model_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


# --- the solver -----------------------------------------------------------------------------------


def solve(costs: list[list[float]], damages: list[list[float]], budget: float, resolution: int = RESOLUTION) -> list[int] | None:
    """One option per unit, with total cost at most ``budget`` and the least total damage.

    A multiple-choice knapsack, solved exactly by dynamic programming over the budget split into
    ``resolution`` steps; each cost is rounded up to whole steps, so the choice never exceeds the
    budget. Returns the chosen option of each unit, or None when no choice fits.
    """
    if budget < 0:
        return None
    step = budget / resolution if budget > 0 else 1.0
    best = np.zeros(resolution + 1)  # least damage with a cost of at most b steps
    back = []
    for unit_costs, unit_damages in zip(costs, damages):
        new = np.full(resolution + 1, np.inf)
        arg = np.full(resolution + 1, -1, dtype=np.int64)
        for index, (cost, damage) in enumerate(zip(unit_costs, unit_damages)):
            steps = int(math.ceil(cost / step - 1e-9)) if cost > 0 else 0
            if steps > resolution:
                continue
            candidate = np.full(resolution + 1, np.inf)
            candidate[steps:] = best[: resolution + 1 - steps] + damage
            better = candidate < new
            new[better], arg[better] = candidate[better], index
        best = new
        back.append((arg, [int(math.ceil(c / step - 1e-9)) if c > 0 else 0 for c in unit_costs]))
    if not np.isfinite(best[resolution]):
        return None
    chosen, b = [], resolution
    for arg, steps in reversed(back):
        index = int(arg[b])
        chosen.append(index)
        b -= steps[index]
    return list(reversed(chosen))


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class PlannedLayer(Record):
    """One layer of the plan: what it becomes, its channels then, and its predicted time (ms per run)."""

    name: str
    choice: str
    in_channels: int
    out_channels: int
    predicted_ms: float | None
    macs: int


@dataclass
class PlannedUnit(Record):
    """One unit: its option's predicted time and damage (KL of the output, alone, refitted)."""

    layers: list[str]
    choice: list[str]
    predicted_ms: float | None
    damage: float | None  # None: not measured alone (a uniform plan won with an option the damage pass screened out)
    agreement: float | None


@dataclass
class PlanRound(Record):
    """One solve: the budget the units got (in the table's ms), the plan's latency predicted by the
    table and as measured (ms; MACs with a MAC budget), and ``scale``, the correction of the units'
    table time measured in the round before that set this round's budget."""

    budget_ms: float
    predicted_ms: float
    measured_ms: float | None
    scale: float = 1.0


@dataclass
class PlanCandidate(Record):
    """A whole plan checked before choosing: the knapsack's (``plan``) or a uniform one
    (``uniform rank-2``, ``uniform prune-0.5``), at a precision (``plan+int8``, ``uniform rank-1+int8``,
    ``int8``: the dense model through ONNX Runtime's quantizer alone); its measured latency (ms;
    MACs with a MAC budget) and, if it met the target, its damage and top-1 agreement once
    calibrated as a whole (an INT8 one's measured on its QDQ graph on ONNX Runtime)."""

    label: str
    measured: float
    damage: float | None = None
    agreement: float | None = None
    chosen: bool = False
    precision: str = "fp32"


@dataclass
class PlanRecord(Record):
    """What :func:`plan` chose and what it measured.

    Speed-ups are original / planned on ``runtime`` at batch ``latency_batch`` (``predicted``
    from the latency table, ``measured`` side by side); with a MAC budget they are MAC ratios.
    ``original_ms`` is the original timed when planning; the latency table's times (cached, its own
    original at ``table_original_ms``) are scaled by their ratio.
    ``damage_predicted`` is the sum of the chosen options' damages, ``damage_measured`` the planned
    and calibrated model's own, on the same held-out images; top-1 on the data's test split
    (None without labels).
    """

    config: dict
    input_size: list[int]
    runtime: str
    device: str
    target: str
    original_ms: float | None
    predicted_ms: float | None
    measured_ms: float | None
    predicted_speedup: float
    measured_speedup: float | None
    macs_before: int
    macs_after: int
    layers: list[PlannedLayer]
    units: list[PlannedUnit]
    damage_predicted: float | None  # None when a chosen option was not measured alone (see PlannedUnit)
    damage_measured: float
    agreement_measured: float
    rounds: list[PlanRound] = field(default_factory=list)
    candidates: list[PlanCandidate] = field(default_factory=list)
    top1_before: float | None = None
    top1_after: float | None = None
    calibration: CalibrationRecord | None = None
    plan: dict = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    table_original_ms: float | None = None
    test_images: int | None = None
    options_measured: int | None = None  # options whose damage was measured end to end (the dense ones aside)
    options_screened: int | None = None  # measured on the first held-out batch only: far behind another option at no more cost
    options_slower: int | None = None  # not measured: predicted no faster than their unit's dense form
    precision: str = "fp32"  # the plan's: int8 is its QDQ graph, calibrated on ``int8_calibration``'s images
    int8_calibration: dict | None = None  # how export rebuilds those images: data, batches, batch_size, seed (and how many images)


def uniform_plans(options: list[list[Option]]) -> dict[str, list[int]]:
    """The plans a user would pick without a planner, as an option index per unit: every
    convertible layer at one rank, or every pair's channels pruned by one ratio (the rest dense)."""
    ranks = sorted({r for unit_choices in options for o in unit_choices for r in o.ranks if r is not None})
    ratios = sorted({o.prune for unit_choices in options for o in unit_choices if o.prune})
    plans = {}
    for label, rank, ratio in [(f"uniform rank-{r}", r, 0.0) for r in ranks] + [(f"uniform prune-{p:g}", None, p) for p in ratios]:
        picked = []
        for unit_choices in options:
            convertible = {i for o in unit_choices for i, r in enumerate(o.ranks) if r is not None}
            ranks_wanted = tuple(rank if i in convertible else None for i in range(len(unit_choices[0].ranks)))
            prune_wanted = ratio if any(o.prune == ratio for o in unit_choices) else 0.0
            picked.append(next(i for i, o in enumerate(unit_choices) if o.ranks == ranks_wanted and o.prune == prune_wanted))
        plans[label] = picked
    return plans


def search(costs: list[list[float]], damages: list[list[float]], target: float, rest: float,
           measure: Callable[[list[int]], float], rounds: int, tolerance: float = TOLERANCE) -> tuple[list[int], PlanRound, list[PlanRound]]:
    """Solve, measure, solve again until the measured cost is within ``tolerance`` of ``target``.

    The table's per-unit costs do not add up exactly to a whole model's (ONNX Runtime fuses and
    schedules differently across layers), and the error runs both ways: a plan measured slower than
    the target misses it, one measured faster gives away accuracy for speed nobody asked for. Each
    round scales the units' costs by what the round before measured, ``(measured - rest) / units``,
    and solves again; it stops when a plan lands within the tolerance, repeats itself, or no plan
    fits. The plan kept is the least damaging one measured within ``target * (1 + tolerance)``,
    else the fastest measured.

    Args:
        costs, damages: per unit, per option (see :func:`solve`); ``rest``: the cost of the layers
            no option changes; ``measure``: the measured cost of a plan (one option index per unit).

    Returns:
        (the option index per unit, the round that measured it, all rounds in order).
    """
    tried, scale = [], 1.0
    for _ in range(rounds):
        budget = (target - rest) / scale
        picked = solve(costs, damages, budget)
        if picked is None or any(picked == t[0] for t in tried):
            break
        units_cost = sum(c[i] for c, i in zip(costs, picked))
        measured = measure(picked)
        tried.append((picked, PlanRound(round(budget, 5), round(rest + units_cost, 5), round(measured, 5), round(scale, 4))))
        if abs(measured - target) <= tolerance * target:
            break
        scale = max(measured - rest, 1e-9) / max(units_cost, 1e-9)
    if not tried:
        raise DscompressError("no plan fits the budget once corrected by the measured latency; lower the target")
    met = [t for t in tried if t[1].measured_ms <= target * (1 + tolerance)]
    if met:
        chosen, final = min(met, key=lambda t: sum(d[i] for d, i in zip(damages, t[0])))
    else:
        chosen, final = min(tried, key=lambda t: t[1].measured_ms)
    return chosen, final, [t[1] for t in tried]


@dataclass
class _Costs:
    """Predicted cost of every option: ms on the runtime (scaled to the original as timed now) or
    MACs when planning by MACs; ``by_unit[u][o]`` is unit ``u`` at option ``o``, ``by_layer[u][o]``
    the same split over the unit's layers."""

    by_unit: list[list[float]]
    by_layer: list[list[list[float]]]
    original: float  # the original's ms (or MACs) at the cost input size
    rest: float  # what no plan changes: the original less its units' dense costs
    target: float
    table: object | None = None  # the LatencyRecord, when timed

    def predicted(self, picked: list[int]) -> float:
        return self.rest + sum(c[i] for c, i in zip(self.by_unit, picked))


def plan(model: nn.Module, input_size, config: PlanConfig, batches, test_data=None, timer: Timer | None = None,
         progress: Progress = QUIET, *, graph: ModelGraph | None = None) -> tuple[nn.Module, PlanRecord]:
    """Plan, build, calibrate and measure ``model`` for ``config``'s target.

    Args:
        model: the dense model to compress (trained); not modified.
        input_size: (C, H, W).
        batches: training image batches (N, C, H, W) or (images, labels) pairs: the first
            ``config.batches`` calibrate, the next ``held_out`` images measure damage.
        test_data: a DataLoader of (images, labels) for top-1 before and after, or None.
        timer: where latency is measured (default: a :class:`~dscompress.planning.latency.Timer` for the
            config's runtime and batch, cached on disk).
        graph: the model's :class:`~dscompress.nn.graph.ModelGraph` at ``input_size``, when the
            caller has one (found now otherwise): its convs, units and their sizes all come from it.

    Returns:
        (the planned, calibrated model, the record).
    """
    start = time.perf_counter()
    input_size = tuple(int(v) for v in input_size)
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    calibration, held_out = _split_batches(batches, config)
    timer = None if config.macs_budget is not None else (timer or Timer(config.runtime, config.latency_batch))
    cost_size = tuple(config.latency_input_size or input_size)  # where latency (or MACs) is counted
    graph = graph or ModelGraph(model, input_size)
    calls = convertible(model, input_size, graph=graph)
    if not calls:
        raise DscompressError("nothing to plan: the model has no conv that conversion takes (see `dscompress convert` for why each is skipped)")
    units = find_units(model, input_size, calls, graph=graph)
    options = [unit_options(u, calls, config.ranks, config.prune_ratios) for u in units]
    cost_graph = graph if cost_size == input_size else ModelGraph(model, cost_size)
    pixels = {n: cost_graph.out_pixels(n) for u in units for n in u.layers}
    precisions = config.planned_precisions()
    costs_at = _option_costs(model, units, options, pixels, cost_size, config, timer, progress, cost_graph, precisions)
    costs = costs_at["fp32"] if "fp32" in costs_at else next(iter(costs_at.values()))
    _check_reachable(list(costs_at.values()), config, timer)
    damages, agreements, kept_of, counts = _damages(model, units, options, calibration[: config.damage_batches], held_out, config,
                                                    progress, costs=[costs_at[p].by_unit for p in precisions], graph=graph)

    def layout(picked):
        """The plan layout of one option index per unit."""
        return layout_of(units, [o[i] for o, i in zip(options, picked)], [k[i] for k, i in zip(kept_of, picked)])

    def measure(picked, precision="fp32"):
        """The plan's MACs, or its time at ``precision`` measured side by side with the original's
        (fp32), in the units of ``costs.original`` (times drift between rounds)."""
        planned, _ = build(model, layout(picked))
        if not timer:
            return count_macs(planned, cost_size)
        return timer.time_module(planned, cost_size, precision) * costs.original / timer.time_module(model, cost_size)

    searched, failures = {}, []
    for precision in precisions:
        at = costs_at[precision]
        try:
            searched[precision] = search(at.by_unit, damages, at.target, at.rest, lambda picked, p=precision: measure(picked, p),
                                         1 if timer is None else config.rounds)
        except DscompressError as e:
            failures.append(f"{precision}: {e}")
    if not searched:
        raise DscompressError("; ".join(failures))
    int8_images = calibration[: max(1, math.ceil(CALIBRATION_INT8_IMAGES / len(calibration[0])))]
    pool, winner, chosen, calibrated, calibration_record, kept = _against_uniform_plans(
        model, input_size, options, searched, layout, measure, calibration, int8_images, held_out, costs.target, timer, config,
        progress, graph)
    costs = costs_at[winner.precision]
    predicted = round(costs.predicted(chosen), 5)
    rounds = searched[winner.precision][2]  # every candidate's precision was searched
    record = PlanRecord(
        config=config.to_dict(),
        input_size=list(input_size),
        runtime=config.runtime if timer else "macs",
        device=costs.table.device if costs.table else "-",
        target=(f"{config.speedup:g}x" if config.speedup else f"{config.latency_ms:g} ms") if timer else f"{config.macs_budget:g} of the MACs",
        original_ms=round(costs.original, 5) if timer else None,
        predicted_ms=predicted if timer else None,
        measured_ms=winner.measured if timer else None,
        predicted_speedup=round(costs.original / predicted, 4),
        measured_speedup=round(costs.original / winner.measured, 4) if winner.measured else None,
        macs_before=count_macs(model, input_size),
        macs_after=count_macs(calibrated, input_size),
        layers=_planned_layers(model, units, options, chosen, costs, pixels, config, timed=timer is not None),
        units=[PlannedUnit(u.layers, [o[i].label(p) for p in range(len(u.layers))], round(c[i], 5) if timer else None,
                           _finite(d[i], 6), _finite(a[i], 3) if math.isfinite(d[i]) else None)
               for u, o, i, c, d, a in zip(units, options, chosen, costs.by_unit, damages, agreements)],
        damage_predicted=_finite(sum(d[i] for d, i in zip(damages, chosen)), 6),
        damage_measured=round(winner.damage, 6),
        agreement_measured=round(winner.agreement, 3),
        rounds=rounds,
        candidates=pool,
        calibration=calibration_record,
        plan=layout(chosen),
        kept=kept,
        seconds=0.0,
        table_original_ms=round(costs.table.total_ms, 5) if costs.table else None,
        options_measured=counts["measured"],
        options_screened=counts["screened"],
        options_slower=counts["slower"],
        precision=winner.precision,
        int8_calibration=({"data": config.data, "batches": len(int8_images), "batch_size": config.batch_size, "seed": config.seed,
                           "images": sum(len(x) for x in int8_images), "method": "minmax"} if winner.precision == "int8" else None),
    )
    if failures:
        record.notes.extend(f"no plan at {line}" for line in failures)
    if winner.precision == "int8" and config.data is None:
        record.notes.append("the INT8 plan's calibration images came from the caller, not --data: export cannot rebuild its graph; use `quantize`")
    if timer and record.measured_speedup and config.speedup and record.measured_speedup < config.speedup * (1 - TOLERANCE):
        record.notes.append(f"measured {record.measured_speedup:.2f}x misses the target {config.speedup:g}x by more than {TOLERANCE:.0%} after {len(rounds)} round(s)")
    if test_data is not None:
        record.top1_before = _top1(model, test_data)
        record.top1_after = _top1(calibrated, test_data) if winner.precision == "fp32" else _int8_top1(calibrated, input_size, int8_images, test_data)
    record.seconds = round(time.perf_counter() - start, 2)
    return calibrated, record


def _finite(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def _option_costs(model: nn.Module, units: list[Unit], options: list[list[Option]], pixels: dict[str, int], cost_size,
                  config: PlanConfig, timer: Timer | None, progress: Progress, graph: ModelGraph,
                  precisions: list[str] = ("fp32",)) -> dict[str, _Costs]:
    """Every option's layers' cost at each precision: their times from the latency table (scaled
    to the model at that precision as timed now; ``graph`` is the model's at ``cost_size``), or
    their MACs without a timer; and the target in the same units (the fp32 original's)."""
    table = None
    if timer:
        table = latency_table(model, cost_size, timer=timer, ranks=config.ranks, prune_ratios=config.prune_ratios,
                              round_to=config.round_to, progress=progress, graph=graph, precisions=precisions)
        # The table may have been measured long before (it is cached) on a machine whose speed
        # drifts (20% was seen here within an hour): the original is timed now, as each plan is,
        # and the table's times are scaled to it.
        original = timer.time_module(model, cost_size)
        target = original / config.speedup if config.speedup else config.latency_ms
    else:
        original = count_macs(model, cost_size)
        target = original * config.macs_budget
    result = {}
    for precision in precisions:
        by_unit, by_layer = [], []
        for unit, unit_options_ in zip(units, options):
            unit_costs, unit_layers = [], []
            for choice in unit_options_:
                values = []
                for position, (layer, (cin, cout)) in enumerate(zip(unit.layers, option_channels(model, unit, choice, config.round_to))):
                    rank = choice.ranks[position]
                    if table:
                        values.append(table.layer(layer).ms[at_precision(candidate_name(rank, choice.prune), precision)])
                    else:
                        values.append(conv_macs(cin, cout, model.get_submodule(layer).kernel_size, pixels[layer], rank))
                unit_costs.append(sum(values))
                unit_layers.append(values)
            by_unit.append(unit_costs)
            by_layer.append(unit_layers)
        dense_now = original
        if table:
            dense_now = original if precision == "fp32" else timer.time_module(model, cost_size, precision)
            now = dense_now / table.totals[precision]
            by_unit = [[c * now for c in unit_costs] for unit_costs in by_unit]
            by_layer = [[[v * now for v in values] for values in unit_layers] for unit_layers in by_layer]
        dense_sum = sum(c[0] for c in by_unit)  # option 0 is all dense, unpruned
        result[precision] = _Costs(by_unit, by_layer, original, dense_now - dense_sum, target, table)
    return result


def _check_reachable(costs_at: list[_Costs], config: PlanConfig, timer: Timer | None) -> None:
    """One line saying how close the fastest plan comes, when no plan at any precision meets the target."""
    costs = min(costs_at, key=lambda c: c.rest + sum(min(u) for u in c.by_unit))
    fastest = costs.rest + sum(min(c) for c in costs.by_unit)
    if fastest <= costs.target:
        return
    what = f"{config.speedup:g}x" if config.speedup else (f"{config.latency_ms:g} ms" if config.latency_ms else f"{config.macs_budget:g} of the MACs")
    if timer:
        reach = (f"the fastest plan these candidates allow is predicted at {fastest:.3f} ms ({costs.original / fastest:.2f}x); "
                 f"the layers plans cannot change leave at most {costs.original / max(costs.rest, 1e-9):.2f}x")
    else:
        reach = f"the smallest plan keeps {fastest / costs.original:.3f} of the MACs"
    raise DscompressError(f"cannot reach {what} on {config.runtime if timer else 'MACs'}: {reach}; add lower ranks or prune ratios, or lower the target")


def _against_uniform_plans(model: nn.Module, input_size, options: list[list[Option]], searched: dict, layout, measure,
                           calibration, int8_images, held_out, target: float, timer: Timer | None, config: PlanConfig,
                           progress: Progress, graph: ModelGraph):
    """The plan against what a user would pick without a planner.

    The units' damages do not add up exactly (measured: a whole plan's is 1.1-2.3x their sum, and
    not in the same order), so each uniform rank and each uniform prune ratio that also meets the
    target is measured too; each is calibrated as a whole and the least damaging on the held-out
    images is kept. Each is calibrated in the order of ``graph`` (the original's: a plan keeps
    which layers run, and in which order).

    With INT8 among ``searched``'s precisions (the knapsack solved again on the INT8 latency table,
    the options' fp32 damages standing for theirs), the candidates gain INT8 forms: that plan
    (``plan+int8``), each uniform plan (``uniform rank-1+int8``) and the dense model alone
    (``int8``: what ONNX Runtime's quantizer gives a user in two lines), timed as QDQ graphs; each
    that meets the target is calibrated in fp32, quantized (ONNX Runtime's quantizer, minmax, on
    ``int8_images``) and its damage measured on ONNX Runtime, so a plan is never more damaging
    than INT8 alone where that is fast enough. Returns every candidate (the winner marked
    ``chosen``), the winner, and its option indices, calibrated (fp32) model, calibration record
    and kept channels.
    """
    dense = [0] * len(options)
    pool, picks = [], {}
    for precision, (chosen, final, _) in searched.items():
        suffix = "" if precision == "fp32" else f"+{precision}"
        pool.append(PlanCandidate(f"plan{suffix}", round(final.measured_ms, 5), precision=precision))
        picks[pool[-1].label] = chosen
        uniform = uniform_plans(options)
        if precision != "fp32":
            uniform = {"dense": dense, **uniform}
        for label, picked in uniform.items():
            if picked != chosen:
                name = precision if label == "dense" else f"{label}{suffix}"
                pool.append(PlanCandidate(name, round(measure(picked, precision), 5),
                                          precision=precision))
                picks[name] = picked
    limit = target * (1 + TOLERANCE) if timer else target
    reference = _log_probs(model, held_out)
    calibrate_config = CalibrateConfig(data=config.data, batches=config.batches, batch_size=config.batch_size, bn=config.bn,
                                       seed=config.seed, device=config.device)
    best, calibrated_of = None, {}
    for candidate in pool:
        if not candidate.label.startswith("plan") and candidate.measured > limit:
            continue
        picked = picks[candidate.label]
        key = tuple(picked)
        if key not in calibrated_of:
            if picked == dense:  # nothing to refit: the original as it is
                calibrated_of[key] = (copy.deepcopy(model), None, {})
            else:
                planned, kept = build(model, layout(picked))
                calibrated, calibration_record = calibrate(planned, model, calibration, calibrate_config, kept=kept, progress=progress,
                                                           graph=graph)
                calibrated_of[key] = (calibrated.cpu(), calibration_record, kept)
        calibrated, calibration_record, kept = calibrated_of[key]
        if candidate.precision == "int8":
            with _int8_session(calibrated, input_size, int8_images) as run:
                candidate.damage, candidate.agreement = (round(v, 6) for v in kl_damage(run, reference, held_out))
        else:
            candidate.damage, candidate.agreement = (round(v, 6) for v in kl_damage(calibrated, reference, held_out))
        meets = candidate.measured <= limit
        if best is None or (meets, -candidate.damage) > (best[0].measured <= limit, -best[0].damage):
            best = (candidate, picked, calibrated, calibration_record, kept)
    winner, picked, calibrated, calibration_record, kept = best
    winner.chosen = True
    return pool, winner, picked, calibrated, calibration_record, kept


@contextlib.contextmanager
def _int8_session(model: nn.Module, input_size, images: list[torch.Tensor]):
    """A callable running ``model``'s INT8 graph (:func:`~dscompress.deploy.quantize.int8_graph`,
    calibrated on ``images``) on ONNX Runtime CPU: image batches in, logits (tensors) out."""
    with tempfile.TemporaryDirectory(prefix="dscompress-plan-int8-") as work:
        path = os.path.join(work, "int8.onnx")
        int8_graph(model, input_size, path, images)
        session, reason = open_session(path, "cpu", threads=torch.get_num_threads())
        if session is None:
            raise DscompressError(f"ONNX Runtime cannot run the plan's INT8 graph: {reason}")
        yield lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.float().cpu().numpy()})[0])


def _int8_top1(model: nn.Module, input_size, images: list[torch.Tensor], loader) -> float:
    """Top-1 (percent) of ``model``'s INT8 graph on ONNX Runtime over a loader of (images, labels)."""
    right = seen = 0
    with _int8_session(model, input_size, images) as run:
        for x, labels in loader:
            right += int((run(x).argmax(1) == labels).sum())
            seen += len(labels)
    return round(100.0 * right / max(seen, 1), 4)


def _planned_layers(model: nn.Module, units: list[Unit], options: list[list[Option]], chosen: list[int], costs: _Costs,
                    pixels: dict[str, int], config: PlanConfig, timed: bool) -> list[PlannedLayer]:
    """What each layer of the chosen plan becomes, with its channels, predicted time and MACs."""
    layers = []
    for unit, unit_options_, index, values in zip(units, options, chosen, costs.by_layer):
        choice = unit_options_[index]
        channels = option_channels(model, unit, choice, config.round_to)
        for position, (layer, (cin, cout)) in enumerate(zip(unit.layers, channels)):
            layers.append(PlannedLayer(layer, choice.label(position), cin, cout,
                                       round(values[index][position], 5) if timed else None,
                                       conv_macs(cin, cout, model.get_submodule(layer).kernel_size, pixels[layer], choice.ranks[position])))
    return layers


def _split_batches(batches, config: PlanConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The calibration batches and the held-out ones (about ``held_out`` images) that follow."""
    calibration, held_out, count = [], [], 0
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if len(calibration) < config.batches:
            calibration.append(images)
        elif count < config.held_out:
            held_out.append(images[: config.held_out - count])
            count += len(held_out[-1])
        else:
            break
    if not calibration or not held_out:
        raise DscompressError(f"plan needs {config.batches} batches of calibration images and {config.held_out} more: the data has too few")
    return calibration, held_out


def _damages(model, units, options, calibration, held_out, config, progress, costs: list[list[list[float]]] | None = None,
             graph: ModelGraph | None = None):
    """Damage and top-1 agreement of every option alone, with its layers refitted; and kept channels.

    Each option is applied alone to the original, its converted (or pruned) layers refitted on the
    calibration images and the KL divergence from the original measured on the held-out ones. With
    an fx trace the work is staged (:class:`~dscompress.nn.graph.Stages`): the part of the model
    before a unit runs once for all of the unit's options (units come in forward order, so it is
    carried from one unit to the next), the refit reuses the layer inputs and the original's
    outputs found then, and each option runs only the rest of the model. The numbers are those of
    running every option on the whole model, to float rounding (tested).

    Only options on or near their unit's front of cost against damage can be chosen (an option
    another of its unit beats on both never is), so with ``costs`` (per precision, per unit, per
    option) two kinds are not measured on all held-out images, and get an infinite damage: an
    option predicted no faster than the unit's dense form at every precision (its damage would be
    at least dense's, zero), and, with ``config.screen``, one whose damage on the first held-out
    batch is :data:`SCREEN_MARGIN` times another's that costs no more, at every precision. Returns the damages, agreements, kept channels and how many options were
    measured, screened out and slower than dense.
    """
    cache = JsonCache(os.path.join(os.path.dirname(default_cache()), "damage.json"))  # by the model's weights, the unit, the option and the images
    digest = hashlib.sha256(json.dumps({
        "model": model_digest(model), "calibration": [float(x.sum()) for x in calibration], "held_out": [float(x.sum()) for x in held_out],
        "round_to": config.round_to, "version": 1,
    }, sort_keys=True).encode()).hexdigest()[:16]
    reference = _log_probs(model, held_out)
    staged = _StagedDamage(model, calibration, held_out, reference) if graph is None or graph.how == "fx" else None
    work = None if staged else copy.deepcopy(model)
    damages, agreements, kept_of = [], [], []
    counts = {"measured": 0, "screened": 0, "slower": 0}
    progress.start("plan: damage of the candidates", sum(map(len, options)))
    for u, (unit, unit_options_) in enumerate(zip(units, options)):
        kept_of.append([pair_channels(model, unit, choice.prune, config.round_to) if unit.is_pair else None for choice in unit_options_])
        keys = [f"{digest}|{unit.name}|{choice.ranks}|{choice.prune}" for choice in unit_options_]
        wanted = [o for o, choice in enumerate(unit_options_)
                  if o > 0 and (costs is None or any(c[u][o] < c[u][0] for c in costs))]  # option 0: dense, no damage
        counts["slower"] += len(unit_options_) - 1 - len(wanted)
        screening = staged is not None and config.screen and costs is not None and len(held_out) > 1
        first = [key + "|first" for key in keys]  # the screening sums are kept too, so that a cached plan screens as the first did
        if staged and any(keys[o] not in cache or (screening and first[o] not in cache) for o in wanted):
            staged.enter(unit)
        if screening:
            for o in wanted:
                if first[o] not in cache:
                    cache[first[o]] = staged.measure(unit, unit_options_[o], kept_of[-1][o], slice(0, 1))
                    progress.advance(0, unit.name)
            estimates = {o: cache[first[o]][0] / cache[first[o]][2] for o in wanted}
            screened = [o for o in wanted if all(_screened_out(o, estimates, c[u]) for c in costs)]
            counts["screened"] += len(screened)
            wanted = [o for o in wanted if o not in screened]
        counts["measured"] += len(wanted)
        unit_damage, unit_agreement = [0.0] + [math.inf] * (len(unit_options_) - 1), [100.0] + [0.0] * (len(unit_options_) - 1)
        for o in wanted:
            if keys[o] not in cache:
                choice, kept = unit_options_[o], kept_of[-1][o]
                if staged:
                    sums = (np.add(cache[first[o]], staged.measure(unit, choice, kept, slice(1, None))) if screening
                            else staged.measure(unit, choice, kept))
                    cache[keys[o]] = [sums[0] / sums[2], 100.0 * sums[1] / sums[2]]
                else:
                    cache[keys[o]] = list(_whole_damage(work, model, unit, choice, kept, calibration, held_out, reference))
            unit_damage[o], unit_agreement[o] = cache[keys[o]]
            progress.advance(1, unit.name)
        progress.advance(len(unit_options_) - len(wanted), unit.name)
        damages.append(unit_damage)
        agreements.append(unit_agreement)
    progress.stop()
    cache.save()
    return damages, agreements, kept_of, counts


def _screened_out(index: int, estimates: dict[int, float], costs: list[float]) -> bool:
    """Whether an option's damage estimated on the first held-out batch is more than
    :data:`SCREEN_MARGIN` times that of another option of its unit that costs no more: so far
    behind at its cost that it would not be on the unit's front of cost against damage, where a
    plan's every choice lies (an option beaten on both by another of its unit never is)."""
    return any(costs[o] <= costs[index] and estimates[o] * SCREEN_MARGIN < estimates[index] for o in estimates if o != index)


def _refitted(unit: Unit, choice: Option, kept: list[int] | None) -> list[bool]:
    """Which of the unit's layers an option refits: the converted ones, and a pruned pair's consumer
    (its producer keeps its kept rows as they were)."""
    return [choice.ranks[p] is not None or (p == 1 and kept is not None) for p in range(len(unit.layers))]


def _whole_damage(work, model, unit, choice, kept, calibration, held_out, reference) -> tuple[float, float]:
    """One option's damage the plain way: applied to ``work`` (a copy of the model), refitted with
    whole forward passes, measured on the whole model, and taken off again."""
    saved = {n: work.get_submodule(n) for n in unit.layers + unit.norms}
    apply_option(work, unit, choice, kept)
    for position, (layer, refit) in enumerate(zip(unit.layers, _refitted(unit, choice, kept))):
        if refit:
            refit_layer(work, model, layer, calibration, out_channels=kept if position == 0 else None)
    result = kl_damage(work, reference, held_out)
    for name, module in saved.items():
        work.set_submodule(name, module)
    return result


class _StagedDamage:
    """Options' damages measured from a cut before their unit (see :func:`_damages`).

    At the cut, each of the unit's layers gets the Gram matrices of the original's input patches
    (with a column of ones) against the original layer's output, over the calibration images.
    Whenever a layer's input is the original's (the unit's first layer; the second when the
    first keeps its dense form, pruned or not) its refit needs no forward pass: a pruned input
    keeps its channels' rows, and a depthwise-separable form's features are the patches times
    its (block-diagonal) depthwise kernel, so its Gram matrices are that kernel's congruence of
    the patches' (:func:`~dscompress.compress.calibrate.form_grams`). Only a second layer after a converted first one
    is refitted from its inputs, run again from the cut.
    """

    def __init__(self, model: nn.Module, calibration: list[torch.Tensor], held_out: list[torch.Tensor], reference: list[torch.Tensor]):
        self.work = torch.fx.GraphModule(copy.deepcopy(model), LayerTracer().trace(model))
        self.stages = Stages(self.work)
        self.reference = reference
        self.calibration = [self.stages.start(x) for x in calibration]
        self.held_out = [self.stages.start(x) for x in held_out]
        self.targets: dict[str, list[torch.Tensor]] = {}
        self.grams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def enter(self, unit: Unit) -> None:
        """Carry the environments to the unit's first layer; find the original layers' inputs'
        patch Gram matrices and outputs there."""
        cut = self.stages.position(unit.layers[0])
        if any(env["at"] > cut for env in self.calibration + self.held_out):  # a unit before the last one: from the start again
            self.calibration = [self.stages.start(env["input"]) for env in self.calibration]
            self.held_out = [self.stages.start(env["input"]) for env in self.held_out]
        self.calibration = [self.stages.run(env, cut) for env in self.calibration]
        self.held_out = [self.stages.run(env, cut) for env in self.held_out]
        self.targets, self.grams = {}, {}
        for env in self.calibration:
            for layer in unit.layers:
                at = self.stages.position(layer)
                env = self.stages.run(env, at + 1, keep=True)
                node = self.stages.nodes[at]
                y = self.stages.value(env, node).clone()
                self.targets.setdefault(layer, []).append(y)
                gram, cross = patch_grams(self.work.get_submodule(layer), self.stages.value(env, node.args[0]), y)
                if layer in self.grams:
                    gram, cross = gram + self.grams[layer][0], cross + self.grams[layer][1]
                self.grams[layer] = (gram, cross)

    def _inputs(self, layer: str) -> list[torch.Tensor]:
        """The layer's inputs on the calibration images, with the unit's current modules."""
        at = self.stages.position(layer)
        node = self.stages.nodes[at].args[0]
        return [self.stages.value(self.stages.run(env, at, keep=True) if env["at"] < at else env, node) for env in self.calibration]

    def _refit(self, unit: Unit, choice: Option, kept: list[int] | None, position: int) -> None:
        layer = unit.layers[position]
        module = self.work.get_submodule(layer)
        if position == 0 or choice.ranks[0] is None:
            inputs = kept if position == 1 else None
            outputs = kept if position == 0 else None
            solve_refit(module, *form_grams(module, *self.grams[layer], inputs, outputs))
        else:
            refit_from(module, zip(self._inputs(layer), self.targets[layer]), name=layer)

    def _apply(self, unit: Unit, choice: Option, kept: list[int] | None) -> dict[str, nn.Module]:
        """Give the work model the option, refitted; returns the modules it replaced."""
        saved = {n: self.work.get_submodule(n) for n in unit.layers + unit.norms}
        apply_option(self.work, unit, choice, kept)
        for position, refit in enumerate(_refitted(unit, choice, kept)):
            if refit:
                self._refit(unit, choice, kept, position)
        return saved

    def _restore(self, saved: dict[str, nn.Module]) -> None:
        for name, module in saved.items():
            self.work.set_submodule(name, module)

    def measure(self, unit: Unit, choice: Option, kept: list[int] | None, batches: slice = slice(None)) -> list[float]:
        """The option's summed KL divergence, agreeing images and images (or pixels) over the
        held-out ``batches``: sums, so that the first batch's (the screening estimate) and the
        rest's add up to the whole's."""
        saved = self._apply(unit, choice, kept)
        try:
            total = agree = count = 0.0
            for env, ref in zip(self.held_out[batches], self.reference[batches]):
                out = F.log_softmax(self.stages.output(self.stages.run(env, keep=True)).double(), dim=1)
                kl = (ref.exp() * (ref - out)).sum(1)
                total += float(kl.sum())
                agree += float((ref.argmax(1) == out.argmax(1)).sum())
                count += kl.numel()
            return [total, agree, count]
        finally:
            self._restore(saved)


def _top1(model: nn.Module, loader) -> float:
    return round(accuracy(model, loader, next(model.parameters()).device)["top1"], 4)


@register_transform(PlanConfig)
def plan_transform(model: nn.Module, config: PlanConfig, context: TransformContext) -> tuple[nn.Module, PlanRecord]:
    """Choose per layer dense / depthwise-separable / pruned for a target speed-up on a runtime, and build it.

    Calibration and damage take batches of the data's train split; top-1 before and after is on
    its test split (classification only).
    """
    if config.data is None:
        raise DscompressError("plan needs images to calibrate and to measure damage: give --data SPEC (e.g. --data digits)")
    size = context.input_size
    count = config.batches + math.ceil(config.held_out / config.batch_size)
    batches = fitting_batches(model, config.data, context, count, config.batch_size, config.seed)
    test = load_dataset(config.data, size, split="test") if context.task == "classification" else None
    model, record = plan(model, size, config, batches, make_loader(test, 256) if test is not None else None, progress=context.progress)
    record.test_images = len(test) if test is not None else None
    return model, record
