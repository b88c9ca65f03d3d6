"""The train stage as N DDP ranks (gloo on CPU): the single process's model, one set of outputs, and a
failure on any rank ends them all with one line and no outputs. Real processes under torchrun."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from test_train import set_params

from posconv.config import parse_params
from posconv.errors import BadInput
from posconv.model import load_model

ROOT = Path(__file__).resolve().parents[1]
LAYER = "coordbias"
STAGE = ("python", "-m", "posconv.stages.train", LAYER)
TORCHRUN = ("python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")

# Two ranks and one process differ only in the order of floating-point sums (the all-reduce adds the
# ranks' gradients and BatchNorm sums in its own order; each rank's convolutions sum over fewer
# images): after 4 SGD steps the weights differ by ~1e-5 at most, the same as one process on 1 thread
# against 2 (measured: 1.2e-5 and 1.5e-5). Per-rank BatchNorm instead of the synchronised one moves
# them by ~1e-2, so 1e-4 tells the two apart. SGD, not Adam: Adam divides by sqrt(v), so a gradient
# that is only rounding noise (the bias just before a BatchNorm, which cancels it) takes steps of lr
# in the noise's direction, a difference of lr x steps that says nothing about DDP.
WEIGHTS_ATOL = 1e-4
LOSS_RTOL = 1e-5


@pytest.fixture
def prepared(project: Path, sh: Callable) -> Path:
    """The tiny project with 29 train images: batches of 8 leave a last one of 5, which two ranks share
    3 + 2; BatchNorm in the encoder too, so every normalisation is synchronised."""
    set_params(
        project,
        generate={"images": 47},
        model={"encoder_batchnorm": True},
        train={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    )
    sh("python", "-m", "posconv.stages.generate")
    sh("python", "-m", "posconv.stages.split")
    assert json.loads((project / "metrics/data.json").read_text())["train"]["images"] == 29
    return project


def files(project: Path) -> set[str]:
    """Every file of the project outside .git, hidden ones (temporaries) included."""
    return {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file() and ".git" not in p.parts}


def leftovers(project: Path) -> list[str]:
    """The model, its DVCLive folder and temporaries of either that are on disk (none, after a failure)."""
    found = [*project.glob(f"models/*{LAYER}*"), *project.glob(f"metrics/train/*{LAYER}*")]
    return sorted(str(path.relative_to(project)) for path in found)


def trained(project: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    metrics = json.loads((project / f"metrics/train/{LAYER}/metrics.json").read_text())
    return metrics, load_model(project / f"models/{LAYER}.pt").state_dict()


def assert_same_model(single: tuple[dict, dict], ranks: tuple[dict, dict]) -> None:
    (metrics_1, weights_1), (metrics_2, weights_2) = single, ranks
    assert metrics_1["processes"] == 1 and metrics_2["processes"] == 2
    assert metrics_2["steps"] == metrics_1["steps"] == 4  # the same global batches: 8, 8, 8, 5
    assert metrics_2["train"]["loss"] == pytest.approx(metrics_1["train"]["loss"], rel=LOSS_RTOL)
    assert metrics_2["val"]["loss"] == pytest.approx(metrics_1["val"]["loss"], rel=LOSS_RTOL)
    assert weights_2.keys() == weights_1.keys()
    for name, weight in weights_1.items():
        if weight.is_floating_point():
            torch.testing.assert_close(weights_2[name], weight, rtol=0, atol=WEIGHTS_ATOL, msg=name)
        else:  # BatchNorm's step count
            assert torch.equal(weights_2[name], weight), name


@pytest.mark.slow
def test_two_ranks_train_the_single_process_model_and_write_one_set_of_outputs(
    prepared: Path, sh: Callable
) -> None:
    sh(*STAGE)
    single = trained(prepared)
    before = files(prepared)

    sh(*TORCHRUN, "-m", "posconv.stages.train", LAYER)  # torchrun itself; train.processes stays 1
    assert_same_model(single, trained(prepared))
    assert files(prepared) == before  # rank 0 replaced the outputs; no rank added any file

    set_params(prepared, train={"processes": 2})  # the stage launches its own ranks
    result = sh(*STAGE)
    assert_same_model(single, trained(prepared))
    assert files(prepared) == before
    assert result.stderr.strip().splitlines()[-1].endswith("on cpu x 2 processes in fp32")  # rank 0's log


def test_processes_that_cannot_share_a_batch_are_refused_by_the_params() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert parse_params(params).train.processes == params["train"].get("processes", 1)
    params["train"] |= {"batch_size": 8, "processes": 3}
    with pytest.raises(BadInput, match=r"train.batch_size = 8: not divisible by train.processes = 3"):
        parse_params(params)
    params["train"] |= {"processes": 0}
    with pytest.raises(BadInput, match=r"train.processes = 0: expected a value >= 1"):
        parse_params(params)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 1e30}, "try a lower train.lr"),  # mid-training: every rank sees the global loss diverge
        ({"batch_size": 4}, "the last batch of each epoch (29 train images) has 1 image(s)"),  # a rank idle
    ],
)
def test_a_bad_input_on_the_ranks_is_one_line_and_leaves_no_outputs(
    prepared: Path, sh: Callable, change: dict, message: str
) -> None:
    set_params(prepared, train={"processes": 2, **change})
    result = sh(*STAGE, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert leftovers(prepared) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("victim", "sig", "code", "line"),
    [
        ("1", signal.SIGKILL, 1, "error: rank 1 of 2 was killed by SIGKILL"),  # a rank dies alone
        ("launcher", signal.SIGTERM, 130, "interrupted: no output written"),  # DVC or a user stops the run
    ],
)
def test_a_signal_ends_every_rank_with_one_line_and_no_outputs(
    prepared: Path, sh: Callable, victim: str, sig: signal.Signals, code: int, line: str
) -> None:
    set_params(prepared, train={"processes": 2, "epochs": 500})
    launcher = subprocess.Popen(STAGE, cwd=prepared, env=sh.env, stderr=subprocess.PIPE, text=True)
    logs = f"metrics/train/.{LAYER}.tmp*/plots/metrics/train/loss.tsv"  # rank 0's, until the run ends
    deadline = time.monotonic() + 90
    while not any(log.read_text().count("\n") > 3 for log in prepared.glob(logs)):
        assert time.monotonic() < deadline and launcher.poll() is None, "training never started"
        time.sleep(0.05)
    children = psutil.Process(launcher.pid).children(recursive=True)
    ranks = {
        child.environ().get("RANK"): child for child in children if "posconv.stages.train" in child.cmdline()
    }
    assert set(ranks) == {"0", "1"}
    (launcher if victim == "launcher" else ranks[victim]).send_signal(sig)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == code, stderr
    assert stderr.strip().splitlines() == [line]
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [child.cmdline() for child in alive]
    assert leftovers(prepared) == []
