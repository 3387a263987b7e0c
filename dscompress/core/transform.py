"""One registry from a config type to the model transform it configures, as torchao maps a config
to its ``quantize_`` transform.

A transform is ``(model, config, context) -> (model, record)``, registered for its config class
with :func:`register_transform` in the module that defines both; :func:`apply` runs the one
registered for a config's type. The Python API (``dscompress.apply``), recipes and the CLI all go
through it: the artifact steps (:mod:`dscompress.pipeline.registry`) only turn an artifact's
history into a :class:`TransformContext`, apply, and save.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dscompress.core.config import Record, StepConfig
from dscompress.core.errors import DscompressError
from dscompress.core.util import QUIET, Progress


@dataclass
class TransformContext:
    """What a transform may need besides the model and its config.

    Attributes:
        input_size: the (C, H, W) the model takes.
        task: ``classification`` or ``segmentation``.
        num_classes: outputs of the model's head, where known.
        label: the model's name in messages (a model name or an artifact folder).
        original: builds a separate, frozen copy of the uncompressed model this one came from (what
            calibration fits back to and fine-tuning distills from); None for a plain model.
        steps: the manifest entries of the steps that made the model (``{"step": ..., "record": ...}``).
        rebuild: for a plain model, builds it again from its spec (a training run seeds its init).
        load: turns a model name or artifact folder into a source with ``model``, ``spec`` and
            ``label`` (a teacher named by the config).
        work_dir: where a resumable transform keeps its checkpoints until its result is saved.
        resume: continue from the checkpoints in ``work_dir``.
        force: start over even if ``work_dir`` holds an unfinished run.
        progress: where long work reports.
    """

    input_size: tuple[int, int, int]
    task: str = "classification"
    num_classes: int | None = None
    label: str = "the model"
    original: Callable[[], nn.Module] | None = None
    steps: list[dict] = field(default_factory=list)
    rebuild: Callable[[], nn.Module] | None = None
    load: Callable[[str], Any] | None = None
    work_dir: str | None = None
    resume: bool = False
    force: bool = False
    progress: Progress = QUIET

    @property
    def kept(self) -> dict[str, list[int]]:
        """For every layer whose outputs the steps pruned, the original's output channels it kept
        (composed over several prune steps: the later ones index the channels the earlier kept)."""
        kept: dict[str, list[int]] = {}
        for step in self.steps:
            record = step.get("record") or {}
            now = dict(record.get("kept") or {})  # a plan's, or a conversion by a plan
            if step["step"] == "prune":
                now.update({layer["name"]: layer["kept_out"] for layer in record.get("layers", []) if layer.get("kept_out") is not None})
            for name, channels in now.items():
                earlier = kept.get(name)
                kept[name] = [earlier[i] for i in channels] if earlier else list(channels)
        return kept

    @property
    def uncalibrated(self) -> bool:
        """Whether the last step that changed the model's layers (convert, prune) was not followed
        by a calibration or a fine-tune (a plan calibrates itself)."""
        for step in reversed(self.steps):
            if step["step"] in ("calibrate", "finetune", "plan"):
                return False
            if step["step"] in ("convert", "prune"):
                return True
        return False


Transform = Callable[[nn.Module, StepConfig, TransformContext], tuple[nn.Module, Record]]

TRANSFORMS: dict[type[StepConfig], Transform] = {}


def register_transform(config: type[StepConfig]):
    """Register the decorated function as the transform ``config`` configures."""

    def register(transform: Transform) -> Transform:
        TRANSFORMS[config] = transform
        return transform

    return register


def transform_for(config: type[StepConfig]) -> Transform | None:
    """The transform registered for a config class (or a base of it), or None."""
    for cls in config.__mro__:
        if cls in TRANSFORMS:
            return TRANSFORMS[cls]
    return None


def apply(model: nn.Module, config: StepConfig, context: TransformContext | tuple[int, int, int]) -> tuple[nn.Module, Record]:
    """Run the transform registered for ``config`` on ``model``.

    Args:
        model: the model to transform (left as it is where the transform copies; see each one).
        config: a transform's config (``ConvertConfig``, ``PruneConfig``, ``CalibrateConfig``, ...).
        context: a :class:`TransformContext`, or just the model's (C, H, W) input size.

    Returns:
        ``(model, record)``: the transformed model and what was done to it.
    """
    transform = transform_for(type(config))
    if transform is None:
        raise DscompressError(f"{type(config).__name__} configures no model transform (the {config.STEP} step measures a model)")
    if not isinstance(context, TransformContext):
        context = TransformContext(tuple(context))
    return transform(model, config, context)
