"""The warm runner's children are processes of their own: what the contract tests read from them is
what a fresh `python -m` gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from warm import run_module

PROBE = """
import json, os, sys
import posconv.errors as shared
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "cwd": os.getcwd(), "name": __name__,
                  "marker": os.environ.get("WARM_MARKER"), "leaked": getattr(shared, "leak", None)}))
shared.leak = "from an earlier child"
print("one line", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def test_each_command_is_a_process_of_its_own(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    first = run_module(tmp_path, "probe", "3", "x y", env={**env, "WARM_MARKER": "a"})
    second = run_module(tmp_path, "probe", "0", env=env)
    assert (first.returncode, first.stderr, second.returncode) == (3, "one line\n", 0)
    seen, again = (json.loads(result.stdout) for result in (first, second))
    assert seen["argv"] == ["3", "x y"] and seen["cwd"] == str(tmp_path) and seen["name"] == "__main__"
    assert seen["marker"] == "a" and again["marker"] is None  # each child has the environment it was given
    assert again["leaked"] is None  # a module changed by one child is as imported in the next
    assert len({seen["pid"], again["pid"], os.getpid()}) == 3


ENDINGS = {
    "exit code": "import sys; sys.exit(3)",
    "exit message": "import sys; sys.exit('a message')",
    "traceback": "raise ValueError('boom')",
    "interrupt": "raise KeyboardInterrupt",
    "thread and atexit": "import atexit, threading, time; atexit.register(print, 'atexit')\n"
    "threading.Thread(target=lambda: (time.sleep(0.2), print('thread', flush=True))).start()",
}


@pytest.mark.parametrize("source", ENDINGS.values(), ids=list(ENDINGS))
def test_a_child_ends_as_a_fresh_interpreter_does(tmp_path: Path, source: str) -> None:
    """Exit code, stdout and the last line of stderr, against `python -m` itself."""
    (tmp_path / "ending.py").write_text(source + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "ending"]
    fresh = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    warm = run_module(tmp_path, "ending", env=env)
    assert (warm.returncode, warm.stdout) == (fresh.returncode, fresh.stdout)
    assert warm.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]


def test_a_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    """The server kills a child at its timeout (SIGKILL: a stage's own SIGALRM handler cannot catch it)."""
    stuck = "import signal, time\nsignal.signal(signal.SIGALRM, print)\ntime.sleep(60)\n"
    (tmp_path / "stuck.py").write_text(stuck)
    assert run_module(tmp_path, "stuck", timeout=1).returncode == -9
