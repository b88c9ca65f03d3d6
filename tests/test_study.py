"""The study: its grid, its reading of `dvc exp show --json`, and its spreads and verdicts over seeds."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posconv.errors import BadInput
from posconv.grid import SCALE, SEEDS, VARIANTS, aggregate, check_study, compare, spread
from posconv.model import FCN, ModelSpec, count_parameters
from posconv.registry import LAYERS
from posconv.tools.experiments import Experiment, finished
from posconv.tools.study import grid


def fake_run(variant: str, seed: int) -> dict:
    """Metrics files of one experiment: coordbias learns position, vanilla does not, seeds add jitter."""
    files = {}
    for model in LAYERS:
        recall = 0.4 + 0.1 * seed if model == "vanilla" else 0.9 + 0.01 * seed
        files[f"metrics/evaluate/{model}.json"] = {
            "recall": [0.99, recall, recall, recall], "miou": recall - 0.1, "position_error_rate": 1 - recall,
            "circle_accuracy": recall, "inference_images_per_s": 200.0,
        }  # fmt: skip
        files[f"metrics/train/{model}/metrics.json"] = {
            "steps_to_position_recall_0_9": None if model == "vanilla" else 40 + seed, "steps": 60,
            "parameters": 100 if model == "vanilla" else 110, "train_images_per_s": 50.0,
        }  # fmt: skip
    return files


def fake_study() -> dict:
    results = aggregate({f"study-{v}-s{s}": fake_run(v, s) for v in VARIANTS for s in SEEDS})
    cost = {"wall_s": 100.0, "cpu_s": 190.0}
    return {"seeds": list(SEEDS), "scale": {"generate.size": 64}, "variants": VARIANTS,
            "cost": cost, "results": results, "comparisons": compare(results)}  # fmt: skip


def test_experiments_are_named_and_set_params_as_dvc_expects() -> None:
    experiments = {experiment.name: experiment for experiment in grid({"generate.size": 64})}
    assert len(experiments) == len(VARIANTS) * len(SEEDS)
    args = experiments["study-batchnorm-s2"].queue_args()
    assert args[:6] == ["exp", "run", "--queue", "-f", "-n", "study-batchnorm-s2"]
    assert args[6:-1:2] == ["-S"] * 4 and args[-1] == "evaluate"
    assert args[7:-1:2] == ["seed=2", "train.seed=2", "generate.size=64", "model.encoder_batchnorm=true"]
    assert Experiment("x", {"a": 1.5}, "train_vanilla").queue_args()[-3:] == ["-S", "a=1.5", "train_vanilla"]


def experiment(name: str, rev: str, timestamp: str | None, **extra: object) -> dict:
    """One experiment as `dvc exp show --json` prints it."""
    return {"revs": [{"name": name, "rev": rev, "data": {"timestamp": timestamp}}], **extra}


def test_finished_study_experiments_are_found_in_exp_show() -> None:
    newer = experiment("study-baseline-s0", "abc", "2026-11-22T03:02:21")
    older = experiment("study-baseline-s0", "0ld", "2026-11-21T10:00:00")
    running = experiment("study-wide-s1", "def", None, executor={"state": "running"})
    failed = experiment("study-wide-s2", "fa1", "2026-11-22T03:02:00", executor={"state": "failed"})
    queued = experiment("study-wide-s0", "0k", "2026-11-22T03:03:00", executor={"state": "success"})
    other = experiment("my-experiment", "123", "2026-11-22T03:00:00")
    shown = [
        {"rev": "workspace", "experiments": None},
        {"rev": "HEAD", "experiments": [newer, running, failed, queued, other]},
        {"rev": "HEAD~1", "experiments": [older]},
    ]
    assert finished(shown, prefix="study-") == {"study-baseline-s0": "abc", "study-wide-s0": "0k"}
    assert finished(shown, prefix="my-") == {"my-experiment": "123"}
    since = datetime.datetime(2026, 11, 22, 3, 1)  # a grid that started then: only what finished after
    assert finished(shown, since=since) == {"study-baseline-s0": "abc", "study-wide-s0": "0k"}


def test_spread_floors_unreached_targets_by_their_run_length() -> None:
    assert spread([3.0, 1.0, 2.0]) == {
        "mean": 2.0,
        "min": 1.0,
        "max": 3.0,
        "reached": 3,
        "not_reached_by": None,
        "values": [3.0, 1.0, 2.0],
    }
    partly = spread([30, None, 10], floors=[60, 60, 60])
    assert (partly["mean"], partly["min"], partly["max"], partly["reached"]) == (None, 10, None, 2)
    never = spread([None, None], floors=[50, 60])  # above 50 and above 60: at least above 50
    assert (never["min"], never["max"], never["not_reached_by"]) == (50, None, 60)
    assert spread([None, None])["min"] is None  # no floor: nothing is known


def test_results_and_verdicts_follow_the_metrics() -> None:
    study = fake_study()
    vanilla = study["results"]["baseline"]["vanilla"]["position_recall"]
    assert vanilla["values"] == pytest.approx([0.4, 0.5, 0.6]) and vanilla["mean"] == pytest.approx(0.5)
    rows = {(r["question"], r["quantity"]): r for r in study["comparisons"]}
    versus_wide = rows[("Q2a parameters: coordbias vs vanilla widened past coordconv", "position_recall")]
    assert versus_wide["separated"] and versus_wide["difference"] == pytest.approx(0.41)
    same = rows[("Q3 coordconv with r vs without", "position_recall")]
    assert not same["separated"] and same["difference"] == pytest.approx(0.0)
    never = rows[("Q1 BatchNorm: coordbias vs vanilla, both with BatchNorm", "steps_to_position_recall_0_9")]
    assert never["difference"] is None and never["separated"]  # coordbias by step 42, vanilla not by 60
    faster = rows[("Q3 coordbias vs coordconv", "steps_to_position_recall_0_9")]
    assert faster["difference"] == pytest.approx(0.0) and not faster["separated"]


def test_widened_vanilla_has_more_parameters_than_coordconv_at_the_study_scale() -> None:
    width = SCALE["model.width"]
    wide = count_parameters(FCN(ModelSpec("vanilla", VARIANTS["wide"]["model.width"])))
    assert wide > count_parameters(FCN(ModelSpec("coordconv", width, with_r=True)))


def test_a_study_file_of_another_format_is_refused_in_one_line() -> None:
    assert check_study(fake_study(), "study.json")["seeds"] == list(SEEDS)
    older = fake_study()
    del older["comparisons"][0]["a_spread"]["not_reached_by"]
    for bad in (older, [], {"comparisons": "none"}):
        with pytest.raises(BadInput, match=r"study\.json: not a study in this version's format"):
            check_study(bad, "study.json")


def changed_stages(checkout: Path) -> set[str]:
    """Stages of study/dvc.yaml that `dvc status` reports out of date."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", "study/dvc.yaml"],
        cwd=checkout, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {name.split(":")[-1] for name in json.loads(status.stdout)}


@pytest.mark.slow
def test_dvc_status_shows_the_study_and_the_benchmark_stale_when_their_inputs_change(checkout: Path) -> None:
    """The report reads both; they are fresh as committed and go stale on their own inputs only."""
    assert changed_stages(checkout) == set()
    params = checkout / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("lr: 0.002", "lr: 0.003"))
    assert changed_stages(checkout) == {"study"}  # the experiments inherit train.lr
    params.write_text(original.replace("min_miou: 0.5", "min_miou: 0.6"))
    assert changed_stages(checkout) == set()  # the gate's thresholds are no input of either
    params.write_text(original)
    with (checkout / "src/posconv/grid.py").open("a") as source:
        source.write("# another grid\n")
    assert changed_stages(checkout) == {"study"}
    with (checkout / "src/posconv/layers.py").open("a") as source:
        source.write("# another layer\n")
    assert changed_stages(checkout) == {"study", "bench_layers"}
