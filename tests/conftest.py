"""Shared fixtures: a copy of the project in a temporary git repository, for tests that run stages."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if "PYTEST_XDIST_WORKER" in os.environ:  # one thread per test worker and its subprocesses
    os.environ.setdefault("OMP_NUM_THREADS", "1")
TINY = {  # a pipeline that runs in seconds on a CPU
    "generate": {"size": 32, "images": 48},
    "model": {"width": 4},
    "train": {"epochs": 1, "batch_size": 8, "val_every": 2},
    "evaluate": {"examples": 2, "sizes": [24, 40], "scales": [0.75, 1.5], "equivariance_images": 4},
    "check": {"min_miou": 0.0, "min_position_recall": 0.0, "min_transfer_position_recall": 0.0},
    "coordinates": {  # two seeds: enough for a paired comparison; one evaluation a run
        "layers": {"vanilla": 2, "coordbias": 2, "coordconv": 2, "coordbias_per_input": 2, "paper_conv": 2},
        **{
            task: {"width": 2, "baseline_width": 4, "steps": 2, "batch_size": 8, "eval_every": 2}
            for task in ("classification", "regression", "rendering")
        },
    },
}


def deep_update(data: dict, changes: dict) -> dict:
    for key, value in changes.items():
        data[key] = deep_update(data[key], value) if isinstance(value, dict) else value
    return data


def make_project(directory: Path) -> Path:
    """The project's pipeline files and sources in a fresh git repo with tiny params, committed."""
    inputs = ("metrics/study.json", "metrics/bench_layers.json")  # committed inputs of the study's report
    for name in ("src", ".dvc", "dvc.yaml", "families", "coordinates", ".dvcignore", ".gitignore", *inputs):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, directory / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache")
            )
        else:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, directory / name)
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (
        ["init", "-q"],
        ["config", "user.name", "test"],
        ["config", "user.email", "t@example.invalid"],
    ):
        subprocess.run(["git", *command], cwd=directory, check=True)
    commit(directory, "tiny project")
    return directory


def commit(directory: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=directory, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=directory, check=True)


def runner(directory: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run a command in a project copy, with its own sources first on the Python path."""
    env = {**os.environ, "PYTHONPATH": str(directory / "src"), "DVC_NO_ANALYTICS": "1"}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]

    def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True)
        if check and result.returncode:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    run.env = env  # type: ignore[attr-defined]
    return run


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh tiny project, committed, nothing run."""
    return make_project(tmp_path)


@pytest.fixture
def sh(project: Path) -> Callable[..., subprocess.CompletedProcess]:
    return runner(project)


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after `dvc repro` of the card, results committed, for the tests that only need
    results to start from (each gets its own copy, `reproduced`): built once per test run, by the first
    test process (xdist worker) that needs it, under a lock the others wait on. `repro.out` (what the
    repro ran) is written last: a build that failed midway is started again."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # the run's directory, above each worker's own
    directory, ran = shared / "reproduced" / "project", shared / "reproduced" / "repro.out"
    with (shared / "reproduced.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ran.exists():
            shutil.rmtree(directory.parent, ignore_errors=True)
            make_project(directory)
            output = runner(directory)("dvc", "repro").stdout
            commit(directory, "tiny results")
            ran.write_text(output)
    return directory


@pytest.fixture
def reproduced(reproduced_template: Path, tmp_path: Path) -> Path:
    """A copy of the reproduced tiny project (data, models, DVC cache and git history included)."""
    directory = tmp_path / "project"
    shutil.copytree(reproduced_template, directory, symlinks=True)
    return directory


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The committed project (code, params, locks and results; no data or models) in a fresh git repo."""
    names = (
        "src",
        ".dvc",
        "dvc.yaml",
        "dvc.lock",
        "families",
        "study",
        "coordinates",
        "params.yaml",
        ".dvcignore",
        ".gitignore",
        "metrics",
        "plots",
    )
    for name in names:
        source = ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "tmp", "cache")
            shutil.copytree(source, tmp_path / name, ignore=ignore)
        else:
            shutil.copy(source, tmp_path / name)
    for command in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
    ):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    return tmp_path
