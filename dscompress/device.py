"""Choosing where to run."""

from __future__ import annotations

import torch

from dscompress.errors import DscompressError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when usable, else CPU; ``cuda`` without a usable GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DscompressError("--device cuda was asked for but no usable CUDA GPU is visible; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DscompressError(f"unknown device {name!r}; use auto, cpu or cuda") from None
