"""The DVC stages, one thin module each: read params, call the library, write outputs.

Every stage runs through `run_stage`: a bad input is one line and exit 2, an interrupt exit 130, and
under DVC a stage that fails puts back the outputs DVC removed before running it (`keep`). A stage
started by DVC (`python -m posconv.stages.<name>`) is covered from its first instruction: this package
is imported before the stage's own module, whose imports (torch: seconds) come before `run_stage`, so
a Ctrl-C or SIGTERM in that time is handled here the same way.
"""

import os
import signal
import sys
from collections.abc import Callable

from posconv.cli import run
from posconv.stages.keep import DVC_STAGE, restore_recorded_outputs


def run_stage(main: Callable[[list[str]], None]) -> None:
    run(main, on_failure=restore_recorded_outputs)


def _interrupted_while_starting(signum: int, frame: object) -> None:
    restore_recorded_outputs()
    print("interrupted: no output written", file=sys.stderr)
    os._exit(130)


if DVC_STAGE in os.environ and sys.argv[:1] == ["-m"]:  # python -m finding a stage, under DVC
    for _signal in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(_signal) is not signal.SIG_IGN:
            signal.signal(_signal, _interrupted_while_starting)
