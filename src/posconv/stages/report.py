"""Stage `report`: the card's `plots/report.md`; with `--study` (study/dvc.yaml's `report`), the
study's `plots/study.md`. Every number is read from metrics files, each a declared dependency of its
stage: the card's report reads only what `dvc repro` makes, so `dvc repro` never starts the study."""

from __future__ import annotations

import logging

from posconv import registry
from posconv.cli import parser
from posconv.config import load_params
from posconv.grid import check_study
from posconv.io import atomic_outputs, read_json
from posconv.reporting import render, render_study
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


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    arguments.add_argument("--study", action="store_true", help="the study's report (study/dvc.yaml)")
    path, text = (study if arguments.parse_args(argv).study else card)()
    with atomic_outputs(path) as (temp,):
        temp.write_text(text)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    run_stage(main)
