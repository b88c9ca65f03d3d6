"""The warm runner's children are processes of their own: what the contract tests read from them is
what a fresh `python -m` gives."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def test_a_crash_is_a_traceback_and_exit_1_as_in_a_fresh_interpreter(tmp_path: Path) -> None:
    (tmp_path / "crash.py").write_text("raise ValueError('boom')\n")
    result = run_module(tmp_path, "crash", env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 1 and "Traceback" in result.stderr and "ValueError: boom" in result.stderr
