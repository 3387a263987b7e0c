"""Small helpers every layer uses: atomic writes, shared caches, hashing, number formatting, model plumbing.

Nothing here knows about convolutions, artifacts or the command line.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

import cpuinfo
import filelock
import psutil
import torch
from torch import nn

from dscompress.core.errors import DscompressError


@functools.cache
def cpu_info() -> dict:
    """This CPU's model (``brand_raw``) and instruction sets (``flags``), from py-cpuinfo (/proc/cpuinfo
    on Linux, the registry or sysctl elsewhere); kept for the process, as it asks a subprocess and
    takes about a second."""
    return cpuinfo.get_cpu_info()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_permissions(path: str, directory: bool = False) -> None:
    """Give a file made by ``mkstemp``/``mkdtemp`` (0600/0700) the mode a plain ``open`` would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str, directory: bool = False):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else remove it.

    Readers never see half a file (or folder): the rename is atomic on one file system. An
    existing ``path`` is replaced only when the block succeeds. Permissions follow the umask, as
    for a file written with ``open``.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise DscompressError(f"cannot create the folder {parent!r}: {e.strerror}; choose another output") from None
    name = os.path.basename(path)
    try:
        if directory:
            tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
        else:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.tmp-")
            os.close(fd)
        default_permissions(tmp, directory)
    except OSError as e:
        raise DscompressError(f"cannot write in {parent!r}: {e.strerror}; choose another output") from None
    try:
        yield tmp
        if directory and os.path.isdir(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.errno == 28:
            raise DscompressError(f"no space left on the device while writing {path!r}; nothing was replaced; free some space and run again") from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def check_writable(path: str) -> None:
    """Raise one line now, before any work, when ``path`` cannot be written: its nearest existing
    folder is a file, or does not take files (read-only, full, or like /proc)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DscompressError(f"cannot write {path!r}: {parent!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".dscompress-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DscompressError(f"cannot write {path!r}: {parent!r} does not take files ({e.strerror}); choose another output") from None


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def write_json(path: str, data) -> None:
    """Write JSON atomically (indented, with a final newline)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")


class JsonCache:
    """Entries (JSON values by string key) kept in a JSON file that several processes may fill at once.

    It opens with what the file holds (nothing when it is missing or damaged: those entries are
    measured again). :meth:`save` merges the entries set since into the file as it is then, under
    a lock beside it (``<path>.lock``), and writes it atomically: two processes measuring into one
    cache both keep theirs. ``path=None`` keeps nothing on disk.
    """

    def __init__(self, path: str | None):
        self.path = path
        self.entries = self._read()
        self.added: dict = {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str):
        return self.entries[key]

    def __setitem__(self, key: str, value) -> None:
        self.entries[key] = self.added[key] = value

    def _read(self) -> dict:
        if not self.path or not os.path.isfile(self.path):
            return {}
        try:
            with open(self.path) as f:
                entries = json.load(f)
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def save(self) -> None:
        """Merge the entries set since the last save into the file (a key both set: this one's wins)."""
        if not self.path or not self.added:
            return
        check_writable(self.path)
        with filelock.FileLock(self.path + ".lock"):
            self.entries = {**self._read(), **self.added}
            write_json(self.path, self.entries)
        self.added = {}


def write_text(path: str, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def human(n: float) -> str:
    """12_345_678 -> '12.35M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the block with ``model`` in eval mode and give it back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def flatten_outputs(outputs) -> list[torch.Tensor]:
    """A model's outputs as a list of tensors (a tensor, tuple, list, dict or named tuple)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return [t for item in outputs for t in flatten_outputs(item)]
    return []


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; the CPU for a model without any."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


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


@contextlib.contextmanager
def captured_output():
    """Collect what Python and native libraries print while the block runs.

    ONNX Runtime logs provider failures from C++ straight to file descriptor 2 and prints some
    from Python; the exporters print progress. Yields a list that receives the text on exit.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    collected: list[str] = []
    python_text = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(1), os.dup(2)
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(python_text), contextlib.redirect_stderr(python_text):
                yield collected
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            collected.append(sink.read().decode(errors="replace") + python_text.getvalue())


class Progress:
    """What long work reports as it goes: a task with a known number of steps, and lines.

    This base reports nothing. The command line passes one that draws a bar on a terminal and
    prints a plain line now and then otherwise (:class:`dscompress.cli.render.ConsoleProgress`).
    """

    def start(self, description: str, total: int) -> None:
        """A task of ``total`` steps begins (one task at a time)."""

    def advance(self, steps: int = 1, status: str = "") -> None:
        """``steps`` more are done; ``status`` is a short text such as ``loss 0.31``."""

    def stop(self) -> None:
        """The task is over (or interrupted)."""

    def line(self, text: str) -> None:
        """A line worth keeping in the log, such as an epoch's summary."""


QUIET = Progress()


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch CPU threads, then give back what was set before."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (psutil: /proc/stat on Linux, and the
    same elsewhere); guest time is already inside user time, so it is not added again."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    return sum(times) - idle - guest


def other_load(window: float = 0.2) -> float:
    """How many CPUs other processes keep busy, sampled over ``window`` seconds (this process excluded)."""
    start_busy, start_self, start = _busy_seconds(), time.process_time(), time.perf_counter()
    time.sleep(window)
    busy = _busy_seconds() - start_busy - (time.process_time() - start_self)
    return max(0.0, busy / (time.perf_counter() - start))


def free_cpus() -> int:
    """CPUs not busy with other work, at least 1."""
    return max(1, cpu_count() - int(round(other_load())))


def choose_threads(requested: int | None = None) -> tuple[int, str | None]:
    """Threads for torch (and ONNX Runtime): ``requested``, or as many as there are free CPUs.

    Threads that outnumber the free cores wait on each other: an eager resnet18 at 32x32 went
    from 8 ms to 500 ms with 2 threads on 2 cores beside another torch job. A passive OpenMP wait
    policy (``OMP_WAIT_POLICY=PASSIVE``) would soften that, but costs a quiet machine dearly
    (measured, resnet18 at 32x32 on 2 idle cores: a training step at batch 64 86 -> 117 ms,
    batch-1 inference 2.8 -> 7.0 ms), so dscompress leaves it to the user and fits the threads
    instead. Returns the number and, when it is below the CPU count or above the free CPUs, one
    line that says why.
    """
    cpus, free = cpu_count(), free_cpus()
    if requested is not None:
        if requested > free:
            return requested, f"--threads {requested} but only {free} of {cpus} CPUs are free: the threads will wait on each other"
        return requested, None
    if free < cpus:
        return free, f"used {free} of {cpus} CPU threads: other processes kept the rest busy; --threads N to choose"
    return cpus, None
