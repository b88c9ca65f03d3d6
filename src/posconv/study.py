"""The seed study's open questions, measured over several seeds as DVC experiments.

`python -m posconv.study run` runs every (variant, seed) of the grid below as `dvc exp run --temp`
up to the evaluate stage (the workspace is left alone), then collects. `python -m posconv.study collect` reads
`dvc exp show --json` into `metrics/study.json`, which the report presents. A difference is called
real only when the min-max intervals over seeds do not overlap.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import time
from pathlib import Path

from posconv.cli import run
from posconv.compare import QUANTITIES
from posconv.config import LAYERS
from posconv.io import read_json, write_json

logger = logging.getLogger(__name__)
STUDY = "metrics/study.json"
SEEDS = (0, 1, 2)  # data seed and training seed together
SCALE = {  # small enough for the whole grid to finish on a 2-core CPU in well under 45 minutes
    "generate.size": 64,
    "generate.images": 600,
    "model.width": 8,
    "train.epochs": 4,
    "train.val_every": 10,
}
FULL_SCALE = {"generate.images": 10000, "split.val": 0.25, "split.test": 0.25, "model.width": 64}
VARIANTS = {  # name -> params changed from the study scale
    "baseline": {},
    "batchnorm": {"model.encoder_batchnorm": True},  # Q1
    "wide": {"model.width": 10},  # Q2a: its vanilla has more parameters than coordconv at width 8
    "constant": {"model.coords": "constant"},  # Q2b: same parameters, no position
    "shuffled": {"model.coords": "shuffled"},  # Q2b
    "with_r": {"model.with_r": True},  # Q3: CoordConv with the radius channel
    "seed_coords": {"model.coords": "seed"},  # Q3: the seed's coordinate convention
}
# (question, (variant, model) A, (variant, model) B): each compared on every quantity
COMPARISONS = [
    (
        "Q1 BatchNorm: coordbias vs vanilla, both with BatchNorm",
        ("batchnorm", "coordbias"),
        ("batchnorm", "vanilla"),
    ),
    (
        "Q1 BatchNorm: coordbias with vs without BatchNorm",
        ("batchnorm", "coordbias"),
        ("baseline", "coordbias"),
    ),
    (
        "Q2a parameters: coordbias vs vanilla widened past coordconv",
        ("baseline", "coordbias"),
        ("wide", "vanilla"),
    ),
    (
        "Q2a parameters: coordconv vs vanilla widened past coordconv",
        ("baseline", "coordconv"),
        ("wide", "vanilla"),
    ),
    (
        "Q2b controls: coordbias vs coordbias with constant maps",
        ("baseline", "coordbias"),
        ("constant", "coordbias"),
    ),
    (
        "Q2b controls: coordbias vs coordbias with shuffled maps",
        ("baseline", "coordbias"),
        ("shuffled", "coordbias"),
    ),
    (
        "Q2b controls: coordconv vs coordconv with constant maps",
        ("baseline", "coordconv"),
        ("constant", "coordconv"),
    ),
    (
        "Q2b controls: coordconv vs coordconv with shuffled maps",
        ("baseline", "coordconv"),
        ("shuffled", "coordconv"),
    ),
    (
        "Q2b controls: coordbias with shuffled maps vs vanilla",
        ("shuffled", "coordbias"),
        ("baseline", "vanilla"),
    ),
    ("Q3 coordbias vs coordconv", ("baseline", "coordbias"), ("baseline", "coordconv")),
    ("Q3 coordconv with r vs without", ("with_r", "coordconv"), ("baseline", "coordconv")),
    ("Q3 coordbias: seed convention vs centered", ("seed_coords", "coordbias"), ("baseline", "coordbias")),
    ("Q3 coordconv: seed convention vs centered", ("seed_coords", "coordconv"), ("baseline", "coordconv")),
]


def experiment_name(variant: str, seed: int) -> str:
    return f"study-{variant}-s{seed}"


def experiment_args(variant: str, seed: int, scale: dict) -> list[str]:
    """`dvc exp run` of one grid point, up to evaluate (the report stage needs the study it feeds)."""
    changes = {"seed": seed, "train.seed": seed, **scale, **VARIANTS[variant]}
    options = []
    for key, value in changes.items():
        options += ["-S", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return ["dvc", "exp", "run", "--temp", "-n", experiment_name(variant, seed), *options, "evaluate"]


def run_grid(scale: dict) -> dict:
    """Run every experiment of the grid, one after the other; return wall and CPU seconds."""
    started = time.perf_counter()
    for variant in VARIANTS:
        for seed in SEEDS:
            logger.info("study: %s", experiment_name(variant, seed))
            subprocess.run(experiment_args(variant, seed, scale), check=True, capture_output=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - started, "cpu_s": children.ru_utime + children.ru_stime}


def experiment_revisions(shown: list[dict]) -> dict[str, str]:
    """Git revision of each finished study experiment in `dvc exp show --json` output."""
    return {
        revision["name"]: revision["rev"]
        for commit in shown
        for experiment in commit.get("experiments") or []
        for revision in experiment["revs"]
        if (revision.get("name") or "").startswith("study-") and not experiment.get("executor")
    }


def read_metrics(revision: str) -> dict[str, dict]:
    """An experiment's metrics files, whole, from its git commit (`dvc exp show` drops list values)."""
    paths = [f"metrics/evaluate/{model}.json" for model in LAYERS] + [
        f"metrics/train/{model}/metrics.json" for model in LAYERS
    ]
    return {path: json.loads(_git_show(f"{revision}:{path}")) for path in paths}


def _git_show(spec: str) -> str:
    return subprocess.run(["git", "show", spec], check=True, capture_output=True, text=True).stdout


def spread(values: list[float | None]) -> dict:
    """Mean and min-max over seeds; a None (e.g. a recall target never reached) is counted apart."""
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "min": None, "max": None, "values": values}
    return {"mean": statistics.fmean(known), "min": min(known), "max": max(known), "values": values}


def aggregate(metrics: dict[str, dict]) -> dict:
    """variant -> model -> quantity -> spread over seeds."""
    results: dict = {}
    for variant in VARIANTS:
        runs = [metrics[experiment_name(variant, seed)] for seed in SEEDS]
        results[variant] = {
            model: {
                quantity: spread(
                    [
                        read(r[f"metrics/evaluate/{model}.json"], r[f"metrics/train/{model}/metrics.json"])
                        for r in runs
                    ]
                )
                for quantity, read in QUANTITIES.items()
            }
            for model in LAYERS
        }
    return results


def compare(results: dict) -> list[dict]:
    """Every comparison on every quantity: intervals, difference of means, and whether they separate."""
    rows = []
    for question, (variant_a, model_a), (variant_b, model_b) in COMPARISONS:
        for quantity in QUANTITIES:
            a, b = results[variant_a][model_a][quantity], results[variant_b][model_b][quantity]
            known = a["mean"] is not None and b["mean"] is not None
            rows.append({
                "question": question, "quantity": quantity,
                "a": f"{variant_a}/{model_a}", "b": f"{variant_b}/{model_b}", "a_spread": a, "b_spread": b,
                "difference": a["mean"] - b["mean"] if known else None,
                "separated": known and (a["min"] > b["max"] or b["min"] > a["max"]),
            })  # fmt: skip
    return rows


def collect(cost: dict | None) -> None:
    """Write the study file; `cost` None (collect only) keeps the cost the last full run measured."""
    if cost is None and Path(STUDY).exists():
        cost = read_json(STUDY)["cost"]
    shown = json.loads(
        subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout
    )
    results = aggregate({name: read_metrics(rev) for name, rev in experiment_revisions(shown).items()})
    write_json(STUDY, {"seeds": list(SEEDS), "scale": SCALE, "variants": VARIANTS, "cost": cost,
                       "results": results, "comparisons": compare(results)})  # fmt: skip
    logger.info("wrote %s: %d variants x %d seeds", STUDY, len(VARIANTS), len(SEEDS))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m posconv.study", description=__doc__)
    parser.add_argument("step", choices=["run", "collect"])
    parser.add_argument("--full-scale", action="store_true", help="the seed's scale (for a GPU), not SCALE")
    args = parser.parse_args(argv)
    cost = run_grid({**SCALE, **FULL_SCALE} if args.full_scale else SCALE) if args.step == "run" else None
    collect(cost)


if __name__ == "__main__":
    run(main)
