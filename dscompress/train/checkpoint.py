"""Training checkpoints: written atomically, read without pickle, checked before resuming.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so ``torch.load(...,
weights_only=True)`` reads it: model, optimizer, scheduler, GradScaler and RNG state, the best
weights so far, the record so far, the config and the number of processes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dscompress.core.errors import DscompressError, first_line
from dscompress.core.util import atomic_path

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "dscompress-finetune-checkpoint"
CHECKPOINT_VERSION = 1


def checkpoint_path(folder: str) -> str:
    return os.path.join(folder, CHECKPOINT)


def save_checkpoint(folder: str, state: dict) -> None:
    """``torch.save`` through a temporary file and a rename: a crash never leaves half a checkpoint."""
    with atomic_path(checkpoint_path(folder)) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, tmp)


def read_checkpoint(folder: str) -> dict:
    """The checkpoint in ``folder``, loaded without pickle (``weights_only=True``)."""
    path = checkpoint_path(folder)
    if not os.path.isfile(path):
        raise DscompressError(f"no checkpoint to resume from: {path} does not exist; run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
        raise DscompressError(f"cannot read checkpoint {path}: {first_line(e, 200)}; start over with --force") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DscompressError(f"{path} is not a dscompress fine-tuning checkpoint; start over with --force")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise DscompressError(f"{path} was written by a newer dscompress; upgrade it or start over with --force")
    return state


def check_resumable(state: dict, path: str, model: nn.Module, config: dict, may_change: tuple[str, ...], world_size: int, precision: str) -> None:
    """Raise unless the checkpoint continues this very run: same model shapes, options (except
    ``may_change``), number of processes and precision."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state["model"].items()}
    if expected != stored:
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
        what = (
            f"{wrong[0]} is {stored[wrong[0]]} there, {expected[wrong[0]]} here" if wrong
            else f"it has {len(unexpected)} unexpected and {len(missing)} missing tensors ({(unexpected or missing)[0]})"
        )
        raise DscompressError(f"checkpoint {path} was made for a different model ({what}); resume with the same MODEL or start over with --force")
    old = state["config"]
    for key, value in config.items():
        if key not in old:
            raise DscompressError(
                f"checkpoint {path} was made by an older dscompress, which had no {key!r} option; "
                "finish it with that version or start over with --force"
            )
        if key not in may_change and old.get(key) != value:
            raise DscompressError(
                f"checkpoint {path} was made with {key}={old.get(key)!r}, not {value!r}; "
                "resume with the same options or start over with --force"
            )
    if state["world_size"] != world_size:
        how = f"torchrun --nproc-per-node {state['world_size']}" if state["world_size"] > 1 else "a single process (no torchrun)"
        raise DscompressError(f"checkpoint {path} was made by {state['world_size']} process(es), this run has {world_size}; resume with {how}")
    if state["record"]["precision"] != precision:
        raise DscompressError(
            f"checkpoint {path} was trained in {state['record']['precision']} on {state['record']['device']}, "
            f"this run would use {precision}; resume on the same kind of device"
        )


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
