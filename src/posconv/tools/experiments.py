"""Grids of DVC experiments, run on DVC's own queue and read back from git.

A grid is a list of named experiments (params overrides of the pipeline, up to a target stage). They
are queued with `dvc exp run --queue` and run by `dvc queue start -j N` (DVC's Celery workers, each in
its own temporary workspace); the names then come back from `dvc exp show --json`.

The queue's known problems, and what happens to each here:
- a task can be lost (a worker that shuts down as it takes a task leaves it "Running" with no worker):
  anything that did not finish and left no error of its own is queued again, up to `RETRIES` times;
- a worker can die or leave while tasks wait (`_wait_for_workers`): the missing workers are started
  again, so a grid keeps its `jobs` workers to the end; control messages left for workers that are
  gone are dropped first (`_drop_stale_control_messages`), or a new worker obeys an old shutdown;
- parallel workers share the repo's lock and its git refs: the same retry covers a run that failed on
  them; -j 2 is tested, and workers get `cores // jobs` threads each so that they do not oversubscribe;
- an experiment that fails on its own (a stage's `error:` line in `dvc queue logs`, or DVC's line for a
  stage that exited 1, a traceback) is not retried: it is reported with that line, while the others
  still land; any other failure (a command not found, a killed stage, the repo's lock) is retried;
- a retry clears the queue, and with it the logs of the experiments that finished: what each of them
  ran and what the run-cache served is read from its log as soon as it finishes;
- a grid that was killed leaves its tasks "Running" with no worker, and `dvc exp show` crashes on such an
  entry once its workspace is gone ("No such file ... .run"); it does so too, for a moment, on a task
  that just finished: a grid starts by failing the dead entries (`dvc queue kill`, `_fail_dead_entries`),
  and `exp show` is asked again while it fails that way (`_exp_show`);
- names are unique per baseline commit: an older experiment of the same name is removed before the
  grid is queued (`dvc exp remove`), and only experiments that finished after the grid started count.
  Not `--force`: DVC passes it on as `reproduce(force=True)`, which runs every stage again even where
  its run-cache holds that very stage; without it, a stage that another experiment already ran with the
  same code, params and inputs is checked out from the run-cache (`served`, counted per experiment).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from posconv.errors import BadInput

logger = logging.getLogger(__name__)
RETRIES = 2
POLL_S = 2.0
STALL_POLLS = 5
SHOW_ATTEMPTS = 5
BROKER_INBOX = Path(".dvc/tmp/exps/celery/broker/in")  # DVC 3's queue broker, from the repository root


@dataclass(frozen=True)
class Experiment:
    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    target: str = "evaluate"  # the stage it runs up to

    def queue_args(self) -> list[str]:
        """`dvc exp run --queue` of this experiment, params set as DVC's YAML reads them back."""
        command = ["exp", "run", "--queue", "-n", self.name]
        for key, value in self.overrides.items():
            command += ["-S", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        return [*command, self.target]


def _run_dvc(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """`dvc args`, output captured; one line if no `dvc` is on PATH (the stages' `python` is PATH's too).
    Captured in files, not pipes: `dvc queue start` leaves its workers running with its stdout and
    stderr, and a pipe would keep the caller waiting for them to exit (the whole grid)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            returncode = subprocess.run(["dvc", *args], stdout=out, stderr=err, env=env).returncode
        except FileNotFoundError:
            raise BadInput(
                "dvc: not found on PATH (activate the project's environment: . .venv/bin/activate)"
            ) from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["dvc", *args], returncode, out.read(), err.read())


def _checked(result: subprocess.CompletedProcess) -> str:
    """The output of a `dvc` command that succeeded; else its last line, as one `BadInput` line."""
    if result.returncode:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise BadInput(f"{' '.join(result.args[:4])} failed: {last}")
    return result.stdout


def _dvc(*args: str, env: Mapping[str, str] | None = None) -> str:
    return _checked(_run_dvc(*args, env=env))


VANISHED_WORKSPACE = re.compile(r"No such file or directory: '[^']*\.run'")


def _exp_show(*args: str) -> list[dict]:
    """`dvc exp show --json args`, asked again while it crashes on a queue task's vanished workspace:
    DVC lists a task as running until its result is stored, and reads that task's info file (`<rev>.run`)
    from a workspace its executor may already have removed."""
    for attempt in range(1, SHOW_ATTEMPTS + 1):
        result = _run_dvc("exp", "show", "--json", *args)
        vanished = result.returncode and VANISHED_WORKSPACE.search(result.stderr)
        if not vanished or attempt == SHOW_ATTEMPTS:
            break
        logger.info("dvc exp show: a queue task's workspace vanished, asking again")
        time.sleep(POLL_S)
    return json.loads(_checked(result))


def queue_state() -> tuple[dict[str, list[str]], int, int]:
    """Status of each queued name (oldest first), and the numbers of busy and of running workers, from
    `dvc queue status` (it has no JSON output)."""
    states: dict[str, list[str]] = {}
    busy = running = 0
    for line in _dvc("queue", "status").splitlines():
        words = line.split()
        if line.startswith("Worker status:"):  # "Worker status: 1 active, 1 idle"
            busy, running = int(words[2]), int(words[2]) + int(words[4])
        elif len(words) >= 4 and words[0] != "Task":
            states.setdefault(words[1], []).append(words[-1])
    return states, busy, running


def _wait_for_workers(names: list[str], jobs: int) -> None:
    """Until no worker is busy and none of `names` is still waiting to start. Workers are topped up to
    `jobs` when tasks wait with fewer running for `STALL_POLLS` polls: they exit when they see an empty
    queue (and can race a task queued as they do), and a worker dies when it reads a message file of
    the queue's file-system broker that the other worker is still writing (kombu: "Unrecoverable
    error: JSONDecodeError"); `dvc queue start -j N` starts only the missing ones."""
    stalled_polls = 0
    while True:
        time.sleep(POLL_S)
        states, busy, running = queue_state()
        waiting = any(states.get(name, [])[-1:] == ["Queued"] for name in names)
        if not busy and not waiting:
            return
        stalled_polls = stalled_polls + 1 if waiting and running < jobs else 0
        if stalled_polls == STALL_POLLS:
            logger.warning("%d of %d queue workers running, tasks waiting: starting more", running, jobs)
            _start_workers(jobs)
            stalled_polls = 0


def _drop_stale_control_messages() -> None:
    """Delete the control messages (ping, inspect, shutdown) waiting for queue workers, with none
    running: DVC's file-system broker keeps those addressed to a worker that is gone, and the next worker
    of that name (DVC numbers them 1..N) obeys them as it starts, a shutdown from an earlier
    `dvc queue stop` included, and leaves after its first task."""
    for message in BROKER_INBOX.glob("*.celery.pidbox.msg"):
        message.unlink(missing_ok=True)


def _fail_dead_entries() -> None:
    """With no worker running, mark the tasks still "Running" as failed (`dvc queue kill`: their
    processes are gone, so DVC marks them failed): a killed grid leaves them, and `dvc exp show` crashes
    on each once its workspace is gone. The control messages left for gone workers are dropped too."""
    states, _, running = queue_state()
    if running:
        return
    _drop_stale_control_messages()
    if dead := sorted(name for name, name_states in states.items() if "Running" in name_states):
        logger.warning("failing queue tasks left running by a killed grid: %s", ", ".join(dead))
        _dvc("queue", "kill", *dead)


def _start_workers(jobs: int) -> None:
    """`dvc queue start -j jobs`, each worker's experiments with `cores // jobs` threads."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    _dvc("queue", "start", "-j", str(jobs), env={**os.environ, "OMP_NUM_THREADS": threads})


def _logs(name: str) -> str:
    return _run_dvc("queue", "logs", name).stdout


OWN_ERROR = re.compile(r"error: .*|ERROR: failed to reproduce .* exited with 1")


def _own_error(name: str) -> str | None:
    """The experiment's own one-line error from `dvc queue logs`: a stage's `error: ...`, else DVC's
    line for a stage that exited 1 (a traceback)."""
    lines = [line for line in _logs(name).splitlines() if OWN_ERROR.fullmatch(line)]
    return next((line for line in lines if line.startswith("error: ")), lines[0] if lines else None)


def stages_run(name: str) -> dict[str, list[str]]:
    """The stages a finished queued experiment ran, and those DVC's run-cache served, from its log."""
    log = _logs(name)
    return {
        "ran": re.findall(r"Running stage '([^']+)'", log),
        "served": re.findall(r"Stage '([^']+)' is cached - skipping run", log),
    }


def _remove_older(names: list[str]) -> None:
    """Remove the experiments of the current commit that bear any of `names` (a re-run of a grid)."""
    shown = _exp_show()
    existing = {r["name"] for c in shown for e in c.get("experiments") or [] for r in e["revs"]}
    if older := sorted(existing & set(names)):
        _dvc("exp", "remove", *older)


def run_queued(grid: list[Experiment], jobs: int) -> dict[str, dict[str, list[str]]]:
    """Run `grid` on DVC's queue with `jobs` workers: the stages each experiment ran and those the
    run-cache served (`stages_run`); BadInput names every experiment that failed, with its own error,
    after the others have landed."""
    started = datetime.datetime.now().replace(microsecond=0)
    pending, failures, stages = list(grid), {}, {}
    for attempt in range(RETRIES + 1):
        _fail_dead_entries()
        _dvc("queue", "remove", "--queued", "--failed", "--success")
        _remove_older([e.name for e in pending])
        for experiment in pending:
            _dvc(*experiment.queue_args())
        logger.info(
            "queued %d experiments (attempt %d); dvc queue start -j %d", len(pending), attempt + 1, jobs
        )
        _start_workers(jobs)
        _wait_for_workers([e.name for e in pending], jobs)
        done = finished(show_all(), since=started)
        stages |= {e.name: stages_run(e.name) for e in pending if e.name in done}  # before a retry
        unfinished = [e for e in pending if e.name not in done]
        errors = {e.name: _own_error(e.name) for e in unfinished}
        failures |= {name: error for name, error in errors.items() if error}
        pending = [e for e in unfinished if not errors[e.name]]
        if not pending:
            break
        logger.warning(
            "%d experiments lost by the queue: %s", len(pending), ", ".join(e.name for e in pending)
        )
    failures |= {e.name: f"lost by DVC's queue {RETRIES + 1} times" for e in pending}
    if failures:
        lines = [f"experiment {name} failed: {error}" for name, error in sorted(failures.items())]
        raise BadInput("; ".join(lines))
    return stages


def machine_cpu_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat): the queue's workers are detached
    from the tool, so their time is not among its children's."""
    busy = Path("/proc/stat").read_text().split()[1:4]  # user, nice, system of the "cpu" line
    return sum(int(ticks) for ticks in busy) / os.sysconf("SC_CLK_TCK")


def stop_queue() -> None:
    """Kill the queue's running experiments and its workers (an interrupted grid leaves nothing running)."""
    _run_dvc("queue", "stop", "--kill")


def show_all() -> list[dict]:
    """`dvc exp show --json --all-commits`: every experiment of every commit."""
    return _exp_show("--all-commits")


class Finished(NamedTuple):
    revision: str  # the experiment's git commit
    at: datetime.datetime  # when it finished (its commit's timestamp)


def finished(
    shown: list[dict], prefix: str = "", since: datetime.datetime | None = None
) -> dict[str, Finished]:
    """Each finished experiment named `prefix...` in `dvc exp show --json` output, finished at `since` or
    later; the newest where a name ran more than once (on another commit, say)."""
    runs = sorted(
        (datetime.datetime.fromisoformat(revision["data"]["timestamp"]), revision["name"], revision["rev"])
        for commit in shown
        for experiment in commit.get("experiments") or []
        for revision in experiment["revs"]
        if (revision.get("name") or "").startswith(prefix)
        and (revision.get("data") or {}).get("timestamp")
        and (experiment.get("executor") or {}).get("state", "success") == "success"
    )  # the queue's finished experiments keep their executor, in state "success"
    return {name: Finished(revision, at) for at, name, revision in runs if since is None or at >= since}


def read_files(revision: str, paths: list[str]) -> dict[str, Any]:
    """JSON files, whole, from an experiment's git commit (`dvc exp show` drops list values); a missing,
    empty or corrupt file is one `BadInput` line naming it."""
    files = {}
    for path in paths:
        shown = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True)
        try:
            files[path] = json.loads(shown.stdout) if shown.returncode == 0 else None
        except ValueError as error:
            raise BadInput(f"experiment {revision[:7]}: {path} is not readable JSON ({error})") from None
        if not isinstance(files[path], dict):
            raise BadInput(f"experiment {revision[:7]}: {path} missing or not a JSON object")
    return files
