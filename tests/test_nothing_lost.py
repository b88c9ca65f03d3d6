"""Nothing lost, nothing injected: one test (or a family of cases) per class of failure.

1. a failed or interrupted stage keeps the last good results;  2. orphaned processes write nothing;
3. a commit leaves the old set of outputs or the new one, whole;  4. no param reaches a shell as text;
5. impossible sizes are refused before they start;  6. one line instead of a traceback;
7. no wrong answer without an error;  8. `dvc repro` of the card does not start the study.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from conftest import ROOT, commit, deep_update, runner
from test_distributed import LAYER, STAGE, prepared  # noqa: F401 (a fixture)
from test_train import set_params

from posconv.config import parse_params
from posconv.errors import BadInput
from posconv.grid import quantities
from posconv.io import atomic_outputs
from posconv.model import FCN, ModelSpec, save_model
from posconv.registry import LAYERS, model_metrics, scale_key
from posconv.tools.check import JUDGED


def _outputs(tmp_path: Path) -> list[Path]:
    """A file and a folder with old contents, as a training's model and metrics."""
    model, metrics = tmp_path / "model.pt", tmp_path / "metrics"
    model.write_text("old model")
    metrics.mkdir()
    (metrics / "metrics.json").write_text("old metrics")
    return [model, metrics]


def _contents(paths: list[Path]) -> tuple[str, str]:
    return paths[0].read_text(), (paths[1] / "metrics.json").read_text()


RENAMES = 4  # two outputs: two moved aside, two moved in


@pytest.mark.parametrize("failing", range(RENAMES))
def test_class3_a_failed_rename_leaves_the_old_set_whole(
    tmp_path: Path, failing: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rename of the commit fails in turn: the old outputs come back whole, nothing else stays."""
    paths = _outputs(tmp_path)
    calls = []
    rename = Path.rename

    def flaky(self: Path, target: Path) -> Path:
        calls.append(self)
        if len(calls) == failing + 1:
            raise OSError(30, "Read-only file system", str(target))
        return rename(self, target)

    with pytest.raises(BadInput, match="Read-only file system"), atomic_outputs(*paths) as (model, metrics):
        model.write_text("new model")
        metrics.mkdir()
        (metrics / "metrics.json").write_text("new metrics")
        monkeypatch.setattr(Path, "rename", flaky)
    monkeypatch.undo()
    assert _contents(paths) == ("old model", "old metrics")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "model.pt"]  # no temporaries


def test_class3_a_successful_commit_leaves_the_new_set_and_nothing_else(tmp_path: Path) -> None:
    paths = _outputs(tmp_path)
    with atomic_outputs(*paths) as (model, metrics):
        model.write_text("new model")
        metrics.mkdir()
        (metrics / "metrics.json").write_text("new metrics")
    assert _contents(paths) == ("new model", "new metrics")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "model.pt"]


def test_class2_ranks_of_a_launcher_killed_with_sigkill_end_and_write_nothing(
    prepared: Path,  # noqa: F811 (the fixture imported above)
    sh: Callable,
) -> None:
    """SIGKILL leaves the launcher no chance to end its DDP ranks: each rank watches its launcher and
    ends itself, so nothing is written after the launcher is gone."""
    set_params(prepared, train={"processes": 2, "epochs": 500})
    launcher = subprocess.Popen(STAGE, cwd=prepared, env=sh.env, stderr=subprocess.DEVNULL)
    logs = f"metrics/train/.{LAYER}.tmp*/plots/metrics/train/loss.tsv"  # rank 0's, while it trains
    deadline = time.monotonic() + 90
    while not any(log.read_text().count("\n") > 3 for log in prepared.glob(logs)):
        assert time.monotonic() < deadline and launcher.poll() is None, "training never started"
        time.sleep(0.05)
    ranks = [
        p for p in psutil.Process(launcher.pid).children(recursive=True) if "posconv" in " ".join(p.cmdline())
    ]
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait()
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, [rank.cmdline() for rank in alive]
    assert not (prepared / f"models/{LAYER}.pt").exists()  # the ranks ended without committing


# ---- 1. a failed or interrupted stage keeps the last good results (real DVC) ----


def snapshot(directory: Path) -> dict[str, str]:
    """Every output file's SHA-256: data, models, metrics, plots."""
    files = [p for folder in ("data", "models", "metrics", "plots") for p in (directory / folder).rglob("*")]
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("layer=bad", "layer = 'bad'"),
        ("train.lr=-1", "train.lr = -1"),
        ("generate.size=30", "generate.size = 30"),
        ("evaluate.equivariance_images=1000", "evaluate.equivariance_images = 1000"),
        ("model.width=3", "model.width = 3"),
    ],
)
def test_class1_a_bad_value_through_exp_run_leaves_every_output_byte_identical(
    reproduced: Path, setting: str, named: str
) -> None:
    before = snapshot(reproduced)
    result = runner(reproduced)("dvc", "exp", "run", "-S", setting, check=False)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], result.stdout + result.stderr
    assert "exited with 2" in result.stderr  # the stage's exit code, as DVC reports it
    assert snapshot(reproduced) == before


@pytest.mark.parametrize("when", ["starting", "training"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_class1_a_signal_to_dvc_repro_mid_training_keeps_the_previous_model_and_metrics(
    reproduced: Path, sig: signal.Signals, when: str
) -> None:
    """SIGTERM to `dvc repro`, or Ctrl-C (SIGINT to its process group, as a terminal sends it), while the
    training stage starts (imports torch) or trains: DVC has removed the training's outputs; the stage
    puts them back, byte for byte. (A signal in the milliseconds before the interpreter reaches
    `posconv.stages` cannot be handled by the stage: DESIGN.md says so.)"""
    before = snapshot(reproduced)
    params = reproduced / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("epochs: 1", "epochs: 100000"))
    run = runner(reproduced)
    dvc = subprocess.Popen(
        ["dvc", "repro", "train_vanilla"], cwd=reproduced, env=run.env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )  # fmt: skip
    deadline = time.monotonic() + 120

    def stages() -> list[psutil.Process]:
        children = psutil.Process(dvc.pid).children(recursive=True)
        return [p for p in children if "posconv.stages.train" in " ".join(p.cmdline())]

    def importing_torch() -> bool:  # the stage's seconds before `run_stage`: torch's libraries load
        try:
            return any("torch/lib" in m.path for p in stages() for m in p.memory_maps())
        except psutil.Error:
            return False

    logs = "metrics/train/.vanilla.tmp*/plots/metrics/train/loss.tsv"
    while not (importing_torch() if when == "starting" else any(reproduced.glob(logs))):
        assert time.monotonic() < deadline and dvc.poll() is None, "the training stage never started"
        time.sleep(0.02)
    assert not (reproduced / "models/vanilla.pt").exists()  # DVC removed it before running the stage
    started = stages()
    if sig == signal.SIGINT:
        os.killpg(dvc.pid, sig)
    else:
        dvc.send_signal(sig)
    output, _ = dvc.communicate(timeout=60)
    _, alive = psutil.wait_procs(started, timeout=30)
    assert started and not alive
    assert snapshot(reproduced) == before, output
    status = run("dvc", "status", "train_vanilla").stdout  # honest: the outputs are the older params'
    assert "train_vanilla" in status and "train" in status and "data/" not in status, status
    params.write_text(original)
    assert "up to date" in run("dvc", "status", "train_vanilla").stdout


HANGING_CLEAN_UP = """
import sys, threading, time
from posconv import cli
cli.CLEAN_UP_S = 2
def main(argv):
    try:
        print("working", flush=True)
        time.sleep(600)
    finally:
        while True:  # a clean-up (a library's exit) that never ends
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                if sys.argv[1:] == ["interruptible"]:
                    raise
cli.run(main, on_failure=lambda: print("put back", flush=True))
"""
LATE = "a clean-up still waited 2 s after the signal"


@pytest.mark.parametrize(
    ("sig", "clean_up", "put_back", "line"),
    [
        (
            signal.SIGTERM,
            "interruptible",
            True,
            "no output written (a clean-up still waited 2 s after the signal)",
        ),
        (
            signal.SIGINT,
            "interruptible",
            True,
            "no output written (a clean-up still waited 2 s after the signal)",
        ),
        (signal.SIGTERM, "stubborn", False, "the clean-up did not end within 4 s; exiting"),
    ],
)
def test_class1_an_interrupted_run_whose_clean_up_hangs_still_ends(
    sig: signal.Signals, clean_up: str, put_back: bool, line: str
) -> None:
    """However a library's clean-up hangs (DVCLive's exit once waited on a queue forever after a
    SIGTERM), a stage or tool ends: `cli.CLEAN_UP_S` after the signal the wait it is stuck in is
    interrupted and the outputs are still put back; a wait that swallows that too ends the process at
    twice the deadline. Exit 130 and one line either way."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(
        [sys.executable, "-c", HANGING_CLEAN_UP, clean_up], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )  # fmt: skip
    try:
        assert process.stdout.readline() == "working\n"
        signalled = time.monotonic()
        process.send_signal(sig)
        output, errors = process.communicate(timeout=30)
    finally:
        process.kill()
    assert 2 <= time.monotonic() - signalled < 20
    assert process.returncode == 130
    assert (output == "put back\n") == put_back
    assert errors.splitlines() == [f"interrupted: {line}"]


# ---- 4. no param reaches a shell as text ----


def test_class4_no_pipeline_interpolates_a_param_into_its_command() -> None:
    """The only interpolation in a `cmd` is a foreach item, a literal of the pipeline file itself."""
    for path in map(ROOT.joinpath, JUDGED):  # every pipeline file
        for name, stage in yaml.safe_load(path.read_text())["stages"].items():
            command = stage.get("do", stage)["cmd"]
            references = re.findall(r"\$\{([^}]*)\}", command)  # ${item} or ${item.field}, nothing else
            assert all(re.fullmatch(r"item(\.\w+)?", ref) for ref in references), (path, name, command)


def test_class4_shell_metacharacters_in_a_param_run_nothing_and_change_nothing(reproduced: Path) -> None:
    marker = reproduced.parent / "INJECTED"
    before = snapshot(reproduced)
    for setting in (f"families.placement='first; touch {marker}'", f"layer='coordbias && touch {marker}'"):
        result = runner(reproduced)("dvc", "exp", "run", "-S", setting, check=False)
        assert result.returncode != 0 and "check_params" in result.stderr
        assert not marker.exists()
    assert snapshot(reproduced) == before


# ---- 5. impossible sizes are refused before they start ----


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"generate": {"images": 2**62}},
            r"generate.images = 4611686018427387904 at generate.size = 32: needs at least .* of disk",
        ),
        ({"generate": {"size": 8192, "images": 10**6}}, r"needs at least .* of disk"),
        (
            {"evaluate": {"sizes": [8192], "batch_size": 10**6}},
            r"evaluating at evaluate.sizes = \[8192\].*: needs at least .* of memory",
        ),
    ],
)
def test_class5_impossible_sizes_are_refused_with_the_figure(
    project: Path, changes: dict, message: str
) -> None:
    params = project / "params.yaml"
    params.write_text(yaml.safe_dump(deep_update(yaml.safe_load(params.read_text()), changes)))
    started = time.monotonic()
    result = runner(project)("python", "-m", "posconv.stages.check_params", check=False)
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(message, result.stderr), result.stderr
    assert not (project / "data").exists()


# ---- 6. one line instead of a traceback ----


def test_class6_a_deeply_nested_params_file_is_one_line(project: Path) -> None:
    (project / "params.yaml").write_text("seed: " + "[" * 100_000 + "]" * 100_000 + "\n")
    result = runner(project)("python", "-m", "posconv.stages.check_params", check=False)
    assert result.returncode == 2 and result.stderr.strip() == "error: params.yaml: nested too deeply to read"


def test_class6_an_output_folder_that_cannot_be_written_is_one_line(project: Path) -> None:
    shutil.rmtree(project / "metrics")
    (project / "metrics").write_text("a file where the stage needs a folder")
    result = runner(project)("python", "-m", "posconv.stages.check_params", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (
        result.stderr.startswith("error: metrics/params_checked.json: ") and "kept as it was" in result.stderr
    )


READ_RESULTS = """
from posconv.cli import run
from posconv.tools.experiments import read_files
run(lambda argv: read_files("HEAD", ["metrics/evaluate/coordbias.json"]))
"""


def test_class6_an_empty_or_wrong_shaped_results_file_is_one_line(reproduced: Path) -> None:
    """A collecting tool reads experiments' files from git: an empty file, or one of another shape."""
    run = runner(reproduced)
    path = reproduced / "metrics/evaluate/coordbias.json"
    for broken in ("", "[1, 2]"):
        path.write_text(broken)
        commit(reproduced, "a broken results file")
        result = run("python", "-c", READ_RESULTS, check=False)
        assert result.returncode == 2 and "metrics/evaluate/coordbias.json" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_class6_collecting_the_precision_experiments_reads_their_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The precision tool's collect called the study's reader with an argument missing: it crashed on
    every call. Here with its experiments faked at the edges (no DVC): it reads every layer's files."""
    from posconv.tools import experiments, precision

    runs = {
        precision.name(p, s): experiments.Finished(f"rev-{p}-{s}", None)
        for p in precision.PRECISIONS
        for s in precision.SEEDS
    }
    monkeypatch.setattr(precision, "show_all", lambda: [])
    monkeypatch.setattr(precision, "finished", lambda shown, prefix: runs)
    read = []

    def fake_read(revision: str, models: tuple[str, ...]) -> dict:
        read.append((revision, models))
        scores = {"recall": [1.0, 0.9, 0.9, 0.9], "miou": 0.9}
        return {path: scores | {"train_images_per_s": 10.0} for m in models for path in model_metrics(m)}

    monkeypatch.setattr(precision, "read_metrics", fake_read)
    results = precision.collect()
    assert len(read) == len(runs) and all(models == LAYERS for _, models in read)
    assert set(results["results"]) == set(LAYERS)


# ---- 7. no wrong answer without an error ----


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text", "not an .npz archive"),
        ("empty arrays", "expected at least one image"),
        ("device", "not a regular file"),
    ],
)
def test_class7_a_data_file_that_cannot_be_scored_is_refused(
    tmp_path: Path, content: str, message: str
) -> None:
    data = tmp_path / "data.npz"
    if content == "text":
        data.write_text("images,labels\n")
    elif content == "empty arrays":
        np.savez(data, images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros((0, 8, 8), np.uint8))
    else:
        data = Path("/dev/zero")
    model = tmp_path / "model.pt"
    save_model(FCN(ModelSpec("coordbias", width=4)), model)
    result = runner(ROOT)(
        "python", "-m", "posconv.stages.evaluate", "--model", str(model), "--data", str(data), check=False
    )
    assert (
        result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    )
    assert result.stdout == ""


def test_class7_close_scales_keep_their_own_result_keys() -> None:
    assert len({scale_key(f) for f in (1.5, 1.50001, 1.5000000001)}) == 3
    assert [q for q in quantities([], [], [1.5, 1.50001]) if q.startswith("scale")] == [
        "scale_error_1.5",
        "scale_error_1.50001",
    ]


def test_class7_more_evaluation_images_than_the_test_split_are_refused() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    test = parse_params(params).split_sizes()["test"]
    for key in ("equivariance_images", "examples"):
        bad = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), {"evaluate": {key: test + 1}})
        with pytest.raises(
            BadInput, match=rf"evaluate.{key} = {test + 1}: expected at most the test split's {test} images"
        ):
            parse_params(bad)


# ---- 8. `dvc repro` of the card does not start the study ----


def test_class8_no_stage_of_the_card_depends_on_what_the_study_makes(checkout: Path) -> None:
    runner(checkout)("dvc", "remove", "--help")  # DVC is importable there
    dry = runner(checkout)("dvc", "repro", "--dry", "--force").stdout  # every stage dvc repro would run
    ran = set(re.findall(r"Running stage '([^']+)'", dry))
    assert "report" in ran and not [stage for stage in ran if "study" in stage or "bench" in stage], ran
