"""What the steps and the command line work on: a :class:`Source` is a model with where it came
from (a name or an artifact folder) and the steps done on it in memory since; :func:`resolve`
turns a MODEL argument (a name, ``package.module:factory`` or an artifact folder) into one, and
:func:`save_step` saves a step's result as a new artifact that keeps the source's history and
its uncompressed original (the teacher for fine-tuning).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from dscompress.artifact.format import Artifact, _tensors, check_output, save
from dscompress.artifact.structure import structure_of
from dscompress.core.errors import DscompressError
from dscompress.models.build import ModelSpec, build_model, check_state_dict, read_state_dict


@dataclass
class Source:
    """A model to work on, with where it came from.

    Attributes:
        model: the model, in eval mode.
        spec: the spec of its base architecture.
        artifact: the artifact it was read from, if any.
        pending: step entries applied in memory since the artifact (or the named model) was read.
        start: the model as read, before the pending steps (its teacher when it has no original).
    """

    model: nn.Module
    spec: ModelSpec
    artifact: Artifact | None = None
    pending: list[dict] = field(default_factory=list)
    start: nn.Module | None = None

    @property
    def steps(self) -> list[dict]:
        return (list(self.artifact.steps) if self.artifact else []) + list(self.pending)

    @property
    def label(self) -> str:
        return self.artifact.path if self.artifact else self.spec.name

    def then(self, model: nn.Module, entry: dict) -> Source:
        """The source after one more step, done in memory: ``model``, with ``entry`` pending."""
        return Source(model, self.spec, self.artifact, self.pending + [entry], self.start if self.pending else self.model)

    def original(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(structure, weights) of the uncompressed model to keep as the teacher.

        An artifact's own original if it has one; otherwise the model as it was read.
        """
        if self.artifact is not None and self.artifact.has_original:
            return self.artifact.original_state()
        model = self.start if self.pending else self.model
        return structure_of(model, build_model(self.spec, load_weights=False)), _tensors(model)

    def teacher(self) -> nn.Module:
        """A separate, frozen copy of the uncompressed model."""
        if self.artifact is not None and self.artifact.has_original:
            model = self.artifact.original_model()
        else:
            model = copy.deepcopy(self.start if self.pending else self.model)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()


def resolve(
    model: str,
    num_classes: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    checkpoint: str | None = None,
    weights: str | None = None,
    task: str | None = None,
    aux: bool = False,
) -> Source:
    """Turn a MODEL argument (a name, ``package.module:factory`` or artifact folder) into a model.

    For an artifact folder the manifest supplies the options; a conflicting ``num_classes`` or
    ``input_size`` is an error, and ``checkpoint`` loads weights over it. Its weights files are
    checked before anything else is done with it.
    """
    if os.path.isdir(model):
        artifact = Artifact.open(model)
        spec = artifact.spec
        if num_classes is not None and spec.num_classes not in (None, num_classes):
            raise DscompressError(f"{model!r} has {spec.num_classes} classes; drop --num-classes {num_classes}")
        if weights:
            raise DscompressError(f"{model!r} is an artifact with its own weights; drop --weights")
        if task is not None and task != spec.task:
            raise DscompressError(f"{model!r} holds a {spec.task} model; drop --task {task}")
        if aux and not spec.aux:
            raise DscompressError(f"{model!r} was built without an auxiliary head; drop --aux (it can only be chosen when the model is first named)")
        if input_size is not None and tuple(input_size) != tuple(spec.input_size):
            made = ",".join(map(str, spec.input_size))
            raise DscompressError(f"{model!r} was made for inputs of {made}; drop --input-size (or convert the model again at that size)")
        artifact.check_files()
        net = artifact.model()
        if checkpoint:
            state = read_state_dict(checkpoint)
            check_state_dict(net, state, source=checkpoint)
            net.load_state_dict(state)
        return Source(net, spec, artifact)
    if os.sep in model and not os.path.exists(model):
        raise DscompressError(f"{model!r} is not an artifact folder (no such folder)")
    if os.path.isfile(model):
        raise DscompressError(f"{model!r} is a file, not a model name or an artifact folder (state dicts go with --checkpoint FILE)")
    spec = ModelSpec(
        name=model,
        num_classes=num_classes,
        input_size=tuple(input_size) if input_size else ModelSpec.__dataclass_fields__["input_size"].default,
        weights=weights,
        checkpoint=os.path.abspath(checkpoint) if checkpoint else None,
        task=task,
        aux=aux,
    )
    return Source(build_model(spec), spec)


def save_step(source: Source, out: str, model: nn.Module, entries: list[dict], metrics: dict | None = None, force: bool = False,
              documents: dict[str, dict] | None = None) -> Artifact:
    """Save ``model`` as the result of the steps ``entries`` (:func:`step_entry`) applied to ``source``.

    The new artifact carries the source's steps plus these, and the uncompressed original
    (the teacher for fine-tuning): the source's own original, or the source itself.
    """
    check_output(out, force)
    return save(out, model, source.spec, source.steps + entries, original=source.original(), metrics=metrics, force=force, documents=documents)
