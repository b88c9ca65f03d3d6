"""Atomic writes and safe loads: a stage leaves either its whole output or nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from posconv.errors import BadInput


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _temporary(final: Path, pid: int | str) -> Path:
    return final.with_name(f".{final.name}.tmp{pid}")


def _previous(final: Path, pid: int | str) -> Path:
    return final.with_name(f".{final.name}.old{pid}")


def remove_stale_temporaries(final: Path) -> None:
    """Remove what killed runs (SIGKILL leaves no chance to clean up) left beside `final`."""
    for pattern in (_temporary(final, "*"), _previous(final, "*")):
        for stale in final.parent.glob(pattern.name):
            _remove(stale)


def _commit(finals: list[Path], temps: list[Path]) -> None:
    """Put `temps` in place of `finals`, leaving either every old output or every new one.

    Phase 1 moves each existing output aside; phase 2 moves each new one in. Should a rename fail, the
    new ones moved in so far go back out and the old ones come back, then the error is raised; the
    set moved aside is removed only once every new output is in place.
    """
    pid = os.getpid()
    aside: list[tuple[Path, Path]] = []
    placed: list[tuple[Path, Path]] = []
    try:
        for final in finals:
            if final.exists() or final.is_symlink():
                final.rename(_previous(final, pid))
                aside.append((final, _previous(final, pid)))
        for final, temp in zip(finals, temps, strict=True):
            temp.rename(final)
            placed.append((final, temp))
    except OSError:
        for final, temp in reversed(placed):
            final.rename(temp)
        for final, previous in reversed(aside):
            previous.rename(final)
        raise
    for _, previous in aside:
        _remove(previous)


@contextmanager
def atomic_outputs(*paths: str | Path) -> Iterator[list[Path]]:
    """Yield temporary siblings of `paths`; put them all in place only if the block succeeds.

    A failure (or Ctrl-C, or SIGTERM) inside the block removes the temporaries and leaves the old
    outputs alone; temporaries of earlier killed runs are removed first. The commit (`_commit`) runs
    with SIGINT, SIGTERM and SIGALRM (`cli`'s clean-up deadline) blocked and leaves either the old set
    of outputs or the new one, whole.
    An output folder that cannot be written (read-only, full) is one `BadInput` line, old outputs kept.
    """
    finals = [Path(p) for p in paths]
    temps = [_temporary(p, os.getpid()) for p in finals]
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(final)
        yield temps
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGALRM})
        try:
            _commit(finals, temps)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    except OSError as error:
        names = ", ".join(map(str, finals))
        raise BadInput(
            f"{names}: {error.strerror or error} ({error.filename or 'writing'}): kept as it was"
        ) from None
    finally:
        for temp in temps:
            _remove(temp)


def json_text(data: Any) -> str:
    """`data` as the project's JSON files hold it: indented, one final newline."""
    return json.dumps(data, indent=2) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_outputs(path) as (temp,):
        temp.write_text(json_text(data))


def read_json(path: str | Path) -> Any:
    """Load a JSON file, turning a missing or corrupt file into one clear `BadInput` line."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found (run the stage that writes it first)") from None
    except (OSError, ValueError) as error:
        raise BadInput(f"{path}: not readable JSON ({error})") from None
