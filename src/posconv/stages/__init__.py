"""The DVC stages, one thin module each: read params, call the library, write outputs.

Every stage runs through `run_stage`: a bad input is one line and exit 2, an interrupt exit 130, and
under DVC a stage that fails puts back the outputs DVC removed before running it (`keep`).
"""

from collections.abc import Callable

from posconv.cli import run
from posconv.stages.keep import restore_recorded_outputs


def run_stage(main: Callable[[list[str]], None]) -> None:
    run(main, on_failure=restore_recorded_outputs)
