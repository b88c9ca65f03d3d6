"""`python -m posconv.tools.verify`: a reproduction against the committed results, on a copy of the
committed project (its metrics, locks and tolerances) in a fresh git repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from warm import run_module

from posconv.registry import evaluate_metrics

ROOT = Path(__file__).resolve().parents[1]


def verify(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_module(checkout, "posconv.tools.verify", *args, timeout=120)


def edit_json(path: Path, change: dict) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | change))


def test_the_committed_results_agree_with_themselves(checkout: Path) -> None:
    result = verify(checkout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| quantity | committed | reproduced | tolerance | agrees |" in result.stdout
    assert (
        "| coordbias position_recall |" in result.stdout and "reproduction agrees with HEAD" in result.stdout
    )


def test_a_metric_outside_its_tolerance_disagrees_and_is_named(checkout: Path) -> None:
    path = checkout / evaluate_metrics("coordbias")
    committed = json.loads(path.read_text())["miou"]
    tolerance = json.loads((checkout / "metrics/tolerances.json").read_text())["tolerances"]["coordbias"][
        "miou"
    ]
    edit_json(path, {"miou": committed - 2 * tolerance})  # a reproduction off by twice the tolerance
    result = verify(checkout)
    assert result.returncode == 1
    assert "| coordbias miou |" in result.stdout and "**NO**" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "DISAGREES: coordbias miou"
    edit_json(path, {"miou": committed - 0.5 * tolerance})  # within: agrees
    assert verify(checkout).returncode == 0


def test_other_data_bytes_disagree(checkout: Path) -> None:
    lock = checkout / "dvc.lock"
    data = yaml.safe_load(lock.read_text())
    data["stages"]["generate"]["outs"][0]["md5"] = "0" * 32 + ".dir"
    lock.write_text(yaml.safe_dump(data))
    result = verify(checkout)
    assert result.returncode == 1 and "DISAGREES: data/scenes (md5)" in result.stdout


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nan tolerance", "metrics/tolerances.json: coordbias.miou = nan: expected a finite number >= 0"),
        ("negative tolerance", "coordbias.miou = -1: expected a finite number >= 0"),
        ("no tolerance file", "metrics/tolerances.json: file not found"),
        ("no results", "nothing to compare: no results in the workspace (run make repro first)"),
        (
            "committed metric missing",
            "HEAD:metrics/evaluate/coordbias.json: no committed file to compare with",
        ),
        ("committed metric corrupt", "HEAD:metrics/evaluate/coordbias.json: not readable JSON"),
        ("committed metric lacks a key", "coordbias: its metrics lack miou"),
        ("no such revision", "nope:dvc.lock: no committed file to compare with"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(checkout: Path, case: str, message: str) -> None:
    tolerances = checkout / "metrics/tolerances.json"
    metric = checkout / evaluate_metrics("coordbias")
    args: tuple[str, ...] = ()
    if case.endswith("tolerance"):
        table = json.loads(tolerances.read_text())
        table["tolerances"]["coordbias"]["miou"] = float("nan") if case.startswith("nan") else -1
        tolerances.write_text(json.dumps(table))
    elif case == "no tolerance file":
        tolerances.unlink()
    elif case == "no results":
        for folder in ("metrics/evaluate", "metrics/families"):
            for path in (checkout / folder).glob("*.json"):
                path.unlink()
    elif case.startswith("committed metric"):
        kept = metric.read_text()
        if case.endswith("missing"):
            metric.unlink()
        else:
            broken = json.loads(kept)
            broken.pop("miou")
            metric.write_text("{" if case.endswith("corrupt") else json.dumps(broken))
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "commit", "-qam", "a broken commit"], cwd=checkout, check=True)
        metric.write_text(kept)
    else:
        args = ("--against", "nope")
    result = verify(checkout, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
    assert message in result.stderr
