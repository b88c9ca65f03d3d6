"""A C++ source built at first use with the machine's compiler into a cached shared library (ctypes).

For kernels that need no torch headers (plain loops over buffers the caller prepares): they build in
seconds, not the minute that `torch.utils.cpp_extension` takes for its headers, and are loaded with
ctypes. The library is cached under `$XDG_CACHE_HOME/posconv` (default `~/.cache/posconv`), named by
a hash of the source, the compiler's identity and the flags, so a changed source or compiler builds
anew and every other use loads in milliseconds.

Concurrent first uses are safe without a lock: each builder writes its own temporary file and renames
it into place atomically, so a process sees no library or a whole one (two workers that start
together both build, once). A lock would let a killed builder leave every later process waiting
(`torch.utils.cpp_extension`'s lock file has no timeout); here a compiler that hangs is killed after
`BUILD_TIMEOUT_S` and the caller falls back. The compiler is `$CXX`, default `c++`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import subprocess
import tempfile
from pathlib import Path

BUILD_TIMEOUT_S = 300  # a cold build takes a few seconds; a compiler past this is hung
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


class BuildError(RuntimeError):
    """The library could not be built or loaded; the message says why, in one line."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "posconv"


def load(source: Path, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """`source` compiled with FLAGS and `flags` (built now unless cached) and loaded; BuildError
    otherwise."""
    compiler, flags = os.environ.get("CXX", "c++"), (*FLAGS, *flags)
    try:
        text = source.read_text()
    except OSError as error:
        raise BuildError(f"cannot read {source}: {error}") from error
    identity = _run([compiler, "--version"], 30)
    machine = _machine()  # -march=native: a library is only for the CPU it was built on
    key = hashlib.sha256("\0".join([text, compiler, identity, *flags, machine]).encode()).hexdigest()
    target = cache_dir() / f"{source.stem}-{key[:16]}.so"
    if not target.exists():
        _build([compiler, *flags, str(source)], target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        raise BuildError(f"cannot load {target}: {error}") from error


def _build(command: list[str], target: Path) -> None:
    """`command -o target`, written under a name of its own and renamed into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as error:
        raise BuildError(f"cannot write to {target.parent}: {error}") from error
    try:
        _run([*command, "-o", partial], BUILD_TIMEOUT_S)
        os.replace(partial, target)
    except OSError as error:
        raise BuildError(f"cannot write {target}: {error}") from error
    finally:
        Path(partial).unlink(missing_ok=True)


def _run(command: list[str], timeout: float) -> str:
    """`command`'s output; BuildError if it cannot start, fails, or runs past `timeout` seconds. It
    runs in a process group of its own, killed whole on a timeout: killing only a compiler driver
    would leave its cc1plus holding the pipes, and the wait for them hanging."""
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    except OSError as error:
        raise BuildError(f"{command[0]} cannot run ({error})") from error
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as error:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise BuildError(f"{command[0]} ran past {timeout} s and was killed") from error
    if process.returncode:
        last = err.strip().splitlines()[-1:] or ["no message"]
        raise BuildError(f"{command[0]} failed (exit {process.returncode}): {last[0]}")
    return out


def _machine() -> str:
    """The CPU's model and instruction-set flags (Linux); empty where /proc/cpuinfo is absent."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
