"""Nothing lost, nothing injected: one test (or a family of cases) per class of failure.

1. a failed or interrupted stage keeps the last good results;  2. orphaned processes write nothing;
3. a commit leaves the old set of outputs or the new one, whole;  4. no param reaches a shell as text;
5. impossible sizes are refused before they start;  6. one line instead of a traceback;
7. no wrong answer without an error;  8. `dvc repro` of the card does not start the study.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from test_distributed import LAYER, STAGE, prepared  # noqa: F401 (a fixture)
from test_train import set_params

from posconv.errors import BadInput
from posconv.io import atomic_outputs


def _outputs(tmp_path: Path) -> list[Path]:
    """A file and a folder with old contents, as a training's model and metrics."""
    model, metrics = tmp_path / "model.pt", tmp_path / "metrics"
    model.write_text("old model")
    metrics.mkdir()
    (metrics / "metrics.json").write_text("old metrics")
    return [model, metrics]


def _contents(paths: list[Path]) -> tuple[str, str]:
    return paths[0].read_text(), (paths[1] / "metrics.json").read_text()


RENAMES = 4  # two outputs: two moved aside, two moved in


@pytest.mark.parametrize("failing", range(RENAMES))
def test_class3_a_failed_rename_leaves_the_old_set_whole(
    tmp_path: Path, failing: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rename of the commit fails in turn: the old outputs come back whole, nothing else stays."""
    paths = _outputs(tmp_path)
    calls = []
    rename = Path.rename

    def flaky(self: Path, target: Path) -> Path:
        calls.append(self)
        if len(calls) == failing + 1:
            raise OSError(30, "Read-only file system", str(target))
        return rename(self, target)

    with pytest.raises(BadInput, match="Read-only file system"), atomic_outputs(*paths) as (model, metrics):
        model.write_text("new model")
        metrics.mkdir()
        (metrics / "metrics.json").write_text("new metrics")
        monkeypatch.setattr(Path, "rename", flaky)
    monkeypatch.undo()
    assert _contents(paths) == ("old model", "old metrics")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "model.pt"]  # no temporaries


def test_class3_a_successful_commit_leaves_the_new_set_and_nothing_else(tmp_path: Path) -> None:
    paths = _outputs(tmp_path)
    with atomic_outputs(*paths) as (model, metrics):
        model.write_text("new model")
        metrics.mkdir()
        (metrics / "metrics.json").write_text("new metrics")
    assert _contents(paths) == ("new model", "new metrics")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "model.pt"]


def test_class2_ranks_of_a_launcher_killed_with_sigkill_end_and_write_nothing(
    prepared: Path,  # noqa: F811 (the fixture imported above)
    sh: Callable,
) -> None:
    """SIGKILL leaves the launcher no chance to end its DDP ranks: each rank watches its launcher and
    ends itself, so nothing is written after the launcher is gone."""
    set_params(prepared, train={"processes": 2, "epochs": 500})
    launcher = subprocess.Popen(STAGE, cwd=prepared, env=sh.env, stderr=subprocess.DEVNULL)
    logs = f"metrics/train/.{LAYER}.tmp*/plots/metrics/train/loss.tsv"  # rank 0's, while it trains
    deadline = time.monotonic() + 90
    while not any(log.read_text().count("\n") > 3 for log in prepared.glob(logs)):
        assert time.monotonic() < deadline and launcher.poll() is None, "training never started"
        time.sleep(0.05)
    ranks = [
        p for p in psutil.Process(launcher.pid).children(recursive=True) if "posconv" in " ".join(p.cmdline())
    ]
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait()
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, [rank.cmdline() for rank in alive]
    assert not (prepared / f"models/{LAYER}.pt").exists()  # the ranks ended without committing
