"""Stages of coordinates/dvc.yaml: CoordConv's coordinate-transform benchmark (`posconv.coordinates`).

`python -m posconv.stages.coordinates data` writes the published square sweep with its two splits
(`data/coordinates/`) and their counts (`metrics/coordinates/data.json`); `... train <task> <split>`
trains every arm of `coordinates.layers` for its seeds on one task and split
(`metrics/coordinates/<task>_<split>.json`); `... compare` judges them with the study's paired rule
(`metrics/coordinates/summary.json`); its page is the report stage's (`posconv.stages.report
--coordinates`). Each reads params.yaml itself: no param reaches a command line.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from posconv import registry
from posconv.cli import parser
from posconv.config import CoordinatesParams, load_params
from posconv.coordinates import (
    CANVAS,
    HALF,
    TASKS,
    Schedule,
    Sizes,
    Sweep,
    examples,
    run_record,
    summarize,
    train_run,
)
from posconv.io import atomic_outputs, json_text, read_json, write_json
from posconv.stages import run_stage

logger = logging.getLogger(__name__)


def write_data() -> None:
    """The sweep, its splits, and their counts."""
    sweep = Sweep.generate()
    counts = {
        "examples": len(sweep.centres),
        "canvas": CANVAS,
        "square": 2 * HALF + 1,
        "splits": sweep.counts(),
    }
    with atomic_outputs(registry.COORDINATES_DATA, registry.COORDINATES_COUNTS) as (directory, counts_path):
        sweep.save(directory)
        counts_path.write_text(json_text(counts))
    logger.info("%d examples; %s", counts["examples"], counts["splits"])


def _fields(cls: type, values: dict) -> dict:
    """The entries of `values` that dataclass `cls` has fields for."""
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}


def train_task(task: str, split: str, params: CoordinatesParams) -> None:
    """Every arm and seed of `coordinates.layers` on one task and split, in one metrics file."""
    torch.set_num_threads(params.threads)
    settings = getattr(params, task).model_dump()
    sizes = Sizes(**_fields(Sizes, settings), family_kernel=params.family_kernel)
    schedule = Schedule(**_fields(Schedule, settings))
    sweep = Sweep.load(registry.COORDINATES_DATA)
    train, test = (examples(task, sweep, sweep.splits[split][side]) for side in ("train", "test"))
    started, arms = time.perf_counter(), {}
    for arm, seeds in params.layers.items():
        runs = [train_run(task, arm, sizes, train, test, schedule, seed) for seed in range(seeds)]
        arms[arm] = {"parameters": runs[0].parameters, "runs": [run_record(s, r) for s, r in enumerate(runs)]}
        logger.info(
            "%s/%s %s: test %s %s, %d parameters, %.1f s a run",
            task, split, arm, TASKS[task].metric, [round(r.metric, 4) for r in runs], runs[0].parameters,
            sum(r.train_seconds for r in runs) / seeds,
        )  # fmt: skip
    write_json(
        registry.coordinates_runs(task, split),
        {
            "task": task,
            "split": split,
            "metric": TASKS[task].metric,
            "higher_is_better": TASKS[task].higher_is_better,
            "examples": {"train": len(train), "test": len(test)},
            "sizes": dataclasses.asdict(sizes),
            "schedule": dataclasses.asdict(schedule),
            "threads": params.threads,
            "wall_seconds": time.perf_counter() - started,
            "arms": arms,
        },
    )


def compare() -> None:
    """Every task and split's runs, judged (`posconv.coordinates.summarize`)."""
    runs = [
        read_json(registry.coordinates_runs(task, split))
        for task in registry.COORD_TASKS
        for split in registry.COORD_SPLITS
    ]
    write_json(registry.COORDINATES_SUMMARY, summarize(runs))


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    commands = arguments.add_subparsers(dest="command", required=True)
    commands.add_parser("data", help="the sweep and its two splits")
    train = commands.add_parser("train", help="every arm and seed on one task and split")
    train.add_argument("task", choices=registry.COORD_TASKS)
    train.add_argument("split", choices=registry.COORD_SPLITS)
    commands.add_parser("compare", help="judge every comparison on every task and split")
    args = arguments.parse_args(argv)
    params = load_params().coordinates  # checked whatever the command: a bad param is one line
    if args.command == "data":
        write_data()
    elif args.command == "train":
        train_task(args.task, args.split, params)
    else:
        compare()


if __name__ == "__main__":
    run_stage(main)
