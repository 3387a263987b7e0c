"""Fine-tuning: win back the accuracy that conversion and pruning cost, by knowledge distillation.

``finetune(student, teacher, train_data, test_data, config)`` trains ``student`` to match the
softened outputs of a frozen ``teacher`` (by default the uncompressed model an artifact keeps)
as well as the labels (:func:`~dscompress.train.distill.distillation_loss`). With no teacher it trains
on the labels alone, which is also how a baseline is trained.

A segmentation model (``task="segmentation"``: logits (N, classes, H, W), masks (N, H, W)) is
trained the same way at every pixel: per-pixel cross-entropy that skips pixels labelled
:data:`~dscompress.nn.metrics.IGNORE_INDEX`, per-pixel distillation, and mean IoU where a
classifier has top-1. A model built with an auxiliary head (``ModelSpec.aux``) returns
``(out, aux)`` in training; the head adds ``aux_weight`` times its own cross-entropy.

Every epoch ends with an evaluation on the test split and a checkpoint
(:mod:`dscompress.train.checkpoint`). A run that is interrupted (Ctrl-C) or stopped by a non-finite
loss keeps the last checkpoint; ``resume=True`` continues from it. The order of the training data
in epoch ``e`` depends only on ``(seed, e)`` and the random number generators are restored, so
on CPU a resumed run ends with bitwise the weights of an uninterrupted one. An epoch interrupted
part-way is run again from its start: its partial updates are dropped, since a Ctrl-C can land
half-way through an optimizer step.

A seeded share of the training split (``val_share``) is held out and scored before training and
after every epoch. A run whose kept epoch scores below the start there (beyond the noise of that
many images) warns in one line and
records ``below_start``: distilling a calibrated model with a baseline's learning rate did exactly
that, so distillation has defaults of its own (:data:`DISTILL_LR`, :data:`DISTILL_WARMUP`). The
weights kept are the last epoch's (``keep="last"``), or with ``keep="best"`` those of the epoch
with the best top-1 on that share: never chosen on the test split, whose accuracy is what the
record reports.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`, every process trains on its own share of each
epoch, metrics are summed across processes (torchmetrics for the test and validation scores,
:mod:`dscompress.train.distributed` for the training ones), and only rank 0 writes checkpoints.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from dscompress.core.config import ConfigError, Record, StepConfig, check_range, option
from dscompress.core.errors import DscompressError, DscompressWarning
from dscompress.core.transform import TransformContext, register_transform
from dscompress.core.util import QUIET, Progress
from dscompress.data.augment import Augmented
from dscompress.data.datasets import (
    DataSpec,
    check_classes,
    check_task,
    load_dataset,
    make_loader,
    num_classes,
    split_validation,
)
from dscompress.models.build import output_classes
from dscompress.nn.metrics import IGNORE_INDEX
from dscompress.train.checkpoint import (
    check_resumable,
    checkpoint_path,
    cpu_state,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dscompress.train.distill import distillation_loss
from dscompress.train.distributed import World, barrier, broadcast_buffers, destroy, init_distributed, process_device, sum_across
from dscompress.train.evaluate import task_scores

TEACHER_ORIGINAL = "original"
TEACHER_NONE = "none"

# Used when the config leaves lr / weight_decay / warmup unset. Training from scratch (--teacher none):
# usual values for CNNs at batch size 64-256.
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}
# Distilling a compressed model from its original starts near a good solution (calibrated): for sgd
# a peak five times lower, reached after a warm-up, keeps it. At 0.05 without warm-up, epoch 1
# threw a calibrated rank-1 resnet18 on Fashion-MNIST from 82-83% to 45-77% and three seeds ended
# at 78.0% on average, 84.7% at 0.01 (BENCHMARKS.md, "Fine-tuning defaults"). adamw at 1e-3 kept
# the start (and ended 0.7 points above 2e-4, one seed): only the warm-up is added.
DISTILL_LR = {"sgd": 0.01, "adamw": 1e-3}
DISTILL_WARMUP = 0.1
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}

# Config fields that may differ when resuming: they change where and how fast, not what is computed.
RESUME_MAY_CHANGE = ("workers", "device")
EVAL_BATCH_SIZE = 256
# The score that chooses the best epoch and sums a run up, by task.
HEADLINE = {"classification": "top1", "segmentation": "miou"}


@dataclass
class FinetuneConfig(StepConfig):
    """How to fine-tune."""

    STEP: ClassVar[str] = "finetune"

    data: str = option("digits", "Dataset: its train split is learnt, its test split evaluated: digits, mnist:DIR, cifar10:DIR, ...", metavar="SPEC")
    epochs: int = option(10, "Passes over the training data.")
    optimizer: Literal["sgd", "adamw"] = option("sgd", "sgd (momentum, no Nesterov) or adamw.")
    lr: float | None = option(
        None, "Peak learning rate [default: sgd 0.01 distilling, 0.05 with --teacher none; adamw 1e-3]."
    )
    momentum: float = option(0.9, "SGD momentum (onecycle cycles it between 0.85 and 0.95 instead).")
    weight_decay: float | None = option(None, "Weight decay [default: 5e-4 for sgd, 0.05 for adamw].")
    schedule: Literal["cosine", "onecycle"] = option(
        "cosine", "cosine decays from --lr to 0; onecycle warms up for 30% of the steps, then anneals. Both step every batch."
    )
    warmup: float | None = option(
        None, "Share of the steps over which cosine's lr rises linearly from 0 to --lr [default: 0.1 distilling, 0 with --teacher none]."
    )
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy term.")
    batch_size: int = option(64, "Images per step and process (the last partial batch of an epoch is dropped).")
    teacher: str = option(
        TEACHER_ORIGINAL,
        "original (the uncompressed model an artifact keeps), none (labels only: a baseline), or an artifact folder "
        "or model name to distill from.",
    )
    alpha: float = option(
        0.9,
        "Weight of the distillation term; the teacher is the very function the student was cut down from, so its "
        "soft outputs carry more than the labels, which keep the rest.",
    )
    temperature: float = option(4.0, "Distillation temperature; the loss is scaled by T^2 so gradients keep their size.")
    aux_weight: float = option(
        0.5, "Segmentation models built with --aux: weight of the auxiliary head's cross-entropy (0.5 in torchvision's reference training)."
    )
    keep: Literal["last", "best"] = option(
        "last",
        "Which weights the result holds: the last epoch's, or the best epoch's by top-1 on --val-share of the "
        "training images held out (never chosen on the test split).",
    )
    val_share: float = option(
        0.1,
        "Share of the training split held out: the start and every epoch are scored on it, a run that ends below its "
        "start says so, and --keep best chooses on it. 0 trains on every image (no such check).",
    )
    augment: Literal["none", "crop", "crop+flip"] = option(
        "none",
        "Training augmentation: crop (random crops of the image padded by 1/8 of its size), crop+flip (and "
        "horizontal flips: not for digits or text).",
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = option(
        "auto", "Mixed precision on CUDA: auto is bf16 where supported, else fp16 with a GradScaler; on CPU, off."
    )
    calibrate_first: bool = option(
        True,
        "Calibrate a converted or pruned model that was not calibrated before training it (seconds; on Fashion-MNIST, "
        "distilling a rank-1 resnet18 uncalibrated ended 3 points lower).",
    )
    seed: int = option(0, "Fixes the initial weights of a plain model, the data order (epoch e is shuffled with seed + e) and dropout.")
    device: str = option("auto", "auto, cpu or cuda.")
    workers: int = option(0, "DataLoader worker processes.")

    def check(self):
        self.data = str(DataSpec.parse(self.data))
        distilling = self.teacher != TEACHER_NONE
        if self.lr is None:
            self.lr = (DISTILL_LR if distilling else DEFAULT_LR)[self.optimizer]
        if self.warmup is None:
            self.warmup = DISTILL_WARMUP if distilling and self.schedule == "cosine" else 0.0
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        check_range("epochs", self.epochs, low=1)
        check_range("batch_size", self.batch_size, low=1)
        check_range("workers", self.workers, low=0)
        check_range("lr", self.lr, low=0, low_open=True)
        check_range("weight_decay", self.weight_decay, low=0)
        check_range("momentum", self.momentum, 0, 1, high_open=True)
        check_range("warmup", self.warmup, 0, 1, high_open=True)
        if self.warmup and self.schedule == "onecycle":
            raise ConfigError("warmup", "is for --schedule cosine; onecycle warms up for 30% of the steps itself")
        check_range("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_range("alpha", self.alpha, 0, 1)
        check_range("temperature", self.temperature, low=0, low_open=True)
        check_range("aux_weight", self.aux_weight, low=0)
        check_range("val_share", self.val_share, 0, 1, high_open=True)
        if self.keep == "best" and self.val_share == 0:
            raise ConfigError("val_share", "must be above 0 with --keep best: the best epoch is chosen on that share")
        if not self.teacher:
            raise ConfigError("teacher", "must be 'original', 'none', an artifact folder or a model name")


@dataclass
class EpochRecord(Record):
    """One epoch. Accuracies in percent; ``lr`` as the epoch started; ``seconds`` include evaluation.
    ``val_top1`` is on the held-out validation share (None with ``val_share=0``). A segmentation run
    fills the ``*_miou`` and ``*_pixel_acc`` fields instead of the top-1/top-5 ones."""

    epoch: int
    lr: float
    train_loss: float
    test_loss: float
    images_per_s: float
    seconds: float
    train_top1: float | None = None
    test_top1: float | None = None
    test_top5: float | None = None
    val_top1: float | None = None
    train_pixel_acc: float | None = None
    test_miou: float | None = None
    test_pixel_acc: float | None = None
    val_miou: float | None = None


@dataclass
class FinetuneRecord(Record):
    """What :func:`finetune` did.

    Attributes:
        teacher: what was distilled from, or None for training on labels alone.
        device, precision, world_size: where and how it ran (precision: fp32, bf16 or fp16).
        train_images, test_images, val_images: images per epoch (all processes together), in the
            test split, and held out of the training split for validation (0 with ``val_share=0``).
        start_top1, start_top5: the student's test accuracy before training.
        start_val_top1: its top-1 on the validation share before training.
        keep: ``last`` or ``best``, the epoch the result holds.
        below_start: the kept epoch scored lower on the validation share than the start did, by
            more than one standard error of the start's score there (a warning said so): training
            lost what the model had, e.g. to too high a learning rate.
        teacher_top1: the teacher's test accuracy.
        epochs: one record per epoch done.
        best_epoch, best_val_top1: the epoch with the highest validation top-1 (kept with ``keep="best"``).
        final_top1: test top-1 after the last epoch.
        kept_epoch, top1, top5: the epoch whose weights the result holds and its test accuracy.
        seconds: training and evaluation time over all epochs, resumed runs included.
        resumed_at: epochs after which an interrupted run was resumed.
        task: ``classification`` or ``segmentation``; a segmentation run fills ``start_miou``,
            ``start_val_miou``, ``teacher_miou``, ``best_val_miou``, ``final_miou``, ``miou`` and ``pixel_acc``
            (percent) instead of the top-1/top-5 fields.
    """

    teacher: str | None
    device: str
    precision: str
    world_size: int
    train_images: int
    test_images: int
    start_top1: float | None = None
    start_top5: float | None = None
    teacher_top1: float | None = None
    val_images: int = 0
    start_val_top1: float | None = None
    keep: str = "last"
    below_start: bool = False
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_val_top1: float | None = None
    final_top1: float | None = None
    kept_epoch: int = 0
    top1: float | None = None
    top5: float | None = None
    seconds: float = 0.0
    resumed_at: list[int] = field(default_factory=list)
    task: str = "classification"
    start_miou: float | None = None
    start_val_miou: float | None = None
    teacher_miou: float | None = None
    best_val_miou: float | None = None
    final_miou: float | None = None
    miou: float | None = None
    pixel_acc: float | None = None


class FinetuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`finetune`; the message says what was saved and how to resume."""


def precision_for(amp: str, device: torch.device) -> str:
    """fp32, bf16 or fp16: what ``amp`` means on ``device``."""
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            raise DscompressError(f"--amp {amp} needs a CUDA device; on {device.type} use --amp off (or auto)")
        return "fp32"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32" if amp == "off" else amp


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    """The lr factor at each step: linear from 0 to 1 over the first ``warmup`` share of the steps,
    then a cosine from 1 to 0 over the rest."""
    warm = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total_steps - warm, 1)))

    return factor


# --- data ----------------------------------------------------------------------------------------


def _train_loader(dataset: Dataset, config: FinetuneConfig, world: World, device: torch.device) -> tuple[DataLoader, DistributedSampler]:
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


def _eval_loader(dataset: Dataset, config: FinetuneConfig, world: World) -> DataLoader:
    """Each process evaluates every ``world.size``-th image, so the sums over processes are exact."""
    if world.size > 1:
        dataset = Subset(dataset, range(world.rank, len(dataset), world.size))
    return make_loader(dataset, EVAL_BATCH_SIZE, workers=config.workers)


# --- the trainer ---------------------------------------------------------------------------------


class Trainer:
    """One fine-tuning run: the model, its teacher, data, optimisation state and checkpoints.

    :func:`finetune` is the way in; the trainer holds what every epoch shares.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, train_data: Dataset, test_data: Dataset,
                 config: FinetuneConfig, checkpoint_dir: str | None, progress: Progress, task: str = "classification"):
        self.config = config
        self.task = task
        self.classes = num_classes(train_data)
        self.ignore_index = IGNORE_INDEX if task == "segmentation" else -100
        self.world = World.current()
        self.device = process_device(config.device)
        self.precision = precision_for(config.amp, self.device)
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress if self.world.writer else QUIET
        self.student = student.to(self.device)
        self.teacher = teacher
        self.val_data = None
        if config.val_share > 0:
            train_data, self.val_data = split_validation(train_data, config.val_share, config.seed)
        if config.augment != "none":
            train_data = Augmented(train_data, flip=config.augment == "crop+flip")
        torch.manual_seed(config.seed + self.world.rank)
        self.train_loader, self.sampler = _train_loader(train_data, config, self.world, self.device)
        self.test_loader = _eval_loader(test_data, config, self.world)
        self.val_loader = _eval_loader(self.val_data, config, self.world) if self.val_data is not None else None
        self.model = student
        if self.world.size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
        params = [p for p in student.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        total_steps = config.epochs * len(self.train_loader)
        if config.schedule == "onecycle":
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=config.lr, total_steps=total_steps)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total_steps, config.warmup))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.best_state = None
        self.saved = 0  # epochs in the checkpoint

    def evaluate(self, model: nn.Module, loader: DataLoader | None) -> dict | None:
        """:func:`~dscompress.train.evaluate.task_scores` over all processes' shares (torchmetrics adds
        them up), and seconds taken."""
        if loader is None:
            return None
        begin = time.perf_counter()
        return {**task_scores(model, loader, self.task, self.classes, self.device), "seconds": time.perf_counter() - begin}

    def new_record(self, teacher_label: str | None) -> FinetuneRecord:
        start = self.evaluate(self.student, self.test_loader)
        start_val = self.evaluate(self.student, self.val_loader)
        teacher = self.evaluate(self.teacher, self.test_loader) if self.teacher is not None else None
        record = FinetuneRecord(
            teacher=teacher_label if self.teacher is not None else None,
            device=str(self.device),
            precision=self.precision,
            world_size=self.world.size,
            train_images=len(self.train_loader) * self.config.batch_size * self.world.size,
            test_images=start["images"],
            val_images=len(self.val_data) if self.val_data is not None else 0,
            keep=self.config.keep,
            task=self.task,
        )
        headline = HEADLINE[self.task]
        setattr(record, f"start_val_{headline}", start_val[headline] if start_val else None)
        if self.task == "segmentation":
            record.start_miou = start["miou"]
            record.teacher_miou = teacher["miou"] if teacher else None
        else:
            record.start_top1, record.start_top5 = start["top1"], start["top5"]
            record.teacher_top1 = teacher["top1"] if teacher else None
        return record

    def restore(self) -> FinetuneRecord:
        """Load the checkpoint to continue from; returns the record so far."""
        state = read_checkpoint(self.checkpoint_dir)
        check_resumable(state, checkpoint_path(self.checkpoint_dir), self.student, self.config.to_dict(),
                        RESUME_MAY_CHANGE, self.world.size, self.precision)
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.device)
        self.best_state = state["best_state"]
        self.saved = state["epoch"]
        record = FinetuneRecord.from_dict(state["record"])
        record.device = str(self.device)
        record.resumed_at.append(state["epoch"])
        return record

    def save(self, epoch: int, record: FinetuneRecord) -> None:
        if self.checkpoint_dir is not None and self.world.writer:
            save_checkpoint(self.checkpoint_dir, {
                "epoch": epoch,
                "config": self.config.to_dict(),
                "world_size": self.world.size,
                "model": cpu_state(self.student),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.device),
                "best_state": self.best_state,
                "record": record.to_dict(),
            })
        self.saved = epoch

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training data: the epoch's lr, train loss and top-1, images/s and seconds."""
        config, world = self.config, self.world
        begin = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.sampler.set_epoch(epoch - 1)
        self.model.train()
        loss_sum = correct = counted = seen = 0.0
        self.progress.start(f"epoch {epoch}/{config.epochs}", len(self.train_loader))
        for step, (images, labels) in enumerate(self.train_loader, 1):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                logits = self.model(images)
                aux = None
                if isinstance(logits, tuple):  # a segmentation model's (out, aux) in training (SegmentationNet)
                    logits, aux = logits
                teacher_logits = None
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher_logits = self.teacher(images).float()
                loss = distillation_loss(logits.float(), teacher_logits, labels, config.alpha, config.temperature,
                                         config.label_smoothing, self.ignore_index)
                if aux is not None and config.aux_weight > 0:
                    loss = loss + config.aux_weight * F.cross_entropy(aux.float(), labels, ignore_index=self.ignore_index)
            step_loss = loss.detach().clone()
            if world.size > 1:
                torch.distributed.all_reduce(step_loss)  # all processes see the same value: they stop together
                step_loss /= world.size
            step_loss = float(step_loss)
            if not math.isfinite(step_loss):
                kept = f"; the last good checkpoint (after epoch {self.saved}) is kept in {self.checkpoint_dir}" if self.checkpoint_dir else ""
                raise DscompressError(
                    f"the loss became {step_loss} in epoch {epoch}, step {step} (lr {self.optimizer.param_groups[0]['lr']:.3g}); "
                    f"training stopped{kept}; lower --lr and start over with --force"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            loss_sum += step_loss * len(labels)  # step_loss is already the mean over all processes
            scored = labels != self.ignore_index  # every image, or for segmentation every labelled pixel
            correct += float(((logits.detach().argmax(1) == labels) & scored).sum())
            counted += float(scored.sum())
            seen += len(labels)
            speed = seen * world.size / max(time.perf_counter() - begin, 1e-9)
            self.progress.advance(1, f"loss {loss_sum / seen:.4f}  acc {100 * correct / max(counted, 1):.1f}%  {speed:.0f} img/s")
        seconds = time.perf_counter() - begin
        self.progress.stop()
        correct, counted, seen_all = sum_across([correct, counted, seen], self.device, world)
        accuracy_key = "train_pixel_acc" if self.task == "segmentation" else "train_top1"
        return {"lr": lr, "train_loss": loss_sum / seen, accuracy_key: 100 * correct / max(counted, 1),
                "images_per_s": seen_all / seconds, "seconds": seconds}

    def end_epoch(self, epoch: int, train: dict, record: FinetuneRecord) -> EpochRecord:
        """Evaluate after an epoch, keep the best weights so far, and add the epoch to the record."""
        broadcast_buffers(self.student, self.world)  # BatchNorm statistics are per process: keep rank 0's
        test = self.evaluate(self.student, self.test_loader)
        val = self.evaluate(self.student, self.val_loader)
        entry = EpochRecord(
            epoch=epoch,
            test_loss=test["loss"],
            seconds=train.pop("seconds") + test["seconds"] + (val["seconds"] if val else 0.0),
            **train,
        )
        headline = HEADLINE[self.task]
        if self.task == "segmentation":
            entry.test_miou, entry.test_pixel_acc = test["miou"], test["pixel_acc"]
            entry.val_miou = val["miou"] if val else None
            record.final_miou = entry.test_miou
        else:
            entry.test_top1, entry.test_top5 = test["top1"], test["top5"]
            entry.val_top1 = val["top1"] if val else None
            record.final_top1 = entry.test_top1
        record.epochs.append(entry)
        record.seconds += entry.seconds
        best = getattr(record, f"best_val_{headline}")
        if val is not None and (best is None or val[headline] > best):
            record.best_epoch = epoch
            setattr(record, f"best_val_{headline}", val[headline])
            self.best_state = cpu_state(self.student)
        return entry


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    train_data: Dataset,
    test_data: Dataset,
    config: FinetuneConfig | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: Progress = QUIET,
    on_epoch_end: Callable[[int, FinetuneRecord], None] | None = None,
    teacher_label: str | None = None,
    task: str = "classification",
) -> tuple[nn.Module, FinetuneRecord]:
    """Train ``student`` (in place) by distillation from ``teacher``, or on labels if it is None.

    Args:
        student: the model to train; it is moved to the device and returned holding the weights
            ``config.keep`` names, in eval mode.
        teacher: a frozen model with the student's outputs (N, classes), sharing no parameters with it.
        train_data, test_data: datasets of (image (C, H, W), label); ``classes`` lists the class names.
            For segmentation the labels are masks (H, W) and the outputs (N, classes, H, W).
        checkpoint_dir: where ``checkpoint.pt`` is written after every epoch (by rank 0); None for none.
        resume: continue from the checkpoint in ``checkpoint_dir``.
        progress: receives a task per epoch and a line per finished epoch.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint.
        task: the student's task, ``classification`` or ``segmentation`` (its ``ModelSpec.task``).

    Returns:
        (student, record). A non-finite loss raises :class:`DscompressError`, Ctrl-C
        :class:`FinetuneInterrupted`; both leave the last checkpoint in place.
    """
    config = config or FinetuneConfig()
    input_size = tuple(train_data[0][0].shape)
    outputs = output_classes(student.to(process_device(config.device)), input_size, task)
    check_classes(train_data, outputs, data_name=config.data, task=task)
    if teacher is not None:
        _check_teacher(student, teacher, train_data, input_size, config)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir to resume from")
    trainer = Trainer(student, teacher, train_data, test_data, config, checkpoint_dir, progress, task)
    if resume:
        record = trainer.restore()
    else:
        record = trainer.new_record(teacher_label)
        trainer.save(0, record)  # so that Ctrl-C or a divergence in the first epoch also leaves a run to resume
    start_epoch = complete = trainer.saved
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            entry = trainer.end_epoch(epoch, trainer.train_epoch(epoch), record)
            complete = epoch
            trainer.save(epoch, record)
            trainer.progress.line(_epoch_line(entry, config.epochs))
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    except KeyboardInterrupt:
        trainer.progress.stop()
        if complete > trainer.saved:  # the epoch is done, but Ctrl-C came before its checkpoint was written
            trainer.save(complete, record)
        raise FinetuneInterrupted(_interrupted_message(trainer.saved, config.epochs, checkpoint_dir)) from None

    kept = record.epochs[-1]
    if config.keep == "best":
        kept = next(e for e in record.epochs if e.epoch == record.best_epoch)
        student.load_state_dict(trainer.best_state)
    record.kept_epoch = kept.epoch
    if task == "segmentation":
        record.miou, record.pixel_acc = kept.test_miou, kept.test_pixel_acc
    else:
        record.top1, record.top5 = kept.test_top1, kept.test_top5
    _check_against_start(record, kept, config, trainer.world.writer)
    return student.eval(), record


def _check_against_start(record: FinetuneRecord, kept: EpochRecord, config: FinetuneConfig, writer: bool) -> None:
    """Set ``record.below_start`` and warn in one line when the kept epoch scores below the start on
    the validation share by more than that share can tell apart: one standard error of the start's
    accuracy on that many images, ``100 * sqrt(p (1 - p) / n)`` points (1.6 points for 500 images
    at 86%, where a last epoch 0.8 points under its start was noise: its test top-1 had risen 1.45)."""
    headline = HEADLINE[record.task]
    start, end = getattr(record, f"start_val_{headline}"), getattr(kept, f"val_{headline}")
    if start is None or end is None:
        return
    noise = 100 * math.sqrt(start / 100 * (1 - start / 100) / max(record.val_images, 1))
    if end >= start - noise:
        return
    record.below_start = True
    if writer:
        name = "mIoU" if headline == "miou" else "top-1"
        warnings.warn(
            f"fine-tuning ended below its start: {name} {end:.2f}% on the {record.val_images} held-out training images, "
            f"{start:.2f}% before training (more than their {noise:.1f}-point noise); try a lower --lr (this run: "
            f"{config.lr:g}) or a longer --warmup, or --keep best",
            DscompressWarning, stacklevel=3,
        )


def _check_teacher(student: nn.Module, teacher: nn.Module, train_data: Dataset, input_size, config: FinetuneConfig) -> None:
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError("the teacher shares parameters with the student; give it a separate copy (Source.teacher())")
    device = process_device(config.device)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        outputs = teacher(torch.zeros(1, *input_size, device=device)).shape[1]  # (N, classes[, H, W])
    if outputs != num_classes(train_data):
        raise DscompressError(
            f"the teacher has {outputs} outputs but {config.data} has {num_classes(train_data)} classes; "
            "choose a teacher trained on the same classes"
        )


def _interrupted_message(saved: int, epochs: int, checkpoint_dir: str | None) -> str:
    where = "interrupted after the last epoch" if saved == epochs else f"interrupted during epoch {saved + 1} of {epochs}"
    if checkpoint_dir is None:
        return f"{where}; no checkpoint folder was given, so nothing was kept"
    return f"{where}; the {saved} finished epoch(s) are saved in {checkpoint_dir}: run the same command with --resume to continue"


def _epoch_line(e: EpochRecord, total: int) -> str:
    if e.test_miou is not None:
        val = f"  val mIoU {e.val_miou:.2f}%" if e.val_miou is not None else ""
        scores = f"train pixel acc {e.train_pixel_acc:.2f}%{val}  test mIoU {e.test_miou:.2f}%  pixel acc {e.test_pixel_acc:.2f}%"
    else:
        val = f"  val {e.val_top1:.2f}%" if e.val_top1 is not None else ""
        scores = f"train {e.train_top1:.2f}%{val}  test {e.test_top1:.2f}%"
    return f"epoch {e.epoch}/{total}: loss {e.train_loss:.4f}  {scores}  lr {e.lr:.3g}  {e.images_per_s:,.0f} img/s  {e.seconds:.1f}s"


@register_transform(FinetuneConfig)
def finetune_transform(model: nn.Module, config: FinetuneConfig, context: TransformContext) -> tuple[nn.Module, FinetuneRecord]:
    """Fine-tune MODEL by distillation from its original (or train it: --teacher none).

    Checkpoints live in ``context.work_dir`` (if given) until the result is saved; a plain model
    (``context.rebuild``) is built again under the seed, so that its init, too, repeats. Under
    torchrun every process trains and joins the group here.
    """
    work_dir = context.work_dir
    has_checkpoint = work_dir is not None and os.path.isfile(checkpoint_path(work_dir))
    if context.resume and not has_checkpoint:
        raise DscompressError(f"--resume: no checkpoint to resume from in {work_dir}; run without --resume to start")
    if not context.resume and has_checkpoint and not context.force:
        raise DscompressError(f"{work_dir} holds an unfinished run of this output; continue it with --resume, or start over with --force")
    teacher, teacher_label = _teacher(config, context)
    if context.rebuild is not None:
        torch.manual_seed(config.seed)
        model = context.rebuild()
    train_data = load_dataset(config.data, context.input_size, split="train")
    test_data = load_dataset(config.data, context.input_size, split="test")
    check_task(train_data, context.task, config.data, context.label)
    started = init_distributed(config.device)
    try:
        world = World.current()
        if work_dir is not None and world.writer and not context.resume and os.path.isdir(work_dir):
            shutil.rmtree(work_dir)
        model, record = finetune(model, teacher, train_data, test_data, config, checkpoint_dir=work_dir, resume=context.resume,
                                 progress=context.progress, teacher_label=teacher_label, task=context.task)
        barrier(world)
    finally:
        if started:
            destroy()
    return model.cpu(), record


def _teacher(config: FinetuneConfig, context: TransformContext) -> tuple[nn.Module | None, str | None]:
    """The frozen teacher the config names, and a label for it."""
    if config.teacher == TEACHER_NONE:
        return None, None
    if config.teacher == TEACHER_ORIGINAL:
        if context.rebuild is not None:
            raise DscompressError(
                f"{context.label} is a plain model, so its default teacher would be a copy of itself; "
                "pass --teacher none to train it on labels (a baseline), or --teacher DIR to distill from a trained artifact"
            )
        if context.original is None:
            raise DscompressError(f"{context.label} keeps no original model to distill from; pass --teacher DIR or --teacher none")
        return context.original(), f"{context.label} (original)"
    if context.load is None:
        raise DscompressError(f"--teacher {config.teacher}: a teacher named by path needs a loader; give the teacher model itself")
    other = context.load(config.teacher)
    if other.spec.task != context.task:
        raise DscompressError(f"the teacher {config.teacher} is a {other.spec.task} model and {context.label} a {context.task} one; choose a teacher of the same task")
    if other.spec.num_classes not in (None, context.num_classes) and context.num_classes is not None:
        raise DscompressError(f"the teacher {config.teacher} has {other.spec.num_classes} classes, the model {context.num_classes}")
    teacher = other.model
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), other.label
