"""dscompress: make trained PyTorch CNNs smaller and faster with depthwise-separable convolutions."""

__version__ = "0.1.0"

from dscompress.errors import DscompressError  # noqa: E402
from dscompress.layers import DepthwiseSeparableConv2d  # noqa: E402
from dscompress.convert import ConvertConfig, ConversionRecord, convert, convert_artifact  # noqa: E402
from dscompress.models import ModelSpec, build_model  # noqa: E402
from dscompress.artifact import Artifact, load, resolve, save  # noqa: E402

__all__ = [
    "Artifact",
    "ConversionRecord",
    "ConvertConfig",
    "DepthwiseSeparableConv2d",
    "DscompressError",
    "ModelSpec",
    "build_model",
    "convert",
    "convert_artifact",
    "load",
    "resolve",
    "save",
]
