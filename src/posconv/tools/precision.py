"""Does bfloat16 training change the science? Each layer trained in fp32 and in bf16 over 3 seeds at
params.yaml's settings, as DVC experiments; bf16 holds when its test position recall and mIoU lie
within fp32's min-max over the seeds.

`python -m posconv.tools.precision run [-j N]` runs the 6 experiments on DVC's queue (up to evaluate),
then collects; `collect` only re-reads them into `metrics/precision.json` and prints the table.
"""

from __future__ import annotations

import logging

from posconv.cli import parser, positive_int, run
from posconv.compare import QUANTITIES
from posconv.errors import BadInput
from posconv.io import write_json
from posconv.registry import LAYERS, evaluate_metrics, train_metrics
from posconv.tools.experiments import Experiment, finished, run_queued, show_all
from posconv.tools.study import read_metrics

logger = logging.getLogger(__name__)
RESULTS = "metrics/precision.json"
PRECISIONS = ("fp32", "bf16")
SEEDS = (0, 1, 2)  # training seeds; the data set is params.yaml's
CHECKED = ("position_recall", "miou")


def name(precision: str, seed: int) -> str:
    return f"precision-{precision}-s{seed}"


def run_grid(jobs: int) -> None:
    grid = [
        Experiment(name(precision, seed), {"train.precision": precision, "train.seed": seed})
        for precision in PRECISIONS
        for seed in SEEDS
    ]
    run_queued(grid, jobs)


def collect() -> dict:
    """Per layer and precision: the checked quantities per seed, and whether bf16 lies in fp32's range."""
    revisions = finished(show_all(), prefix="precision-")
    keys = [(p, s) for p in PRECISIONS for s in SEEDS]
    if missing := [name(*key) for key in keys if name(*key) not in revisions]:
        raise BadInput(f"no finished experiment {missing[0]}: run python -m posconv.tools.precision run")
    runs = {key: read_metrics(revisions[name(*key)].revision, LAYERS) for key in keys}
    results: dict = {}
    for layer in LAYERS:
        files = {key: (run[evaluate_metrics(layer)], run[train_metrics(layer)]) for key, run in runs.items()}
        values = {
            quantity: {p: [QUANTITIES[quantity](*files[p, seed]) for seed in SEEDS] for p in PRECISIONS}
            for quantity in CHECKED
        }
        throughput = {p: [files[p, seed][1]["train_images_per_s"] for seed in SEEDS] for p in PRECISIONS}
        holds = all(
            min(v["fp32"]) <= x <= max(v["fp32"]) for v in values.values() for x in v["bf16"]
        )  # every bf16 seed inside fp32's range
        results[layer] = {"values": values, "train_images_per_s": throughput, "bf16_within_fp32_range": holds}
    return {"seeds": list(SEEDS), "results": results}


def table(results: dict) -> str:
    header = (
        "| layer | precision | position recall: seeds | mIoU: seeds | train img/s | bf16 within fp32 range |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for layer, result in results["results"].items():
        for precision in PRECISIONS:
            cells = [
                ", ".join(f"{value:.4f}" for value in result["values"][quantity][precision])
                for quantity in CHECKED
            ]
            speed = sum(result["train_images_per_s"][precision]) / len(SEEDS)
            holds = ("yes" if result["bf16_within_fp32_range"] else "**no**") if precision == "bf16" else ""
            lines.append(f"| `{layer}` | {precision} | {cells[0]} | {cells[1]} | {speed:.1f} | {holds} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    arguments.add_argument("step", choices=["run", "collect"])
    arguments.add_argument("-j", "--jobs", type=positive_int, default=1, help="DVC queue workers")
    args = arguments.parse_args(argv)
    if args.step == "run":
        run_grid(args.jobs)
    results = collect()
    write_json(RESULTS, results)
    print(table(results))


if __name__ == "__main__":
    run(main)
