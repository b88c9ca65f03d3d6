"""The study of the seed's open questions: its grid (variants x seeds, and what is compared with what)
and its statistics over seeds. Knows nothing of DVC: the study tool (`posconv.tools.study`) runs the
grid and collects it.

A difference is called real only when the min-max intervals over seeds do not overlap.
"""

from __future__ import annotations

import itertools
import statistics

from posconv.compare import QUANTITIES
from posconv.errors import BadInput
from posconv.registry import LAYERS, evaluate_metrics, train_metrics

SEEDS = (0, 1, 2)  # data seed and training seed together
SCALE = {  # the seed's 128 px, sized so that the grid finishes on a 2-core CPU in under 45 minutes
    "generate.size": 128,
    "generate.images": 800,  # 480 train, 160 validation, 160 test
    "model.width": 16,
    "train.epochs": 4,  # 240 steps: enough for the position-aware layers to reach recall 0.9
    "train.val_every": 10,
}
FULL_SCALE = {  # the seed's scale, for a GPU: 5000 train and 2500 validation images of 128 px, width 64
    "generate.size": 128,
    "generate.images": 10000,
    "split.val": 0.25,
    "split.test": 0.25,
    "model.width": 64,
    "train.epochs": 2,
    "train.val_every": 50,
}
VARIANTS = {  # name -> params changed from the study scale
    "baseline": {},
    "batchnorm": {"model.encoder_batchnorm": True},  # Q1
    "wide": {"model.width": 18},  # Q2a: its vanilla has more parameters than coordconv at width 16
    "constant": {"model.coords": "constant"},  # Q2b: same parameters, no position
    "shuffled": {"model.coords": "shuffled"},  # Q2b
    "with_r": {"model.with_r": True},  # Q3: CoordConv with the radius channel
    "seed_coords": {"model.coords": "seed"},  # Q3: the seed's coordinate convention
}
# (question, (variant, model) A, (variant, model) B): each compared on every quantity
COMPARISONS = [
    (
        "Q1 BatchNorm: coordbias vs vanilla, both with BatchNorm",
        ("batchnorm", "coordbias"),
        ("batchnorm", "vanilla"),
    ),
    (
        "Q1 BatchNorm: coordbias with vs without BatchNorm",
        ("batchnorm", "coordbias"),
        ("baseline", "coordbias"),
    ),
    (
        "Q2a parameters: coordbias vs vanilla widened past coordconv",
        ("baseline", "coordbias"),
        ("wide", "vanilla"),
    ),
    (
        "Q2a parameters: coordconv vs vanilla widened past coordconv",
        ("baseline", "coordconv"),
        ("wide", "vanilla"),
    ),
    (
        "Q2b controls: coordbias vs coordbias with constant maps",
        ("baseline", "coordbias"),
        ("constant", "coordbias"),
    ),
    (
        "Q2b controls: coordbias vs coordbias with shuffled maps",
        ("baseline", "coordbias"),
        ("shuffled", "coordbias"),
    ),
    (
        "Q2b controls: coordconv vs coordconv with constant maps",
        ("baseline", "coordconv"),
        ("constant", "coordconv"),
    ),
    (
        "Q2b controls: coordconv vs coordconv with shuffled maps",
        ("baseline", "coordconv"),
        ("shuffled", "coordconv"),
    ),
    (
        "Q2b controls: coordbias with shuffled maps vs vanilla",
        ("shuffled", "coordbias"),
        ("baseline", "vanilla"),
    ),
    ("Q3 coordbias vs coordconv", ("baseline", "coordbias"), ("baseline", "coordconv")),
    ("Q3 coordconv with r vs without", ("with_r", "coordconv"), ("baseline", "coordconv")),
    ("Q3 coordbias: seed convention vs centered", ("seed_coords", "coordbias"), ("baseline", "coordbias")),
    ("Q3 coordconv: seed convention vs centered", ("seed_coords", "coordconv"), ("baseline", "coordconv")),
]


def experiment_name(variant: str, seed: int) -> str:
    return f"study-{variant}-s{seed}"


SPREAD_KEYS = {"mean", "min", "max", "reached", "not_reached_by", "values"}


def spread(values: list[float | None], floors: list[float] | None = None) -> dict:
    """Mean and min-max over seeds. A None is a target that a seed did not reach within its run's
    `floors` steps: its value lies above that floor, so the floor bounds `min` from below, while `mean`
    and `max` are unknown (None)."""
    known = [v for v in values if v is not None]
    missed = [f for v, f in zip(values, floors or [None] * len(values), strict=True) if v is None and f]
    complete = len(known) == len(values)
    return {
        "mean": statistics.fmean(known) if known and complete else None,
        "min": min(known + missed) if known + missed else None,
        "max": max(known) if known and complete else None,
        "reached": len(known),
        "not_reached_by": max(missed) if missed else None,
        "values": values,
    }


def _below(a: dict, b: dict) -> bool:
    return a["max"] is not None and b["min"] is not None and a["max"] < b["min"]


def aggregate(metrics: dict[str, dict]) -> dict:
    """variant -> model -> quantity -> spread over seeds (steps to a target: floored by the run's steps)."""
    results: dict = {}
    for variant, model in itertools.product(VARIANTS, LAYERS):
        runs = [metrics[experiment_name(variant, seed)] for seed in SEEDS]
        paths = evaluate_metrics(model), train_metrics(model)
        files = [(run[paths[0]], run[paths[1]]) for run in runs]  # (evaluation, training) per seed
        steps = [training["steps"] for _, training in files]
        results.setdefault(variant, {})[model] = {
            quantity: spread([read(*f) for f in files], steps if quantity.startswith("steps_to_") else None)
            for quantity, read in QUANTITIES.items()
        }
    return results


def compare(results: dict) -> list[dict]:
    """Every comparison on every quantity: intervals, difference of means, and whether they separate."""
    rows = []
    for question, (variant_a, model_a), (variant_b, model_b) in COMPARISONS:
        for quantity in QUANTITIES:
            a, b = results[variant_a][model_a][quantity], results[variant_b][model_b][quantity]
            both = a["mean"] is not None and b["mean"] is not None
            rows.append({
                "question": question, "quantity": quantity,
                "a": f"{variant_a}/{model_a}", "b": f"{variant_b}/{model_b}", "a_spread": a, "b_spread": b,
                "difference": a["mean"] - b["mean"] if both else None,
                "separated": _below(a, b) or _below(b, a), "a_below_b": _below(a, b),
            })  # fmt: skip
    return rows


def check_study(study: object, path: str) -> dict:
    """`study` as read from `path`, refused in one line if it is not in this version's format."""
    rows = study.get("comparisons") if isinstance(study, dict) else None
    rows = rows if isinstance(rows, list) and all(isinstance(row, dict) for row in rows) else []
    spreads = [row.get(side) for row in rows for side in ("a_spread", "b_spread")]
    if not rows or not all(isinstance(s, dict) and s.keys() >= SPREAD_KEYS for s in spreads):
        raise BadInput(
            f"{path}: not a study in this version's format (run: python -m posconv.tools.study collect)"
        )
    return study  # type: ignore[return-value]
