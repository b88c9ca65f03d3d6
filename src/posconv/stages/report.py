"""Stage `report`: `plots/report.md`, the study on one page. Every number is read from metrics files,
each a declared dependency of this stage in `dvc.yaml`: the pipeline's own, the study's results and
the layer benchmark (both made by `study/dvc.yaml`)."""

from __future__ import annotations

import logging

from posconv import registry
from posconv.cli import parser, run
from posconv.config import load_params
from posconv.grid import check_study
from posconv.io import atomic_outputs, read_json
from posconv.reporting import render

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> None:
    parser(__name__, __doc__).parse_args(argv)
    params = load_params()
    summary = read_json(registry.SUMMARY)
    evaluation = {m: read_json(registry.evaluate_metrics(m)) for m in registry.LAYERS}
    training = {m: read_json(registry.train_metrics(m)) for m in registry.LAYERS}
    study = check_study(read_json(registry.STUDY), registry.STUDY)
    data, bench = read_json(registry.DATA_METRICS), read_json(registry.BENCH_LAYERS)
    with atomic_outputs(registry.REPORT) as (temp,):
        temp.write_text(render(params, summary, evaluation, training, data, study, bench))
    logger.info("wrote %s", registry.REPORT)


if __name__ == "__main__":
    run(main)
