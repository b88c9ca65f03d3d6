"""Scale-out on DVC's own engines: a grid on the experiment queue, and experiments shared between
clones through a git remote and a DVC remote. Real DVC, real training, tiny sizes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import runner

from posconv.errors import BadInput
from posconv.registry import model_path, train_metrics
from posconv.tools import experiments as queue
from posconv.tools.experiments import OWN_ERROR, finished

ROOT = Path(__file__).resolve().parents[1]

QUEUE_GRID = """
import json, sys
from posconv.cli import run
from posconv.tools.experiments import Experiment, run_queued

def two_grids(argv):
    grid = [Experiment(f"q-s{seed}", {"train.seed": seed}, "train_coordbias") for seed in (1, 2)]
    stages = run_queued(grid, jobs=2)
    grid = [Experiment("q-bad", {"train.lr": -1}, "train_coordbias")]
    grid.append(Experiment("q-s3", {"train.seed": 3}, "train_coordbias"))  # lands beside the failure
    try:  # a second grid clears the queue's logs first, as a retry does
        run_queued(grid, jobs=2)
    finally:
        print(json.dumps(stages))

sys.argv = ["queue"]
run(two_grids)
"""


def experiments(sh: Callable) -> dict[str, str]:
    """Name -> revision of the finished experiments `dvc exp show` lists (test_study tests `finished`)."""
    shown = finished(json.loads(sh("dvc", "exp", "show", "--json", "--all-commits").stdout))
    return {name: done.revision for name, done in shown.items()}


@pytest.mark.slow
def test_a_grid_runs_on_the_queue_with_two_workers_and_a_failure_is_its_own_error(
    project: Path, sh: Callable
) -> None:
    """2 experiments, `dvc queue start -j 2`, then a failing one beside a good one: the failure is
    reported with the stage's own line, the others land and can be read back, and what the first two ran
    was read before the second grid cleared their logs."""
    result = sh("python", "-c", QUEUE_GRID, check=False)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error_lines == ["error: experiment q-bad failed: error: train.lr = -1: expected a value > 0.0"], (
        result.stderr
    )
    found = experiments(sh)
    assert {"q-s1", "q-s2", "q-s3"} <= set(found) and "q-bad" not in found  # its neighbour landed
    losses = set()
    for name in ("q-s1", "q-s2"):
        params = yaml.safe_load(sh("git", "show", f"{found[name]}:params.yaml").stdout)
        assert params["train"]["seed"] == int(name[-1])
        scores = json.loads(sh("git", "show", f"{found[name]}:{train_metrics('coordbias')}").stdout)
        losses.add(scores["train"]["loss"])
    assert len(losses) == 2  # two seeds, two different networks
    status = sh("dvc", "queue", "status").stdout
    assert "Queued" not in status and "Running" not in status  # nothing left behind
    stages = json.loads(result.stdout)
    assert all("train_coordbias" in stages[name]["ran"] for name in ("q-s1", "q-s2")), stages
    logs = sh("dvc", "queue", "logs", "q-s1", check=False)
    assert "Running stage" not in logs.stdout + logs.stderr  # the log is gone


def queue_status(busy: int, idle: int, **states: str) -> str:
    """`dvc queue status` as DVC 3 prints it."""
    rows = [f"{index:07x}  {name}   01:58 PM   {state}" for index, (name, state) in enumerate(states.items())]
    workers = f"Worker status: {busy} active, {idle} idle"
    return "\n".join(["Task     Name    Created    Status", *rows, "", workers])


def test_workers_are_topped_up_when_one_dies_while_tasks_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """One of two workers dies (the file-system broker's JSONDecodeError) with a task queued: after
    `STALL_POLLS` polls the missing worker is started again; a worker between two tasks is not missing."""
    polls = [
        queue_status(1, 1, a="Running", b="Queued"),  # one busy, one idle: both there
        *[queue_status(1, 0, a="Running", b="Queued")] * queue.STALL_POLLS,  # one died
        queue_status(2, 0, a="Running", b="Running"),
        queue_status(0, 2, a="Success", b="Success"),
    ]
    started: list[int] = []
    monkeypatch.setattr(queue, "POLL_S", 0)
    monkeypatch.setattr(queue, "_dvc", lambda *args, env=None: polls.pop(0))
    monkeypatch.setattr(queue, "_start_workers", started.append)
    queue._wait_for_workers(["a", "b"], jobs=2)
    assert started == [2] and not polls


def test_control_messages_left_for_gone_workers_are_dropped_and_tasks_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / queue.BROKER_INBOX
    inbox.mkdir(parents=True)
    stale = inbox / "44564072_e9ae7116.dvc-exp-cde9b5-2@localhost.celery.pidbox.msg"  # as DVC 3 names them
    task = inbox / "45605613_5b6dc2b3.celery.msg"
    for message in (stale, task):
        message.write_text("{}")
    monkeypatch.chdir(tmp_path)
    queue._drop_stale_control_messages()
    assert not stale.exists() and task.exists()


NAP = """stages:
  nap:
    cmd: sleep 600 && echo done > out.txt
    params: [p]
    outs: [out.txt]
"""


def test_a_task_left_running_by_a_killed_grid_is_failed_and_cleared_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker and stage killed with SIGKILL mid-task leave the task "Running" with no worker; the next
    grid's start marks it failed through DVC (`dvc queue kill`) and clears it, and `dvc exp show` reads
    the repository again once the dead task's workspace is gone. Real DVC queue, a stage that sleeps."""
    sh = runner(tmp_path)
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    (tmp_path / "dvc.yaml").write_text(NAP)
    (tmp_path / "params.yaml").write_text("p: 1\n")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "nap")
    sh("dvc", "exp", "run", "--queue", "-n", "nap-1", "-S", "p=2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    queue._start_workers(1)  # not through a pipe: the worker keeps it open
    run_dir = tmp_path / ".dvc/tmp/exps/run"
    for _ in range(120):  # the stage's process is recorded as it starts
        if [*run_dir.glob("*/*.json")] and "Running" in sh("dvc", "queue", "status").stdout:
            break
        time.sleep(1)
    else:
        pytest.fail("the queue's worker did not start the task within 120 polls")
    stage = os.getpgid(json.loads(next(run_dir.glob("*/*.json")).read_text())["pid"])
    assert stage != os.getpgrp()  # the task runs in a process group of its own
    os.killpg(stage, signal.SIGKILL)
    for worker in Path("/proc").glob("[0-9]*"):
        if _is_worker_in(worker, tmp_path):
            os.kill(int(worker.name), signal.SIGKILL)
    next(run_dir.glob("*/*.run")).unlink()  # the workspace's info file gone, as after a cleanup
    assert queue.queue_state() == ({"nap-1": ["Running"]}, 0, 0)
    assert queue.VANISHED_WORKSPACE.search(sh("dvc", "exp", "show", "--json", check=False).stderr)
    queue._fail_dead_entries()
    assert queue.queue_state()[0] == {"nap-1": ["Failed"]}
    sh("dvc", "queue", "remove", "--failed")
    assert sh("git", "rev-parse", "HEAD").stdout.strip() in {commit["rev"] for commit in queue.show_all()}


def _is_worker_in(process: Path, directory: Path) -> bool:
    """Whether /proc/<pid> is a DVC queue worker of the repository in `directory`."""
    try:
        command = (process / "cmdline").read_bytes().split(b"\0")
        return b"queue-worker" in command and Path(os.readlink(process / "cwd")) == directory
    except OSError:  # exited meanwhile, or not ours to read
        return False


def test_exp_show_is_asked_again_while_a_task_workspace_vanishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC's crash on a finishing task's info file is asked again (and succeeds once the task's result
    is stored); any other failure, or the crash past `SHOW_ATTEMPTS`, is one error line."""
    crash = "ERROR: unexpected error - [Errno 2] No such file or directory: '/r/.dvc/tmp/exps/run/ab/ab.run'"
    answers: list[tuple[int, str, str]] = []
    monkeypatch.setattr(queue, "POLL_S", 0)
    monkeypatch.setattr(
        queue, "_run_dvc", lambda *args: subprocess.CompletedProcess(["dvc", *args], *answers.pop(0))
    )
    answers[:] = [(255, "", crash), (255, "", crash), (0, "[]", "")]
    assert queue.show_all() == [] and not answers
    answers[:] = [(255, "", crash)] * queue.SHOW_ATTEMPTS
    with pytest.raises(BadInput, match=r"^dvc exp show --json failed: ERROR: unexpected error"):
        queue.show_all()
    assert not answers
    answers[:] = [(255, "", "ERROR: not a git repository"), (0, "[]", "")]
    with pytest.raises(BadInput, match="not a git repository"):
        queue.show_all()
    assert len(answers) == 1  # not asked again


FAILED_RUN = "ERROR: failed to reproduce 'train_coordbias': failed to run: python -m posconv.stages.train"


@pytest.mark.parametrize(
    ("line", "own"),
    [
        ("error: train.lr = -1: expected a value > 0.0", True),  # a stage's bad input
        (f"{FAILED_RUN} coordbias, exited with 1", True),  # a traceback: run again, it fails again
        (f"{FAILED_RUN} coordbias, exited with 127", False),  # no python on the worker's PATH
        (f"{FAILED_RUN} coordbias, exited with -9", False),  # killed
        ("ERROR: Unable to acquire lock. Most likely another DVC process is running", False),
    ],
)
def test_an_experiments_own_failures_are_told_from_the_machines(line: str, own: bool) -> None:
    """An experiment's own failure is reported, not retried; any other is retried."""
    assert bool(OWN_ERROR.fullmatch(line)) == own


@pytest.mark.slow
def test_experiments_and_models_travel_through_a_git_remote_and_a_dvc_remote(
    reproduced: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The multi-machine recipe of the README: one clone runs and pushes, a fresh clone pulls."""
    project, sh = reproduced, runner(reproduced)
    shared = tmp_path_factory.mktemp("shared")
    origin, storage = shared / "origin.git", shared / "storage"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    sh("git", "remote", "add", "origin", str(origin))
    sh("dvc", "remote", "add", "-f", "-d", "storage", str(storage))
    # the card's pipeline alone, run (`dvc exp apply` checks out the outputs of every pipeline)
    sh("git", "rm", "-q", "families/dvc.yaml", "coordinates/dvc.yaml")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "trained, with a DVC remote")
    sh("git", "push", "-q", "origin", "HEAD:main")
    sh("dvc", "push", "-q")
    sh("dvc", "exp", "run", "--temp", "-n", "shared-s1", "-S", "train.seed=1")
    sh("dvc", "exp", "push", "origin", "shared-s1")

    clone = shared / "clone"
    subprocess.run(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], check=True)

    def in_clone(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=clone, env=sh.env, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result

    in_clone("dvc", "pull", "-q")
    model = model_path("coordbias")
    assert (clone / model).read_bytes() == (project / model).read_bytes()
    in_clone("dvc", "exp", "pull", "origin", "shared-s1")
    listed = in_clone("dvc", "exp", "show", "--json").stdout
    assert '"shared-s1"' in listed
    in_clone("dvc", "exp", "apply", "shared-s1")  # checks out the experiment's models, pulled with it
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    recorded = next(out for out in lock["stages"]["train_coordbias"]["outs"] if out["path"] == model)
    assert in_clone("md5sum", model).stdout.split()[0] == recorded["md5"]
    assert (clone / model).read_bytes() != (project / model).read_bytes()  # seed 1, not seed 0


@pytest.mark.slow
def test_a_clone_elsewhere_gets_the_models_from_the_repository_and_the_same_data_by_regenerating(
    reproduced: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`make bundle` then `make models`: the trained models travel inside the repository (its DVC remote
    `bundled/`, committed to git), and the data, whose bytes do not depend on the machine, regenerates
    to the hashes the lock records: the clone is up to date without training."""
    project, sh = reproduced, runner(reproduced)
    sh("git", "rm", "-q", "families/dvc.yaml", "coordinates/dvc.yaml")  # the card's pipeline alone, run
    card = "MODEL_STAGES=train_vanilla train_coordbias train_coordconv"  # families/dvc.yaml is not here
    sh(
        "make",
        "-f",
        str(ROOT / "Makefile"),
        "bundle",
        card,
        f"BIN={Path(sys.executable).parent}",
        "INSTALLED=",
    )
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "trained; the models bundled")
    clone = tmp_path_factory.mktemp("elsewhere") / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)

    def in_clone(*command: str) -> subprocess.CompletedProcess:
        env = {**sh.env, "PYTHONPATH": str(clone / "src")}
        result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result

    in_clone("dvc", "pull", "-r", "bundled", "train_vanilla", "train_coordbias", "train_coordconv")
    for layer in ("vanilla", "coordbias", "coordconv"):
        assert (clone / model_path(layer)).read_bytes() == (project / model_path(layer)).read_bytes()
    ran = in_clone("dvc", "repro").stdout  # regenerates the data; nothing else needs to run
    assert set(re.findall(r"Running stage '(\w+)'", ran)) == {"generate", "split"}
    assert "up to date" in in_clone("dvc", "status").stdout
