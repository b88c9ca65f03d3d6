"""Nothing lost, nothing injected: one test (or a family of cases) per class of failure.

1. a failed or interrupted stage keeps the last good results;  2. orphaned processes write nothing;
3. a commit leaves the old set of outputs or the new one, whole;  4. no param reaches a shell as text;
5. impossible sizes are refused before they start;  6. one line instead of a traceback;
7. no wrong answer without an error;  8. `dvc repro` of the card does not start the study.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
