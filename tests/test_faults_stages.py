"""The reliability contract at the stages: bad params, flags and data files, and kills.

Every case runs a real stage as a subprocess in a copy of a tiny project that has already run once,
and checks: the exit code, one line on stderr naming the key, flag or file, no traceback, and that
every earlier output is byte-for-byte what it was.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from ruamel.yaml import YAML
from test_faults import assert_contract, digest, run, write

from posconv.model import FCN, ModelSpec, save_model

Edit = Callable[[Path], None]


@pytest.fixture
def project(reproduced_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the reproduced tiny project without its git and DVC records (the stages run
    alone, as a user runs them), for one case to break."""
    records = shutil.ignore_patterns(".git", ".dvc", "dvc.lock")
    shutil.copytree(reproduced_template, tmp_path / "p", symlinks=True, ignore=records)
    return tmp_path / "p"


def param(key: str, raw: str) -> Edit:
    """Set params.yaml's `key` (a dotted path) to the YAML text `raw`, read as DVC would read it."""

    def edit(directory: Path) -> None:
        yaml = YAML()
        params = yaml.load((directory / "params.yaml").read_text())
        *groups, last = key.split(".")
        node = params
        for group in groups:
            node = node[group]
        node[last] = "__VALUE__"
        stream = io.StringIO()
        yaml.dump(params, stream)
        (directory / "params.yaml").write_text(stream.getvalue().replace("__VALUE__", raw))

    return edit


# (key line, replacement, fragment): every numeric option against NaN, infinities, zero, negatives,
# values beyond int64 and wrong types; YAML 1.2 as DVC reads it.
PARAM_CASES = [
    ("seed", "-1", "seed = -1: expected a value >= 0"),
    ("seed", "18446744073709551616", "seed = 18446744073709551616: expected a value <= "),
    ("seed", "1.5", "seed = 1.5: expected an integer"),
    ("seed", ".nan", "seed = nan: expected an integer"),
    ("device", "gpu", "device = 'gpu': expected one of auto, cpu"),
    ("device", "cuda:x", "device = 'cuda:x'"),
    ("layer", "vanilla", "layer = 'vanilla': expected one of coordbias, coordconv"),
    ("generate.size", "0", "generate.size = 0: expected a value >= 16"),
    ("generate.size", "30", "generate.size = 30: expected a multiple of 4"),
    ("generate.size", ".inf", "generate.size = inf: expected an integer"),
    ("generate.images", "0", "generate.images = 0: expected a value >= 1"),
    ("generate.images", "-40", "generate.images = -40: expected a value >= 1"),
    ("generate.images", "9223372036854775808", "generate.images = 9223372036854775808: expected a value <= "),
    ("generate.images", "'48'", "generate.images = '48': expected an integer"),
    ("generate.images", "true", "generate.images = True: expected an integer"),
    ("split.val", ".nan", "split.val = nan: expected a finite number"),
    ("split.val", "0", "split.val = 0: expected a value > 0.0"),
    ("split.val", "-0.2", "split.val = -0.2: expected a value > 0.0"),
    ("split.val", ".inf", "split.val = inf: expected a finite number"),
    ("split.val", "0.9", "split.val + split.test = 1.1: expected < 1"),
    ("model.width", "0", "model.width = 0: expected a value >= 2"),
    ("model.width", "5", "model.width = 5: expected a multiple of 2"),
    ("model.coords", "polar", "model.coords = 'polar': expected one of centered, seed, constant, shuffled"),
    ("model.with_r", "yes", "model.with_r = 'yes': expected true or false"),  # YAML 1.2: a string
    ("train.seed", "-3", "train.seed = -3: expected a value >= 0"),
    ("train.epochs", "0", "train.epochs = 0: expected a value >= 1"),
    ("train.epochs", "1.0", "train.epochs = 1.0: expected an integer"),
    ("train.batch_size", "0", "train.batch_size = 0: expected a value >= 1"),
    ("train.lr", "0", "train.lr = 0: expected a value > 0.0"),
    ("train.lr", "-1e-3", "train.lr = -0.001: expected a value > 0.0"),
    ("train.lr", ".nan", "train.lr = nan: expected a finite number"),
    ("train.lr", "-.inf", "train.lr = -inf: expected a finite number"),
    ("train.lr", "fast", "train.lr = 'fast': expected a number"),
    ("train.momentum", "1.5", "train.momentum = 1.5: expected a value <= 1.0"),
    ("train.weight_decay", "-1", "train.weight_decay = -1: expected a value >= 0.0"),
    ("train.precision", "fp16", "train.precision = 'fp16': expected one of auto, fp32, bf16"),
    ("train.val_every", "0", "train.val_every = 0: expected a value >= 1"),
    ("evaluate.batch_size", "-1", "evaluate.batch_size = -1: expected a value >= 1"),
    ("evaluate.position_bins", "1", "evaluate.position_bins = 1: expected a value >= 2"),
    ("check.min_position_recall", ".nan", "check.min_position_recall = nan"),
    ("evaluate.colour", "red", "evaluate.colour: unknown key"),
]


@pytest.mark.parametrize(("key", "raw", "fragment"), PARAM_CASES, ids=[f"{c[0]}={c[1]}" for c in PARAM_CASES])
@pytest.mark.parametrize("stage", ["generate", "split"])
def test_bad_params_stop_a_stage_in_one_line(
    project: Path, stage: str, key: str, raw: str, fragment: str
) -> None:
    param(key, raw)(project)
    before = digest(project)
    assert_contract(run(project, f"posconv.stages.{stage}"), 2, fragment)
    assert digest(project) == before


def model_of(layer: str) -> Edit:
    def edit(directory: Path) -> None:
        save_model(FCN(ModelSpec(layer=layer, width=4)), directory / "models/coordbias.pt")

    return edit


def labels_with(value: int) -> Edit:
    def edit(directory: Path) -> None:
        path = directory / "data/scenes/labels.npy"
        labels = np.load(path)
        labels[1, 0, 0] = value
        np.save(path, labels)

    return edit


def split_with(name: str, index: int) -> Edit:
    def edit(directory: Path) -> None:
        path = directory / "data/split.npz"
        with np.load(path) as archive:
            split = {key: archive[key] for key in archive}
        split[name] = np.append(split[name], np.int64(index))
        np.savez(path, **split)

    return edit


# (case, edit, command, fragment): data files and flags the stages are given
INPUT_CASES = [
    (
        "label beyond the classes",
        labels_with(7),
        ["posconv.stages.train", "vanilla"],
        "data/scenes/labels.npy",
    ),
    (
        "label beyond the classes, evaluate",
        labels_with(4),
        ["posconv.stages.evaluate"],
        "data/scenes/labels.npy",
    ),
    (
        "index beyond the data",
        split_with("train", 10**6),
        ["posconv.stages.train", "vanilla"],
        "data/split.npz",
    ),
    ("negative index", split_with("val", -1), ["posconv.stages.train", "coordbias"], "data/split.npz"),
    ("negative test index", split_with("test", -3), ["posconv.stages.evaluate"], "data/split.npz"),
    (
        "split not a zip",
        write("data/split.npz", "junk"),
        ["posconv.stages.train", "vanilla"],
        "data/split.npz",
    ),
    (
        "images truncated",
        write("data/scenes/images.npy", "x"),
        ["posconv.stages.train", "vanilla"],
        "images.npy",
    ),
    (
        "circles table emptied",
        write("data/scenes/circles.csv", ""),
        ["posconv.stages.evaluate"],
        "circles.csv",
    ),
    ("model of another layer", model_of("coordconv"), ["posconv.stages.evaluate"], "models/coordbias.pt"),
    (
        "model not a model",
        write("models/coordbias.pt", "junk"),
        ["posconv.stages.evaluate"],
        "models/coordbias.pt",
    ),
    ("unknown layer", lambda d: None, ["posconv.stages.train", "resnet"], "resnet"),
    ("extra argument", lambda d: None, ["posconv.stages.split", "--fast"], "--fast"),
    ("batch size -1", lambda d: None, [*["posconv.stages.evaluate"], "--batch-size", "-1"], "--batch-size"),
]


@pytest.mark.parametrize(
    ("case", "edit", "command", "fragment"), INPUT_CASES, ids=[c[0] for c in INPUT_CASES]
)
def test_bad_inputs_stop_a_stage_in_one_line(
    project: Path, case: str, edit: Edit, command: list[str], fragment: str
) -> None:
    edit(project)
    before = digest(project)
    assert_contract(run(project, *command), 2, fragment)
    assert digest(project) == before


@pytest.fixture(scope="module")
def scoring(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A saved model and a labelled .npz for the standalone scorer."""
    directory = tmp_path_factory.mktemp("scoring")
    torch.manual_seed(0)
    save_model(FCN(ModelSpec(layer="coordbias", width=4)), directory / "model.pt")
    images = np.zeros((3, 20, 20, 3), np.uint8)
    np.savez(directory / "data.npz", images=images, labels=np.zeros((3, 20, 20), np.uint8))
    return directory / "model.pt", directory / "data.npz"


FLAG_CASES = [  # (flags, fragment) for `evaluate --model M --data D`
    (["--batch-size", "-1"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "nan"], "--batch-size"),
    (["--batch-size", "1.5"], "--batch-size"),
    (["--batch-size", "9223372036854775808"], "--batch-size"),
    (["--device", "foo"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--device", ""], "--device"),
    (["--bogus"], "--bogus"),
]


@pytest.mark.parametrize(("flags", "fragment"), FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flags_of_the_scorer_are_one_line(
    scoring: tuple[Path, Path], flags: list[str], fragment: str
) -> None:
    model, data = scoring
    result = run(model.parent, "posconv.stages.evaluate", "--model", str(model), "--data", str(data), *flags)
    assert_contract(result, 2, fragment)
    assert result.stdout == ""  # no metrics made up


def wait_for(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition(), "the stage never reached the point to kill it at"


def temporaries(directory: Path) -> list[Path]:
    return list(directory.rglob(".*.tmp*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.parametrize(
    ("command", "point"),
    [
        (["posconv.stages.generate"], "data/.scenes.tmp*/images.npy"),  # drawing scenes
        (["posconv.stages.train", "vanilla"], "metrics/train/.vanilla.tmp*/plots/metrics/train/loss.tsv"),
        (["posconv.stages.train", "coordconv"], "metrics/train/.coordconv.tmp*/plots/metrics/val/loss.tsv"),
    ],
    ids=["generate", "train-steps", "train-validated"],
)
def test_a_killed_stage_leaves_the_old_outputs_and_the_next_run_cleans_up(
    project: Path, command: list[str], point: str, sig: signal.Signals
) -> None:
    """Killed at a point of its work, a stage leaves the previous outputs whole; the next run of it
    removes what the killed one left and gives the same outputs as before, byte for byte."""
    params = (project / "params.yaml").read_text()
    before = digest(project)
    longer = params.replace("epochs: 1", "epochs: 400").replace("images: 48", "images: 20000")
    (project / "params.yaml").write_text(longer)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    log = (project.parent / "stage.log").open("w")  # a file, not a pipe nobody reads: it never fills
    process = subprocess.Popen([sys.executable, "-m", *command], cwd=project, env=env, stderr=log)
    wait_for(lambda: any(project.glob(point)))
    assert process.poll() is None, "the stage ended before it could be killed"
    process.send_signal(sig)
    assert process.wait(timeout=180) != 0
    log.close()
    (project / "params.yaml").write_text(params)
    assert {path: sha for path, sha in digest(project).items() if "/." not in path} == before
    result = run(project, *command)
    assert result.returncode == 0, result.stderr
    assert not temporaries(project)
    after = digest(project)
    for path, sha in before.items():  # training is deterministic; timings in metrics.json differ
        if not path.endswith("metrics.json"):
            assert after[path] == sha, path


@pytest.mark.parametrize(
    ("path", "message"),
    [(None, "no finished experiment"), ("/nonexistent", "dvc: not found on PATH (activate")],
)
def test_collecting_a_study_with_no_experiments_or_no_dvc_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str | None, message: str
) -> None:
    for command in (
        ["init", "-q"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c", "--allow-empty"],
    ):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    if path:
        monkeypatch.setenv("PATH", path)  # no dvc to run (the tool runs it as the stages run python)
    assert_contract(run(tmp_path, "posconv.tools.study", "collect"), 2, message)
    assert not (tmp_path / "metrics").exists()


def test_json_of_the_scorer_is_all_it_prints(scoring: tuple[Path, Path]) -> None:
    model, data = scoring
    result = run(model.parent, "posconv.stages.evaluate", "--model", str(model), "--data", str(data))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["miou"] is not None
