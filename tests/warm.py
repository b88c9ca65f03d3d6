"""`python -m module args` as a real child process whose imports are already paid for.

The contract tests run a stage or tool some 150 times to see its exit code, its one line on stderr and
the files it leaves; a fresh interpreter spends ~2.5 s of each run importing torch, matplotlib and DVC
before the stage reads its first input. One server per test process imports those once, then forks a
child per command: each child is a process of its own (its own exit status, stdout, stderr, cwd and
environment; nothing of one command reaches the next), runs the module as `python -m` does (`runpy`,
the cwd first on sys.path) and is ended by Python itself; only the imports come from the server.
Commands whose environments differ in what Python or torch read as they start (a source tree, an
instruction set, a thread count) get servers of their own.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

STARTUP_VARIABLES = ("PYTHON", "PYTORCH", "TORCH", "ATEN_", "OMP_", "MKL", "KMP_", "DNNL_", "ONEDNN_", "LD_")
SOURCES = Path(__file__).resolve().parents[1] / "src"
PRELOAD = ("torch", "numpy", "posconv.figures", "posconv.engine", "posconv.compare", "dvc.repo")

SERVER = r"""
import json, os, runpy, signal, sys, time

for name in sys.argv[1:]:
    __import__(name)
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        break
    # past the timeout SIGKILL ends the child (from here: the stages handle SIGALRM themselves)
    deadline = time.monotonic() + request["timeout"]
    while not (ended := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    print(os.waitstatus_to_exitcode(ended[1]), flush=True)
else:
    sys.exit()  # the test process has ended
# the child, from here on `python -m module args`: Python itself ends it (atexit, threads, exit code)
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
sys.argv = ["-m", *request["args"]]
sys.path.insert(0, os.getcwd())
runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
"""

_servers: dict[tuple[tuple[str, str], ...], subprocess.Popen] = {}


def _server(env: Mapping[str, str]) -> subprocess.Popen:
    """The running server for `env`'s start-up variables, started now if there is none. Whatever its
    imports print is an error: a fresh interpreter would print it into every command's output."""
    key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(STARTUP_VARIABLES)))
    if key not in _servers or _servers[key].poll() is not None:
        command = [sys.executable, "-c", SERVER, *PRELOAD]
        with tempfile.TemporaryFile("w+") as printed:
            server = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=printed, env=env, text=True
            )
            atexit.register(server.kill)
            ready = _reply(server, 120)
            printed.seek(0)
            if ready != "ready\n" or (output := printed.read()):
                server.kill()
                raise RuntimeError(f"the warm server's imports printed: {ready}{output}")
        _servers[key] = server
    return _servers[key]


def _reply(server: subprocess.Popen, timeout: float) -> str:
    """The server's next line; it is killed if none comes within `timeout` seconds."""
    if not select.select([server.stdout], [], [], timeout)[0]:
        server.kill()
        raise RuntimeError(f"the warm server gave no answer in {timeout} s")
    return server.stdout.readline()


def run_module(
    cwd: Path, module: str, *args: str, env: Mapping[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m module args` in `cwd` with `env` (by default this one, with this checkout's sources
    on the path), as a forked child of the warm server."""
    if env is None:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(SOURCES)}
    server = _server(env)
    with tempfile.TemporaryDirectory() as directory:
        out, err = Path(directory, "stdout"), Path(directory, "stderr")
        request = {
            "cwd": str(cwd), "env": dict(env), "module": module, "args": list(args), "timeout": timeout,
            "stdout": str(out), "stderr": str(err),
        }  # fmt: skip
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        reply = _reply(server, timeout + 30)
        if not reply:
            raise RuntimeError(f"the warm server ended (exit {server.wait()})")
        return subprocess.CompletedProcess(
            [module, *args], int(reply), out.read_text(errors="replace"), err.read_text(errors="replace")
        )
