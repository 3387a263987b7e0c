"""The state of a recipe run: ``run.json`` in the run folder.

It records each finished step with a key that hashes the model spec and the config of that step
and of every step before it, so a rerun can skip what is finished and unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os

from dscompress.core.errors import DscompressError
from dscompress.core.util import write_json

RUN_FILE = "run.json"


def chain_key(previous: str, payload: dict) -> str:
    """A hash of ``payload`` chained to the key of everything before it."""
    text = json.dumps({"previous": previous, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_state(out_dir: str) -> dict:
    """The run's state: ``{"steps": {name: entry}}``, empty for a new run."""
    path = os.path.join(out_dir, RUN_FILE)
    if not os.path.isfile(path):
        return {"steps": {}}
    try:
        with open(path) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
            raise ValueError("no steps")
        return state
    except (OSError, ValueError) as e:
        raise DscompressError(f"{path} is damaged ({e}); delete it to run every step again") from None


def write_state(out_dir: str, state: dict) -> None:
    write_json(os.path.join(out_dir, RUN_FILE), state)


def is_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_FILE))


def finished(entry: dict | None, key: str, output: str) -> bool:
    """Whether a step's entry says it finished with this key, and its output is still there."""
    return bool(entry) and entry.get("key") == key and entry.get("status") == "done" and os.path.exists(output)


def run_models(out_dir: str) -> list[str]:
    """Model artifact folders of a finished or partial run, in step order."""
    steps = read_state(out_dir)["steps"].values()
    folders = [os.path.join(out_dir, e["output"]) for e in steps if e.get("makes_model", e.get("kind") in ("finetune", "convert", "calibrate", "prune"))]
    return [f for f in folders if os.path.isdir(f)]
