"""The seed study's open questions, measured over several seeds as DVC experiments.

`python -m posconv.tools.study run` runs every (variant, seed) of the grid (`posconv.grid`) as
`dvc exp run --temp` up to the evaluate stage (the workspace is left alone), then collects.
`python -m posconv.tools.study collect` finds the experiments in `dvc exp show --json`, reads their metrics
files from git and writes `metrics/study.json`, which the report presents.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import time
from pathlib import Path

from posconv.cli import parser, run
from posconv.errors import BadInput
from posconv.grid import FULL_SCALE, SCALE, SEEDS, VARIANTS, aggregate, compare, experiment_name
from posconv.io import read_json, write_json
from posconv.registry import LAYERS, STUDY, evaluate_metrics, train_metrics

logger = logging.getLogger(__name__)


def experiment_args(variant: str, seed: int, scale: dict) -> list[str]:
    """`dvc exp run` of one grid point, up to evaluate (the report stage needs the study it feeds)."""
    changes = {"seed": seed, "train.seed": seed, **scale, **VARIANTS[variant]}
    options = []
    for key, value in changes.items():
        options += ["-S", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return ["dvc", "exp", "run", "--temp", "-n", experiment_name(variant, seed), *options, "evaluate"]


def run_experiment(command: list[str]) -> None:
    """Run one `dvc exp run`; a failure is one line: the stage's own error where it printed one."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        lines = (result.stderr + result.stdout).splitlines()
        errors = [line for line in lines if line.startswith("error: ")] or [
            line for line in lines if line.startswith("ERROR")
        ]
        reason = errors[0] if errors else f"exited {result.returncode}"
        raise BadInput(f"experiment {command[command.index('-n') + 1]} failed: {reason}")


def run_grid(scale: dict) -> dict:
    """Run every experiment of the grid, one after the other; return wall and CPU seconds."""
    started = time.perf_counter()
    for variant in VARIANTS:
        for seed in SEEDS:
            logger.info("study: %s", experiment_name(variant, seed))
            run_experiment(experiment_args(variant, seed, scale))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - started, "cpu_s": children.ru_utime + children.ru_stime}


def experiment_revisions(shown: list[dict], prefix: str = "study-") -> dict[str, str]:
    """Git revision of each finished experiment named `prefix...` in `dvc exp show --json --all-commits`
    output; the newest run where a name ran more than once (on another commit, say)."""
    finished = sorted(
        (revision["data"]["timestamp"], revision["name"], revision["rev"])
        for commit in shown
        for experiment in commit.get("experiments") or []
        for revision in experiment["revs"]
        if (revision.get("name") or "").startswith(prefix)
        and (revision.get("data") or {}).get("timestamp")
        and not experiment.get("executor")
    )
    return {name: revision for _, name, revision in finished}


def read_metrics(revision: str) -> dict[str, dict]:
    """An experiment's metrics files, whole, from its git commit (`dvc exp show` drops list values)."""
    paths = [evaluate_metrics(model) for model in LAYERS] + [train_metrics(model) for model in LAYERS]
    return {path: json.loads(_git_show(f"{revision}:{path}")) for path in paths}


def show_all() -> list[dict]:
    """`dvc exp show --json --all-commits`: every experiment of every commit."""
    command = ["dvc", "exp", "show", "--json", "--all-commits"]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def _git_show(spec: str) -> str:
    return subprocess.run(["git", "show", spec], check=True, capture_output=True, text=True).stdout


def collect(cost: dict | None) -> None:
    """Write the study file; `cost` None (collect only) keeps the cost the last full run measured."""
    if cost is None and Path(STUDY).exists():
        cost = read_json(STUDY)["cost"]
    revisions = experiment_revisions(show_all())
    missing = [
        experiment_name(v, s) for v in VARIANTS for s in SEEDS if experiment_name(v, s) not in revisions
    ]
    if missing:
        raise BadInput(
            f"no finished experiment {missing[0]} (and {len(missing) - 1} more of the grid's "
            f"{len(VARIANTS) * len(SEEDS)}): run python -m posconv.tools.study run"
        )
    results = aggregate({name: read_metrics(revisions[name]) for name in revisions})
    write_json(STUDY, {"seeds": list(SEEDS), "scale": SCALE, "variants": VARIANTS, "cost": cost,
                       "results": results, "comparisons": compare(results)})  # fmt: skip
    logger.info("wrote %s: %d variants x %d seeds", STUDY, len(VARIANTS), len(SEEDS))


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    arguments.add_argument("step", choices=["run", "collect"])
    arguments.add_argument(
        "--full-scale", action="store_true", help="the seed's scale (for a GPU), not SCALE"
    )
    args = arguments.parse_args(argv)
    cost = run_grid(FULL_SCALE if args.full_scale else SCALE) if args.step == "run" else None
    collect(cost)


if __name__ == "__main__":
    run(main)
