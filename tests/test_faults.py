"""The reliability contract, class by class: a bad input is one line naming the key, file or flag, exit 2,
no traceback, and every earlier output unchanged; the gate says 1 for stale or failing results."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from warm import run_module

Edit = Callable[[Path], None]


def digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory`'s outputs (metrics, plots, models, data), by path."""
    files = (p for name in ("metrics", "plots", "models", "data") for p in (directory / name).rglob("*"))
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.is_file()
    }


def run(directory: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m module args` in `directory`, this checkout's code: a process of its own (`warm`)."""
    return run_module(directory, module, *args)


def replace_in(path: str, old: str, new: str) -> Edit:
    def edit(directory: Path) -> None:
        text = (directory / path).read_text()
        assert old in text, (path, old)
        (directory / path).write_text(text.replace(old, new, 1))

    return edit


def write(path: str, text: str) -> Edit:
    return lambda directory: (directory / path).write_text(text)


def append(path: str, text: str) -> Edit:
    def edit(directory: Path) -> None:
        with (directory / path).open("a") as file:
            file.write(text)

    return edit


def json_edit(path: str, change: Callable[[dict], object]) -> Edit:
    def edit(directory: Path) -> None:
        data = json.loads((directory / path).read_text())
        (directory / path).write_text(json.dumps(change(data)))

    return edit


def without(key: str) -> Callable[[dict], dict]:
    return lambda data: {k: v for k, v in data.items() if k != key}


def assert_contract(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    assert fragment in output, output
    if code == 2:  # one line on stderr, naming what was wrong
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


SUMMARY = "metrics/summary.json"
GATE_CASES = [  # (case, edit of the committed project, exit code, fragment of the message)
    ("summary is a list", write(SUMMARY, "[1, 2]"), 2, f"{SUMMARY}: expected a JSON object"),
    ("summary is not JSON", write(SUMMARY, "{miou"), 2, f"{SUMMARY}: not readable JSON"),
    (
        "summary lacks miou",
        json_edit(SUMMARY, without("miou")),
        2,
        "miou.coordbias = None: expected a finite",
    ),
    (
        "summary miou is a string",
        json_edit(SUMMARY, lambda d: d | {"miou": {"coordbias": "0.9"}}),
        2,
        "miou.coordbias = '0.9': expected a finite number",
    ),
    (
        "summary miou is NaN",
        json_edit(SUMMARY, lambda d: d | {"miou": {"coordbias": float("nan")}}),
        2,
        "miou.coordbias = nan: expected a finite number",
    ),
    (
        "summary position recall is a list",
        json_edit(SUMMARY, lambda d: d | {"position_recall": [0.9]}),
        2,
        "position_recall.coordbias = None",
    ),
    (
        "summary deleted",
        lambda d: (d / SUMMARY).unlink(),
        1,
        f"FAIL {SUMMARY}: committed metrics file missing",
    ),
    (
        "threshold NaN",
        replace_in("params.yaml", "min_miou: 0.5", "min_miou: .nan"),
        2,
        "check.min_miou = nan",
    ),
    (
        "threshold inf",
        replace_in("params.yaml", "min_miou: 0.5", "min_miou: .inf"),
        2,
        "check.min_miou = inf",
    ),
    ("threshold above 1", replace_in("params.yaml", "min_miou: 0.5", "min_miou: 2"), 2, "check.min_miou = 2"),
    (
        "threshold negative",
        replace_in("params.yaml", "min_miou: 0.5", "min_miou: -0.1"),
        2,
        "check.min_miou = -0.1",
    ),
    (
        "threshold a string",
        replace_in("params.yaml", "min_miou: 0.5", "min_miou: high"),
        2,
        "check.min_miou = 'high'",
    ),
    (
        "threshold missing",
        replace_in("params.yaml", "  min_miou: 0.5\n", ""),
        2,
        "check.min_miou: missing key",
    ),
    ("params not YAML", write("params.yaml", "seed: [0\n"), 2, "params.yaml: not valid YAML"),
    ("params deleted", lambda d: (d / "params.yaml").unlink(), 2, "params.yaml: file not found"),
    ("dvc.yaml not YAML", write("dvc.yaml", "stages: [\n"), 2, "dvc.yaml: not valid YAML"),
    ("dvc.lock corrupt", write("dvc.lock", "schema: '2.0'\nstages: 3\n"), 2, "dvc status:"),
    (
        "below threshold",
        replace_in("params.yaml", "min_miou: 0.5", "min_miou: 0.999"),
        1,
        "FAIL miou of coordbias",
    ),
    (
        "params changed after the run",
        replace_in("params.yaml", "lr: 0.002", "lr: 0.003"),
        1,
        "FAIL train_vanilla: changed deps params.yaml train modified",
    ),
    (
        "another layer",
        replace_in("params.yaml", "layer: coordbias", "layer: coordconv"),
        1,
        "is about 'coordbias'",
    ),
    (
        "transfer below its threshold",
        replace_in("params.yaml", "min_transfer_position_recall: ", "min_transfer_position_recall: 0.999 #"),
        1,
        "FAIL position_recall_at_96 of coordbias",
    ),
    (
        "code changed after the run",
        append("src/posconv/reporting.py", "# edited\n"),
        1,
        "FAIL report: changed deps src/posconv/reporting.py modified",
    ),
    (
        "study code changed after the study",
        append("src/posconv/grid.py", "# edited\n"),
        1,
        "FAIL study/dvc.yaml:study: changed deps src/posconv/grid.py modified",
    ),
    (
        "family params changed after their run",
        replace_in("params.yaml", "placement: first", "placement: all"),
        1,
        "FAIL families/dvc.yaml:train@coorddeform: changed deps params.yaml families.placement modified",
    ),
    (
        "family pipeline file deleted, its results kept",
        lambda d: (d / "families/dvc.yaml").unlink(),
        1,
        "FAIL families/dvc.lock: results without their pipeline file families/dvc.yaml",
    ),
    (
        "committed metrics edited",
        json_edit("metrics/evaluate/vanilla.json", lambda d: d | {"miou": 1.0}),
        1,
        "changed outs metrics/evaluate modified",
    ),
]


@pytest.mark.parametrize(("case", "edit", "code", "fragment"), GATE_CASES, ids=[c[0] for c in GATE_CASES])
def test_the_gate_judges_and_never_crashes(
    checkout: Path, case: str, edit: Edit, code: int, fragment: str
) -> None:
    edit(checkout)
    before = digest(checkout)
    assert_contract(run(checkout, "posconv.tools.check"), code, fragment)
    assert digest(checkout) == before  # the gate writes nothing


def test_the_gate_passes_the_committed_results(checkout: Path) -> None:
    result = run(checkout, "posconv.tools.check")
    assert result.returncode == 0 and "metrics gate passed" in result.stdout, result.stdout + result.stderr
