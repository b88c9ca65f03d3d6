"""The report as Markdown: the study on one page, rendered from metrics that the report stage reads."""

from __future__ import annotations

from posconv.config import Params
from posconv.registry import BASELINE, CLASS_NAMES, LAYERS

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
    header = [
        "model",
        "mIoU",
        "pixel accuracy",
        *(f"recall {c}" for c in CLASSES),
        "position error rate",
        "circle accuracy",
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
            training[m]["parameters"],
            training[m]["train_images_per_s"],
            training[m]["steps_to_position_recall_0_9"],
        ]
        for m, e in evaluation.items()
    ]
    return "## All models (test split)\n\n" + table(header, rows)


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


STUDY_QUANTITIES = (
    "position_recall",
    "steps_to_position_recall_0_9",
    "miou",
    "parameters",
    "train_images_per_s",
)
BATCHNORM_ARGUMENT = (
    "Why BatchNorm cannot cancel the coordinate bias as it cancels a plain one: BatchNorm subtracts "
    "each channel's mean over the batch and the pixels, so a plain bias (one constant per channel) is "
    "removed exactly and its gradient is zero; the coordinate term `a X + b Y` differs from pixel to "
    "pixel, so only its mean is removed and its gradient is not zero (`tests/test_layers.py` checks "
    "both on a real BatchNorm2d in training mode)."
)


def interval(values: dict) -> str:
    """mean [min, max] over seeds; where seeds missed a target, the values reached and how many missed."""
    if values["mean"] is not None:
        return f"{fmt(values['mean'])} [{fmt(values['min'])}, {fmt(values['max'])}]"
    reached = ", ".join(fmt(v) for v in values["values"] if v is not None)
    by = "" if values["not_reached_by"] is None else f" by step {fmt(values['not_reached_by'])}"
    missed = f"{len(values['values']) - values['reached']}/{len(values['values'])} not reached{by}"
    return f"{reached}; {missed}" if reached else missed


def comparison_row(row: dict) -> list:
    real = "**yes**" if row["separated"] else "no"
    a, b = interval(row["a_spread"]), interval(row["b_spread"])
    return [row["question"], f"`{row['a']}`", a, f"`{row['b']}`", b, row["quantity"], row["difference"], real]


def _real(row: dict, above: str, below: str) -> str:
    if not row["separated"]:
        return "no real difference"
    return f"real: A {below if row['a_below_b'] else above}"


def answer(recall: dict, steps: dict) -> str:
    """One question in a line: A against B on position recall and on steps to recall 0.9."""
    return (
        f"- **{recall['question']}** (A `{recall['a']}`, B `{recall['b']}`): test position recall "
        f"{interval(recall['a_spread'])} against {interval(recall['b_spread'])}, "
        f"{_real(recall, 'higher', 'lower')}; steps to validation position recall 0.9 "
        f"{interval(steps['a_spread'])} against {interval(steps['b_spread'])}, "
        f"{_real(steps, 'slower', 'faster')}."
    )


def study_section(study: dict) -> str:
    """The open questions: every comparison as mean [min, max] over seeds, real only if they separate."""
    rows = [comparison_row(row) for row in study["comparisons"] if row["quantity"] in STUDY_QUANTITIES]
    by_quantity = {(row["question"], row["quantity"]): row for row in study["comparisons"]}
    questions = dict.fromkeys(row["question"] for row in study["comparisons"])
    answers = "\n".join(
        answer(by_quantity[q, "position_recall"], by_quantity[q, "steps_to_position_recall_0_9"])
        for q in questions
    )
    cost = study["cost"] or {}
    scale = ", ".join(f"`{key}={value}`" for key, value in study["scale"].items())
    intro = (
        f"{len(study['variants'])} variants x {len(study['seeds'])} seeds (data and training seed "
        f"together) as DVC experiments on DVC's queue (`python -m posconv.tools.study run -j "
        f"{cost.get('jobs', 1)}`) at a reduced scale: {scale}. Total cost: {fmt(cost.get('wall_s'))} s "
        f"wall, {fmt(cost.get('cpu_s'))} s CPU of the machine. Values are "
        "mean [min, max] over seeds; a difference is called real only when the min-max intervals "
        "do not overlap."
    )
    header = ["question", "A", "A: mean [min, max]", "B", "B: mean [min, max]", "quantity", "A - B", "real?"]
    sections = [intro, BATCHNORM_ARGUMENT, answers, "Every comparison and quantity:", table(header, rows)]
    return "## The seed study's open questions\n\n" + "\n\n".join(sections)


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


def render(
    params: Params, summary: dict, evaluation: dict, training: dict, data: dict, study: dict, bench: dict
) -> str:
    figures = "\n\n".join(f"### {title}\n\n![{title}]({path})" for title, path in FIGURES.items())
    sections = [
        "# posconv: where-aware convolutions, study report",
        "Written by the `report` stage of `dvc repro`; every number is read from `metrics/`.",
        verdict(summary, training),
        headline_section(summary),
        models_section(evaluation, training),
        study_section(study),
        layer_cost_section(bench),
        "## Figures\n\n" + figures,
        params_section(params, data),
    ]
    return "\n\n".join(sections) + "\n"
