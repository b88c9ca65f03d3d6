"""How every stage runs: a bad input is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

from posconv.errors import BadInput


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(main: Callable[[list[str]], None]) -> None:
    """Run a stage's `main(argv)`; SIGTERM unwinds like Ctrl-C so atomic writes clean up."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main(sys.argv[1:])
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        sys.exit(130)
