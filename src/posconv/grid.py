"""The study: its grid (variants x seeds, in two independent replicates), what is compared with what,
and the verdict rule. Knows nothing of DVC: the study tool (`posconv.tools.study`) runs the grid.

The verdict rule, written down before any number was seen (DESIGN.md §7). A comparison sets arm A
against arm B on one quantity. Both arms of a seed share its data, its training order and its initial
draws, so each seed gives one difference d = A - B, and the n seeds give the 95% paired-t interval
mean(d) ± t(0.975, n - 1) · sd(d) / √n. With the quantity's margin m:
- "A higher" / "A lower": the interval excludes 0 and |mean(d)| >= m (a real difference);
- "no real difference": the whole interval lies inside (-m, m);
- "undecided": anything else (more seeds needed).
The rule is applied to each replicate (seeds 0-4, seeds 5-9) and to all seeds; a verdict is
replicated when both replicates give it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from posconv.compare import transfer_quantities
from posconv.errors import BadInput
from posconv.metrics import position_recall
from posconv.registry import CLASS_NAMES, FAMILIES, LAYERS, scale_key

REPLICATES = {"A": (0, 1, 2, 3, 4), "B": (5, 6, 7, 8, 9)}  # two independent runs of the study
SEEDS = REPLICATES["A"] + REPLICATES["B"]  # data seed and training seed together
ALL = "all"
SCALE = {  # sized so that the whole grid (40 experiments) fits a 2-core CPU in about an hour
    "generate.size": 64,  # the seed's 128 px cost ~4x on this CPU; the rules keep their proportions
    "generate.images": 800,  # 480 train, 160 validation, 160 test
    "model.width": 16,
    "train.epochs": 4,  # 240 steps: enough for the position-aware layers to reach recall 0.9
    "train.val_every": 20,
    "evaluate.sizes": [48, 96],  # transfer to 3/4 and 3/2 of the trained side
    "evaluate.equivariance_images": 8,
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


@dataclass(frozen=True)
class Variant:
    """Params changed from the study scale, and which pipeline's models it trains and scores."""

    changes: dict
    families: bool = False  # families/dvc.yaml (the content-adaptive layers), not the card
    seeds: tuple[int, ...] = SEEDS

    @property
    def models(self) -> tuple[str, ...]:
        return FAMILIES if self.families else LAYERS


VARIANTS = {
    "baseline": Variant({}),
    "batchnorm": Variant({"model.encoder_batchnorm": True}),  # Q1
    "per_input": Variant({"model.coords_per_input": True}),  # the seed's first coordinate-bias form
    "families": Variant({}, families=True),  # families/dvc.yaml: the content-adaptive layers
}
Arm = tuple[str, str]  # (variant, model)
POSITION = ("position_recall", "steps_to_position_recall_0_9")  # what most questions are about
SCALE_ERRORS = ("scale_error_",)  # every rescaling (a prefix: the quantities are named by factor)


class Comparison(NamedTuple):
    question: str
    a: Arm
    b: Arm
    answers: tuple[str, ...] = POSITION  # the quantities (or prefixes ending in _) that answer it


COMPARISONS = [
    Comparison("Headline: coordbias vs vanilla", ("baseline", "coordbias"), ("baseline", "vanilla")),
    Comparison(
        "Q1 BatchNorm: coordbias vs vanilla, both with BatchNorm",
        ("batchnorm", "coordbias"),
        ("batchnorm", "vanilla"),
    ),
    Comparison(
        "Q1 BatchNorm: coordbias with vs without BatchNorm",
        ("batchnorm", "coordbias"),
        ("baseline", "coordbias"),
    ),
    Comparison("Q3 coordbias vs coordconv", ("baseline", "coordbias"), ("baseline", "coordconv")),
    Comparison(
        "Seed's first form: per-input-channel vs reduced coordbias",
        ("per_input", "coordbias"),
        ("baseline", "coordbias"),
    ),
    Comparison("Families: involution vs vanilla", ("families", "involution"), ("baseline", "vanilla")),
    Comparison(
        "Families: coordinvolution vs involution", ("families", "coordinvolution"), ("families", "involution")
    ),
    Comparison("Families: deform vs vanilla", ("families", "deform"), ("baseline", "vanilla")),
    Comparison("Families: coorddeform vs deform", ("families", "coorddeform"), ("families", "deform")),
    # seed 004: DSS lowers the scale equivariance error (its authors' claim); bilinear lifting (DSS v2) is
    # worse; deformable DSS helps at small rescalings and hurts at large ones
    Comparison("DSS: dss vs vanilla", ("families", "dss"), ("baseline", "vanilla"), SCALE_ERRORS),
    Comparison(
        "DSS v2: dss_bilinear vs dss", ("families", "dss_bilinear"), ("families", "dss"), SCALE_ERRORS
    ),
    Comparison(
        "Deformable DSS: dss_deform vs dss", ("families", "dss_deform"), ("families", "dss"), SCALE_ERRORS
    ),
    # seed 003's spatial-specific filter: every pixel its own weights
    Comparison("Spatial-specific filter: local vs vanilla", ("families", "local"), ("baseline", "vanilla")),
    Comparison(
        "Spatial-specific filter: local vs coordbias", ("families", "local"), ("baseline", "coordbias")
    ),
]


def answers(comparison: Comparison, quantity: str) -> bool:
    """Whether `quantity` is one that answers `comparison`'s question."""
    return any(quantity == a or (a.endswith("_") and quantity.startswith(a)) for a in comparison.answers)


Reader = Callable[[dict, dict], float | None]  # (evaluation metrics, training metrics) -> value


@dataclass(frozen=True)
class Quantity:
    read: Reader
    margin: float | None  # the smallest difference called real; None: reported, never judged


def quantities(sizes: list[int], shifts: list[int], scales: list[float]) -> dict[str, Quantity]:
    """What the study reads from each model's metrics, with the margins of the verdict rule: 0.05 for
    recalls and mIoU, 20 steps (one validation apart at the study scale) for learning speed, 0.02 for
    equivariance errors; parameters and throughput are reported, not judged."""
    recall = 0.05
    found: dict[str, Quantity] = {
        "position_recall": Quantity(lambda e, t: position_recall(e["recall"]), recall),
        "miou": Quantity(lambda e, t: e["miou"], recall),
        "steps_to_position_recall_0_9": Quantity(lambda e, t: t["steps_to_position_recall_0_9"], 20),
    }
    for index, name in enumerate(CLASS_NAMES):
        found[f"recall_{name}"] = Quantity(lambda e, t, i=index: e["recall"][i], recall)
    found |= {name: Quantity(read, recall) for name, read in transfer_quantities(sizes).items()}
    for shift in shifts:
        found[f"translation_error_{shift}"] = Quantity(
            lambda e, t, s=str(shift): e["equivariance"]["translation"][s], 0.02
        )
    for key in map(scale_key, scales):
        found[f"scale_error_{key}"] = Quantity(lambda e, t, s=key: e["equivariance"]["scale"][s], 0.02)
    found["parameters"] = Quantity(lambda e, t: t["parameters"], None)
    found["train_images_per_s"] = Quantity(lambda e, t: t["train_images_per_s"], None)
    return found


# A reproduction's tolerance on a quantity: the difference between two runs that differ only by chance
# stays within z(0.995) * sqrt(2) * sd in 99% of cases (the sd over the study's seeds, two independent
# runs, normal errors); per model, from the variant that trains it at params.yaml's settings.
TOLERANCE_FACTOR = 2.576 * math.sqrt(2)
PER_SIZE = ("position_recall_at_", "translation_error_", "scale_error_")  # one tolerance for all sizes


def tolerance_key(quantity: str) -> str:
    """The tolerance a quantity is judged by: one per kind for the sized ones (the study's transfer sizes
    and rescalings need not be the card's)."""
    return next((prefix + "any" for prefix in PER_SIZE if quantity.startswith(prefix)), quantity)


def tolerances(results: dict, readers: dict[str, Quantity]) -> dict[str, dict[str, float]]:
    """model -> tolerance key -> tolerance, from the seed-to-seed spread of the study's baseline and
    families variants (the largest spread over a kind's sizes); parameters must agree exactly. A
    quantity is left out (not judged) where it has no spread to measure: throughput, and steps to a
    target that some seed never reached."""
    found: dict[str, dict[str, float]] = {}
    for variant in ("baseline", "families"):
        for model, quantities in results[variant].items():
            entry = found.setdefault(model, {})
            for quantity, q in readers.items():
                if (q.margin is None and quantity != "parameters") or quantities[quantity]["censored"]:
                    continue  # throughput is the machine's; a target some seed never reached has no spread
                spread = statistics.stdev(quantities[quantity]["values"]) * TOLERANCE_FACTOR
                key = tolerance_key(quantity)
                entry[key] = max(entry.get(key, 0.0), 0.0 if quantity == "parameters" else spread)
    return found


def experiment_name(variant: str, seed: int) -> str:
    return f"study-{variant}-s{seed}"


# t(0.975, df): the two-sided 95% quantile of Student's t (tests/test_study.py integrates the density)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086}  # fmt: skip


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences and its 95% paired-t interval."""
    n = len(differences)
    if not 2 <= n <= len(T975) + 1:
        raise ValueError(f"paired interval of {n} differences: expected 2 to {len(T975) + 1}")
    mean = statistics.fmean(differences)
    half = T975[n - 1] * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, mean: float, margin: float | None) -> str | None:
    """The written rule (module docstring) on one interval."""
    if margin is None:
        return None
    if (low > 0 or high < 0) and abs(mean) >= margin:
        return "A higher" if mean > 0 else "A lower"
    if -margin < low and high < margin:
        return "no real difference"
    return "undecided"


def spread(values: list[float], censored: int = 0) -> dict:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "values": values,
        "censored": censored,
    }


def aggregate(metrics: dict[str, dict], readers: dict[str, Quantity], paths: Callable) -> dict:
    """variant -> model -> quantity -> values over the variant's seeds with mean/min/max. A learning-speed
    target a seed missed counts as the run's step count (a lower bound; `censored` says how many)."""
    results: dict = {}
    for name, variant in VARIANTS.items():
        for model in variant.models:
            files = [
                tuple(metrics[experiment_name(name, seed)][p] for p in paths(model)) for seed in variant.seeds
            ]
            entry = results.setdefault(name, {}).setdefault(model, {})
            for quantity, q in readers.items():
                try:
                    raw = [q.read(*f) for f in files]
                except (KeyError, IndexError, TypeError) as error:
                    raise BadInput(
                        f"study: {name}/{model}: its metrics lack {quantity} ({error!r})"
                    ) from None
                floors = [training["steps"] for _, training in files]
                values = [floor if v is None else v for v, floor in zip(raw, floors, strict=True)]
                if any(v is None for v in values):
                    raise BadInput(f"study: {name}/{model} has no {quantity} in some seed")
                entry[quantity] = spread(values, censored=raw.count(None))
    return results


def _judged(
    a: dict[int, float], b: dict[int, float], seeds: tuple[int, ...], margin: float | None
) -> dict | None:
    """The rule on `seeds`; None where an arm did not run one of them."""
    if not set(seeds) <= set(a) & set(b):
        return None
    mean, low, high = paired_interval([a[s] - b[s] for s in seeds])
    return {"difference": mean, "low": low, "high": high, "verdict": verdict(low, high, mean, margin)}


def compare(results: dict, readers: dict[str, Quantity]) -> list[dict]:
    """Every comparison on every quantity: per replicate and over all the seeds both arms ran, the paired
    difference, its 95% interval and the verdict; `replicated`: True when both replicates give the same
    verdict, False when they differ, None when an arm ran one replicate only."""
    rows = []
    for comparison in COMPARISONS:
        question, (variant_a, model_a), (variant_b, model_b) = comparison[:3]
        seeds_a, seeds_b = VARIANTS[variant_a].seeds, VARIANTS[variant_b].seeds
        both = tuple(seed for seed in SEEDS if seed in seeds_a and seed in seeds_b)
        for quantity, q in readers.items():
            a = dict(zip(seeds_a, results[variant_a][model_a][quantity]["values"], strict=True))
            b = dict(zip(seeds_b, results[variant_b][model_b][quantity]["values"], strict=True))
            judged = {name: _judged(a, b, seeds, q.margin) for name, seeds in REPLICATES.items()}
            judged[ALL] = _judged(a, b, both, q.margin)
            ran = [judged[name] for name in REPLICATES]
            replicated = None if None in ran else len({j["verdict"] for j in ran}) == 1  # type: ignore[index]
            rows.append({
                "question": question, "quantity": quantity, "margin": q.margin, "seeds": list(both),
                "a": f"{variant_a}/{model_a}", "b": f"{variant_b}/{model_b}",
                **judged, "replicated": replicated, "answers": answers(comparison, quantity),
            })  # fmt: skip
    return rows


ROW_KEYS = {"question", "quantity", "a", "b", "replicated", "answers", ALL, *REPLICATES}


def check_study(study: object, path: str) -> dict:
    """`study` as read from `path`, refused in one line if it is not in this version's format."""
    rows = study.get("comparisons") if isinstance(study, dict) else None
    rows = rows if isinstance(rows, list) and all(isinstance(row, dict) for row in rows) else []
    if not rows or not all(row.keys() >= ROW_KEYS for row in rows) or "results" not in study:
        raise BadInput(
            f"{path}: not a study in this version's format (run: python -m posconv.tools.study collect)"
        )
    return study  # type: ignore[return-value]
