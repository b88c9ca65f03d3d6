"""Stage `report`: the card's `plots/report.md`; with `--study` (study/dvc.yaml's `report`), the
study's `plots/study.md`; with `--coordinates` (coordinates/dvc.yaml's `report`), the coordinate
benchmark's `plots/coordinates.md`. Every number is read from metrics files, each a declared dependency
of its stage: each page reads only what its own pipeline makes, so `dvc repro` never starts the study
or the benchmark, and the study never starts the benchmark."""

from __future__ import annotations

import logging

from posconv import registry
from posconv.cli import parser
from posconv.config import load_params
from posconv.grid import check_study
from posconv.io import atomic_outputs, read_json
from posconv.reporting import render, render_coordinates, render_study
from posconv.stages import run_stage

logger = logging.getLogger(__name__)


def card() -> tuple[str, str]:
    params = load_params()
    summary = read_json(registry.SUMMARY)
    evaluation = {m: read_json(registry.evaluate_metrics(m)) for m in registry.LAYERS}
    training = {m: read_json(registry.train_metrics(m)) for m in registry.LAYERS}
    data = read_json(registry.DATA_METRICS)
    return registry.REPORT, render(params, summary, evaluation, training, data)


def study() -> tuple[str, str]:
    results = check_study(read_json(registry.STUDY), registry.STUDY)
    return registry.STUDY_REPORT, render_study(results, read_json(registry.BENCH_LAYERS))


def coordinates() -> tuple[str, str]:
    summary, counts = read_json(registry.COORDINATES_SUMMARY), read_json(registry.COORDINATES_COUNTS)
    return registry.COORDINATES_REPORT, render_coordinates(summary, counts)


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    page = arguments.add_mutually_exclusive_group()
    page.add_argument("--study", action="store_true", help="the study's report (study/dvc.yaml)")
    page.add_argument("--coordinates", action="store_true", help="the benchmark's (coordinates/dvc.yaml)")
    args = arguments.parse_args(argv)
    path, text = (study if args.study else coordinates if args.coordinates else card)()
    with atomic_outputs(path) as (temp,):
        temp.write_text(text)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    run_stage(main)
