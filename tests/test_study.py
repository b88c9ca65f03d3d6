"""The study: its grid, its reading of `dvc exp show --json`, and its spreads and verdicts over seeds."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posconv.errors import BadInput
from posconv.grid import (
    ALL,
    REPLICATES,
    SCALE,
    SEEDS,
    T975,
    VARIANTS,
    aggregate,
    check_study,
    compare,
    paired_interval,
    quantities,
    verdict,
)
from posconv.registry import FAMILIES, LAYERS, model_metrics
from posconv.tools.experiments import Experiment, finished
from posconv.tools.study import grid

READERS = quantities([96], [8], [1.5])
# position recall by model: coordbias and its first form learn position, the families with coordinates
# too; vanilla and the content-adaptive layers alone do not; each seed adds jitter
RECALL = {"vanilla": 0.45, "coordbias": 0.93, "coordconv": 0.93, "involution": 0.45, "deform": 0.45,
          "coordinvolution": 0.9, "coorddeform": 0.9, "dss": 0.45, "dss_bilinear": 0.45, "dss_deform": 0.45,
          "local": 0.92}  # fmt: skip
SCALE_ERROR = {"dss": 0.05, "dss_deform": 0.04}  # the others 0.1


def fake_run(variant: str, seed: int) -> dict:
    """Metrics files of one experiment, as its pipeline writes them."""
    files = {}
    for model in VARIANTS[variant].models:
        recall = RECALL[model] + 0.01 * (seed % 3)
        scores = {"recall": [0.99, recall, recall, recall], "miou": recall - 0.1}
        evaluation, training = model_metrics(model)
        files[evaluation] = {
            **scores, "transfer": {"96": scores},
            "equivariance": {"translation": {"8": 1 - recall}, "scale": {"1.5": SCALE_ERROR.get(model, 0.1)}},
        }  # fmt: skip
        files[training] = {
            "steps_to_position_recall_0_9": None if recall < 0.9 else 20 + seed, "steps": 60,
            "parameters": 100 if model == "vanilla" else 110, "train_images_per_s": 50.0,
        }  # fmt: skip
    return files


def fake_runs() -> dict[str, dict]:
    return {
        f"study-{name}-s{s}": fake_run(name, s) for name, variant in VARIANTS.items() for s in variant.seeds
    }


def fake_study() -> dict:
    results = aggregate(fake_runs(), READERS, model_metrics)
    return {
        "replicates": REPLICATES, "scale": {"generate.size": 64}, "cost": {"wall_s": 100.0, "cpu_s": 190.0},
        "variants": {n: {"changes": v.changes, "models": v.models, "seeds": v.seeds}
                     for n, v in VARIANTS.items()},
        "margins": {name: q.margin for name, q in READERS.items()},
        "results": results, "comparisons": compare(results, READERS),
    }  # fmt: skip


def test_experiments_are_named_and_set_params_as_dvc_expects() -> None:
    experiments = {experiment.name: experiment for experiment in grid({"generate.size": 64})}
    assert len(experiments) == sum(len(v.seeds) for v in VARIANTS.values()) and len(SEEDS) >= 10
    assert all(v.seeds == SEEDS for v in VARIANTS.values())  # every variant on both replicates
    args = experiments["study-batchnorm-s2"].queue_args()
    assert args[:5] == ["exp", "run", "--queue", "-n", "study-batchnorm-s2"]  # no --force: run-cache
    assert args[5:-1:2] == ["-S"] * 4 and args[-1] == "evaluate"
    assert args[6:-1:2] == ["seed=2", "train.seed=2", "generate.size=64", "model.encoder_batchnorm=true"]
    assert experiments["study-families-s3"].queue_args()[-1] == "families/dvc.yaml:evaluate"
    assert Experiment("x", {"a": 1.5}, "train_vanilla").queue_args()[-3:] == ["-S", "a=1.5", "train_vanilla"]
    assert f"generate.size={SCALE['generate.size']}" in grid(SCALE)[0].queue_args()  # the run step's grid
    names = [e.name for e in grid({})]  # variant by variant: the run-cache serves later variants
    assert names.index("study-baseline-s9") < names.index("study-per_input-s0")


def test_the_replicates_are_disjoint_and_at_least_five_seeds_each() -> None:
    first, second = REPLICATES.values()
    assert len(first) >= 5 and len(second) >= 5 and not set(first) & set(second)
    assert first + second == SEEDS


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

    def revisions(found: dict) -> dict:
        return {name: run.revision for name, run in found.items()}

    assert revisions(finished(shown, prefix="study-")) == {"study-baseline-s0": "abc", "study-wide-s0": "0k"}
    assert revisions(finished(shown, prefix="my-")) == {"my-experiment": "123"}
    since = datetime.datetime(2026, 11, 22, 3, 1)  # a grid that started then: only what finished after
    assert revisions(finished(shown, since=since)) == {"study-baseline-s0": "abc", "study-wide-s0": "0k"}
    assert finished(shown, prefix="study-")["study-wide-s0"].at == datetime.datetime(2026, 11, 22, 3, 3)


def _t_density(x: float, df: int) -> float:
    return math.exp(
        math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - math.log(math.pi * df) / 2
        - (df + 1) / 2 * math.log1p(x * x / df)
    )  # fmt: skip


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantiles_leave_two_and_a_half_percent_above(df: int) -> None:
    """Simpson's rule on Student's t density from 0 to the tabled quantile gives 0.475."""
    q, n = T975[df], 20_000
    h = q / n
    inner = sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, n))
    area = h / 3 * (_t_density(0, df) + inner + _t_density(q, df))
    assert area == pytest.approx(0.475, abs=2e-4)


def test_paired_interval_by_hand() -> None:
    mean, low, high = paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # sd sqrt(2.5), t(0.975, 4) = 2.776
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    with pytest.raises(ValueError, match="expected 2 to"):
        paired_interval([1.0])


@pytest.mark.parametrize(
    ("low", "high", "mean", "expected"),
    [
        (0.10, 0.30, 0.20, "A higher"),
        (-0.30, -0.10, -0.20, "A lower"),
        (0.01, 0.05, 0.03, "undecided"),  # excludes 0 but smaller than the margin: not yet negligible
        (-0.04, 0.04, 0.0, "no real difference"),
        (0.01, 0.04, 0.025, "no real difference"),  # real but inside the margin: negligible
        (-0.10, 0.30, 0.10, "undecided"),
    ],
)
def test_the_verdict_rule(low: float, high: float, mean: float, expected: str) -> None:
    assert verdict(low, high, mean, 0.05) == expected
    assert verdict(low, high, mean, None) is None


def test_results_and_verdicts_follow_the_metrics() -> None:
    study = fake_study()
    vanilla = study["results"]["baseline"]["vanilla"]["position_recall"]
    assert vanilla["values"] == pytest.approx([0.45 + 0.01 * (s % 3) for s in SEEDS])
    rows = {(r["question"], r["quantity"]): r for r in study["comparisons"]}
    bn = rows[("Q1 BatchNorm: coordbias vs vanilla, both with BatchNorm", "position_recall")]
    assert bn["all"]["difference"] == pytest.approx(0.48) and bn["replicated"]
    assert {bn[name]["verdict"] for name in (*REPLICATES, ALL)} == {"A higher"}
    same = rows[("Q3 coordbias vs coordconv", "position_recall")]
    assert same["all"]["verdict"] == "no real difference" and same["replicated"]
    steps = rows[("Headline: coordbias vs vanilla", "steps_to_position_recall_0_9")]
    assert study["results"]["baseline"]["vanilla"]["steps_to_position_recall_0_9"]["censored"] == len(SEEDS)
    assert steps["all"]["verdict"] == "A lower"  # reached by step 20-29 against never within 60
    family = rows[("Families: coordinvolution vs involution", "translation_error_8")]
    assert family["all"]["difference"] == pytest.approx(-0.45) and family["all"]["verdict"] == "A lower"
    assert family["seeds"] == list(VARIANTS["families"].seeds)  # the seeds both arms ran
    assert family["B"] is not None and family["replicated"]  # every variant runs both replicates
    versus_vanilla = rows[("Families: involution vs vanilla", "position_recall")]
    assert versus_vanilla["seeds"] == list(SEEDS) and versus_vanilla["A"] is not None
    assert rows[("Headline: coordbias vs vanilla", "parameters")]["all"]["verdict"] is None
    dss = rows[("DSS: dss vs vanilla", "scale_error_1.5")]
    assert dss["answers"] and dss["all"]["verdict"] == "A lower"  # a scale question, answered by scale
    assert not rows[("DSS: dss vs vanilla", "position_recall")]["answers"]
    assert (
        rows[("Spatial-specific filter: local vs vanilla", "position_recall")]["all"]["verdict"] == "A higher"
    )


def test_a_verdict_that_differs_between_replicates_is_not_replicated() -> None:
    runs = fake_runs()
    for seed in REPLICATES["B"]:  # the second replicate: BatchNorm erases coordbias's gain
        scores = runs[f"study-batchnorm-s{seed}"]["metrics/evaluate/coordbias.json"]
        scores["recall"] = [0.99, 0.45, 0.45, 0.45 + 0.01 * seed]
    results = aggregate(runs, READERS, model_metrics)
    rows = {(r["question"], r["quantity"]): r for r in compare(results, READERS)}
    bn = rows[("Q1 BatchNorm: coordbias vs vanilla, both with BatchNorm", "position_recall")]
    assert bn["A"]["verdict"] == "A higher" and bn["B"]["verdict"] != "A higher" and not bn["replicated"]


def test_every_factory_layer_is_in_the_study() -> None:
    studied = {model for variant in VARIANTS.values() for model in variant.models}
    assert studied == set(LAYERS) | set(FAMILIES)
    assert model_metrics("deform")[0] == "metrics/families/deform.json"


def test_a_study_file_of_another_format_is_refused_in_one_line() -> None:
    assert check_study(fake_study(), "study.json")["replicates"] == REPLICATES
    older = fake_study()
    del older["comparisons"][0]["replicated"]
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
    grid = checkout / "src/posconv/grid.py"
    grid_source = grid.read_text()
    grid.write_text(grid_source + "# another grid\n")
    assert changed_stages(checkout) == {"study", "report"}  # the study's report renders the grid's rows
    grid.write_text(grid_source)
    with (checkout / "src/posconv/layers/factory.py").open("a") as source:
        source.write("# another layer\n")
    assert changed_stages(checkout) == {"study", "bench_layers"}
