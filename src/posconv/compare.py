"""The headline: the layer under study against vanilla, from evaluation and training metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from posconv.metrics import position_recall
from posconv.registry import BASELINE

# quantity -> how to read it from one model's (evaluation metrics, training metrics)
QUANTITIES: dict[str, Callable[[dict, dict], float | None]] = {
    "miou": lambda evaluation, training: evaluation["miou"],
    "position_recall": lambda evaluation, training: position_recall(evaluation["recall"]),
    "position_error_rate": lambda evaluation, training: evaluation["position_error_rate"],
    "circle_accuracy": lambda evaluation, training: evaluation["circle_accuracy"],
    "steps_to_position_recall_0_9": lambda evaluation, training: training["steps_to_position_recall_0_9"],
    "parameters": lambda evaluation, training: training["parameters"],
    "train_images_per_s": lambda evaluation, training: training["train_images_per_s"],
    "inference_images_per_s": lambda evaluation, training: evaluation["inference_images_per_s"],
}


def transfer_quantities(sizes: Iterable[int | str]) -> dict[str, Callable[[dict, dict], float | None]]:
    """Position recall on unseen scenes at each of `sizes` (an evaluation's `transfer` keys)."""
    return {
        f"position_recall_at_{size}": lambda e, t, s=str(size): position_recall(e["transfer"][s]["recall"])
        for size in sizes
    }


def headline(layer: str, evaluation: dict[str, dict], training: dict[str, dict]) -> dict:
    """For each headline quantity: vanilla's value, the layer's, and the layer's minus vanilla's."""
    summary: dict = {"layer": layer}
    for key, read in (QUANTITIES | transfer_quantities(evaluation[BASELINE].get("transfer", {}))).items():
        base, value = (read(evaluation[m], training[m]) for m in (BASELINE, layer))
        difference = None if base is None or value is None else value - base
        summary[key] = {BASELINE: base, layer: value, "difference": difference}
    summary["parameter_overhead"] = summary["parameters"]["difference"] / summary["parameters"][BASELINE]
    summary["train_time_ratio"] = (
        summary["train_images_per_s"][BASELINE] / summary["train_images_per_s"][layer]
    )
    return summary
