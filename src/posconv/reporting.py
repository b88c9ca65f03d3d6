"""The reports as Markdown, rendered from the metrics files the report stages read: the card's
(`plots/report.md`), the study's (`plots/study.md`) and the coordinate benchmark's
(`plots/coordinates.md`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from posconv.config import Params
from posconv.metrics import position_recall
from posconv.registry import (
    BASELINE,
    CLASS_NAMES,
    COORDBIAS,
    COORDCONV,
    LAYERS,
    PAPER_CONV,
    PER_INPUT,
    VANILLA,
)

MARGIN = 0.05  # a position-recall difference smaller than this is not called a gain or a loss
CLASSES = tuple(f"{index} {name.replace('_', ' ')}" for index, name in enumerate(CLASS_NAMES))
FIGURES = {
    "Training loss (per step) and validation loss": "evaluate/losses.png",
    "Test recall per class (the seed's figure)": "evaluate/recall.png",
    "Pixel confusion matrices (rows: true class, normalised)": "evaluate/confusion.png",
    "Where each model fails: circle accuracy against centre position": "evaluate/position.png",
    "Test images: input, label, and each model's prediction": "evaluate/predictions.png",
    "Data preview: image and label": "data/preview.png",
}


def fmt(value: float | int | str | None) -> str:
    """One number format for the whole report (the report test uses it too)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.4f}"  # rates: 1 decimal; fractions: 4


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
        for row in rows
    ]
    return "\n".join(lines)


def params_section(params: Params, data: dict) -> str:
    groups = {name: getattr(params, name).model_dump() for name in ("generate", "split", "model", "train")}
    rows = [
        [f"`{group}.{key}`", fmt(value)] for group, values in groups.items() for key, value in values.items()
    ]
    rows = [["`seed` (data)", fmt(params.seed)], ["`device`", params.device], *rows]
    counts = ", ".join(f"{name} {fmt(split['images'])}" for name, split in data.items())
    return f"## Setup\n\nImages per split: {counts}.\n\n" + table(["param", "value"], rows)


def headline_section(summary: dict) -> str:
    layer = summary["layer"]
    rows = [
        [f"`{key}`", *(values[m] for m in (BASELINE, layer, "difference"))]
        for key, values in summary.items()
        if isinstance(values, dict)
    ]
    rows += [
        ["`parameter_overhead`", "", "", summary["parameter_overhead"]],
        ["`train_time_ratio` (layer / vanilla time per image)", "", "", summary["train_time_ratio"]],
    ]
    return f"## Headline: `{layer}` against `{BASELINE}` (test split)\n\n" + table(
        ["quantity", BASELINE, layer, "difference"], rows
    )


def models_section(evaluation: dict[str, dict], training: dict[str, dict]) -> str:
    first = next(iter(evaluation.values()))
    sizes = list(first["transfer"])
    errors = [(kind, amount) for kind, by_amount in first["equivariance"].items() for amount in by_amount]
    header = [
        "model",
        "mIoU",
        "pixel accuracy",
        *(f"recall {c}" for c in CLASSES),
        "position error rate",
        "circle accuracy",
        *(f"position recall at {size} px" for size in sizes),
        *(f"{kind} error {amount}" for kind, amount in errors),
        "parameters",
        "train img/s",
        "steps to position recall 0.9",
    ]
    rows = [
        [
            f"`{m}`",
            e["miou"],
            e["pixel_accuracy"],
            *e["recall"],
            e["position_error_rate"],
            e["circle_accuracy"],
            *(position_recall(e["transfer"][size]["recall"]) for size in sizes),
            *(e["equivariance"][kind][amount] for kind, amount in errors),
            training[m]["parameters"],
            training[m]["train_images_per_s"],
            training[m]["steps_to_position_recall_0_9"],
        ]
        for m, e in evaluation.items()
    ]
    note = (
        "Transfer: position recall on unseen scenes drawn by the same rules at other image sides "
        "(`evaluate.sizes`; coordinates are relative to the image, DESIGN.md §3). Equivariance error: "
        "‖Φ(T f) − T Φ(f)‖ / ‖T Φ(f)‖ of the logits under a translation by that many pixels (interior "
        "pixels) or a rescaling by that factor (DESIGN.md §5)."
    )
    return f"## All models (test split)\n\n{note}\n\n" + table(header, rows)


def _reached(steps: int | None, total: int) -> str:
    return f"after {fmt(steps)} steps" if steps is not None else f"not within its {fmt(total)} steps"


def verdict(summary: dict, training: dict[str, dict]) -> str:
    """What the headline says about the seed study's claim, in words chosen by the numbers."""
    layer, recall = summary["layer"], summary["position_recall"]
    gain = recall["difference"]
    if gain > MARGIN:
        word = "agrees with the seed study"
    elif gain < -MARGIN:
        word = "contradicts the seed study"
    else:
        word = f"does not reproduce the seed study's gap (difference within {MARGIN})"
    finding = (
        f"**{word}**: test recall on the position classes is {fmt(recall[layer])} for `{layer}` "
        f"against {fmt(recall[BASELINE])} for `{BASELINE}` (difference {fmt(gain)})"
    )
    steps = summary["steps_to_position_recall_0_9"]
    reached = {m: _reached(steps[m], training[m]["steps"]) for m in (layer, BASELINE)}
    speed = (
        f"Validation recall on the position classes reached 0.9 {reached[layer]} for `{layer}`, "
        f"and {reached[BASELINE]} for `{BASELINE}`."
    )
    cost = (
        f"The layer adds {fmt(summary['parameters']['difference'])} parameters "
        f"({fmt(100 * summary['parameter_overhead'])} % of vanilla) and trains at "
        f"{fmt(summary['train_time_ratio'])}x vanilla's time per image."
    )
    caveat = "One training seed here: the open questions below repeat the comparison over several seeds."
    return f"## What the numbers say\n\nThis run {finding}. {speed} {cost} {caveat}"


BATCHNORM_ARGUMENT = (
    "Why BatchNorm cannot cancel the coordinate bias as it cancels a plain one: BatchNorm subtracts "
    "each channel's mean over the batch and the pixels, so a plain bias (one constant per channel) is "
    "removed exactly and its gradient is zero; the coordinate term `a X + b Y` differs from pixel to "
    "pixel, so only its mean is removed and its gradient is not zero (`tests/test_layers.py` checks "
    "both on a real BatchNorm2d in training mode)."
)
RULE = (
    "**Verdict rule** (fixed in `posconv/grid.py` before the numbers): each seed gives a paired "
    "difference A - B (both arms share the seed's data, training order and initial draws); its 95% "
    "paired-t interval over the seeds decides: *A higher/lower* when the interval excludes 0 and the "
    "mean difference is at least the quantity's margin, *no real difference* when the whole interval "
    "lies within ± the margin, *undecided* otherwise. Margins: 0.05 for recalls and mIoU, 20 steps for "
    "steps to validation position recall 0.9 (a seed that never reached it counts as its run's step "
    "count, a lower bound), 0.02 for equivariance errors. The rule is applied to each of the two "
    "independent replicates (seeds 0-4 and 5-9) and to all the seeds both arms ran."
)
WORDS = {  # how an answer's line names a quantity; others by their names
    "position_recall": "test position recall",
    "steps_to_position_recall_0_9": "steps to validation position recall 0.9",
}


def words(quantity: str) -> str:
    return WORDS.get(quantity, quantity.replace("_", " "))


def judged(side: dict) -> str:
    """A difference with its 95% interval and verdict."""
    return f"{fmt(side['difference'])} [{fmt(side['low'])}, {fmt(side['high'])}]: {side['verdict']}"


def said_by(side: dict | None) -> str:
    """A replicate's verdict, or why there is none."""
    return side["verdict"] if side else "not run"


REPLICATED = {True: "replicated", False: "NOT replicated", None: "one replicate"}  # in an answer's line
REPLICATED_CELL = {True: "yes", False: "**no**", None: "one replicate"}  # in the comparisons table


def _mean(study: dict, arm: str, quantity: str) -> float:
    variant, model = arm.split("/")
    return study["results"][variant][model][quantity]["mean"]


def answer(study: dict, rows: dict[str, dict]) -> str:
    """One question in a line: the verdicts on the quantities that answer it (position recall and
    learning speed, or the scale equivariance errors), per replicate."""
    first = next(iter(rows.values()))
    parts = []
    for quantity, row in rows.items():
        if not row["answers"]:
            continue
        a, b = (_mean(study, row[arm], quantity) for arm in ("a", "b"))
        parts.append(
            f"{words(quantity)} {fmt(a)} vs {fmt(b)}, A - B {judged(row['all'])} "
            f"(replicates: {said_by(row['A'])} / {said_by(row['B'])}, {REPLICATED[row['replicated']]})"
        )
    return f"- **{first['question']}** (A `{first['a']}`, B `{first['b']}`): " + "; ".join(parts) + "."


def family_table(study: dict) -> str:
    """Every model of the study in one row: means over all seeds."""
    quantities = [q for q in study["margins"] if q != "train_images_per_s"] + ["train_images_per_s"]
    rows = [
        [f"`{variant}/{model}`", *(values[q]["mean"] for q in quantities)]
        for variant, models in study["results"].items()
        for model, values in models.items()
        if variant != "per_input" or model == "coordbias"  # its other networks are the baseline's again
    ]
    header = ["model", *(q.replace("_0_9", " 0.9").replace("_", " ") for q in quantities)]
    return table(header, rows)


def comparisons_table(study: dict) -> str:
    header = [
        "question",
        "quantity",
        "A",
        "B",
        "A - B [95% CI], all seeds",
        "seeds 0-4",
        "seeds 5-9",
        "replicated",
    ]
    rows = [
        [row["question"], row["quantity"], _mean(study, row["a"], row["quantity"]),
         _mean(study, row["b"], row["quantity"]), judged(row["all"]), said_by(row["A"]),
         said_by(row["B"]), REPLICATED_CELL[row["replicated"]]]
        for row in study["comparisons"] if row["margin"] is not None
    ]  # fmt: skip
    return table(header, rows)


def agreement(study: dict) -> str:
    """The seed study's claims, point by point, against this study's verdicts."""
    rows = {(row["question"], row["quantity"]): row for row in study["comparisons"]}

    def said(question: str, quantity: str = "position_recall") -> str:
        return rows[question, quantity]["all"]["verdict"]

    params = {m: _mean(study, f"baseline/{m}", "parameters") for m in ("vanilla", "coordbias", "coordconv")}
    per_input = _mean(study, "per_input/coordbias", "parameters") - params["vanilla"]
    extra = {m: params[m] - params["vanilla"] for m in ("coordbias", "coordconv")}
    headline = "Headline: coordbias vs vanilla"
    first_form = "Seed's first form: per-input-channel vs reduced coordbias"
    q3 = "Q3 coordbias vs coordconv"
    points = [
        f"Coordbias learns the position classes better than vanilla (seed 000): position recall "
        f"**{said(headline)}**, steps to 0.9 **{said(headline, 'steps_to_position_recall_0_9')}**.",
        f"About 90% fewer extra parameters than CoordConv (seed 000): coordbias adds "
        f"{fmt(int(extra['coordbias']))}, coordconv {fmt(int(extra['coordconv']))} "
        f"({fmt(100 * (1 - extra['coordbias'] / extra['coordconv']))} % fewer).",
        f"Open question 1, BatchNorm: coordbias vs vanilla with BatchNorm, position recall "
        f"**{said('Q1 BatchNorm: coordbias vs vanilla, both with BatchNorm')}**.",
        f"Open question 2, parameters: the seed's first form adds {fmt(int(per_input))} parameters, "
        f"{fmt(per_input / extra['coordconv'])}x coordconv's; if parameters made the gain, it would beat "
        f"the reduced form: position recall **{said(first_form)}**.",
        f"Open question 3, coordbias vs CoordConv: position recall "
        f"**{said(q3)}**, steps to 0.9 **{said(q3, 'steps_to_position_recall_0_9')}**.",
        f"The seed's first layer stored a coordinate pair per input channel ({fmt(int(per_input))} extra "
        f"parameters here); its published code uses the reduced form. Per-input vs reduced: position "
        f"recall **{said(first_form)}**, steps to 0.9 "
        f"**{said(first_form, 'steps_to_position_recall_0_9')}**.",
    ]
    return "### Against the seed study, point by point\n\n" + "\n".join(f"- {p}" for p in points)


def run_cache_reuse(cost: dict) -> str:
    """How many of the grid's trainings DVC's run-cache served instead of running them."""
    served, ran = cost.get("trainings_served_by_run_cache"), cost.get("trainings_run")
    if served is None or ran is None:
        return "the trainings DVC's run-cache served were not counted"
    return f"DVC's run-cache served {served} of its {served + ran} trainings (another experiment ran them)"


def study_section(study: dict) -> str:
    """The study: the rule, the answers, every model in one table, every comparison."""
    by_question: dict[str, dict[str, dict]] = {}
    for row in study["comparisons"]:
        by_question.setdefault(row["question"], {})[row["quantity"]] = row
    answers = "\n".join(answer(study, rows) for rows in by_question.values())
    cost = study["cost"] or {}
    seeds = {name: len(v["seeds"]) for name, v in study["variants"].items()}
    scale = ", ".join(f"`{key}={value}`" for key, value in study["scale"].items())
    grid = ", ".join(f"{name} x {count} seeds" for name, count in seeds.items())
    command = f"python -m posconv.tools.study run -j {cost.get('jobs', 1)}"
    wall = cost.get("wall_s")
    intro = (
        f"{sum(seeds.values())} experiments ({grid}; data and training seed together) as DVC experiments "
        f"on DVC's queue (`{command}`) at a reduced scale: {scale}; the content-adaptive families at "
        f"`families.placement` of params.yaml. Total cost: {fmt(wall)} s wall "
        f"({(wall or 0) / 60:.1f} min), {fmt(cost.get('cpu_s'))} s CPU of the machine; "
        f"{run_cache_reuse(cost)}."
    )
    sections = [
        intro, RULE, BATCHNORM_ARGUMENT, answers, agreement(study),
        "### Every model, means over all seeds\n\n" + family_table(study),
        "### Every comparison\n\n" + comparisons_table(study),
    ]  # fmt: skip
    return "## The study: open questions, the seed's first form, transfer, equivariance, every family\n\n" + (
        "\n\n".join(sections)
    )


AWARE = tuple(layer for layer in LAYERS if layer != BASELINE)


def layer_cost_section(bench: dict) -> str:
    """Q3's speed: each layer's forward+backward time over nn.Conv2d's, from the layer benchmark: the
    default (plain) path, and the opt-in fused backend where the benchmark ran it."""
    settings: dict[tuple, list[dict]] = {}
    for row in bench["results"]:
        settings.setdefault((row["device"], row["dtype"], row["format"], row["width"]), []).append(row)
    variants = [*AWARE, *(f"{layer}_fused" for layer in AWARE)]
    rows = []
    for (device, dtype, memory_format, width), cases in settings.items():
        stack = next(case for case in cases if case["layer"] == "encoder stack")
        worst_ratio, worst = max(
            (max(case[f"{layer}_ratio"] for layer in AWARE), case["layer"])
            for case in cases
            if case is not stack
        )
        rows.append([
            f"{device} ({bench['devices'][device]})", dtype, memory_format, width,
            *(stack.get(f"{variant}_ratio") for variant in variants), f"{fmt(worst_ratio)} (`{worst}`)",
            fmt(bench["targets"][device]),
        ])  # fmt: skip
    intro = (
        "Forward+backward time over `nn.Conv2d`'s at the encoder's shapes (128 px, batch "
        f"{bench['batch']}), the median of per-repetition ratios over interleaved repetitions "
        "(`python -m posconv.tools.bench layers`, `metrics/bench_layers.json`): the six encoder "
        "convolutions with their ReLUs and pools as in the model, by the default path and by the opt-in "
        "fused backend (CPU only), and the worst single convolution of the six on the default path."
    )
    header = ["device", "dtype", "memory", "width"]
    header += [f"{variant.replace('_', ' ')}: stack" for variant in variants]
    header += ["worst single", "target"]
    return f"## Cost of the layers\n\n{intro}\n\n" + table(header, rows)


def family_cost_section(bench: dict) -> str:
    """The other families' speed, from the layer benchmark: the content-adaptive layers at 64->64
    channels (the targets: involution at most 1x nn.Conv2d, deform at most 4x), then every layer of
    families/dvc.yaml at the model's encoder shapes."""
    at_64 = table(
        ["memory", "layer", "ms", "nn.Conv2d ms", "x nn.Conv2d", "target"],
        [[r["format"], f"`{r['layer']}`", r["ms"], r["vanilla_ms"], r["ratio"], r["target"]]
         for r in bench["families"]],
    )  # fmt: skip
    layers = [key.removesuffix("_ratio") for key in bench["family_layers"][0] if key.endswith("_ratio")]
    at_model = table(
        ["case", "nn.Conv2d ms", *(f"`{layer}`" for layer in layers)],
        [[r["layer"], r["vanilla_ms"], *(r[f"{layer}_ratio"] for layer in layers)]
         for r in bench["family_layers"]],
    )  # fmt: skip
    return (
        "## Cost of the other families\n\nForward+backward at 64->64 channels, 64x64, batch 8, float32, "
        f"the fastest of 10 interleaved repetitions:\n\n{at_64}\n\nEvery layer of `families/dvc.yaml` over "
        "`nn.Conv2d` at the model's encoder shapes (width 16, 128 px, batch 8, channels_last), the median of "
        f"per-repetition ratios:\n\n{at_model}"
    )


def render(params: Params, summary: dict, evaluation: dict, training: dict, data: dict) -> str:
    """The card's report (`plots/report.md`): what `dvc repro` made, nothing that it did not."""
    figures = "\n\n".join(f"### {title}\n\n![{title}]({path})" for title, path in FIGURES.items())
    sections = [
        "# posconv: where-aware convolutions, the card's report",
        "Written by the `report` stage of `dvc repro`; every number is read from `metrics/`. The study "
        "over many seeds, the layer benchmark and the other pipelines are in [the study's report](study.md), "
        "made by `dvc repro study/dvc.yaml` (a separate, deliberate act: `dvc repro` never starts it); "
        "CoordConv's coordinate-transform benchmark is on [its own page](coordinates.md), made by "
        "`dvc repro coordinates/dvc.yaml`.",
        verdict(summary, training),
        headline_section(summary),
        models_section(evaluation, training),
        "## Figures\n\n" + figures,
        params_section(params, data),
    ]
    return "\n\n".join(sections) + "\n"


def render_study(study: dict, bench: dict) -> str:
    """The study's report (`plots/study.md`): the grid of experiments and the layer benchmark."""
    sections = [
        "# posconv: the study, the layer benchmark and the other pipelines",
        "Written by the `report` stage of `study/dvc.yaml` (`dvc repro study/dvc.yaml`); every number is "
        "read from `metrics/`. While the study is out of date with the code or params, `dvc status` lists "
        "its stages and the CI gate fails; this page is re-made only when the study is re-run.",
        study_section(study),
        layer_cost_section(bench),
        family_cost_section(bench),
    ]
    return "\n\n".join(sections) + "\n"


# ---- coordinates/dvc.yaml: CoordConv's coordinate-transform tasks, beside the paper ----


@dataclass(frozen=True)
class PaperFigure:
    value: float
    source: str  # where in the paper, with its words


COORDCONV_PAPER = {  # Liu et al., "An intriguing failing of convolutional neural networks and the CoordConv
    # solution", NeurIPS 2018 (arXiv:1807.03247): the figures the coordinates section sets its runs beside
    "conv_accuracy_uniform": PaperFigure(
        0.86, "§4.1: convolutional models reach at most about 86% test accuracy on the uniform split"
    ),
    "conv_hours_uniform": PaperFigure(1, "§4.1: and training them to that takes over an hour"),
    "coordconv_accuracy": PaperFigure(
        1.0, "§4.1: CoordConv reaches 100% test accuracy on both splits, in seconds"
    ),
    "speedup": PaperFigure(
        150, "Abstract: CoordConv solves the coordinate transform problem 150 times faster"
    ),
    "fewer_parameters_low": PaperFigure(10, "Abstract: with 10-100 times fewer parameters than convolution"),
    "fewer_parameters_high": PaperFigure(
        100, "Abstract: with 10-100 times fewer parameters than convolution"
    ),
    "conv_iou": PaperFigure(1.0, "§4.3: no convolutional model reaches a rendering IoU of 1.0"),
    "conv_minutes_to_iou_0_8": PaperFigure(
        90, "§4.3: one of the better ones needs 90 minutes to reach IoU 0.8"
    ),
}
METRIC_WORDS = {"accuracy": "test accuracy", "pixel_error": "test error (px)", "iou": "test IoU"}


def _paper_cell(task: str, split: str, arm: str) -> str:
    """What the paper reports for this row, from COORDCONV_PAPER."""
    paper = COORDCONV_PAPER
    if task == "classification" and arm == COORDCONV:
        return f"{fmt(paper['coordconv_accuracy'].value)} in seconds (§4.1)"
    if (task, split, arm) == ("classification", "uniform", PAPER_CONV):
        hours = paper["conv_hours_uniform"].value
        return f"at most ~{fmt(paper['conv_accuracy_uniform'].value)}, after > {hours} h (§4.1)"
    if (task, split, arm) == ("rendering", "uniform", PAPER_CONV):
        minutes = paper["conv_minutes_to_iou_0_8"].value
        return f"never {fmt(paper['conv_iou'].value)}; 0.8 after {minutes} min at best (§4.3)"
    return ""


def _spread_cell(values: dict) -> str:
    return f"{fmt(values['mean'])} [{fmt(values['min'])}, {fmt(values['max'])}]"


def _threshold_cell(values: dict, threshold: str) -> str:
    """`k/n` runs that reached the threshold, with their mean steps and training seconds."""
    reached, steps, seconds = (
        values["reached"][threshold],
        values["steps_to"][threshold],
        values["seconds_to"][threshold],
    )
    head = f"{reached}/{values['seeds']}"
    return (
        f"{head}: {fmt(steps['mean'])} steps, {fmt(seconds['mean'])} s"
        if reached
        else f"{head} (of {fmt(values['steps'])} steps)"
    )


def coordinates_table(summary: dict) -> str:
    """Task x split x arm: test metric over the seeds, parameters, steps and seconds to the paper's
    thresholds, and the paper's figure where it gives one."""
    header = [
        "task",
        "split",
        "arm",
        "seeds",
        "test metric: mean [min, max]",
        "parameters",
        "to 1.0",
        "to 0.8",
        "paper",
    ]
    rows = []
    for task, splits in summary["cells"].items():
        for split, arms in splits.items():
            for arm, values in arms.items():
                thresholds = [
                    _threshold_cell(values, t) if t in values["reached"] else "" for t in ("1", "0.8")
                ]
                rows.append([
                    task, split, f"`{arm}`", values["seeds"],
                    f"{METRIC_WORDS[summary['metrics'][task]]} {_spread_cell(values['metric'])}",
                    values["parameters"], *thresholds, _paper_cell(task, split, arm),
                ])  # fmt: skip
    return table(header, rows)


def coordinates_comparisons(summary: dict) -> str:
    """Every comparison of the study's rule, on every task and split."""
    header = ["task", "split", "A vs B", "quantity", "seeds", "A - B [95% CI]: verdict"]
    rows = [
        [
            row["task"],
            row["split"],
            f"`{row['a']}` vs `{row['b']}`",
            row["quantity"],
            row["seeds"],
            judged(row),
        ]
        for row in summary["comparisons"]
    ]
    return table(header, rows)


def _verdicts(summary: dict, a: str, b: str, quantity_of: Callable[[str], str]) -> str:
    """`a` against `b` on each task and split, on the task's quantity: verdict with its interval."""
    found = {
        (row["task"], row["split"]): row
        for row in summary["comparisons"]
        if (row["a"], row["b"]) == (a, b) and row["quantity"] == quantity_of(row["task"])
    }
    if not found:
        return "not run (both arms need two common seeds)"
    return "; ".join(f"{task}/{split} {judged(row)}" for (task, split), row in found.items())


def _arm(summary: dict, task: str, split: str, arm: str) -> dict | None:
    return summary["cells"].get(task, {}).get(split, {}).get(arm)


def _agreement(summary: dict) -> list[str]:
    """Where this project's runs agree and disagree with the paper's figures."""
    paper, lines = COORDCONV_PAPER, []
    conv = _arm(summary, "classification", "uniform", PAPER_CONV)
    if conv:
        ceiling, best = paper["conv_accuracy_uniform"].value, conv["metric"]["max"]
        word = "agrees" if best <= ceiling else "disagrees"
        lines.append(
            f"Convolutional baseline, classification/uniform: at most {fmt(best)} test accuracy in its "
            f"{fmt(conv['steps'])} steps ({fmt(conv['train_seconds']['mean'])} s); the paper: at most about "
            f"{fmt(ceiling)} after over {paper['conv_hours_uniform'].value} h: **{word}**."
        )
    for split in summary["cells"].get("classification", {}):
        coordconv = _arm(summary, "classification", split, COORDCONV)
        if coordconv:
            reached, seconds = coordconv["reached"]["1"], coordconv["seconds_to"]["1"]
            word = "agrees" if reached == coordconv["seeds"] else "disagrees"
            when = f", after {fmt(seconds['mean'])} s of training on average" if seconds else ""
            lines.append(
                f"CoordConv, classification/{split}: {reached}/{coordconv['seeds']} seeds reached 100% test "
                f"accuracy{when}; the paper: 100% on both splits within seconds: **{word}**."
            )
    for task in summary["cells"]:
        coordconv, conv = (
            _arm(summary, task, "uniform", COORDCONV),
            _arm(summary, task, "uniform", PAPER_CONV),
        )
        if coordconv and conv:
            ratio = conv["parameters"] / coordconv["parameters"]
            low, high = paper["fewer_parameters_low"].value, paper["fewer_parameters_high"].value
            word = "within" if low <= ratio <= high else "outside"
            lines.append(
                f"Parameters, {task}: the baseline has {fmt(conv['parameters'])}, CoordConv's network "
                f"{fmt(coordconv['parameters'])} ({fmt(ratio)}x fewer), **{word}** the paper's {low}-{high}x."
            )
    for split in summary["cells"].get("rendering", {}):
        conv = _arm(summary, "rendering", split, PAPER_CONV)
        if conv:
            perfect = conv["reached"]["1"]
            word = "agrees" if perfect == 0 else "disagrees"
            lines.append(
                f"Convolutional baseline, rendering/{split}: IoU 1.0 in {perfect}/{conv['seeds']} seeds, "
                f"0.8 in {conv['reached']['0.8']}/{conv['seeds']} (best {fmt(conv['metric']['max'])}); the "
                f"paper: no convolutional model reaches 1.0: **{word}**."
            )
    return lines


def _quadrant(summary: dict) -> list[str]:
    """What coordbias does on the split whose test quadrant training never saw."""
    lines = []
    for task in summary["cells"]:
        bias, coordconv = (_arm(summary, task, "quadrant", arm) for arm in (COORDBIAS, COORDCONV))
        if bias:
            metric = METRIC_WORDS[summary["metrics"][task]]
            against = f" (coordconv {_spread_cell(coordconv['metric'])})" if coordconv else ""
            lines.append(f"coordbias on {task}/quadrant: {metric} {_spread_cell(bias['metric'])}{against}.")
    return lines


def coordinates_conclusions(summary: dict) -> str:
    """The findings in words chosen by the numbers."""

    def metric(task: str) -> str:
        return summary["metrics"][task]

    coordbias_vs_coordconv = _verdicts(summary, COORDBIAS, COORDCONV, metric)
    forms = _verdicts(summary, PER_INPUT, COORDBIAS, metric)
    points = [
        "**One function class, three starts.** In every CoordConv network the slot is a 1x1 convolution, "
        "where coordconv's weights on X and Y are a per-channel a·X + b·Y, which is coordbias, in either "
        "form (`tests/test_coordinates.py` maps each onto the others exactly). What differs is the start: "
        "coordbias at zero, its per-input form and coordconv drawn at random. coordbias vs coordconv: "
        f"{coordbias_vs_coordconv}. Per-input vs reduced coordbias: {forms}.",
        "coordbias vs vanilla in the same network (no coordinates): "
        f"{_verdicts(summary, COORDBIAS, VANILLA, metric)}.",
        "coordbias vs the paper's convolutional baseline: "
        f"{_verdicts(summary, COORDBIAS, PAPER_CONV, metric)}.",
        *_agreement(summary),
        *_quadrant(summary),
    ]
    return "\n".join(f"- {point}" for point in points)


def render_coordinates(summary: dict, counts: dict) -> str:
    """The benchmark's page (`plots/coordinates.md`): its data, the side-by-side table, the conclusions,
    every comparison."""
    splits = "; ".join(
        f"{split}: {fmt(sides['train'])} train, {fmt(sides['test'])} test"
        for split, sides in counts["splits"].items()
    )
    square, canvas = counts["square"], counts["canvas"]
    intro = (
        f"The published Not-so-Clevr sweep ({fmt(counts['examples'])} squares of {square}x{square} px on a "
        f"{canvas}x{canvas} canvas; {splits}), the paper's three supervised tasks and networks, with each "
        "layer in the slot where CoordConv's network sees the coordinates (`coordinates/dvc.yaml`). "
        "Thresholds: the paper's 100% accuracy (to 1.0) and IoU 1.0 and 0.8; steps and training seconds are "
        "means over the seeds that reached them. The paper's figures (`reporting.COORDCONV_PAPER`): "
        + "; ".join(dict.fromkeys(figure.source for figure in COORDCONV_PAPER.values()))
        + "."
    )
    sections = [
        "# posconv: CoordConv's coordinate tasks, beside the paper",
        "Written by the `report` stage of `coordinates/dvc.yaml`, a pipeline of its own: run it with "
        "`dvc repro coordinates/dvc.yaml` (the card's `dvc repro` never starts it); every number is read "
        "from `metrics/coordinates/`.",
        intro,
        coordinates_table(summary),
        "## Conclusions\n\n" + coordinates_conclusions(summary),
        "## Every comparison\n\n" + coordinates_comparisons(summary),
    ]
    return "\n\n".join(sections) + "\n"
