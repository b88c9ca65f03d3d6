"""The study's grid, and its reading of `dvc exp show --json` into spreads and verdicts."""

from __future__ import annotations

import pytest

from posconv.config import LAYERS
from posconv.study import SEEDS, VARIANTS, aggregate, compare, experiment_args, experiment_revisions, spread


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
            "steps_to_position_recall_0_9": None if model == "vanilla" else 40 + seed,
            "parameters": 100 if model == "vanilla" else 110, "train_images_per_s": 50.0,
        }  # fmt: skip
    return files


def fake_study() -> dict:
    results = aggregate({f"study-{v}-s{s}": fake_run(v, s) for v in VARIANTS for s in SEEDS})
    cost = {"wall_s": 100.0, "cpu_s": 190.0}
    return {"seeds": list(SEEDS), "scale": {"generate.size": 64}, "variants": VARIANTS,
            "cost": cost, "results": results, "comparisons": compare(results)}  # fmt: skip


def test_experiments_are_named_and_set_params_as_dvc_expects() -> None:
    args = experiment_args("batchnorm", 2, {"generate.size": 64})
    assert args[:6] == ["dvc", "exp", "run", "--temp", "-n", "study-batchnorm-s2"]
    assert args[6:-1:2] == ["-S"] * 4 and args[-1] == "evaluate"
    assert args[7:-1:2] == ["seed=2", "train.seed=2", "generate.size=64", "model.encoder_batchnorm=true"]


def test_finished_study_experiments_are_found_in_exp_show() -> None:
    """The shape `dvc exp show --json` prints: commits, each with experiments and their revisions."""
    experiment = {"revs": [{"name": "study-baseline-s0", "rev": "abc"}]}
    running = {"revs": [{"name": "study-wide-s1", "rev": "def"}], "executor": {"state": "running"}}
    other = {"revs": [{"name": "my-experiment", "rev": "123"}]}
    shown = [
        {"rev": "workspace", "experiments": None},
        {"rev": "HEAD", "experiments": [experiment, running, other]},
    ]
    assert experiment_revisions(shown) == {"study-baseline-s0": "abc"}


def test_spread_counts_unreached_targets_apart() -> None:
    assert spread([3.0, None, 1.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "values": [3.0, None, 1.0]}
    assert spread([None, None])["mean"] is None


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
    assert never["difference"] is None and not never["separated"]
