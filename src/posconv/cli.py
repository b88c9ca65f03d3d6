"""How every stage and tool runs: a bad input, param or flag is one line on stderr and exit code 2,
never a traceback; an interrupted run exits 130 and leaves the previous outputs."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from posconv.errors import BadInput
from posconv.registry import DEVICE_PATTERN, INT64_MAX

_PR_SET_PDEATHSIG = 1


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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _end_with_parent() -> None:
    """On Linux, have the kernel send SIGTERM when the parent process (`dvc repro`, the shell) dies,
    so that killing DVC does not leave a stage running without it."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request: stop now
        raise KeyboardInterrupt("parent ended")


def run(main: Callable[[list[str]], None]) -> None:
    """Run a stage's `main(argv)`; SIGTERM unwinds like Ctrl-C so atomic writes clean up."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _end_with_parent()
        main(sys.argv[1:])
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        sys.exit(130)
