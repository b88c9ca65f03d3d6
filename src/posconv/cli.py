"""How every stage and tool runs: a bad input, param or flag is one line on stderr and exit code 2,
never a traceback; an interrupted run exits 130 and leaves the previous outputs."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from posconv.errors import BadInput
from posconv.registry import DEVICE_PATTERN, INT64_MAX

DVC_STAGE_VARIABLE = "DVC_STAGE"  # DVC sets it for every command it runs
ELASTIC_RANK_VARIABLE = "TORCHELASTIC_RUN_ID"  # torch's elastic launcher (torchrun) sets it for every rank
_WATCH_INTERVAL_S = 0.2
CLEAN_UP_S = 30  # seconds an interrupted run may take to unwind (put back outputs, end threads)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one `BadInput` line naming the flag, instead of usage text."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(message)


def parser(module: str, description: str | None) -> Parser:
    return Parser(prog=f"python -m {module}", description=description)


def positive_int(text: str) -> int:
    """A flag's value as an integer in 1..2**63-1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if not 1 <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..{INT64_MAX}, found {value}")
    return value


def device_name(text: str) -> str:
    """A flag's value as a device name that `engine.resolve_device` knows."""
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, found {text!r}")
    return text


class Overdue(KeyboardInterrupt):
    """The unwinding after an interrupt still waited CLEAN_UP_S after the signal."""


def start_clean_up_deadline() -> None:
    """Give the unwinding after an interrupt CLEAN_UP_S: library code runs in it (a context manager's
    exit, a thread's join at shutdown) that a signal landing mid-way can leave waiting forever, as
    DVCLive's exit once did. A deadline already running holds."""
    remaining = signal.alarm(CLEAN_UP_S)
    if remaining:
        signal.alarm(remaining)


def _interrupt(signum: int, frame: object) -> None:
    start_clean_up_deadline()
    raise KeyboardInterrupt(f"signal {signum}")


_overdue_raised = False


def _overdue(signum: int, frame: object) -> None:
    """SIGALRM at the deadline. The first raises `Overdue` into the wait the unwinding is stuck in (a
    lock, a queue, a join: Python interrupts those), so that the outputs DVC removed are still put
    back, and allows CLEAN_UP_S more; the second ends the process (one line, exit 130)."""
    global _overdue_raised
    if not _overdue_raised:
        _overdue_raised = True
        signal.alarm(CLEAN_UP_S)
        raise Overdue(f"a clean-up still waited {CLEAN_UP_S} s after the signal")
    os.write(2, f"interrupted: the clean-up did not end within {2 * CLEAN_UP_S} s; exiting\n".encode())
    os._exit(130)


_SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "fish"})


def _parent_of(pid: int) -> int:
    """`pid`'s parent from /proc (field 4 of stat, after the command name in parentheses)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _launch_chain() -> list[tuple[int, int]]:
    """(child, parent) links from this process up to the first ancestor that is not a shell: DVC runs a
    command as `$SHELL -c cmd`, and dash, unlike bash, stays alive between DVC and the stage."""
    links = [(os.getpid(), os.getppid())]
    while Path(f"/proc/{links[-1][1]}/comm").read_text().strip() in _SHELLS:
        shell = links[-1][1]
        links.append((shell, _parent_of(shell)))
    return links


def _watch(links: list[tuple[int, int]]) -> None:
    """SIGTERM this process as soon as a link breaks: the launcher or a shell in between has ended."""
    while True:
        try:
            if any(_parent_of(child) != parent for child, parent in links):
                break
        except OSError:  # a process in the chain is gone
            break
        time.sleep(_WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def _end_with_launcher() -> None:
    """On Linux, end this process when the process that launched it ends: under DVC, the `dvc` that
    runs the stage (DVC dies on SIGTERM without passing it on); as a DDP rank, its launcher (a launcher
    killed with SIGKILL cannot end its ranks). A stage or rank running on alone would write outputs that
    nobody records, over those of the next run."""
    launched = DVC_STAGE_VARIABLE in os.environ or ELASTIC_RANK_VARIABLE in os.environ
    if not launched or not Path("/proc/self/stat").exists():
        return
    links = _launch_chain()
    if links[-1][1] == 1:  # the launcher ended before this process started: init adopted the chain
        raise KeyboardInterrupt("launcher ended")
    threading.Thread(target=_watch, args=(links,), name="end-with-launcher", daemon=True).start()


def run(main: Callable[[list[str]], None], on_failure: Callable[[], None] | None = None) -> None:
    """Run a stage's or tool's `main(argv)`; SIGTERM unwinds like Ctrl-C so atomic writes clean up,
    within a deadline (`start_clean_up_deadline`, `_overdue`).
    `on_failure` runs when `main` fails in any way (a stage puts back the outputs DVC removed)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _overdue)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # an ignored Ctrl-C stays ignored
        signal.signal(signal.SIGINT, _interrupt)
    try:
        _end_with_launcher()
        main(sys.argv[1:])
    except BaseException as failure:
        if on_failure and not (isinstance(failure, SystemExit) and failure.code in (0, None)):
            with contextlib.suppress(
                KeyboardInterrupt
            ):  # a deadline or a signal cut it short: what is back stays
                on_failure()
        if isinstance(failure, BadInput):
            print(f"error: {failure}", file=sys.stderr)
            sys.exit(2)
        if isinstance(failure, KeyboardInterrupt):
            late = f" ({failure})" if isinstance(failure, Overdue) else ""
            print(f"interrupted: no output written{late}", file=sys.stderr)
            sys.exit(130)
        raise
