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


def remove_stale_temporaries(final: Path) -> None:
    """Remove what killed runs (SIGKILL leaves no chance to clean up) left beside `final`."""
    for stale in final.parent.glob(_temporary(final, "*").name):
        _remove(stale)


@contextmanager
def atomic_outputs(*paths: str | Path) -> Iterator[list[Path]]:
    """Yield temporary siblings of `paths`; rename them all into place only if the block succeeds.

    A failure (or Ctrl-C, or SIGTERM) inside the block removes the temporaries and leaves the old
    outputs alone; temporaries of earlier killed runs are removed first. The renames run with SIGINT
    and SIGTERM blocked, so a signal cannot leave some outputs new and others old.
    """
    finals = [Path(p) for p in paths]
    temps = [_temporary(p, os.getpid()) for p in finals]
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
    try:
        yield temps
    except BaseException:
        for temp in temps:
            _remove(temp)
        raise
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for final, temp in zip(finals, temps, strict=True):
            _remove(final)
            temp.rename(final)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_outputs(path) as (temp,):
        temp.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """Load a JSON file, turning a missing or corrupt file into one clear `BadInput` line."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found (run the stage that writes it first)") from None
    except (OSError, ValueError) as error:
        raise BadInput(f"{path}: not readable JSON ({error})") from None
