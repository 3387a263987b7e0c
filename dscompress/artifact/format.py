"""Artifacts: a folder with ``model.safetensors`` and a JSON manifest, rebuilt without pickle.

Layout::

    OUT/
      manifest.json         format version, model spec, preprocessing, steps (config + record),
                            structure, metrics
      model.safetensors     the model's state dict
      original.safetensors  the uncompressed model it came from (the fine-tuning teacher), if any

``structure`` lists every module whose shape differs from a freshly built model of the spec:
swapped layers with their constructor arguments, and resized layers (after pruning) with their
new attributes (:mod:`dscompress.artifact.structure`). Loading builds the spec's model, applies
the structure, resizes tensors to the stored shapes and loads the weights, so the outputs are
bitwise those of the saved model.

Each step entry is ``{"step": name, "version": config version, "config": ..., "record": ...}``.
Format 1 (dscompress 0.1) had no ``version`` in step entries and no ``preprocess``; it reads as is.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dscompress import __version__
from dscompress.artifact.structure import apply_structure, structure_of
from dscompress.core.config import Record, StepConfig
from dscompress.core.errors import DscompressError
from dscompress.core.util import atomic_path, check_writable, default_permissions, write_json
from dscompress.data.datasets import Preprocess
from dscompress.models.build import ModelSpec, build_model, check_state_dict, with_metadata
from dscompress.nn.metrics import count_macs, count_params

FORMAT = "dscompress-artifact"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ORIGINAL = "original.safetensors"

# The manifest's keys and the JSON type each must have.
MANIFEST_SCHEMA = {"format": str, "format_version": int, "model": dict, "steps": list, "structure": dict, "files": dict, "metrics": dict}


def is_artifact(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def step_entry(config: StepConfig, record: Record) -> dict:
    """The manifest's entry for one step."""
    return {"step": config.STEP, "version": config.VERSION, "config": config.to_dict(), "record": record.to_dict()}


# --- writing -----------------------------------------------------------------------------------


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def check_output(path: str, force: bool) -> None:
    """Refuse to overwrite an existing output unless asked to, and outputs that cannot be made."""
    if os.path.exists(path) and not force:
        raise DscompressError(f"{path!r} already exists; choose another output or pass --force to replace it")
    check_writable(path)


def save(
    path: str,
    model: nn.Module,
    spec: ModelSpec,
    steps: list[dict],
    original: tuple[dict, dict[str, torch.Tensor]] | None = None,
    metrics: dict | None = None,
    force: bool = False,
    documents: dict[str, dict] | None = None,
) -> Artifact:
    """Write an artifact folder atomically: it is built beside ``path`` and renamed into place.

    Args:
        model: the model to store; its structure is recorded against a fresh build of ``spec``.
        spec: how to build the base architecture again.
        steps: every step so far, oldest first (:func:`step_entry`).
        original: (structure, state dict) of the uncompressed model that the steps started from.
        metrics: extra measured values (accuracy, latency, ...); params, MACs and size are added.
        documents: JSON documents to keep beside the weights, by file name (``plan.json``),
            listed in the manifest's ``documents``.
    """
    check_output(path, force)
    base = build_model(spec, load_weights=False)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dscompress_version": __version__,
        "torch_version": torch.__version__,
        "model": spec.to_dict(),
        "preprocess": Preprocess.for_input(spec.input_size).to_dict(),
        "steps": steps,
        "structure": structure_of(model, base),
        "files": {"model": WEIGHTS},
        "metrics": {},
    }
    with atomic_path(path, directory=True) as tmp:
        try:
            save_file(_tensors(model), os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
            if original is not None:
                original_structure, original_state = original
                save_file({k: v.contiguous() for k, v in original_state.items()}, os.path.join(tmp, ORIGINAL))
                manifest["files"]["original"] = ORIGINAL
                manifest["original"] = {"structure": original_structure}
        except SafetensorError as e:
            if "No space left" in str(e):
                raise DscompressError(f"no space left on the device while writing {path!r}; nothing was replaced; free some space and run again") from None
            raise
        metrics = dict(metrics or {})
        if "macs" not in metrics:
            metrics["macs"] = count_macs(model, spec.input_size)
        manifest["metrics"] = {"params": count_params(model), "size_bytes": os.path.getsize(os.path.join(tmp, WEIGHTS)), **metrics}
        for name, document in (documents or {}).items():
            write_json(os.path.join(tmp, name), document)
            manifest.setdefault("documents", {})[os.path.splitext(name)[0]] = name
        write_json(os.path.join(tmp, MANIFEST), manifest)
        for name in os.listdir(tmp):  # safetensors writes its files 0600 whatever the umask
            default_permissions(os.path.join(tmp, name))
    return Artifact.open(path)


# --- reading -----------------------------------------------------------------------------------


def _check_manifest(manifest, manifest_path: str, path: str) -> None:
    """Raise one line for a manifest that is not what this dscompress writes and reads."""
    damaged = "; the artifact is damaged, convert again"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DscompressError(f"{manifest_path} is not a dscompress manifest")
    for key, kind in MANIFEST_SCHEMA.items():
        if key not in manifest:
            raise DscompressError(f"{manifest_path} lacks {key!r}{damaged}")
        if not isinstance(manifest[key], kind) or (kind is int and isinstance(manifest[key], bool)):
            raise DscompressError(f"{manifest_path}: {key!r} should be {kind.__name__}, not {type(manifest[key]).__name__}{damaged}")
    version = manifest["format_version"]
    if version > FORMAT_VERSION:
        raise DscompressError(f"{path!r} has artifact format {version}, newer than this dscompress reads ({FORMAT_VERSION}); upgrade dscompress")
    if version not in READS_VERSIONS:
        raise DscompressError(f"{path!r} has artifact format {version}, which this dscompress does not read; convert the model again")
    if not isinstance(manifest["model"].get("name"), str):
        raise DscompressError(f"{manifest_path}: the model spec has no name{damaged}")
    if not isinstance(manifest["files"].get("model"), str):
        raise DscompressError(f"{manifest_path}: files.model should name the weights file{damaged}")
    for i, step in enumerate(manifest["steps"]):
        if not (isinstance(step, dict) and isinstance(step.get("step"), str) and isinstance(step.get("config", {}), dict)):
            raise DscompressError(f"{manifest_path}: steps[{i}] is not a step entry{damaged}")


@dataclass
class Artifact:
    """An artifact folder on disk; :meth:`model` rebuilds what it holds."""

    path: str
    manifest: dict

    @classmethod
    def open(cls, path: str) -> Artifact:
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            kind = "a file" if os.path.exists(path) else "no such folder"
            raise DscompressError(f"{path!r} is not an artifact folder ({kind})")
        if not os.path.isfile(manifest_path):
            raise DscompressError(f"{path!r} is not a dscompress artifact: it has no {MANIFEST}")
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DscompressError(f"cannot read {manifest_path}: {e}; the artifact is damaged, convert again") from None
        _check_manifest(manifest, manifest_path, path)
        return cls(path, manifest)

    @property
    def spec(self) -> ModelSpec:
        try:
            return ModelSpec.from_dict(self.manifest["model"])
        except (TypeError, ValueError) as e:
            raise DscompressError(f"{os.path.join(self.path, MANIFEST)}: bad model spec ({e}); the artifact is damaged, convert again") from None

    @property
    def steps(self) -> list[dict]:
        return self.manifest["steps"]

    @property
    def metrics(self) -> dict:
        return self.manifest["metrics"]

    @property
    def has_original(self) -> bool:
        return "original" in self.manifest["files"]

    def manifest_sha256(self) -> str:
        with open(os.path.join(self.path, MANIFEST), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def file(self, key: str) -> str:
        """The path of a weights file (``model`` or ``original``), after checking it is readable."""
        weights = os.path.join(self.path, self.manifest["files"][key])
        if not os.path.isfile(weights):
            raise DscompressError(f"{self.path!r} lacks {self.manifest['files'][key]}; the artifact is incomplete, convert again")
        try:
            with safe_open(weights, framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as e:
            raise DscompressError(f"cannot read {weights}: {e}; the artifact is damaged, convert again") from None
        return weights

    def check_files(self) -> None:
        """Raise now, before any work, for a missing or damaged weights file."""
        for key in self.manifest["files"]:
            self.file(key)

    def _rebuild(self, structure: dict, key: str) -> nn.Module:
        weights = self.file(key)
        try:
            state = load_file(weights)
        except (SafetensorError, OSError, ValueError) as e:
            raise DscompressError(f"cannot read {weights}: {e}; the artifact is damaged, convert again") from None
        model = build_model(self.spec, load_weights=False)
        apply_structure(model, structure, state)
        check_state_dict(model, state, source=weights)
        model.load_state_dict(with_metadata(state, model))
        return model.eval()

    def model(self) -> nn.Module:
        """The stored model, in eval mode."""
        return self._rebuild(self.manifest["structure"], "model")

    def original_model(self) -> nn.Module | None:
        """The uncompressed model the steps started from, or None if this artifact is one."""
        if not self.has_original:
            return None
        return self._rebuild(self.manifest["original"]["structure"], "original")

    def original_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(structure, weights) of the uncompressed original."""
        return self.manifest["original"]["structure"], load_file(self.file("original"))

    def update_metrics(self, **values) -> None:
        """Merge measured values into the manifest's metrics (atomically)."""
        self.manifest["metrics"].update(values)
        write_json(os.path.join(self.path, MANIFEST), self.manifest)


def load(path: str) -> nn.Module:
    """Rebuild the model stored in an artifact folder, without pickle."""
    return Artifact.open(path).model()
