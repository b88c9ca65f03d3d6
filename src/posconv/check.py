"""The CI gate: committed metrics must exist, match the committed code and params, and pass thresholds.

`python -m posconv.check` exits 1 on any failure. Stale means `dvc status` finds a stage whose params,
code or git-tracked outputs differ from `dvc.lock`; cached data and models are absent from a fresh
clone and are not held against it. It also prints `dvc metrics diff --md` against the previous commit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from dvc.repo import Repo

from posconv.cli import run
from posconv.config import load_params
from posconv.io import read_json

ABSENT = {"deleted", "not in cache"}  # how `dvc status` reports a cached file this checkout lacks


def stale_stages(repo: Repo) -> list[str]:
    """Changes `dvc status` reports, except cached outputs (and their copies as deps) missing here."""
    cached = {str(out) for stage in repo.index.stages for out in stage.outs if out.use_cache}
    problems = []
    for stage, changes in repo.status().items():
        for change in changes:
            if isinstance(change, str):
                problems.append(f"{stage}: {change}")
                continue
            for kind, paths in change.items():
                for path, status in paths.items() if isinstance(paths, dict) else []:
                    missing_cached = status in ABSENT and any(
                        path == c or path.startswith(c + "/") for c in cached
                    )
                    if not missing_cached:
                        problems.append(f"{stage}: {kind} {path} {status}")
    return problems


def threshold_failures(summary: dict, layer: str, min_miou: float, min_position_recall: float) -> list[str]:
    checks = {"miou": min_miou, "position_recall": min_position_recall}
    return [
        f"{key} of {layer} = {summary[key][layer]:.4f} < {minimum}"
        for key, minimum in checks.items()
        if summary[key][layer] < minimum
    ]


def metrics_diff() -> str:
    """`dvc metrics diff --md` against the previous commit, or a note when there is none."""
    if subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD~1"], capture_output=True).returncode:
        return "(no previous commit to compare with)"
    diff = subprocess.run(["dvc", "metrics", "diff", "HEAD~1", "--md"], capture_output=True, text=True)
    return diff.stdout.strip() or diff.stderr.strip() or "(no metric changed since the previous commit)"


def main(argv: list[str]) -> None:
    params = load_params()
    declared = yaml.safe_load(Path("dvc.yaml").read_text()).get("metrics", [])
    problems = [f"{path}: committed metrics file missing" for path in declared if not Path(path).is_file()]
    with Repo(".") as repo:
        problems += stale_stages(repo)
    summary = read_json("metrics/summary.json")
    if summary.get("layer") != params.layer:
        problems.append(
            f"metrics/summary.json is about {summary.get('layer')!r}, params.yaml has layer {params.layer!r}"
        )
    else:
        problems += threshold_failures(
            summary, params.layer, params.check.min_miou, params.check.min_position_recall
        )
    print(metrics_diff())
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        sys.exit(1)
    print(
        f"metrics gate passed: {params.layer} mIoU {summary['miou'][params.layer]:.4f}, "
        f"position recall {summary['position_recall'][params.layer]:.4f}"
    )


if __name__ == "__main__":
    run(main)
