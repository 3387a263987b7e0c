"""ONNX Runtime: provider names, sessions that really run where asked, and reading ONNX files.

ONNX Runtime quietly runs a session on the CPU when the CUDA or TensorRT provider cannot start
(no GPU, missing libraries): the onnxruntime-gpu wheel lists them as available either way.
:func:`open_session` therefore checks ``session.get_providers()`` and reports such a provider
as unavailable, with the reason ONNX Runtime logged, rather than passing off a CPU run as a
CUDA result.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from dscompress.core.errors import DscompressError
from dscompress.core.util import captured_output

# Short names accepted on the command line; full ONNX Runtime names are accepted too.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
SHORT_NAMES = {v: k for k, v in PROVIDERS.items()}


def parse_providers(value: str | Iterable[str]) -> list[str]:
    """'cpu,cuda' or ['cpu', 'CUDAExecutionProvider'] -> ['cpu', 'cuda']; 'auto' stays alone."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        short = item.lower()
        if short == "auto" or short in PROVIDERS:
            name = short
        elif item in SHORT_NAMES:
            name = SHORT_NAMES[item]
        elif item.endswith("ExecutionProvider"):
            name = item  # another ONNX Runtime provider, e.g. OpenVINOExecutionProvider
        else:
            raise DscompressError(
                f"unknown provider {item!r}; use {', '.join(PROVIDERS)}, auto, or a full ONNX Runtime "
                "name such as CUDAExecutionProvider"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise DscompressError("give at least one provider (cpu, cuda, tensorrt or auto)")
    if "auto" in names and len(names) > 1:
        raise DscompressError("'auto' already means every usable provider; give it alone")
    return names


def ort_name(provider: str) -> str:
    return PROVIDERS.get(provider, provider)


def resolve_providers(providers: list[str]) -> tuple[list[str], bool]:
    """The providers to try and whether they came from ``auto`` (every one this build has;
    those that cannot start are then skipped with a note rather than failed)."""
    if providers == ["auto"]:
        built = available_providers()
        return [short for short, name in PROVIDERS.items() if name in built], True
    return list(providers), False


# --- sessions ------------------------------------------------------------------------------------


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _fallback_reason(log: str) -> str:
    """The line of ONNX Runtime's log that says why a provider did not start."""
    log = _ANSI.sub("", log)
    for pattern in (
        r"Failed to load library \S*?([^/\s]+) with error: ([^\n]+)",
        r"EP Error [^\n]*?(\w+\.cc:\d+ )?[^\n]*?\) ([^\n]+)",
        r"(Failed to create \w+)[^\n]*?(Require [^\n.]+)",
    ):
        match = re.search(pattern, log)
        if match:
            return ": ".join(g.strip() for g in match.groups() if g and g.strip())
    return "ONNX Runtime logged no reason"


def available_providers() -> list[str]:
    """Providers this onnxruntime build was compiled with (not necessarily usable here)."""
    import onnxruntime as ort

    return ort.get_available_providers()


def open_session(onnx_path: str, provider: str, threads: int | None = None, fp16: bool = False, profile: str | None = None):
    """An ONNX Runtime session that really runs on ``provider``, or None and the reason why not.

    Args:
        provider: a short name (``cpu``, ``cuda``, ``tensorrt``) or a full provider name.
        threads: intra-op threads for the CPU parts (None: ONNX Runtime's default).
        fp16: let TensorRT build its engine in half precision (``trt_fp16_enable``).
        profile: a file prefix: record every node's time with ONNX Runtime's profiler
            (``session.end_profiling()`` writes the JSON and returns its path).

    Returns:
        (session, None) when ``session.get_providers()[0]`` is the requested provider, else
        (None, reason). TensorRT gets CUDA and CPU behind it for the nodes it does not take,
        CUDA gets the CPU (shape computations), as in a deployment.
    """
    import onnxruntime as ort

    name = ort_name(provider)
    if name not in ort.get_available_providers():
        return None, f"not in this onnxruntime build (it has {', '.join(ort.get_available_providers())})"
    chain = [(name, {"trt_fp16_enable": True}) if fp16 and name == "TensorrtExecutionProvider" else name]
    if name == "TensorrtExecutionProvider":
        chain.append("CUDAExecutionProvider")
    if name != "CPUExecutionProvider":
        chain.append("CPUExecutionProvider")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    with captured_output() as log:
        try:
            session = ort.InferenceSession(onnx_path, sess_options=options, providers=chain)
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidArgument types
            session, error = None, e
    if session is None:
        text = _ANSI.sub("", str(error)).strip().splitlines()
        if name == "CPUExecutionProvider":
            raise DscompressError(f"ONNX Runtime cannot load {onnx_path!r}: {text[0][:300] if text else error!r}")
        return None, f"session failed: {text[0][:300] if text else type(error).__name__}"
    actual = session.get_providers()
    if actual[0] != name:
        return None, f"ONNX Runtime fell back to {actual[0]}: {_fallback_reason(log[0])}"
    return session, None


def read_onnx(onnx_path: str):
    """Load an ONNX model's graph (weights left on disk), or say why the file is not one."""
    import onnx

    if not os.path.exists(onnx_path):
        raise DscompressError(f"ONNX file {onnx_path!r} does not exist; export one with `dscompress export MODEL --onnx {onnx_path}`")
    if os.path.isdir(onnx_path):
        raise DscompressError(f"{onnx_path!r} is a folder, not an ONNX file")
    try:
        return onnx.load(onnx_path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, onnx its own errors
        raise DscompressError(f"{onnx_path!r} is not an ONNX model ({type(e).__name__}); give a .onnx file written by an exporter") from None


def onnx_precision(model_proto) -> str:
    """'fp16' when the dscompress metadata says so or any float initializer is float16, else 'fp32'."""
    import onnx

    props = {p.key: p.value for p in model_proto.metadata_props}
    if "dscompress.precision" in props:
        return props["dscompress.precision"]
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model_proto.graph.initializer):
        return "fp16"
    return "fp32"


def onnx_input_shape(model_proto) -> list:
    """The first graph input's shape: ints for fixed dims, names (str) for dynamic ones."""
    graph_inputs = {i.name for i in model_proto.graph.initializer}
    inputs = [i for i in model_proto.graph.input if i.name not in graph_inputs]
    if len(inputs) != 1:
        raise DscompressError(f"the ONNX model has {len(inputs)} inputs; dscompress validates single-image-batch models")
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def check_input_size(shape: list, input_size) -> None:
    """Raise when the ONNX input (N, C, H, W) cannot take images of ``input_size`` (C, H, W)."""
    if len(shape) != 4:
        raise DscompressError(f"the ONNX model takes a {len(shape)}-d input {shape}; expected an image batch (N, C, H, W)")
    fixed = [(want, have) for want, have in zip(input_size, shape[1:]) if isinstance(have, int) and have > 0]
    if any(want != have for want, have in fixed):
        given = ",".join(str(v) if isinstance(v, int) and v > 0 else "?" for v in shape[1:])
        raise DscompressError(
            f"the ONNX model takes {given} (C,H,W) images but the model is set up for "
            f"{','.join(map(str, input_size))}; pass --input-size {given} or validate against the model it was exported from"
        )
