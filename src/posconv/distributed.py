"""Multi-process training with PyTorch DDP: N ranks on one machine, launched by torchrun's elastic agent.

A rank knows its place from the variables torchrun sets (`World.from_env`). Every rank builds the same
model from the same seed and walks the same global batches; `engine.train` gives rank r the items
r::N of each one, and DDP averages the gradients, so a step follows the global batch's mean loss.
Every BatchNorm (the decoder's; the encoder's when it has some) becomes a `SyncBatchNorm2d`, whose
statistics are those of the global batch (torch's `nn.SyncBatchNorm` runs on GPUs only), so N ranks
train the single process's model up to the order of floating-point sums. Backends: gloo on CPU (each
rank takes max(1, cores // N) threads), nccl on CUDA (rank r takes cuda:<local rank>).

`launch` runs a command or a function as N ranks: the stage uses it when `train.processes > 1` and it
is not already a rank, so `dvc exp run -S train.processes=2` works. The ranks' output goes to files;
a failure ends every rank and becomes the failing rank's own one-line error; a signal to the launcher
ends the ranks first.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from posconv.cli import start_clean_up_deadline
from posconv.errors import BadInput

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
INTERRUPTED = 130  # what `cli.run` exits with on SIGTERM or Ctrl-C
BAD_INPUT = 2  # what `cli.run` exits with on a `BadInput`
SHUTDOWN_S = 5  # a rank still there this long after the agent's SIGTERM is killed (see `launch`)

# DDP's buffers synchronised once, at the start (a newer keyword; older torch has the other)
_BUFFERS_ONCE = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: a single process is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls) -> World | None:
        """The rank torchrun started this process as, from its variables; None outside torchrun."""
        if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
            return None
        values = {name: os.environ.get(name, "0" if name == "RANK" else "1") for name in TORCHRUN_VARIABLES}
        if not all(re.fullmatch(r"\d+", value) for value in values.values()):
            raise BadInput(f"torchrun variables {values}: expected non-negative integers")
        rank, size, local_rank, local_size = (int(value) for value in values.values())
        if not (size >= 1 and rank < size and local_rank < local_size <= size):
            raise BadInput(f"torchrun variables {values}: not a valid rank of a group")
        return cls(rank, size, local_rank, local_size)

    @property
    def main(self) -> bool:
        """Rank 0: the one that validates and writes the outputs."""
        return self.rank == 0


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check(processes: int, device: torch.device) -> None:
    """Refuse what N processes cannot do on `device`: one line, before any process starts."""
    if processes == 1:
        return
    if device.type == "mps":
        raise BadInput(f"train.processes = {processes}: DDP has no backend for mps (use device: cpu)")
    if device.type == "cuda" and device.index is not None:
        raise BadInput(
            f"device = 'cuda:{device.index}' with train.processes = {processes}: each process takes its own "
            "GPU, cuda:<local rank> (use device: cuda or auto)"
        )
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise BadInput(
            f"train.processes = {processes}: more than the {torch.cuda.device_count()} GPU(s) here "
            "(NCCL needs one GPU per process)"
        )


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device a rank trains on: its own GPU on CUDA, else `device`."""
    if world.size > 1 and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def threads_per_rank(world: World) -> int:
    """CPU threads of each of a machine's ranks: its cores shared out, at least one each."""
    return max(1, cpu_cores() // world.local_size)


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the ranks' process group for the block (nothing for a single process): gloo on CPU, where
    the rank takes `threads_per_rank` threads, nccl on CUDA. Left cleanly when the block succeeds;
    after a failure the process ends without the goodbye, which can wait on a peer that is gone."""
    if world.size == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        torch.set_num_threads(threads_per_rank(world))
        dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks of the default group, differentiably."""
    return _SumOverRanks.apply(tensor)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises a training batch with the statistics of the global batch, summed
    over the ranks; any device and backend (torch's SyncBatchNorm runs on GPUs only).

    Mean, then variance about it (two all-reduces, as a single process computes them), summed in
    float64 so that the sum over ranks adds no rounding of its own; gradients flow back through the
    all-reduces. The running statistics are updated as BatchNorm2d updates them, from the global batch,
    so they stay equal on every rank. Outside training, or without a process group, it is BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        per_channel = (0, 2, 3)
        pixels = x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float64)
        totals = sum_over_ranks(torch.cat([x.sum(per_channel, dtype=torch.float64), pixels]))
        count = totals[-1].detach()
        mean = (totals[:-1] / count).to(torch.float32)
        centred = x.float() - mean[None, :, None, None]
        squares = sum_over_ranks(centred.square().sum(per_channel, dtype=torch.float64))
        var = (squares / count).to(torch.float32)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1)).to(torch.float32)
                self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with each BatchNorm2d replaced by a `SyncBatchNorm2d` that shares its parameters and
    buffers (so the module's state dict, and what `save_model` writes, are unchanged)."""
    if type(module) is nn.BatchNorm2d:
        synced = SyncBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        synced._parameters, synced._buffers = module._parameters, module._buffers
        return synced.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child))
    return module


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """What a rank trains: `model` with synchronised BatchNorm inside DDP; `model` itself when alone.

    Buffers are synchronised once, not at every step: the synchronised BatchNorm keeps them equal.
    """
    if world.size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(sync_batchnorm(model), device_ids=ids, **_BUFFERS_ONCE)


# ---- launching ----


class RankFailed(Exception):
    """A rank ended with an error that is neither a bad input nor an interruption (a crash, a kill)."""


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """No records from `logger_name` and below for the block: the elastic agent's report of a failure
    is a page of warnings and tracebacks; `launch` reports it as the failing rank's own line."""
    logger = logging.getLogger(logger_name)
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [logging.NullHandler()], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """The elastic agent installs its own handlers for SIGTERM, SIGINT, SIGHUP and SIGQUIT; put the
    caller's back afterwards (the stage's SIGTERM handler unwinds like Ctrl-C)."""
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    kept = {sig: signal.getsignal(sig) for sig in (getattr(signal, n) for n in names if hasattr(signal, n))}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


def _log(logs: Path, local_rank: int, stream: str) -> str:
    """What a rank wrote to `stream` (stdout or stderr); empty if it wrote nothing."""
    found = sorted(logs.glob(f"*/attempt_*/{local_rank}/{stream}.log"))
    return found[-1].read_text(errors="replace") if found else ""


_PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe")  # a rank whose peer ended


def _failure_error(failures: dict[int, Any], processes: int, logs: Path) -> BaseException:
    """The error that stands for a failed launch: its root cause, not the consequences of it.

    When one rank ends, the others see their peer's connection close, and the agent ends them with
    SIGTERM (they may die of it while exiting). So, in this order, the failure that stands is: a
    bad input (all ranks may have hit it), a rank killed by another signal, a rank's crash, an
    interruption; in the order the agent observed them (`failures` keeps it).
    """
    interruptions = {INTERRUPTED, -signal.SIGTERM, -signal.SIGINT}

    def kind(item: tuple[int, Any]) -> int:
        failure = item[1]
        if failure.exitcode == BAD_INPUT:
            return 0
        if failure.exitcode < 0 and failure.exitcode not in interruptions:
            return 1
        if failure.exitcode in interruptions:
            return 3
        return 4 if _PEER_GONE.search(_log(logs, failure.local_rank, "stderr")) else 2

    rank, failure = min(failures.items(), key=kind)  # the first of its kind: `min` keeps the order
    lines = _log(logs, failure.local_rank, "stderr").strip().splitlines()
    if kind((rank, failure)) == 0:
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        return BadInput(errors[-1] if errors else f"rank {rank} of {processes} refused its input")
    if kind((rank, failure)) == 3:
        return KeyboardInterrupt(f"rank {rank}")
    if failure.exitcode < 0:
        killer = signal.Signals(-failure.exitcode).name
        return RankFailed(f"rank {rank} of {processes} was killed by {killer}")
    last = lines[-1].strip() if lines else "no error output"
    return RankFailed(f"rank {rank} of {processes} failed with exit code {failure.exitcode}: {last}")


def launch(entrypoint: Callable[..., Any] | str, args: Sequence[Any], processes: int) -> dict[int, Any]:
    """Run `entrypoint` as `processes` ranks on this machine, as `torchrun --standalone` does: a
    rendezvous on a free localhost port, no restarts. `entrypoint` is a command (`args` its arguments,
    the ranks' output relayed from rank 0 when all succeed) or a picklable function (`args` its
    arguments; returns their results by rank).

    A failure on any rank ends all of them and raises the failing rank's error: `BadInput` with its
    one line, `KeyboardInterrupt`, or `RankFailed`. A signal to this process (SIGTERM, Ctrl-C) ends
    the ranks first, then raises `KeyboardInterrupt`. The agent ends ranks with SIGTERM, then SIGKILL
    after `SHUTDOWN_S` (not its 30 s): a rank blocked in a collective whose peer is gone, or already in
    its exit handlers, cannot run its handler, and what a failed run leaves is removed anyway.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with (
        tempfile.TemporaryDirectory(prefix="posconv-ranks-") as folder,
        _quiet("torch.distributed"),
        _signal_handlers_kept(),
    ):
        logs = Path(folder)
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=processes,
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=folder, redirects=Std.ALL),
        )
        if hasattr(config, "shutdown_timeout"):  # torch 2.13; before, the agent's 30 s
            config.shutdown_timeout = SHUTDOWN_S
        try:
            results = elastic_launch(config, entrypoint)(*args)
        except SignalException:  # the agent's own handler caught SIGTERM or SIGINT: unwind as cli's would
            start_clean_up_deadline()
            raise KeyboardInterrupt("launcher signalled") from None
        except ChildFailedError as failed:
            raise _failure_error(failed.failures, processes, logs) from None
        if isinstance(entrypoint, str):
            sys.stdout.write(_log(logs, 0, "stdout"))
            sys.stderr.write(_log(logs, 0, "stderr"))
        return results
