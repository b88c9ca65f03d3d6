"""The train stage as DVC runs it: reproducible, and all-or-nothing when it fails or is killed."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from posconv.model import load_model
from posconv.stages.train import live_log

TIMING_KEYS = {"wall_time_s", "train_images_per_s", "peak_memory_mb"}


def set_params(project: Path, **groups: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for group, values in groups.items():
        params[group].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def prepared(project: Path, sh: Callable) -> Path:
    """The tiny project with its data generated and split."""
    sh("python", "-m", "posconv.stages.generate")
    sh("python", "-m", "posconv.stages.split")
    return project


def leftovers(project: Path, layer: str) -> list[str]:
    """The model, its DVCLive folder and temporaries of either that are on disk (none, after a failure)."""
    found = [*project.glob(f"models/*{layer}*"), *project.glob(f"metrics/train/*{layer}*")]
    return sorted(str(path.relative_to(project)) for path in found)


def test_same_params_and_seed_give_identical_metrics_and_weights(prepared: Path, sh: Callable) -> None:
    runs = []
    for _ in range(2):
        sh("python", "-m", "posconv.stages.train", "coordbias")
        metrics = json.loads((prepared / "metrics/train/coordbias/metrics.json").read_text())
        weights = load_model(prepared / "models/coordbias.pt").state_dict()
        runs.append(({k: v for k, v in metrics.items() if k not in TIMING_KEYS}, weights))
    (metrics_a, weights_a), (metrics_b, weights_b) = runs
    assert metrics_a == metrics_b
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    assert (prepared / "metrics/train/coordbias/plots/metrics/train/loss.tsv").read_text().count("\n") > 1


def test_saved_model_rebuilds_from_its_own_spec(prepared: Path, sh: Callable) -> None:
    sh("python", "-m", "posconv.stages.train", "coordconv")
    model = load_model(prepared / "models/coordconv.pt")
    assert model.spec.layer == "coordconv" and model.spec.width == 4
    assert model(torch.rand(2, 3, 24, 40)).shape == (2, 4, 24, 40)


def test_diverging_loss_stops_with_the_step_and_writes_nothing(prepared: Path, sh: Callable) -> None:
    set_params(prepared, train={"optimizer": "sgd", "lr": 1e30})
    result = sh("python", "-m", "posconv.stages.train", "coordbias", check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "training loss is" in result.stderr and "at step" in result.stderr
    assert leftovers(prepared, "coordbias") == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_mid_training_leaves_nothing_and_repro_redoes_it(
    prepared: Path, sh: Callable, sig: signal.Signals
) -> None:
    set_params(prepared, train={"epochs": 200})
    process = subprocess.Popen(
        ["python", "-m", "posconv.stages.train", "vanilla"],
        cwd=prepared,
        env=sh.env,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a job a non-interactive shell starts in the background ignores SIGINT,
        # and Python keeps an ignored SIGINT ignored (what a user's Ctrl-C reaches is the default)
        preexec_fn=partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
    )

    def logged_steps() -> int:  # DVCLive logs into a temporary folder until the run ends
        logs = list(prepared.glob("metrics/train/.vanilla.tmp*/plots/metrics/train/loss.tsv"))
        return logs[0].read_text().count("\n") if logs else 0

    deadline = time.monotonic() + 60
    while logged_steps() <= 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be interrupted"
    process.send_signal(sig)
    assert process.wait(timeout=30) != 0
    assert leftovers(prepared, "vanilla") == []

    set_params(prepared, train={"epochs": 1})
    sh("dvc", "repro", "train_vanilla")
    assert load_model(prepared / "models/vanilla.pt").spec.layer == "vanilla"
    assert json.loads((prepared / "metrics/train/vanilla/metrics.json").read_text())["steps"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_sigterm_to_dvc_repro_ends_the_training_it_started(prepared: Path, sh: Callable, shell: str) -> None:
    """DVC dies on SIGTERM without passing it on, and runs the command through $SHELL, which stays
    between DVC and the stage when it is dash (/bin/sh here); the stage ends with DVC either way, so
    no training goes on without it, and it leaves no outputs."""
    set_params(prepared, train={"epochs": 100_000})
    dvc = subprocess.Popen(
        ["dvc", "repro", "train_vanilla"],
        cwd=prepared,
        env=sh.env | {"SHELL": shell},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    logs = "metrics/train/.vanilla.tmp*/plots/metrics/train/loss.tsv"
    deadline = time.monotonic() + 120
    while not any(log.read_text().count("\n") > 3 for log in prepared.glob(logs)):
        assert time.monotonic() < deadline and dvc.poll() is None, "training never started"
        time.sleep(0.05)
    children = psutil.Process(dvc.pid).children(recursive=True)
    assert any("posconv.stages.train" in " ".join(child.cmdline()) for child in children)
    dvc.send_signal(signal.SIGTERM)
    dvc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=30)  # 100,000 epochs: ended, not finished
    assert not alive, [child.cmdline() for child in alive]
    assert leftovers(prepared, "vanilla") == []


def test_an_interrupt_inside_a_dvclive_step_ends_the_logging_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM becomes a KeyboardInterrupt wherever the stage is. Landing in DVCLive's `next_step`
    after it made its Studio queue but before it started the queue's worker (here: the worker's start
    interrupted), `with Live(...)` ended the run on the way out and waited on that queue forever."""
    ended: list[BaseException] = []

    def block() -> None:
        try:
            with live_log(tmp_path / "live") as live:
                live.log_metric("val/loss", 1.0)
                monkeypatch.setattr(threading.Thread, "start", interrupted)
                live.next_step()
        except BaseException as error:  # what the block raised is the result
            ended.append(error)

    def interrupted(thread: threading.Thread) -> None:
        raise KeyboardInterrupt("signal 15")

    runner = threading.Thread(target=block, daemon=True)
    runner.start()
    runner.join(timeout=30)
    monkeypatch.undo()
    assert not runner.is_alive(), "the logging block hung after the interrupt"
    assert [type(error) for error in ended] == [KeyboardInterrupt]
