"""The report's numbers are the metrics files' numbers, and its verdict follows them."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_study import fake_study

from posconv.compare import headline
from posconv.config import load_params
from posconv.reporting import (
    family_cost_section,
    fmt,
    judged,
    layer_cost_section,
    render,
    render_study,
    said_by,
    study_section,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vanilla", "coordbias", "coordconv")


def fake_metrics(position_gain: float) -> tuple[dict, dict, dict]:
    evaluation, training = {}, {}
    for index, model in enumerate(MODELS):
        gain = position_gain if model != "vanilla" else 0.0
        evaluation[model] = {
            "miou": 0.5 + index / 10, "pixel_accuracy": 0.9,
            "recall": [0.99, *(r + gain for r in (0.6, 0.7, 0.5))],
            "position_error_rate": 0.3 - gain, "circle_accuracy": 0.6 + gain, "inference_images_per_s": 100.0,
            "transfer": {"96": {"recall": [0.99, 0.5 + gain, 0.5, 0.5]}},
            "equivariance": {"translation": {"8": 0.1 + index}, "scale": {"1.5": 0.2}},
        }  # fmt: skip
        training[model] = {
            "parameters": 1000 + 500 * index, "train_images_per_s": 20.0 - index,
            "steps_to_position_recall_0_9": None if model == "vanilla" else 40 * index, "steps": 60,
        }  # fmt: skip
    data = {name: {"images": count} for name, count in (("train", 6), ("val", 2), ("test", 2))}
    return evaluation, training, data


def fake_bench() -> dict:
    """metrics/bench_layers.json of two layer cases and the stack, on one CPU setting."""
    cases = [("3->8 @128", 1.08, 1.02), ("8->8 @128", 1.01, 1.12), ("encoder stack", 1.03, 1.04)]
    results = [
        {"device": "cpu", "dtype": "float32", "format": "NHWC", "width": 8, "layer": layer,
         "coordbias_ratio": bias, "coordconv_ratio": conv, "coordbias_fused_ratio": 0.99}
        for layer, bias, conv in cases
    ]  # fmt: skip
    families = [
        {"format": "NHWC", "layer": layer, "ms": ms, "vanilla_ms": 40.0, "ratio": ms / 40.0, "target": target}
        for layer, ms, target in (("involution", 14.0, 1.0), ("deform", 132.0, 4.0))
    ]
    family_layers = [{"layer": "encoder stack", "vanilla_ms": 50.0, "dss_ratio": 2.5, "local_ratio": 1.5}]
    return {
        "devices": {"cpu": "AMD EPYC"}, "batch": 16, "targets": {"cpu": 1.1}, "results": results,
        "families": families, "family_layers": family_layers,
    }  # fmt: skip


def test_family_cost_shows_each_ratio_and_its_target() -> None:
    section = family_cost_section(fake_bench())
    assert table_row(section, "NHWC", "`deform`")[2:] == [fmt(132.0), fmt(40.0), fmt(3.3), fmt(4.0)]
    assert table_row(section, "encoder stack") == ["encoder stack", fmt(50.0), fmt(2.5), fmt(1.5)]
    assert "`dss`" in section and "`local`" in section


def test_layer_cost_shows_the_stack_and_the_worst_single_layer() -> None:
    row = table_row(layer_cost_section(fake_bench()), "cpu (AMD EPYC)")
    assert row[1:] == [
        "float32",
        "NHWC",
        "8",
        "1.0300",
        "1.0400",
        "0.9900",
        "n/a",
        "1.1200 (`8->8 @128`)",
        "1.1000",
    ]


def table_row(report: str, first_cell: str, containing: str = "") -> list[str]:
    lines = report.splitlines()
    line = next(line for line in lines if line.startswith(f"| {first_cell} |") and containing in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.parametrize(
    ("gain", "word"), [(0.2, "agrees with"), (-0.2, "contradicts"), (0.01, "does not reproduce")]
)
def test_report_numbers_come_from_the_metrics(gain: float, word: str) -> None:
    evaluation, training, data = fake_metrics(gain)
    summary = headline("coordbias", evaluation, training)
    study = fake_study()
    params = load_params(ROOT / "params.yaml")
    report = render(params, summary, evaluation, training, data)
    assert "(study.md)" in report and "## The study" not in report  # the card's report waits for no study
    report_of_study = render_study(study, fake_bench())
    for key in (
        "miou",
        "position_recall",
        "position_error_rate",
        "steps_to_position_recall_0_9",
        "parameters",
    ):
        values = summary[key]
        assert table_row(report, f"`{key}`")[1:] == [
            fmt(values[m]) for m in ("vanilla", "coordbias", "difference")
        ]
    for model in MODELS:
        row = table_row(report, f"`{model}`")
        assert row[1] == fmt(evaluation[model]["miou"])
        assert row[3:7] == [fmt(r) for r in evaluation[model]["recall"]]
        transfer = (1.5 + gain) / 3 if model != "vanilla" else 0.5
        assert row[9:12] == [fmt(transfer), fmt(0.1 + MODELS.index(model)), fmt(0.2)]
        assert row[-1] == fmt(training[model]["steps_to_position_recall_0_9"])
    assert f"**{word}" in report
    for row in study["comparisons"]:
        if row["quantity"] == "position_recall":
            cells = table_row(report_of_study, row["question"], "| position_recall |")
            variant, model = row["a"].split("/")
            assert cells[2] == fmt(study["results"][variant][model]["position_recall"]["mean"])
            assert cells[4:7] == [judged(row["all"]), said_by(row["A"]), said_by(row["B"])]
    said = report.split("## What the numbers say")[1].split("##")[0]
    assert fmt(summary["position_recall"]["coordbias"]) in said
    assert "after 40 steps for `coordbias`, and not within its 60 steps for `vanilla`" in said


def test_headline_differences_and_ratios() -> None:
    evaluation, training, _ = fake_metrics(0.2)
    summary = headline("coordconv", evaluation, training)
    assert summary["miou"]["difference"] == pytest.approx(0.2)
    assert summary["parameters"]["difference"] == 1000
    assert summary["parameter_overhead"] == pytest.approx(1.0)
    assert summary["train_time_ratio"] == pytest.approx(20 / 18)
    assert summary["steps_to_position_recall_0_9"]["difference"] is None


def test_each_question_is_answered_in_one_line_with_its_replicates() -> None:
    study = fake_study()
    lines = study_section(study).splitlines()

    def answer(question: str) -> str:
        return next(line for line in lines if line.startswith(f"- **{question}**"))

    rows = {(r["question"], r["quantity"]): r for r in study["comparisons"]}
    question = "Q1 BatchNorm: coordbias vs vanilla, both with BatchNorm"
    bn = answer(question)
    assert f"A - B {judged(rows[question, 'position_recall']['all'])}" in bn
    assert "(replicates: A higher / A higher, replicated)" in bn
    assert answer("Q3 coordbias vs coordconv").count("no real difference / no real difference") == 2
    assert "(replicates: A higher / A higher, replicated)" in answer("Families: coorddeform vs deform")
    point = next(line for line in lines if line.startswith("- Open question 1, BatchNorm"))
    assert "position recall **A higher**" in point


def test_every_model_of_the_study_has_a_row() -> None:
    section = study_section(fake_study())
    for name in ("baseline/vanilla", "baseline/coordbias", "per_input/coordbias", "families/coorddeform"):
        assert f"| `{name}` |" in section


def test_the_study_says_how_many_trainings_the_run_cache_served() -> None:
    study = fake_study()
    study["cost"] |= {"trainings_run": 150, "trainings_served_by_run_cache": 20}
    assert "DVC's run-cache served 20 of its 170 trainings" in study_section(study)
    study["cost"] |= {"trainings_run": None, "trainings_served_by_run_cache": None}
    assert "the trainings DVC's run-cache served were not counted" in study_section(study)
