"""Stage `train_<layer>`: train the study's network with one encoder layer, logged with DVCLive.

`python -m posconv.stages.train <layer>` writes `models/<layer>.pt` and the DVCLive folder
`metrics/train/<layer>/` (metrics.json and per-step plots). Both are written under temporary names
and renamed into place together at the end, so a failed or killed run leaves the previous pair.

With `train.processes: N > 1` the stage launches itself as N DDP ranks (`posconv.distributed`);
`torchrun --nproc-per-node N -m posconv.stages.train <layer>` runs it as N ranks directly. Rank 0
writes the outputs; the others write nothing.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from dvclive import Live

from posconv import distributed, registry, resources
from posconv.cli import parser
from posconv.config import Params, load_params
from posconv.data import load_scenes, load_split
from posconv.distributed import World
from posconv.engine import (
    LabelledImages,
    NoLog,
    TrainResult,
    peak_memory_mb,
    place,
    resolve_device,
    resolve_precision,
    train,
)
from posconv.io import atomic_outputs, remove_stale_temporaries
from posconv.layers import acceleration, fused
from posconv.model import FCN, ModelSpec, count_parameters, materialize, model_bytes
from posconv.stages import run_stage

logger = logging.getLogger(__name__)
POSITION_RECALL_TARGET = 0.9


@contextmanager
def live_log(directory: Path) -> Iterator[Live]:
    """DVCLive logging into `directory`, ended (summary, report) only when the block succeeds. A failed
    or interrupted stage discards the folder anyway, and `with Live(...)` would end it there too: an
    interrupt that lands in `next_step` after DVCLive made its Studio queue but before it started the
    queue's worker left that end waiting on the queue forever (dvclive 3.49: a stage that never exits)."""
    live = Live(str(directory), dvcyaml=False, save_dvc_exp=False)
    yield live
    live.end()


class LiveLog:
    """Sends the engine's progress to DVCLive, so `dvc exp show` and `dvc plots` follow training."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def train_loss(self, step: int, loss: float) -> None:
        self.live.step = step
        self.live.log_metric("train/loss", loss)  # registry.loss_curve names the file this makes

    def validation(self, step: int, scores: dict) -> None:
        self.live.step = step
        values = {key: scores[key] for key in ("loss", "miou", "position_recall")}
        values |= {f"recall/{cls}": recall for cls, recall in enumerate(scores["recall"])}
        for key, value in values.items():
            self.live.log_metric(f"val/{key}", math.nan if value is None else value)  # None: class absent
        self.live.next_step()


def steps_to_target(
    validations: list[tuple[int, dict]], target: float = POSITION_RECALL_TARGET
) -> int | None:
    """First training step at which validation recall on the position classes reached `target`."""
    reached = (step for step, scores in validations if (scores["position_recall"] or 0.0) >= target)
    return next(reached, None)


def summary(
    result: TrainResult, model: FCN, started: float, device: torch.device, precision: str, processes: int
) -> dict:
    """The run's numbers for DVCLive's metrics.json (what `dvc exp show` lists); under DDP, rank 0's
    (the images per second are the global batch's, the peak memory rank 0's own)."""
    vanilla = FCN(ModelSpec.of(registry.BASELINE, vars(model.spec)))
    return {
        "steps": result.steps,
        "steps_to_position_recall_0_9": steps_to_target(result.validations),
        "train_images_per_s": result.images_per_second,
        "wall_time_s": time.perf_counter() - started,
        "parameters": count_parameters(model),
        "extra_parameters": count_parameters(model) - count_parameters(vanilla),
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device),
        "precision": precision,
        "processes": processes,
        "backends": acceleration.backends(),  # op -> what ran it ("cpp", or "eager" after a fallback)
    }


def launch(argv: list[str], layer: str, processes: int) -> None:
    """Run this stage (`argv`) as `processes` DDP ranks; a failure is the failing rank's one line, and
    leaves no temporaries even where a rank was killed before it could remove its own."""
    try:
        distributed.launch(sys.executable, ["-m", "posconv.stages.train", *argv], processes)
    except distributed.RankFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        for output in (registry.model_path(layer), registry.train_dir(layer)):
            remove_stale_temporaries(Path(output))


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    arguments.add_argument("layer", choices=registry.FACTORY_LAYERS)
    arguments.add_argument(
        "--families", action="store_true", help="place the layer at families.placement (families/dvc.yaml)"
    )
    args = arguments.parse_args(argv)
    layer, params = args.layer, load_params()
    resources.check_train(params)
    if args.families:
        placement = params.families.placement
        params = params.model_copy(update={"model": params.model.model_copy(update={"placement": placement})})
    device = resolve_device(params.device)
    world = World.from_env()
    if world is None and params.train.processes > 1:  # not a rank yet: start the ranks
        distributed.check(params.train.processes, device)
        launch(argv, layer, params.train.processes)
        return
    world = world or World()  # under torchrun its world size rules, whatever train.processes says
    distributed.check(world.local_size, device)
    device = distributed.rank_device(device, world)
    with distributed.process_group(world, device):
        train_rank(layer, params, world, device)


def train_rank(layer: str, params: Params, world: World, device: torch.device) -> None:
    """Train as `world`'s rank (a single process is rank 0 of 1); rank 0 writes the outputs."""
    fused.enable(params.train.fused_conv)
    settings = params.train.model_copy(
        update={"precision": resolve_precision(params.train.precision, device)}
    )
    scenes = load_scenes(registry.SCENES)
    split = load_split(registry.SPLIT, len(scenes.images))
    train_data, val_data = (
        LabelledImages.from_arrays(scenes.images[split[name]], scenes.labels[split[name]], device)
        for name in ("train", "val")
    )
    torch.manual_seed(params.train.seed)
    network = materialize(FCN(ModelSpec.of(layer, params.model.model_dump())), params.generate.size)
    model = place(network, device, params.train.channels_last)
    trained = distributed.wrap(model, world, device)
    started = time.perf_counter()
    if not world.main:  # trains its shards and writes nothing
        train(trained, train_data, val_data, settings, NoLog(), settings.val_every, settings.batch_size)
        return
    with atomic_outputs(registry.model_path(layer), registry.train_dir(layer)) as (model_path, live_dir):
        with live_log(live_dir) as live:
            log, every = LiveLog(live), settings.val_every
            result = train(trained, train_data, val_data, settings, log, every, settings.batch_size)
            live.summary.update(summary(result, model, started, device, settings.precision, world.size))
        model_path.write_bytes(model_bytes(model))
    ranks = f" x {world.size} processes" if world.size > 1 else ""
    logger.info(
        "%s: %d steps, train loss %.4f, val mIoU %.3f, %.0f img/s on %s%s in %s",
        layer,
        result.steps,
        result.final_train_loss,
        result.validations[-1][1]["miou"],
        result.images_per_second,
        device,
        ranks,
        settings.precision,
    )


if __name__ == "__main__":
    run_stage(main)
