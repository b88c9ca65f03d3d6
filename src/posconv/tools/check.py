"""The CI gate: committed metrics must exist, match the committed code and params, and pass thresholds.

`python -m posconv.tools.check` exits 0 when the results are fresh and meet the thresholds, 1 when
they are missing, stale or below them (a FAIL line for each), 2 when its own inputs are malformed.
Stale means `dvc status` finds a stage whose params, code or git-tracked outputs differ from its lock,
in every pipeline whose results are committed (`dvc.yaml`, `study/dvc.yaml`, `families/dvc.yaml`,
`coordinates/dvc.yaml`, where present; a lock without its pipeline file fails); cached data and models
are absent from a fresh clone and are not held against it. It also prints `dvc metrics diff --md`
against the previous commit.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from dvc.exceptions import DvcException
from dvc.repo import Repo

from posconv.cli import parser, run
from posconv.config import Params, load_params, read_yaml
from posconv.errors import BadInput
from posconv.io import read_json
from posconv.registry import SUMMARY

ABSENT = {"deleted", "not in cache"}  # how `dvc status` reports a cached file this checkout lacks
JUDGED = ["dvc.yaml", "study/dvc.yaml", "families/dvc.yaml", "coordinates/dvc.yaml"]  # committed results


def _changes(kind: str, paths: object) -> Iterator[tuple[str, str]]:
    """(path, what changed) of one `dvc status` entry; a params file's entry names each changed key."""
    for path, status in paths.items() if isinstance(paths, dict) else []:
        if isinstance(status, dict):  # params.yaml: {key: "modified" | "new" | "deleted"}
            yield from ((f"{path} {key}", str(change)) for key, change in status.items())
        else:
            yield path, str(status)


def stale_stages(repo: Repo) -> list[str]:
    """Changes `dvc status` reports, except cached outputs (and their copies as deps) missing here."""
    cached = {str(out) for stage in repo.index.stages for out in stage.outs if out.use_cache}
    present = [path for path in JUDGED if Path(path).is_file()]
    problems = [  # a lock left without its pipeline file: results nothing can re-make or judge
        f"{lock}: results without their pipeline file {path}"
        for path in JUDGED
        if path not in present and (lock := Path(path).with_suffix(".lock")).is_file()
    ]
    for stage, changes in repo.status(targets=present).items():
        for change in changes:
            if isinstance(change, str):
                problems.append(f"{stage}: {change}")
                continue
            for kind, paths in change.items():
                for path, status in _changes(kind, paths):
                    missing_cached = status in ABSENT and any(
                        path == c or path.startswith(c + "/") for c in cached
                    )
                    if not missing_cached:
                        problems.append(f"{stage}: {kind} {path} {status}")
    return problems


def headline_value(summary: object, key: str, layer: str) -> float:
    """`summary[key][layer]` as a number, or one `BadInput` line naming what is missing."""
    value = summary.get(key) if isinstance(summary, dict) else None
    value = value.get(layer) if isinstance(value, dict) else None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise BadInput(f"{SUMMARY}: {key}.{layer} = {value!r}: expected a finite number")
    return float(value)


def threshold_failures(summary: object, layer: str, minimums: dict[str, float]) -> list[str]:
    values = {key: headline_value(summary, key, layer) for key in minimums}
    return [
        f"{key} of {layer} = {values[key]:.4f} < {minimum}"
        for key, minimum in minimums.items()
        if values[key] < minimum
    ]


def metrics_diff() -> str:
    """`dvc metrics diff --md` against the previous commit, or a note when there is none."""
    if subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD~1"], capture_output=True).returncode:
        return "(no previous commit to compare with)"
    diff = subprocess.run(["dvc", "metrics", "diff", "HEAD~1", "--md"], capture_output=True, text=True)
    return diff.stdout.strip() or diff.stderr.strip() or "(no metric changed since the previous commit)"


def judge(params: Params) -> list[str]:
    """Every reason the committed results fail: missing, stale, about another layer, below thresholds.
    Malformed inputs (a summary that is not the headline's shape, an unreadable DVC project) raise."""
    dvc_yaml = read_yaml("dvc.yaml")
    declared = dvc_yaml.get("metrics", []) if isinstance(dvc_yaml, dict) else []
    problems = [f"{path}: committed metrics file missing" for path in declared if not Path(path).is_file()]
    try:
        with Repo(".") as repo:
            problems += stale_stages(repo)
    except DvcException as error:  # not a DVC project, an unreadable dvc.yaml or lock, ...
        raise BadInput(f"dvc status: {' '.join(str(error).split())}") from None
    if not Path(SUMMARY).is_file():
        return [*problems, f"{SUMMARY}: missing (run dvc repro)"]
    summary = read_json(SUMMARY)
    if not isinstance(summary, dict):
        raise BadInput(f"{SUMMARY}: expected a JSON object (the headline), found {type(summary).__name__}")
    if summary.get("layer") != params.layer:
        return [
            *problems,
            f"{SUMMARY} is about {summary.get('layer')!r}, params.yaml has layer {params.layer!r}",
        ]
    minimums = {"miou": params.check.min_miou, "position_recall": params.check.min_position_recall}
    for size in params.evaluate.sizes:  # transfer: unseen scenes at the other sizes
        minimums[f"position_recall_at_{size}"] = params.check.min_transfer_position_recall
    return problems + threshold_failures(summary, params.layer, minimums)


def main(argv: list[str]) -> None:
    parser(__name__, __doc__).parse_args(argv)
    params = load_params()
    problems = judge(params)
    print(metrics_diff())
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        sys.exit(1)
    summary = read_json(SUMMARY)
    passed = ", ".join(
        f"{key} {headline_value(summary, key, params.layer):.4f}" for key in ("miou", "position_recall")
    )
    print(f"metrics gate passed: {params.layer} {passed}")


if __name__ == "__main__":
    run(main)
