"""The seed study's open questions, measured over several seeds as DVC experiments.

`python -m posconv.tools.study run [-j N]` queues every (variant, seed) of the grid (`posconv.grid`)
with `dvc exp run --queue` up to the evaluate stage of the card or of families/dvc.yaml, runs them
with `dvc queue start -j N` (the workspace is left alone; `posconv.tools.experiments`), then collects.
`python -m posconv.tools.study collect` finds the experiments in `dvc exp show --json`, reads their metrics
files from git and writes `metrics/study.json`, which the report presents.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from posconv.cli import parser, positive_int
from posconv.config import load_params
from posconv.errors import BadInput
from posconv.grid import (
    FULL_SCALE,
    REPLICATES,
    SCALE,
    TOLERANCE_FACTOR,
    VARIANTS,
    aggregate,
    compare,
    experiment_name,
    quantities,
    tolerances,
)  # fmt: skip
from posconv.io import read_json, write_json
from posconv.registry import STUDY, TOLERANCES, model_metrics
from posconv.stages import run_stage
from posconv.tools.experiments import (
    Experiment,
    finished,
    machine_cpu_seconds,
    read_files,
    run_queued,
    show_all,
    stages_run,
    stop_queue,
)

logger = logging.getLogger(__name__)
TARGETS = {False: "evaluate", True: "families/dvc.yaml:evaluate"}  # the card, or the families pipeline
STARTED = ".dvc/tmp/posconv-study-started.json"  # the grid's start, for its wall time (this machine)


def grid(scale: dict) -> list[Experiment]:
    """Every (variant, seed) of the study up to its pipeline's evaluate (the report stage needs the study
    it feeds), variant by variant, so that a variant finds the stages it shares with the earlier ones in
    DVC's run-cache."""
    return [
        Experiment(
            experiment_name(name, seed),
            {"seed": seed, "train.seed": seed, **scale, **variant.changes},
            TARGETS[variant.families],
        )
        for name, variant in VARIANTS.items()
        for seed in variant.seeds
    ]


def run_grid(scale: dict, jobs: int) -> dict:
    """Run the grid on DVC's queue; its start is recorded first (`STARTED`), so that a later `collect`
    measures the grid's wall time itself even if the tool was stopped while the workers went on."""
    write_json(STARTED, {"started": time.time(), "cpu_s": machine_cpu_seconds(), "jobs": jobs})
    try:
        stages = run_queued(grid(scale), jobs)
    except KeyboardInterrupt:
        stop_queue()
        raise
    return measured_cost(time.time(), machine_cpu_seconds()) | reuse(list(stages.values()))


def measured_cost(finished_at: float, cpu_now: float | None) -> dict:
    """Wall seconds from the recorded start of the grid to `finished_at`, and the machine's CPU seconds
    meanwhile (None when the end is only known from the experiments' timestamps)."""
    if not Path(STARTED).is_file():
        raise BadInput(f"{STARTED}: no recorded start of a grid (run: python -m posconv.tools.study run)")
    start = read_json(STARTED)
    cpu = None if cpu_now is None else cpu_now - start["cpu_s"]
    return {"wall_s": finished_at - start["started"], "cpu_s": cpu, "jobs": start["jobs"]}


def read_metrics(revision: str, models: tuple[str, ...]) -> dict[str, dict]:
    """An experiment's metrics files of `models`."""
    return read_files(revision, [path for model in models for path in model_metrics(model)])


def reuse(stages: list[dict[str, list[str]]]) -> dict:
    """Trainings the experiments ran and those DVC's run-cache served, from their `stages_run` (None where
    the queue no longer held an experiment's log)."""
    if not all(s["ran"] or s["served"] for s in stages):
        return {"trainings_run": None, "trainings_served_by_run_cache": None}
    count = {key: sum(sum("train" in stage for stage in s[key]) for s in stages) for key in ("ran", "served")}
    return {"trainings_run": count["ran"], "trainings_served_by_run_cache": count["served"]}


def collect(cost: dict | None) -> None:
    """Write the study file; `cost` None (collect only): measured from the recorded start of the grid to
    the last experiment's finish."""
    revisions = finished(show_all(), prefix="study-")
    names = {experiment_name(name, s): name for name, variant in VARIANTS.items() for s in variant.seeds}
    missing = [name for name in names if name not in revisions]
    if missing:
        raise BadInput(
            f"no finished experiment {missing[0]} (and {len(missing) - 1} more of the grid's "
            f"{len(names)}): run python -m posconv.tools.study run"
        )
    if cost is None:
        last = max(revisions[name].at for name in names).timestamp()
        cost = measured_cost(last, None) | reuse([stages_run(name) for name in names])
    evaluate = load_params().evaluate.model_copy(update={"sizes": SCALE["evaluate.sizes"]})
    readers = quantities(evaluate.sizes, evaluate.shifts, evaluate.scales)
    metrics = {
        name: read_metrics(revisions[name].revision, VARIANTS[variant].models)
        for name, variant in names.items()
    }
    results = aggregate(metrics, readers, model_metrics)
    variants = {
        name: {"changes": v.changes, "models": v.models, "seeds": v.seeds} for name, v in VARIANTS.items()
    }
    write_json(STUDY, {
        "replicates": REPLICATES, "scale": SCALE, "evaluate": evaluate.model_dump(), "variants": variants,
        "margins": {name: q.margin for name, q in readers.items()}, "cost": cost,
        "results": results, "comparisons": compare(results, readers),
    })  # fmt: skip
    write_json(TOLERANCES, {"factor": TOLERANCE_FACTOR, "tolerances": tolerances(results, readers)})
    logger.info("wrote %s and %s: %d variants, %d experiments", STUDY, TOLERANCES, len(VARIANTS), len(names))


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    arguments.add_argument("step", choices=["run", "collect"])
    arguments.add_argument(
        "--full-scale", action="store_true", help="the seed's scale (for a GPU), not SCALE"
    )
    arguments.add_argument(
        "-j", "--jobs", type=positive_int, default=1, help="DVC queue workers (dvc queue start -j)"
    )
    args = arguments.parse_args(argv)
    scale = FULL_SCALE if args.full_scale else SCALE
    collect(run_grid(scale, args.jobs) if args.step == "run" else None)


if __name__ == "__main__":
    run_stage(main)  # under DVC, a failed or stopped run puts back the outputs DVC removed
