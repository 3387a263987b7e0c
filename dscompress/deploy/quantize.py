"""INT8 graphs with ONNX Runtime's quantizer, measured against the fp32 graph they came from.

``quantize_onnx(model, input_size, path, config)`` exports the fp32 graph as ``export`` does
(:func:`~dscompress.deploy.export.export_onnx`, validated on ONNX Runtime CPU), runs ONNX
Runtime's ``quant_pre_process`` (shape inference and graph optimization) and ``quantize_static``
(QDQ, per-channel weights) with calibration images from the data's train split, then measures
top-1 of both graphs on ONNX Runtime CPU over the test split, and their top-1 agreement. An INT8
graph that loses more than ``max_drop`` points is kept as ``NAME.failed.onnx``; ``path`` only ever
holds one that passed.

The two runtimes want different INT8 forms:

- ``ort-cpu``: unsigned 8-bit activations and signed 8-bit per-channel weights, the form MLAS
  runs with its u8s8 kernels (VNNI). ONNX Runtime's own optimized graph
  (``optimized_model_filepath``) is read back to check that each quantized conv became an int8
  kernel (``QLinearConv``), since a Q/DQ pair that the runtime does not fuse runs in float.
- ``ort-trt``: symmetric signed 8-bit activations and weights (zero point 0), the only form
  TensorRT's explicit quantization takes, and float biases (its DequantizeLinear takes no int32).
  Checked here by graph structure only (no GPU).

Graph nodes are named after the modules they came from by their weight initializer
(``layer1.0.conv1.weight``, which both exporters keep when they fold a BatchNorm), so
``--exclude`` takes the same module patterns as ``convert``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx
import torch
from torch import nn

from dscompress.core.config import Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError, first_line
from dscompress.core.selection import check_pattern, matches_any, require_matches
from dscompress.core.util import QUIET, Progress, atomic_path, captured_output, cpu_info, default_permissions
from dscompress.data.datasets import DataSpec, check_classes, load_dataset, make_loader
from dscompress.deploy.export import INPUT_NAME, ExportConfig, export_onnx, failed_path
from dscompress.deploy.onnx_passes import stamp
from dscompress.deploy.ort import open_session
from dscompress.models.build import output_classes

Runtime = Literal["ort-cpu", "ort-trt"]
# The ops whose weights ONNX Runtime's quantizer quantizes; a record row per node of these.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Op types of ONNX Runtime's optimized graph that run a conv in int8 on the CPU.
INT8_CONV_KERNELS = ("QLinearConv", "ConvInteger", "NhwcQLinearConv")
# Op types of the optimized graph that run a weighted node, int8 or float.
KERNEL_OPS = INT8_CONV_KERNELS + WEIGHTED_OPS + ("QGemm", "QLinearMatMul", "MatMulInteger", "FusedConv", "FusedGemm")
CALIBRATION_BATCH = 32


@dataclass
class QuantizeConfig(StepConfig):
    """How to quantize, calibrate and check."""

    STEP: ClassVar[str] = "quantize"

    data: str | None = option(
        None, "Dataset whose train split calibrates and whose test split measures top-1: digits, mnist:DIR, ...", metavar="SPEC")
    runtime: Runtime = option(
        "ort-cpu", "ort-cpu: u8 activations, s8 per-channel weights (MLAS); ort-trt: symmetric s8, zero point 0 (TensorRT).")
    calibrate_images: int = option(256, "Train images the activation ranges are calibrated on.")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = option("minmax", "How activation ranges are read from the calibration images.")
    reduce_range: Literal["auto", "yes", "no"] = option(
        "auto", "ort-cpu: 7-bit weights, which MLAS's u8s8 kernels need on CPUs without VNNI (AVX2's 16-bit sums saturate); "
        "auto: yes where this CPU lacks VNNI.")
    exclude: list[str] = option(factory=list, repeat=True, help="Leave modules matching this pattern in float (layer4.*, re:...).")
    equalize: bool = option(False, "First equalize each depthwise-separable layer's halves on the calibration data, and each conv -> conv "
                                   "pair through BatchNorm and ReLU (`dscompress equalize --pairs`: the same fp32 function, ranges brought together).")
    bias_correction: bool = option(False, "Then correct each conv's bias for the mean error its INT8 weights add (their grid predicted exactly, "
                                          "mean inputs from the calibration data); the fp32 graph measured is still the model's own.")
    max_drop: float = option(1.0, "Top-1 points the INT8 graph may lose against the fp32 graph; more is a failure.")
    test_images: int | None = option(None, "Test images measured [default: all].")
    opset: int = option(18, "ONNX opset of the exported graph.")
    seed: int = option(0, "Seed of the draw of calibration images.")

    def check(self):
        check_range("calibrate_images", self.calibrate_images, low=1)
        check_range("test_images", self.test_images, low=1)
        check_range("max_drop", self.max_drop)
        for pattern in self.exclude:
            check_pattern(pattern)
        if self.data is not None:
            self.data = str(DataSpec.parse(self.data))


@dataclass
class QuantizedNode(Record):
    """One weighted node of the graph (conv, gemm, matmul), by the module it came from.

    Attributes:
        module: the module name (``layer1.0.conv1``), or the node's own name where none is known.
        op: its ONNX op type in the fp32 graph.
        node: its name in the graph.
        weight: its float weight initializer's name.
        quantized: whether its input and weight are quantized (come from DequantizeLinear).
        reason: why it was left in float (empty when quantized).
        kernel: ``ort-cpu``: the op ONNX Runtime's optimized graph runs it with (``QLinearConv``,
            or ``Conv`` when the Q/DQ pair was not fused); empty when not checked.
    """

    module: str
    op: str
    node: str
    weight: str
    quantized: bool
    reason: str = ""
    kernel: str = ""


@dataclass
class QuantizeRecord(Record):
    """What :func:`quantize_onnx` wrote and how the INT8 graph measured against the fp32 one.

    ``reduce_range``: the weights got 7 bits (see :func:`reduces_range`); ``kernels`` counts the op
    types of ONNX Runtime CPU's optimized graph (``ort-cpu``). Top-1 values and the agreement are percentages on ``test_images`` images of the test split,
    both graphs run on ONNX Runtime CPU; ``drop`` is ``fp32_top1 - int8_top1`` in points;
    ``logit_error`` and ``logit_shift``: the INT8 logits' RMS and mean error against fp32's,
    relative to the fp32 logits' standard deviation (:func:`measure`).
    """

    DERIVED: ClassVar[tuple[str, ...]] = ("passed",)

    path: str
    requested_path: str
    runtime: str
    data: str
    calibrate_method: str
    calibrate_images: int
    test_images: int
    fp32_top1: float
    int8_top1: float
    drop: float
    agreement: float
    max_drop: float
    fp32_bytes: int
    int8_bytes: int
    nodes: list[QuantizedNode] = field(default_factory=list)
    preprocessed: bool = True
    reduce_range: bool = False
    kernels: dict = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    equalized: int = 0
    bias_corrected: int = 0
    logit_error: float = 0.0
    logit_shift: float = 0.0

    @property
    def passed(self) -> bool:
        return self.drop <= self.max_drop

    @property
    def quantized(self) -> list[QuantizedNode]:
        return [n for n in self.nodes if n.quantized]

    def failure(self) -> str:
        """One line saying why the INT8 graph was not accepted (empty when it was)."""
        if self.passed:
            return ""
        return (f"INT8 top-1 {self.int8_top1:.2f}% is {self.drop:.2f} points below fp32's {self.fp32_top1:.2f}% "
                f"(--max-drop {self.max_drop:g}); the graph is kept at {self.path}, not at {self.requested_path}")

    def summary(self) -> dict:
        """The short form stored in an artifact's metrics (``int8``)."""
        return {
            "path": os.path.abspath(self.path), "runtime": self.runtime, "passed": self.passed, "data": self.data,
            "fp32_top1": self.fp32_top1, "int8_top1": self.int8_top1, "agreement": self.agreement, "test_images": self.test_images,
            "calibrate_method": self.calibrate_method, "calibrate_images": self.calibrate_images,
            "quantized": len(self.quantized), "float": len(self.nodes) - len(self.quantized), "int8_bytes": self.int8_bytes,
        }


# --- names ---------------------------------------------------------------------------------------


def _weight_of(node, initializers: set[str], producers: dict) -> str | None:
    """The float weight initializer of a weighted node, through its DequantizeLinear if quantized."""
    if len(node.input) < 2:
        return None
    weight = node.input[1]
    if weight not in initializers and weight in producers and producers[weight].op_type == "DequantizeLinear":
        weight = producers[weight].input[0].removesuffix("_quantized")
    return weight


def _scoped_name(node_name: str) -> str | None:
    """``/layer2/layer2.0/downsample/downsample.0/Conv`` -> ``layer2.0.downsample.0``: the
    TorchScript exporter's scopes, where a child of a Sequential is written ``parent.index``."""
    parts = []
    for scope in node_name.strip("/").split("/")[:-1]:
        parts.append(scope[len(parts[-1]) + 1:] if parts and scope.startswith(parts[-1] + ".") else scope)
    return ".".join(parts) or None


def module_names(graph) -> dict[str, str]:
    """Node name -> module name for every weighted node (:data:`WEIGHTED_OPS`) of ``graph``.

    The module is read from the node's weight initializer (``layer1.0.conv1.weight``, which the
    dynamo exporter keeps when it folds a BatchNorm), else from the exporter's scopes (dynamo:
    the ``pkg.torch.onnx.name_scopes`` metadata; TorchScript: ``/layer1/layer1.0/conv1/Conv``),
    else the node's own name stands for it.
    """
    initializers = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    names = {}
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        weight = _weight_of(node, initializers, producers) or ""
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        if weight.endswith(".weight"):
            names[node.name] = weight.removesuffix(".weight")
        elif scopes and scopes.count(",") > 1:
            names[node.name] = scopes.strip("[]").split(",")[-2].strip(" '\"")
        elif node.name.startswith("/") and node.name.count("/") > 1:
            names[node.name] = _scoped_name(node.name)
        else:
            names[node.name] = node.name
    return names


# --- calibration ---------------------------------------------------------------------------------


def batches_reader(batches):
    """ONNX Runtime's ``CalibrationDataReader`` over image batches (tensors or arrays, N x C x H x W)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            arrays = [x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32) for x in batches]
            self.batches = iter([{INPUT_NAME: x} for x in arrays])
            self.count = sum(len(x) for x in arrays)

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def calibration_reader(dataset, images: int, seed: int):
    """:func:`batches_reader` over ``images`` train images drawn with ``seed`` (all of them when
    there are fewer), in batches of :data:`CALIBRATION_BATCH`."""
    count = min(images, len(dataset))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return batches_reader([x for x, _ in make_loader(torch.utils.data.Subset(dataset, chosen), CALIBRATION_BATCH)])


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 VNNI or AVX-VNNI); False where unknown."""
    flags = set(cpu_info().get("flags") or [])
    return bool(flags & {"avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni"})


def reduces_range(config: QuantizeConfig) -> bool:
    """Whether the weights get 7 bits: ``ort-cpu`` on a CPU without VNNI, where MLAS multiplies
    u8 by s8 with VPMADDUBSW, whose 16-bit pair sums saturate at full 8-bit range (ONNX Runtime's
    quantization docs; measured here on AVX2: a TinyCNN on digits at 3x32x32 lost 29 top-1 points, none with 7 bits)."""
    if config.runtime != "ort-cpu" or config.reduce_range == "no":
        return False
    return config.reduce_range == "yes" or not cpu_has_vnni()


def _quantize_static(source: str, target: str, reader, config: QuantizeConfig, exclude: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    symmetric = config.runtime == "ort-trt"
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    with captured_output():
        quantize_static(
            source, target, reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduces_range(config),
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method[config.calibrate_method],
            nodes_to_exclude=exclude,
            # TensorRT's DequantizeLinear takes only 8-bit inputs, not ONNX Runtime's int32 biases
            # (onnx/onnx-tensorrt#850, microsoft/onnxruntime#17738): they stay float, TensorRT fuses them.
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": not symmetric},
        )


def _preprocess(source: str, target: str) -> str | None:
    """``quant_pre_process`` of ``source`` into ``target``; the reason when it failed (then the
    quantizer takes the graph as exported)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with captured_output():
            quant_pre_process(source, target)
    except Exception as e:  # noqa: BLE001 - shape inference and the optimizer raise many kinds
        return first_line(e)[:300]
    return None


def int8_graph(model: nn.Module, input_size, path: str, batches=None, config: QuantizeConfig | None = None) -> list[str]:
    """Write ``model``'s QDQ INT8 graph to ``path`` as :func:`quantize_onnx` makes it (exported,
    pre-processed, quantized for ``config.runtime``), calibrated on image ``batches``, without
    validating or measuring it: what a plan times and measures its INT8 candidates with. Without
    ``batches``, on 8 seeded random images: for timing only (ranges do not change its speed).
    Returns notes (a pre-processing that failed)."""
    config = config or QuantizeConfig()
    if batches is None:
        batches = [np.random.default_rng(0).standard_normal((8, *input_size), dtype=np.float32)]
    notes = []
    with tempfile.TemporaryDirectory(prefix="dscompress-int8-") as work:
        source = os.path.join(work, "fp32.onnx")
        export_onnx(model, list(input_size), source, ExportConfig(opset=config.opset, validate=False))
        prepared = os.path.join(work, "prepared.onnx")
        reason = _preprocess(source, prepared)
        if reason:
            notes.append(f"quant_pre_process failed ({reason}); quantized the graph as exported")
            prepared = source
        _quantize_static(prepared, path, batches_reader(batches), config, [])
    return notes


# --- what was quantized --------------------------------------------------------------------------


def quantized_nodes(graph, excluded: set[str]) -> list[QuantizedNode]:
    """A row per weighted node of a QDQ ``graph``: quantized when its input and weight come
    from DequantizeLinear nodes, else left in float with the reason."""
    initializers = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    names = module_names(graph)
    rows = []
    for node in graph.node:
        if node.name not in names:
            continue
        quantized = all(x in producers and producers[x].op_type == "DequantizeLinear" for x in node.input[:2])
        reason = ""
        if not quantized:
            reason = "excluded by pattern" if node.name in excluded else f"ONNX Runtime's quantizer left this {node.op_type} in float"
        rows.append(QuantizedNode(names[node.name], node.op_type, node.name, _weight_of(node, initializers, producers) or "", quantized, reason))
    return rows


def optimized_kernels(path: str, work: str, threads: int) -> tuple[dict[str, str], Counter]:
    """ONNX Runtime CPU's optimized form of ``path``: (weight initializer name -> op type running
    each weighted node, count of every op type). The optimized graph is written to ``work``."""
    import onnxruntime as ort

    optimized = os.path.join(work, "optimized.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = optimized
    options.intra_op_num_threads = threads
    with captured_output():
        ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    graph = onnx.load(optimized, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    kernels = {}
    for node in graph.node:
        weights = [x for x in node.input if x in initializers and not x.endswith(("_scale", "_zero_point"))]
        if node.op_type in KERNEL_OPS and weights:
            kernels.setdefault(weights[0].removesuffix("_quantized"), node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
    return kernels, Counter(n.op_type for n in graph.node)


def _not_fused_reason(row: QuantizedNode, graph) -> str:
    """Why ONNX Runtime CPU runs a quantized conv in float, where it can be told from the graph."""
    node = next(n for n in graph.node if n.name == row.node)
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if group > 1:
        return f"a grouped conv (group {group}) whose Q/DQ pair ONNX Runtime did not fuse (its int8 depthwise kernel needs equal zero points)"
    return "ONNX Runtime did not fuse its Q/DQ pair into an int8 kernel"


# --- measuring -----------------------------------------------------------------------------------


def measure(fp32_session, int8_session, batches, limit: int | None) -> dict:
    """Top-1 of both graphs against the labels and their agreement, in percent, over up to ``limit``
    images; and how far the INT8 logits are from the fp32 ones, relative to the fp32 logits' spread
    (their standard deviation over images and classes): ``logit_error``, the root mean square of the
    difference, and ``logit_shift``, the mean over classes of |the difference's mean over images|
    (the part of the error that bias correction removes)."""
    seen = fp32_right = int8_right = agree = 0
    difference_sum = difference_squares = reference_sum = reference_squares = 0.0
    for images, labels in batches:
        if limit is not None:
            images, labels = images[: limit - seen], labels[: limit - seen]
        if len(images) == 0:
            break
        feed = {INPUT_NAME: images.float().numpy()}
        reference, quantized = fp32_session.run(None, feed)[0].astype(np.float64), int8_session.run(None, feed)[0].astype(np.float64)
        a, b = reference.argmax(axis=1), quantized.argmax(axis=1)
        difference_sum = difference_sum + (quantized - reference).sum(axis=0)
        difference_squares += float(((quantized - reference) ** 2).sum())
        reference_sum += float(reference.sum())
        reference_squares += float((reference ** 2).sum())
        labels = np.asarray(labels)
        fp32_right += int((a == labels).sum())
        int8_right += int((b == labels).sum())
        agree += int((a == b).sum())
        seen += len(images)
    if seen == 0:
        raise DscompressError("no test images to measure top-1 on; the dataset's test split is empty")
    values = seen * len(difference_sum)
    spread = max(np.sqrt(max(reference_squares / values - (reference_sum / values) ** 2, 0.0)), 1e-12)
    return {"images": seen, "fp32_top1": 100.0 * fp32_right / seen, "int8_top1": 100.0 * int8_right / seen, "agreement": 100.0 * agree / seen,
            "logit_error": float(np.sqrt(difference_squares / values) / spread),
            "logit_shift": float(np.abs(difference_sum / seen).mean() / spread)}


# --- quantizing ----------------------------------------------------------------------------------


def _check_output(path: str, force: bool) -> None:
    for target in (path, failed_path(path)):
        if os.path.isdir(target):
            raise DscompressError(f"{target!r} is a folder; give a file name such as model.int8.onnx")
    if os.path.exists(path) and not force:
        raise DscompressError(f"{path!r} already exists; choose another output or pass --force to replace it")


def quantize_onnx(
    model: nn.Module,
    input_size,
    path: str,
    config: QuantizeConfig,
    force: bool = False,
    metadata: dict | None = None,
    task: str = "classification",
    model_name: str = "the model",
    progress: Progress = QUIET,
    reference: nn.Module | None = None,
    calibration: list[torch.Tensor] | None = None,
) -> QuantizeRecord:
    """Export ``model``, quantize it to INT8 for ``config.runtime`` and measure it against fp32.

    Args:
        model: a classifier taking image batches (N, C, H, W) and returning logits (N, classes).
        input_size: (C, H, W) of one image.
        path: the ``.onnx`` file to write; the INT8 graph goes there only when it loses at most
            ``config.max_drop`` top-1 points, else to ``NAME.failed.onnx`` beside it.
        config: data, runtime, calibration, exclusions and the accepted drop.
        metadata: extra ``metadata_props`` entries (e.g. the source artifact's manifest hash).
        task: the model's task; only classification is measured (segmentation is refused).
        reference: the fp32 model the INT8 graph is measured against, where ``model`` is not it
            (bias correction changes the fp32 function; equalization does not); default ``model``.
        calibration: image batches (N, C, H, W) to calibrate on instead of ``config.calibrate_images``
            drawn from the train split (a plan's: its INT8 graph is rebuilt from the images it was measured with).

    Returns:
        The :class:`QuantizeRecord`; a graph over the drop is recorded there (``passed``), not raised.
    """
    if config.data is None:
        raise DscompressError("quantize needs a dataset to calibrate on and measure with: give --data SPEC (e.g. --data digits)")
    if task != "classification":
        raise DscompressError(f"quantize measures top-1 of classifiers; {model_name} is a {task} model (not supported yet)")
    _check_output(path, force)
    input_size = [int(v) for v in input_size]
    started = time.perf_counter()
    train = load_dataset(config.data, input_size, split="train")
    check_classes(train, output_classes(model, input_size, task, model_name), data_name=config.data, task=task, model_name=model_name)
    test = load_dataset(config.data, input_size, split="test")
    progress.start("quantize: export, calibrate, measure", 3)
    try:
        record = _quantize(model, input_size, path, config, train, test, metadata, progress, reference, calibration)
    finally:
        progress.stop()
    record.seconds = time.perf_counter() - started
    return record


def _export_fp32(model: nn.Module, input_size: list[int], path: str, config: QuantizeConfig, metadata: dict | None) -> None:
    exported = export_onnx(model, input_size, path, ExportConfig(opset=config.opset, providers=["cpu"]), metadata=metadata)
    if exported.validation_status != "pass":
        raise DscompressError(f"the fp32 graph does not match PyTorch ({exported.failure()}); see `dscompress export`")


def _quantize(model: nn.Module, input_size: list[int], path: str, config: QuantizeConfig, train, test, metadata: dict | None,
              progress: Progress, reference: nn.Module | None = None, calibration: list[torch.Tensor] | None = None) -> QuantizeRecord:
    threads = torch.get_num_threads()
    notes = []
    with tempfile.TemporaryDirectory(prefix="dscompress-quantize-") as work:
        fp32 = source = os.path.join(work, "fp32.onnx")
        _export_fp32(model, input_size, fp32, config, metadata)
        if reference is not None and reference is not model:
            fp32 = os.path.join(work, "reference.onnx")
            _export_fp32(reference, input_size, fp32, config, metadata)
        progress.advance(status="exported")
        prepared = os.path.join(work, "prepared.onnx")
        reason = _preprocess(source, prepared)
        if reason:
            notes.append(f"quant_pre_process failed ({reason}); quantized the graph as exported")
            prepared = source
        graph = onnx.load(prepared, load_external_data=False).graph
        names = module_names(graph)
        require_matches(config.exclude, list(dict.fromkeys(names.values())), "--exclude", kind="weighted layer")
        excluded = {node for node, module in names.items() if matches_any(module, config.exclude)}
        reader = batches_reader(calibration) if calibration is not None else calibration_reader(train, config.calibrate_images, config.seed)
        int8 = os.path.join(work, "int8.onnx")
        _quantize_static(prepared, int8, reader, config, sorted(excluded))
        progress.advance(status=f"calibrated on {reader.count} images")
        proto = onnx.load(int8)
        nodes = quantized_nodes(proto.graph, excluded)
        kernels = {}
        if config.runtime == "ort-cpu":
            by_weight, counts = optimized_kernels(int8, work, threads)
            kernels = dict(sorted(counts.items()))
            for row in nodes:
                row.kernel = by_weight.get(row.weight, "")
                if row.quantized and row.op == "Conv" and row.kernel.split(".")[-1] not in INT8_CONV_KERNELS:
                    notes.append(f"{row.module} runs as {row.kernel or 'an unknown kernel'}: {_not_fused_reason(row, proto.graph)}")
        fp32_session, _ = open_session(fp32, "cpu", threads=threads)
        int8_session, _ = open_session(int8, "cpu", threads=threads)
        scores = measure(fp32_session, int8_session, make_loader(test, 64), config.test_images)
        progress.advance(status="measured")
        drop = scores["fp32_top1"] - scores["int8_top1"]
        record = QuantizeRecord(
            path=path, requested_path=path, runtime=config.runtime, data=config.data, calibrate_method=config.calibrate_method,
            calibrate_images=reader.count, test_images=scores["images"], fp32_top1=scores["fp32_top1"], int8_top1=scores["int8_top1"],
            drop=drop, agreement=scores["agreement"], max_drop=config.max_drop, fp32_bytes=os.path.getsize(fp32),
            int8_bytes=0, nodes=nodes, preprocessed=reason is None, reduce_range=reduces_range(config), kernels=kernels,
            exclude=list(config.exclude), notes=notes, logit_error=scores["logit_error"], logit_shift=scores["logit_shift"],
        )
        stamp(proto, {**{p.key: p.value for p in onnx.load(fp32, load_external_data=False).metadata_props},
                      "dscompress.precision": "int8", "dscompress.runtime": config.runtime,
                      "dscompress.calibration": f"{config.calibrate_method}, {reader.count} images of {config.data}"})
        _write(proto, record)
    return record


def _write(proto, record: QuantizeRecord) -> None:
    """Put the INT8 graph at the requested path if it passed, else at ``NAME.failed.onnx``, atomically."""
    record.path = record.requested_path if record.passed else failed_path(record.requested_path)
    with atomic_path(record.path) as tmp:
        onnx.save_model(proto, tmp)
    default_permissions(record.path)
    record.int8_bytes = os.path.getsize(record.path)
