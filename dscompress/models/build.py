"""Naming, building and loading the models that dscompress works on.

A model is named by a :class:`ModelSpec`: a torchvision classification model
(``resnet18``) or segmentation model (``deeplabv3_resnet50``), a user factory
(``package.module:factory``), optionally torchvision weights (``--weights``) or a local
checkpoint (``--checkpoint``). Artifact folders carry their own spec in their manifest; see
:mod:`dscompress.artifact.format`.

Every spec records its **task**: ``classification`` (the model returns logits (N, classes)) or
``segmentation`` (logits (N, classes, H, W), one class score per pixel). The task decides the
metric, the loss and the checks on data downstream. torchvision's segmentation models return a
dict (``out``, and ``aux`` when built with an auxiliary head); :class:`SegmentationNet` gives them
one output, the ``out`` logits, with the same state-dict names, so their checkpoints load as they are.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import socket
import urllib.error
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch import nn
from torchvision.models import segmentation

from dscompress.core.errors import DscompressError, DscompressWarning, first_line

DEFAULT_INPUT_SIZE = (3, 224, 224)
TASKS = ("classification", "segmentation")
Task = Literal["classification", "segmentation"]


@dataclass
class ModelSpec:
    """Everything needed to build a model again.

    Attributes:
        name: a torchvision classification or segmentation model name, ``timm:NAME`` or
            ``package.module:factory``.
        num_classes: size of the classifier head; None keeps the model's default.
        input_size: (C, H, W) of one input image, used for shapes, MACs and export.
        weights: a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``); these download.
        checkpoint: path of a state dict (``.pt``/``.pth``/``.safetensors``) to load.
        kwargs: extra keyword arguments for the constructor.
        task: ``classification`` or ``segmentation``; None means the task of a torchvision name
            (:func:`task_of`), else classification. A factory of segmentation models says so.
        aux: build a torchvision DeepLabV3/FCN with its auxiliary head (on ``layer3``), which
            fine-tuning then trains with a weighted loss; it never reaches the export. Without it
            the head is left out (and dropped from ``--weights`` and checkpoints that have one).
    """

    name: str
    num_classes: int | None = None
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE
    weights: str | None = None
    checkpoint: str | None = None
    kwargs: dict = field(default_factory=dict)
    task: Task | None = None
    aux: bool = False

    def __post_init__(self):
        if self.task is None:
            self.task = task_of(self.name)
        if self.task not in TASKS:
            raise DscompressError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.aux and self.task != "segmentation":
            raise DscompressError(f"--aux adds the auxiliary head of a segmentation model; {self.name} is a {self.task} model")
        self.input_size = tuple(int(v) for v in self.input_size)
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise DscompressError(f"input size must be C,H,W with positive values, got {self.input_size}")
        if self.num_classes is not None and self.num_classes < 1:
            raise DscompressError(f"--num-classes must be at least 1, got {self.num_classes}")
        if self.weights and self.checkpoint:
            raise DscompressError("give either --weights or --checkpoint, not both")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_input_size(text: str) -> tuple[int, int, int]:
    """'3,224,224' (or '3x224x224') -> (3, 224, 224): channels, height, width, all three."""
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise DscompressError(f"--input-size must be C,H,W with positive values, such as 3,224,224; got {text!r}")
    return tuple(values)


def list_models() -> list[str]:
    """Torchvision classification models that can be named."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def segmentation_models() -> list[str]:
    """Torchvision segmentation models that can be named (DeepLabV3, FCN, LRASPP)."""
    return sorted(torchvision.models.list_models(module=segmentation))


def model_tasks() -> dict[str, str]:
    """Every torchvision name that can be given, with its task."""
    tasks = {name: "classification" for name in list_models()}
    tasks.update({name: "segmentation" for name in segmentation_models()})
    return dict(sorted(tasks.items()))


def task_of(name: str) -> str:
    """The task of a model name: segmentation for torchvision's segmentation models, else classification."""
    return "segmentation" if name in segmentation_models() else "classification"


class SegmentationNet(nn.Module):
    """A torchvision DeepLabV3, FCN or LRASPP that returns its ``out`` logits (N, classes, H, W).

    torchvision's models return ``{"out": ..., "aux": ...}``; this one returns the ``out`` tensor,
    so that evaluation, calibration, pruning, export and benchmarks see one output. It holds the
    same submodules under the same names (``backbone``, ``classifier``, ``aux_classifier``), so
    state dicts are interchangeable with torchvision's. With an auxiliary head, a forward pass
    in training mode returns ``(out, aux)``; in eval mode the head does not run, and so is not
    exported.
    """

    def __init__(self, net: nn.Module, keep_aux: bool = False):
        super().__init__()
        self.backbone = net.backbone
        self.classifier = net.classifier
        self.aux_classifier = getattr(net, "aux_classifier", None) if keep_aux else None
        # LRASPP's head reads the low- and high-level features; DeepLabV3's and FCN's the last only.
        self.head_takes_all_features = isinstance(net, segmentation.LRASPP)

    def forward(self, x: torch.Tensor):
        outputs = self._heads(x, with_aux=self.training)
        return outputs if len(outputs) > 1 else outputs[0]

    def all_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(out,)``, or ``(out, aux)`` with an auxiliary head, whatever the mode: what pruning
        traces, so that the head only training runs keeps fitting the layers it reads."""
        return self._heads(x, with_aux=True)

    def _heads(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, ...]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = self.classifier(features if self.head_takes_all_features else features["out"])
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        if with_aux and self.aux_classifier is not None:
            aux = F.interpolate(self.aux_classifier(features["aux"]), size=size, mode="bilinear", align_corners=False)
            return out, aux
        return (out,)


TIMM_PREFIX = "timm:"


def build_model(spec: ModelSpec, load_weights: bool = True) -> nn.Module:
    """Build the model a spec names, in eval mode, with its weights unless ``load_weights=False``.

    Sources: a torchvision name (``resnet18``), ``timm:NAME`` (when timm is installed: the
    ``timm`` extra), or a user factory ``package.module:factory``.
    """
    if spec.name.startswith(TIMM_PREFIX):
        model = _build_timm(spec, load_weights)
    elif ":" in spec.name:
        model = _build_from_factory(spec)
    else:
        model = _build_torchvision(spec, load_weights)
    if isinstance(model, (segmentation.DeepLabV3, segmentation.FCN, segmentation.LRASPP)):
        model = SegmentationNet(model, keep_aux=spec.aux)  # a factory's torchvision model, too
    if load_weights and spec.checkpoint:
        load_checkpoint(model, spec.checkpoint)
    return model.eval()


def _build_torchvision(spec: ModelSpec, load_weights: bool) -> nn.Module:
    names = list_models() + segmentation_models()
    if spec.name not in names:
        close = difflib.get_close_matches(spec.name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DscompressError(
            f"unknown model {spec.name!r}{hint} (`dscompress models` lists them; "
            "your own model is named package.module:factory)"
        )
    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.name.startswith(("googlenet", "inception")) and not (load_weights and spec.weights):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    if spec.name in segmentation_models():
        _segmentation_kwargs(spec, kwargs, with_weights=bool(load_weights and spec.weights))
    weights = spec.weights if load_weights else None
    if weights:
        try:
            weights = torchvision.models.get_model_weights(spec.name)[weights]
        except KeyError:
            options = ", ".join(torchvision.models.get_model_weights(spec.name).__members__)
            raise DscompressError(f"unknown weights {spec.weights!r} for {spec.name}; choose one of {options}") from None
    try:
        return torchvision.models.get_model(spec.name, weights=weights, **kwargs)
    except ValueError as e:
        raise DscompressError(f"cannot build {spec.name}: {e}") from None
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a broken download a RuntimeError
        raise DscompressError(
            f"could not download {spec.name} weights {spec.weights} ({type(e).__name__}: {e}); "
            "without internet, download the file elsewhere and pass it with --checkpoint FILE"
        ) from None


def _segmentation_kwargs(spec: ModelSpec, kwargs: dict, with_weights: bool) -> None:
    """Offline by default: no ImageNet backbone weights (torchvision's factories download them
    unless told not to); an auxiliary head only with ``spec.aux`` (torchvision's COCO weights
    have one: it is built to load them, then left out of :class:`SegmentationNet`)."""
    has_aux = not spec.name.startswith("lraspp")
    if spec.aux and not has_aux:
        raise DscompressError(f"{spec.name} has no auxiliary head; drop --aux")
    if not with_weights:
        kwargs.setdefault("weights_backbone", None)
        if has_aux:
            kwargs.setdefault("aux_loss", spec.aux)


def _build_timm(spec: ModelSpec, load_weights: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise DscompressError(f"{spec.name} needs timm, which is not installed: pip install 'dscompress[timm]'") from None
    name = spec.name[len(TIMM_PREFIX) :]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise DscompressError(f"unknown timm model {name!r}{hint}")
    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    pretrained = bool(load_weights and spec.weights)
    if spec.weights and spec.weights not in ("DEFAULT", "pretrained"):
        name = f"{name}.{spec.weights}"  # a timm pretrained tag, e.g. a1_in1k
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm and hub downloads raise many kinds
        raise factory_failed(spec.name, e) from None


def _build_from_factory(spec: ModelSpec) -> nn.Module:
    module_name, _, attr = spec.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DscompressError(f"cannot import {module_name!r} for model {spec.name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DscompressError(f"{module_name!r} has no callable {attr!r} (model {spec.name!r})")
    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        params = inspect.signature(factory).parameters
        if "num_classes" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise DscompressError(f"{spec.name} takes no num_classes argument; drop --num-classes")
        kwargs["num_classes"] = spec.num_classes
    try:
        model = factory(**kwargs)
    except DscompressError:
        raise
    except Exception as e:  # noqa: BLE001 - a user factory can raise anything
        raise factory_failed(spec.name, e) from None
    if not isinstance(model, nn.Module):
        raise DscompressError(f"{spec.name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _is_download_error(error: BaseException) -> bool:
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, (urllib.error.URLError, socket.gaierror, socket.timeout, ConnectionError)):
            return True
        text = str(error).lower()
        if "urlopen" in text or "download" in text or "name or service not known" in text:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def factory_failed(name: str, error: BaseException) -> DscompressError:
    """One line for a model factory that raised: which one, why, and for a download what to do."""
    if _is_download_error(error):
        return DscompressError(
            f"{name} tried to download weights ({type(error).__name__}: {first_line(error, 120)}); without internet, "
            "build it without pretrained weights (for torchvision: weights=None, weights_backbone=None) and pass local "
            "weights with --checkpoint FILE"
        )
    return DscompressError(f"{name} raised {type(error).__name__}: {first_line(error, 200)}; check the factory and its arguments")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or, without pickle, from ``.pt``/``.pth``.

    Common wrappers are unwrapped: ``{"state_dict": ...}``, ``{"model": ...}`` and the
    ``module.`` prefix that DistributedDataParallel adds.
    """
    if not os.path.isfile(path):
        raise DscompressError(f"checkpoint {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise DscompressError(
            f"cannot read checkpoint {path!r}: {first_line(e, 200)} (expected a state dict saved with "
            "torch.save(model.state_dict()) or safetensors; whole pickled models are not loaded)"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DscompressError(f"checkpoint {path!r} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def with_metadata(state: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """``state`` with the model's own state-dict metadata (module versions), which safetensors
    does not store and some modules (MNASNet) need in order to load."""
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)
    return state


# Auxiliary classifiers that torchvision's googlenet and inception_v3 (and its segmentation
# models) train with and drop for inference.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.", "aux_classifier.")


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict into ``model``, or say precisely why it does not fit.

    A googlenet, inception_v3, DeepLabV3 or FCN checkpoint saved with its auxiliary heads (as
    torchvision trains them) loads into the model without them: the auxiliary weights are dropped
    with a warning.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    aux = [k for k in state if k not in expected and k.startswith(AUX_PREFIXES)]
    if aux:
        state = {k: v for k, v in state.items() if k not in aux}
        warnings.warn(
            f"dropped {len(aux)} auxiliary-classifier tensors ({aux[0]}, ...) from {path}: they are used only in training",
            DscompressWarning,
            stacklevel=2,
        )
    check_state_dict(model, state, source=path)
    model.load_state_dict(with_metadata(state, model))


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a one-line :class:`DscompressError` when ``state`` does not fit ``model`` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    if wrong:
        parts.append(f"{len(wrong)} of the wrong shape ({', '.join(wrong[:2])}{', ...' if len(wrong) > 2 else ''})")
    raise DscompressError(
        f"checkpoint {source!r} does not fit the model: keys {'; '.join(parts)}. "
        "Check the model name and --num-classes"
    )


# The output of one image batch for each task: logits (N, classes) or per-pixel logits (N, classes, H, W).
OUTPUT_DIMS = {"classification": 2, "segmentation": 4}


def output_classes(model: nn.Module, input_size, task: str = "classification", model_name: str = "the model") -> int:
    """The number of outputs (classes) of ``model``, run in eval mode on one zero image of
    ``input_size`` (C, H, W); one line raised when the output is not the one tensor a ``task``
    model returns: (N, classes), or (N, classes, H, W) for segmentation."""
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    per_pixel = isinstance(output, torch.Tensor) and output.dim() == 4
    if task == "classification" and per_pixel:
        raise DscompressError(f"{model_name} returns {shape} (per-pixel logits: if it is a segmentation model, say so with --task segmentation)")
    if not isinstance(output, torch.Tensor) or output.dim() != OUTPUT_DIMS[task]:
        expected = "(N, classes)" if task == "classification" else "(N, classes, H, W)"
        raise DscompressError(f"{model_name} returns {shape}, but a {task} model returns one tensor {expected}")
    return output.shape[1]
