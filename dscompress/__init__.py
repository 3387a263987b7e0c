"""dscompress: make trained PyTorch CNNs smaller and faster with depthwise-separable convolutions.

This module is the public API; the subpackages below it are the implementation (see "How the
code is laid out" in the README). The names are loaded on first use, so that ``import dscompress``
(and ``dscompress --help``) does not import torch.
"""

import importlib

__version__ = "0.2.0"

# Public name -> the module that defines it.
_API = {
    # models and artifacts
    "ModelSpec": "dscompress.models.build",
    "build_model": "dscompress.models.build",
    "Artifact": "dscompress.artifact.format",
    "Source": "dscompress.artifact.source",
    "load": "dscompress.artifact.format",
    "resolve": "dscompress.artifact.source",
    "save": "dscompress.artifact.format",
    # transforms: nn.Module in, (module, record) out; apply runs the one a config configures
    "apply": "dscompress.core.transform",
    "TransformContext": "dscompress.core.transform",
    "ConvertConfig": "dscompress.compress.convert",
    "ConversionRecord": "dscompress.compress.convert",
    "convert": "dscompress.compress.convert",
    "convert_": "dscompress.compress.convert",
    "CalibrateConfig": "dscompress.compress.calibrate",
    "calibrate": "dscompress.compress.calibrate",
    "PruneConfig": "dscompress.compress.prune",
    "prune": "dscompress.compress.prune",
    "EqualizeConfig": "dscompress.compress.equalize",
    "equalize": "dscompress.compress.equalize",
    "BiasCorrectConfig": "dscompress.compress.biascorrect",
    "bias_correct": "dscompress.compress.biascorrect",
    "FinetuneConfig": "dscompress.train.finetune",
    "finetune": "dscompress.train.finetune",
    "PlanConfig": "dscompress.planning.plan",
    "plan": "dscompress.planning.plan",
    # deployment and measurement
    "ExportConfig": "dscompress.deploy.export",
    "export_onnx": "dscompress.deploy.export",
    "QuantizeConfig": "dscompress.deploy.quantize",
    "quantize_onnx": "dscompress.deploy.quantize",
    "ValidateConfig": "dscompress.deploy.validate",
    "validate_onnx": "dscompress.deploy.validate",
    "EvaluateConfig": "dscompress.train.evaluate",
    "evaluate": "dscompress.train.evaluate",
    # steps over artifacts
    "StepContext": "dscompress.pipeline.steps",
    "convert_artifact": "dscompress.pipeline.steps",
    "run_step": "dscompress.pipeline.steps",
    "DepthwiseSeparableConv2d": "dscompress.nn.layers",
    "DscompressError": "dscompress.core.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
