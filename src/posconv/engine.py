"""Training and inference loops. Data sits in memory (on the GPU when training there) as uint8 and
is batched by indexing, so there is no per-sample loader cost. Knows nothing of DVC: progress
goes to a `TrainLog`. `train` also trains a DistributedDataParallel model, one rank's shard of each
batch (`posconv.distributed` starts the ranks and wraps the model).
"""

from __future__ import annotations

import functools
import math
import re
import resource
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from posconv.config import TrainParams
from posconv.errors import BadInput
from posconv.metrics import class_scores, position_recall
from posconv.registry import DEVICE_PATTERN, N_CLASSES

FLUSH_EVERY = 25  # steps between host syncs for logging and the finite-loss check


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA, then MPS, then the CPU; a named device that is absent is a bad param."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise BadInput(f"device = {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }[device.type]
    if not available:
        raise BadInput(f"device = {name!r}: not available on this machine (use auto or cpu)")
    return device


CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # bfloat16 dot products in hardware


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them; none where /proc/cpuinfo cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((line.partition(":")[2].split() for line in lines if line.startswith("flags")), []))


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CPU with avx512_bf16 or AMX (detected, not guessed
    from the vendor), or a CUDA GPU that supports it without emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(CPU_BF16_FLAGS & cpu_flags())


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` becomes `bf16` where the device has native bfloat16, `fp32` elsewhere; others stay."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast | nullcontext:
    """bfloat16 autocast where `precision` resolves to `bf16`; plain float32 otherwise."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class LabelledImages:
    """Images `uint8 (N, H, W, 3)` and labels `uint8 (N, H, W)` as tensors on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, device: torch.device) -> LabelledImages:
        return cls(
            torch.from_numpy(np.ascontiguousarray(images)).to(device),
            torch.from_numpy(np.ascontiguousarray(labels)).to(device),
        )

    def __len__(self) -> int:
        return len(self.images)


def place(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move `model` to `device`, its weights channels_last if asked (`to_input` makes the input match)."""
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def to_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC to float NCHW in [0, 1]; the NHWC bytes already are the channels_last layout."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    return x if channels_last else x.contiguous()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int, precision: str, channels_last: bool
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (rows, float32 logits) over `images` in batches, in eval mode without autograd."""
    model.eval()
    with torch.inference_mode(), autocast(images.device, precision):
        for start in range(0, len(images), batch_size):
            rows = slice(start, start + batch_size)
            yield rows, model(to_input(images[rows], channels_last)).float()


def validate(
    model: nn.Module, data: LabelledImages, batch_size: int, precision: str, channels_last: bool
) -> dict:
    """Mean loss, per-class recall and mIoU on `data`."""
    loss, confusion = torch.zeros((), device=data.images.device), 0
    for rows, logits in predict_logits(model, data.images, batch_size, precision, channels_last):
        labels = data.labels[rows].long()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum")
        pairs = labels * N_CLASSES + logits.argmax(1)
        confusion = confusion + torch.bincount(pairs.flatten(), minlength=N_CLASSES**2)
    scores = class_scores(confusion.reshape(N_CLASSES, N_CLASSES).cpu().numpy())
    return {
        "loss": loss.item() / data.labels.numel(),
        "recall": scores["recall"],
        "miou": scores["miou"],
        "position_recall": position_recall(scores["recall"]),
    }


def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int, precision: str, channels_last: bool
) -> tuple[np.ndarray, float]:
    """Predicted classes `uint8 (N, H, W)` on the host, and inference throughput in images/s."""
    predictions = torch.empty(images.shape[:3], dtype=torch.uint8, device=images.device)
    started = time.perf_counter()
    for rows, logits in predict_logits(model, images, batch_size, precision, channels_last):
        predictions[rows] = logits.argmax(1)
    synchronize(images.device)
    seconds = time.perf_counter() - started
    return predictions.cpu().numpy(), len(images) / seconds


class TrainLog(Protocol):
    def train_loss(self, step: int, loss: float) -> None: ...
    def validation(self, step: int, scores: dict) -> None: ...


class NoLog:
    """The log of DDP ranks other than 0: they train, rank 0 reports."""

    def train_loss(self, step: int, loss: float) -> None:
        pass

    def validation(self, step: int, scores: dict) -> None:
        pass


@dataclass
class TrainResult:
    steps: int = 0
    images: int = 0
    train_seconds: float = 0.0
    final_train_loss: float = math.nan
    validations: list[tuple[int, dict]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.train_seconds


def make_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), params.lr, momentum=params.momentum, weight_decay=params.weight_decay
        )
    optimizer = torch.optim.Adam if params.optimizer == "adam" else torch.optim.AdamW
    return optimizer(model.parameters(), params.lr, weight_decay=params.weight_decay)


def make_schedule(
    optimizer: torch.optim.Optimizer, params: TrainParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if params.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class _LossBuffer:
    """Per-step losses kept on the device and handed to the log in bulk, so steps never wait for the host.

    Under DDP (`processes` > 1) each rank holds its share of every step's loss; a flush sums them over
    the ranks, so every rank logs and checks the global batch's loss, and all stop at a non-finite one.
    """

    def __init__(self, log: TrainLog, processes: int = 1, group: dist.ProcessGroup | None = None) -> None:
        self.log, self.first_step, self.losses = log, 0, []
        self.processes, self.group = processes, group

    def add(self, step: int, loss: torch.Tensor) -> None:
        if not self.losses:
            self.first_step = step
        self.losses.append(loss.detach())

    def flush(self) -> float:
        if self.processes > 1 and self.losses:
            shares = torch.stack(self.losses).float()
            dist.all_reduce(shares, group=self.group)
            values = shares.tolist()
        else:
            values = torch.stack(self.losses).float().tolist() if self.losses else []
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise BadInput(
                    f"training loss is {value} at step {self.first_step + offset}: try a lower train.lr"
                )
            self.log.train_loss(self.first_step + offset, value)
        self.losses = []
        return values[-1] if values else math.nan


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: LabelledImages,
    rows: torch.Tensor,
    params: TrainParams,
    loss_scale: float | None = None,
) -> torch.Tensor:
    """One optimisation step on `rows` of `data`; returns the loss, still on the device.

    The loss is the mean over the pixels of `rows`; with `loss_scale`, their sum times `loss_scale`
    instead (how a DDP rank weighs its shard of a batch, see `train`).
    """
    model.train()
    with autocast(data.images.device, params.precision):
        logits = model(to_input(data.images[rows], params.channels_last))
        if loss_scale is None:
            loss = nn.functional.cross_entropy(logits.float(), data.labels[rows].long())
        else:
            loss = nn.functional.cross_entropy(logits.float(), data.labels[rows].long(), reduction="sum")
            loss = loss * loss_scale
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def check_shards(images: int, batch_size: int, processes: int) -> None:
    """Refuse batches that `processes` DDP ranks cannot share: each needs an equal share of a full batch
    and at least one image of the last, shorter one (a rank with no image has no step to take)."""
    if batch_size % processes:
        raise BadInput(
            f"train.batch_size = {batch_size}: not divisible by the {processes} training processes "
            "(each takes an equal share of every batch)"
        )
    last = images % batch_size
    if 0 < last < processes:
        raise BadInput(
            f"train.batch_size = {batch_size}: the last batch of each epoch ({images} train images) has "
            f"{last} image(s), fewer than the {processes} training processes; choose a batch size that "
            f"leaves 0 or at least {processes}"
        )


def train(
    model: nn.Module,
    train_data: LabelledImages,
    val_data: LabelledImages,
    params: TrainParams,
    log: TrainLog,
    val_every: int,
    val_batch_size: int,
) -> TrainResult:
    """Train with cross-entropy; validate every `val_every` steps and after the last step.

    Training time excludes validation, so throughput measures the training loop alone.

    A DistributedDataParallel `model` is trained as one of N ranks: every rank draws the same order,
    so the global batches, the steps and the schedule are the single process's, and rank r takes items
    r::N of each batch. Its loss is its pixels' summed loss over the batch's pixels, times N: DDP's mean
    of the ranks' gradients is then the gradient of the batch's mean loss, whatever the shards' sizes
    (the last batch may split unevenly). Rank 0 validates and logs while the others wait.
    """
    device = train_data.images.device
    network, rank, processes, group = model, 0, 1, None
    if isinstance(model, DistributedDataParallel):
        network, group = model.module, model.process_group
        rank, processes = dist.get_rank(group), dist.get_world_size(group)
        check_shards(len(train_data), params.batch_size, processes)
    total_steps = params.epochs * math.ceil(len(train_data) / params.batch_size)
    optimizer = make_optimizer(model, params)
    schedule = make_schedule(optimizer, params, total_steps)
    order_rng = torch.Generator().manual_seed(params.seed)
    result, buffer = TrainResult(), _LossBuffer(log, processes, group)
    bar = tqdm(
        total=params.epochs * len(train_data), unit="img", desc="train", disable=None if rank == 0 else True
    )  # rank 0, on a terminal only
    pixels_per_image = train_data.labels[0].numel()
    with bar:
        clock = time.perf_counter()
        for _ in range(params.epochs):
            order = torch.randperm(len(train_data), generator=order_rng).to(device)
            for rows in order.split(params.batch_size):
                if processes == 1:
                    loss = train_step(model, optimizer, train_data, rows, params)
                else:  # this rank's share of the batch's mean loss, to be summed over the ranks
                    scale = processes / (len(rows) * pixels_per_image)
                    shard = rows[rank::processes]
                    loss = train_step(model, optimizer, train_data, shard, params, scale) / processes
                buffer.add(result.steps, loss)
                schedule.step()
                result.steps, result.images = result.steps + 1, result.images + len(rows)
                bar.update(len(rows))
                validate_now = result.steps % val_every == 0 or result.steps == total_steps
                if validate_now or result.steps % FLUSH_EVERY == 0:
                    result.final_train_loss = buffer.flush()
                    bar.set_postfix(loss=f"{result.final_train_loss:.4f}", refresh=False)
                if validate_now:
                    synchronize(device)
                    result.train_seconds += time.perf_counter() - clock
                    if rank == 0:
                        scores = validate(
                            network, val_data, val_batch_size, params.precision, params.channels_last
                        )
                        result.validations.append((result.steps, scores))
                        log.validation(result.steps, scores)
                    if processes > 1:
                        dist.barrier(group)  # the others wait for rank 0's validation
                    clock = time.perf_counter()
    return result


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
