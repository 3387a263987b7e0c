"""Fine-tuning: win back the accuracy that conversion and pruning cost, by knowledge distillation.

``finetune(student, teacher, train_data, test_data, config)`` trains ``student`` to match the
softened outputs of a frozen ``teacher`` (by default the uncompressed model an artifact keeps,
see :meth:`dscompress.artifact.Source.teacher`) as well as the labels::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

With no teacher it trains on the labels alone, which is also how a baseline is trained.

Every epoch ends with an evaluation on the test split and a checkpoint (``checkpoint.pt`` in a
work folder, ``OUT.partial/`` for :func:`finetune_artifact`), written atomically and readable with
``torch.load(..., weights_only=True)``: it holds only tensors, numbers, strings, lists and dicts.
A run that is interrupted (Ctrl-C) or stopped by a non-finite loss keeps the last checkpoint;
``resume=True`` continues from it. The order of the training data in epoch ``e`` depends only on
``(seed, e)`` and the random number generators are restored, so on CPU a resumed run ends with
bitwise the weights of an uninterrupted one. An epoch interrupted part-way is run again from its
start: its partial updates are dropped, since a Ctrl-C can land half-way through an optimizer step.

Under ``torchrun`` (environment variable ``WORLD_SIZE`` > 1) the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`, every process trains on its own share of each
epoch (:class:`~torch.utils.data.distributed.DistributedSampler`), metrics are summed across
processes, and only rank 0 writes checkpoints, the artifact and output.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from dscompress.data import DataSpec, check_classes, load_dataset, make_loader, num_classes
from dscompress.device import resolve_device
from dscompress.errors import DscompressError, first_line
from dscompress.evaluate import accuracy

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")
KEEP = ("best", "last")
AMP = ("auto", "bf16", "fp16", "off")
TEACHER_ORIGINAL = "original"
TEACHER_NONE = "none"

# Used when the config leaves lr / weight_decay unset: usual values for CNNs at batch size 64-256.
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "dscompress-finetune-checkpoint"
CHECKPOINT_VERSION = 1
# Config fields that may differ when resuming: they change where and how fast, not what is computed.
RESUME_MAY_CHANGE = ("workers", "device")
EVAL_BATCH_SIZE = 256


@dataclass
class FinetuneConfig:
    """How to fine-tune.

    Attributes:
        data: dataset spec (``digits``, ``mnist:DIR``, ...): train split to learn, test split to evaluate.
        epochs: passes over the training data.
        optimizer: ``"sgd"`` (momentum, no Nesterov) or ``"adamw"``.
        lr: peak learning rate; default 0.05 for SGD, 1e-3 for AdamW.
        momentum: SGD momentum (``onecycle`` cycles it between 0.85 and 0.95 instead).
        weight_decay: default 5e-4 for SGD, 0.05 for AdamW.
        schedule: ``"cosine"`` decays from ``lr`` to 0; ``"onecycle"`` warms up for 30% of the
            steps, then anneals. Both step every batch.
        label_smoothing: for the label (cross-entropy) term.
        batch_size: images per step and per process (under torchrun the global batch is
            ``batch_size * WORLD_SIZE``). The last partial batch of an epoch is dropped, so that
            BatchNorm never sees a batch of one.
        teacher: ``"original"`` (the uncompressed model the artifact keeps), ``"none"`` (train
            on labels only), or an artifact folder or model name to distill from.
        alpha: weight of the distillation term; 0.9 because the teacher is the very function the
            student was cut down from, so its soft outputs carry more than the one-hot label (which
            the remaining 0.1 keeps for images the teacher gets wrong).
        temperature: softens both distributions (Hinton et al. 2015); 4 shows which wrong
            classes the teacher finds plausible without flattening the distribution. The loss is
            scaled by T^2 so that the gradients keep their size when T changes.
        keep: which weights the result holds: those of the ``"best"`` epoch by test top-1, or the
            ``"last"``. With only a train and a test split, "best" is chosen on the test split,
            so its top-1 is slightly optimistic; the record also gives the last epoch's.
        amp: automatic mixed precision, on CUDA only. ``"auto"`` is bf16 where the GPU supports
            it (same exponent range as fp32: no loss scaling needed), else fp16 with a
            GradScaler; ``"off"`` trains in fp32. On CPU ``auto`` means off.
        seed: fixes the data order (epoch ``e`` is shuffled with ``seed + e``) and dropout.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        workers: DataLoader worker processes.
    """

    data: str = "digits"
    epochs: int = 10
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    batch_size: int = 64
    teacher: str = TEACHER_ORIGINAL
    alpha: float = 0.9
    temperature: float = 4.0
    keep: str = "best"
    amp: str = "auto"
    seed: int = 0
    device: str = "auto"
    workers: int = 0

    def __post_init__(self):
        self.data = str(DataSpec.parse(self.data))
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("keep", KEEP), ("amp", AMP)):
            if getattr(self, name) not in choices:
                raise DscompressError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise DscompressError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if not (isinstance(self.workers, int) and self.workers >= 0):
            raise DscompressError(f"workers must be 0 or more, got {self.workers!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DscompressError(f"learning rate must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise DscompressError(f"weight decay must be 0 or more, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise DscompressError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.label_smoothing < 1:
            raise DscompressError(f"label smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 <= self.alpha <= 1:
            raise DscompressError(f"alpha (the weight of the distillation loss) must be in [0, 1], got {self.alpha!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DscompressError(f"temperature must be a positive number, got {self.temperature!r}")
        if not self.teacher:
            raise DscompressError("teacher must be 'original', 'none', an artifact folder or a model name")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DscompressError(f"unknown finetune option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class EpochRecord:
    """One epoch. Accuracies in percent; ``lr`` as the epoch started; ``seconds`` include evaluation."""

    epoch: int
    lr: float
    train_loss: float
    train_top1: float
    test_top1: float
    test_top5: float
    test_loss: float
    images_per_s: float
    seconds: float


@dataclass
class FinetuneRecord:
    """What :func:`finetune` did.

    Attributes:
        teacher: what was distilled from, or None for training on labels alone.
        device, precision, world_size: where and how it ran (precision: fp32, bf16 or fp16).
        train_images, test_images: images per epoch (all processes together) and in the test split.
        start_top1, start_top5: the student's test accuracy before training.
        teacher_top1: the teacher's test accuracy.
        epochs: one record per epoch done.
        best_epoch, best_top1: the epoch with the highest test top-1 (the first, on ties).
        final_top1: test top-1 after the last epoch.
        kept_epoch, top1, top5: the epoch whose weights the result holds (``config.keep``) and its accuracy.
        seconds: training and evaluation time over all epochs, resumed runs included.
        resumed_at: epochs after which an interrupted run was resumed.
    """

    teacher: str | None
    device: str
    precision: str
    world_size: int
    train_images: int
    test_images: int
    start_top1: float
    start_top5: float
    teacher_top1: float | None = None
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_top1: float | None = None
    final_top1: float | None = None
    kept_epoch: int = 0
    top1: float | None = None
    top5: float | None = None
    seconds: float = 0.0
    resumed_at: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["epochs"] = [EpochRecord(**e) for e in d.get("epochs", [])]
        return cls(**d)


class FinetuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`finetune`; the message says what was saved and how to resume."""


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float = 0.9,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(student, labels)``, a scalar.

    Args:
        student_logits, teacher_logits: (N, classes); without a teacher only the CE term is used.
        labels: (N,) class indices.
    """
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return hard
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * hard


# --- processes and devices -----------------------------------------------------------------------


@dataclass
class _World:
    rank: int = 0
    size: int = 1

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> _World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def init_distributed(device: str = "auto") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); False when there is none.

    The backend is NCCL for CUDA and gloo for CPU; each process uses GPU ``LOCAL_RANK``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return True


def _device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _precision(amp: str, device: torch.device) -> str:
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            raise DscompressError(f"--amp {amp} needs a CUDA device; on {device.type} use --amp off (or auto)")
        return "fp32"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32" if amp == "off" else amp


def _sum(values: list[float], device: torch.device, world: _World) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64, so counts stay exact)."""
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_path(folder: str) -> str:
    return os.path.join(folder, CHECKPOINT)


def _save_checkpoint(folder: str, state: dict) -> None:
    """``torch.save`` through a temporary file and a rename: a crash never leaves half a checkpoint."""
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, checkpoint_path(folder))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def _check_resumable(state: dict, path: str, model: nn.Module, config: FinetuneConfig, world: _World, precision: str) -> None:
    """Raise unless the checkpoint continues this very run: same model shapes, options and processes."""
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
    for key, value in config.to_dict().items():
        if key not in RESUME_MAY_CHANGE and old.get(key) != value:
            raise DscompressError(
                f"checkpoint {path} was made with {key}={old.get(key)!r}, not {value!r}; "
                "resume with the same options or start over with --force"
            )
    if state["world_size"] != world.size:
        how = f"torchrun --nproc-per-node {state['world_size']}" if state["world_size"] > 1 else "a single process (no torchrun)"
        raise DscompressError(f"checkpoint {path} was made by {state['world_size']} process(es), this run has {world.size}; resume with {how}")
    if state["record"]["precision"] != precision:
        raise DscompressError(
            f"checkpoint {path} was trained in {state['record']['precision']} on {state['record']['device']}, "
            f"this run would use {precision}; resume on the same kind of device"
        )


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# --- training ------------------------------------------------------------------------------------


def _make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(optimizer, config: FinetuneConfig, steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


def _train_loader(dataset: Dataset, config: FinetuneConfig, world: _World, device: torch.device) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled batches for this process; ``sampler.set_epoch(e)`` makes epoch e's order (seed + e)."""
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=config.seed)
    if len(sampler) < config.batch_size:
        raise DscompressError(
            f"batch size {config.batch_size} is larger than the {len(sampler)} training images each process gets; "
            "lower --batch-size"
        )
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=config.workers,
        generator=torch.Generator().manual_seed(config.seed),
        persistent_workers=config.workers > 0,
        pin_memory=device.type == "cuda",
    )
    return loader, sampler


def _test_loader(dataset: Dataset, config: FinetuneConfig, world: _World) -> DataLoader:
    """Each process evaluates every ``world.size``-th image, so the sums over processes are exact."""
    if world.size > 1:
        dataset = Subset(dataset, range(world.rank, len(dataset), world.size))
    return make_loader(dataset, EVAL_BATCH_SIZE, workers=config.workers)


def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device, world: _World) -> dict:
    """Test top-1/top-5 (percent), mean loss and images over all processes' shares, and seconds taken."""
    begin = time.perf_counter()
    result = accuracy(model, loader, device)
    n = result["images"] if len(loader.dataset) else 0
    correct1, correct5, loss, images = _sum(
        [result["top1"] * n / 100, result["top5"] * n / 100, result["loss"] * n, n], device, world
    )
    images = max(images, 1)
    return {
        "images": int(images),
        "top1": 100 * round(correct1) / images,
        "top5": 100 * round(correct5) / images,
        "loss": loss / images,
        "seconds": time.perf_counter() - begin,
    }


class _Progress:
    """A rich progress bar per epoch (rank 0 only) and one summary line per epoch."""

    def __init__(self, enabled: bool, total_epochs: int):
        self.enabled = enabled
        self.total_epochs = total_epochs
        self.bar = self.task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = Console(stderr=True)
        if enabled and self.console.is_terminal:  # in logs, only the line per epoch
            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}/" + str(total_epochs)),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1f}%  {task.fields[ips]:.0f} img/s"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )

    def start(self, epoch: int, steps: int) -> None:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("train", total=steps, epoch=epoch, loss=float("nan"), acc=0.0, ips=0.0)

    def update(self, loss: float, acc: float, ips: float) -> None:
        if self.task is not None:
            self.bar.update(self.task, advance=1, loss=loss, acc=acc, ips=ips)

    def stop(self) -> None:
        if self.task is not None:
            self.bar.stop()
            self.bar.remove_task(self.task)
            self.task = None

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    train_data: Dataset,
    test_data: Dataset,
    config: FinetuneConfig | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = False,
    on_epoch_end=None,
    teacher_label: str | None = None,
) -> tuple[nn.Module, FinetuneRecord]:
    """Train ``student`` (in place) by distillation from ``teacher``, or on labels if it is None.

    Args:
        student: the model to train; it is moved to the device and returned holding the weights of
            the epoch that ``config.keep`` names, in eval mode.
        teacher: a frozen model with the student's outputs (N, classes), sharing no parameters with it.
        train_data, test_data: datasets of (image (C, H, W), label); ``classes`` lists the class names.
        checkpoint_dir: where ``checkpoint.pt`` is written after every epoch (by rank 0); None for none.
        resume: continue from the checkpoint in ``checkpoint_dir``.
        progress: show a progress bar and a line per epoch on stderr.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint.

    Returns:
        (student, record). A non-finite loss raises :class:`DscompressError`, Ctrl-C
        :class:`FinetuneInterrupted`; both leave the last checkpoint in place.
    """
    config = config or FinetuneConfig()
    world = _World.current()
    device = _device(config.device)
    precision = _precision(config.amp, device)
    input_size = tuple(train_data[0][0].shape)
    student.to(device)
    check_classes(train_data, student, input_size, data_name=config.data)
    if teacher is not None:
        shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
        if shared:
            raise ValueError("the teacher shares parameters with the student; give it a separate copy (Source.teacher())")
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            outputs = teacher(torch.zeros(1, *input_size, device=device)).shape[-1]
        if outputs != num_classes(train_data):
            raise DscompressError(f"the teacher has {outputs} outputs but {config.data} has {num_classes(train_data)} classes; choose a teacher trained on the same classes")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir to resume from")

    torch.manual_seed(config.seed + world.rank)
    train_loader, sampler = _train_loader(train_data, config, world, device)
    test_loader = _test_loader(test_data, config, world)
    model = student
    if world.size > 1:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = _make_optimizer(student, config)
    steps_per_epoch = len(train_loader)
    scheduler = _make_scheduler(optimizer, config, config.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    best_state = None
    if resume:
        state = read_checkpoint(checkpoint_dir)
        _check_resumable(state, checkpoint_path(checkpoint_dir), student, config, world, precision)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], device)
        record = FinetuneRecord.from_dict(state["record"])
        record.device = str(device)
        record.resumed_at.append(state["epoch"])
        best_state = state["best_state"]
        start_epoch = state["epoch"]
    else:
        start = _evaluate(student, test_loader, device, world)
        record = FinetuneRecord(
            teacher=teacher_label if teacher is not None else None,
            device=str(device),
            precision=precision,
            world_size=world.size,
            train_images=steps_per_epoch * config.batch_size * world.size,
            test_images=start["images"],
            start_top1=start["top1"],
            start_top5=start["top5"],
            teacher_top1=_evaluate(teacher, test_loader, device, world)["top1"] if teacher is not None else None,
        )
        start_epoch = 0

    def snapshot(epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "config": config.to_dict(),
            "world_size": world.size,
            "model": _cpu_state(student),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(device),
            "best_state": best_state,
            "record": record.to_dict(),
        }

    def save(epoch: int) -> None:
        if checkpoint_dir is not None and world.writer:
            _save_checkpoint(checkpoint_dir, snapshot(epoch))

    if not resume:
        save(0)  # so that Ctrl-C or a divergence in the first epoch also leaves a run to resume
    bar = _Progress(progress and world.writer, config.epochs)
    saved = complete = start_epoch  # epochs in the checkpoint / epochs done
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            train = _train_epoch(model, teacher, train_loader, sampler, optimizer, scheduler, scaler, config, epoch, device, world, bar, autocast_dtype, checkpoint_dir, saved)
            if world.size > 1:  # BatchNorm statistics are per process; evaluate and keep rank 0's
                for buffer in student.buffers():
                    dist.broadcast(buffer, 0)
            test = _evaluate(student, test_loader, device, world)
            entry = EpochRecord(
                epoch=epoch,
                test_top1=test["top1"],
                test_top5=test["top5"],
                test_loss=test["loss"],
                seconds=train.pop("seconds") + test["seconds"],
                **train,
            )
            record.epochs.append(entry)
            record.seconds += entry.seconds
            record.final_top1 = entry.test_top1
            if record.best_top1 is None or entry.test_top1 > record.best_top1:
                record.best_epoch, record.best_top1 = epoch, entry.test_top1
                best_state = _cpu_state(student)
            complete = epoch
            save(epoch)
            saved = epoch
            bar.line(_epoch_line(entry, config.epochs, best=record.best_epoch == epoch))
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    except KeyboardInterrupt:
        bar.stop()
        if complete > saved:  # the epoch is done, but Ctrl-C came before its checkpoint was written
            save(complete)
            saved = complete
        raise FinetuneInterrupted(_interrupted_message(saved, config.epochs, checkpoint_dir)) from None
    finally:
        bar.stop()

    kept = record.epochs[-1]
    if config.keep == "best":
        kept = next(e for e in record.epochs if e.epoch == record.best_epoch)
        student.load_state_dict(best_state)
    record.kept_epoch, record.top1, record.top5 = kept.epoch, kept.test_top1, kept.test_top5
    return student.eval(), record


def _train_epoch(model, teacher, loader, sampler, optimizer, scheduler, scaler, config, epoch, device, world, bar, autocast_dtype, checkpoint_dir, saved) -> dict:
    """One pass over the training data: the epoch's lr, train loss and top-1, images/s and seconds."""
    begin = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    sampler.set_epoch(epoch - 1)
    model.train()
    loss_sum = correct = seen = 0.0
    bar.start(epoch, len(loader))
    for step, (images, labels) in enumerate(loader, 1):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(images).float()
            loss = distillation_loss(logits.float(), teacher_logits, labels, config.alpha, config.temperature, config.label_smoothing)
        step_loss = loss.detach().clone()
        if world.size > 1:
            dist.all_reduce(step_loss)  # all processes see the same value: they stop together, before a bad update
            step_loss /= world.size
        step_loss = float(step_loss)
        if not math.isfinite(step_loss):
            kept = f"; the last good checkpoint (after epoch {saved}) is kept in {checkpoint_dir}" if checkpoint_dir else ""
            raise DscompressError(
                f"the loss became {step_loss} in epoch {epoch}, step {step} (lr {optimizer.param_groups[0]['lr']:.3g}); "
                f"training stopped{kept}; lower --lr and start over with --force"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += step_loss * len(labels)  # step_loss is already the mean over all processes
        correct += float((logits.detach().argmax(-1) == labels).sum())
        seen += len(labels)
        bar.update(loss_sum / seen, 100 * correct / seen, seen * world.size / max(time.perf_counter() - begin, 1e-9))
    seconds = time.perf_counter() - begin
    bar.stop()
    train_loss = loss_sum / seen
    correct, seen = _sum([correct, seen], device, world)
    return {"lr": lr, "train_loss": train_loss, "train_top1": 100 * correct / seen, "images_per_s": seen / seconds, "seconds": seconds}


def _interrupted_message(saved: int, epochs: int, checkpoint_dir: str | None) -> str:
    where = "interrupted after the last epoch" if saved == epochs else f"interrupted during epoch {saved + 1} of {epochs}"
    if checkpoint_dir is None:
        return f"{where}; no checkpoint folder was given, so nothing was kept"
    return f"{where}; the {saved} finished epoch(s) are saved in {checkpoint_dir}: run the same command with --resume to continue"


def _epoch_line(e: EpochRecord, total: int, best: bool) -> str:
    return (
        f"epoch {e.epoch}/{total}: loss {e.train_loss:.4f}  train {e.train_top1:.2f}%  test {e.test_top1:.2f}%"
        f"{' (best)' if best else ''}  lr {e.lr:.3g}  {e.images_per_s:,.0f} img/s  {e.seconds:.1f}s"
    )


# --- artifacts -----------------------------------------------------------------------------------


def work_folder(out: str) -> str:
    """Where the checkpoints of the run that writes ``out`` live until the artifact is saved."""
    return os.path.normpath(out) + ".partial"


def _teacher(source, config: FinetuneConfig) -> tuple[nn.Module | None, str | None]:
    """The frozen teacher the config names, and a label for it."""
    from dscompress.artifact import resolve

    if config.teacher == TEACHER_NONE:
        return None, None
    if config.teacher == TEACHER_ORIGINAL:
        if source.artifact is None:
            raise DscompressError(
                f"{source.label} is a plain model, so its default teacher would be a copy of itself; "
                "pass --teacher none to train it on labels (a baseline), or --teacher DIR to distill from a trained artifact"
            )
        return source.teacher(), f"{source.label} (original)"
    other = resolve(config.teacher, num_classes=source.spec.num_classes, input_size=source.spec.input_size)
    teacher = other.model
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), other.label


def finetune_artifact(source, out: str, config: FinetuneConfig | None = None, force: bool = False, resume: bool = False, progress: bool = False, on_epoch_end=None):
    """Fine-tune a :class:`~dscompress.artifact.Source` and save the result as an artifact folder.

    The artifact carries the source's steps plus a ``finetune`` step (config and record), the
    source's original model (for a plain model, the trained model itself: a baseline trained
    here is then the teacher of what is converted from it), and the test top-1/top-5 of the saved
    weights in its metrics. Checkpoints live in ``OUT.partial/`` until the artifact is written.
    Under torchrun only rank 0 writes, and only rank 0 gets the artifact (others get None).

    Returns (artifact, record).
    """
    from dscompress.artifact import check_output, save_step
    from dscompress.models import build_model

    config = config or FinetuneConfig()
    check_output(out, force)
    partial = work_folder(out)
    has_checkpoint = os.path.isfile(checkpoint_path(partial))
    if resume and not has_checkpoint:
        raise DscompressError(f"--resume: no checkpoint to resume from in {partial}; run without --resume to start")
    if not resume and has_checkpoint and not force:
        raise DscompressError(f"{partial} holds an unfinished run of this output; continue it with --resume, or start over with --force")
    teacher, teacher_label = _teacher(source, config)
    if source.artifact is None:
        # A plain model starts from its constructor's random init (or loads its weights): build it
        # again so that the init, too, is a function of the seed and the run can be repeated.
        torch.manual_seed(config.seed)
        source = dataclasses.replace(source, model=build_model(source.spec))
    input_size = source.spec.input_size
    train_data = load_dataset(config.data, input_size, split="train")
    test_data = load_dataset(config.data, input_size, split="test")
    started = init_distributed(config.device)
    try:
        world = _World.current()
        if world.writer and not resume and os.path.isdir(partial):
            shutil.rmtree(partial)
        model, record = finetune(
            source.model, teacher, train_data, test_data, config,
            checkpoint_dir=partial, resume=resume, progress=progress, on_epoch_end=on_epoch_end, teacher_label=teacher_label,
        )
        artifact = None
        if world.writer:
            metrics = {"top1": record.top1, "top5": record.top5, "eval_data": config.data, "eval_images": record.test_images}
            trained = dataclasses.replace(source, model=model.cpu())
            artifact = save_step(trained, out, model, "finetune", config.to_dict(), record.to_dict(), metrics=metrics, force=force)
            shutil.rmtree(partial, ignore_errors=True)
        if world.size > 1:
            dist.barrier()
        return artifact, record
    finally:
        if started:
            dist.destroy_process_group()


# --- rendering -----------------------------------------------------------------------------------


def finetune_table(record: FinetuneRecord):
    """Per-epoch rich table of a :class:`FinetuneRecord`."""
    from rich.table import Table

    how = f"distilled from {record.teacher}" if record.teacher else "trained on labels"
    table = Table(title=f"fine-tuned for {len(record.epochs)} epochs, {how} ({record.device}, {record.precision})")
    for column in ("epoch", "lr", "train loss", "train top-1", "test top-1", "test top-5", "img/s", "seconds"):
        table.add_column(column, justify="right")
    for e in record.epochs:
        mark = " *" if e.epoch == record.kept_epoch else ""
        table.add_row(
            f"{e.epoch}{mark}", f"{e.lr:.3g}", f"{e.train_loss:.4f}", f"{e.train_top1:.2f}",
            f"{e.test_top1:.2f}", f"{e.test_top5:.2f}", f"{e.images_per_s:,.0f}", f"{e.seconds:.1f}",
        )
    return table


def finetune_summary(record: FinetuneRecord) -> list[str]:
    """Lines summarising a fine-tuning record."""
    lines = [f"test top-1: {record.start_top1:.2f}% before -> {record.top1:.2f}% kept (epoch {record.kept_epoch}, * above); last epoch {record.final_top1:.2f}%"]
    if record.teacher_top1 is not None:
        lines.append(f"teacher top-1: {record.teacher_top1:.2f}%")
    extra = f", resumed after epoch {', '.join(map(str, record.resumed_at))}" if record.resumed_at else ""
    lines.append(f"took {record.seconds:.1f}s on {record.world_size} process(es){extra}")
    return lines
