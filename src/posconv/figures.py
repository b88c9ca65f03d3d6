"""The evaluate stage's figures (matplotlib PNGs) and the small CSVs that `dvc plots` overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from posconv.metrics import position_recall
from posconv.plots import show_labels
from posconv.registry import CLASS_NAMES

LossCurves = tuple[Path, Path]  # per-step training loss and validation loss, tab-separated (step, loss)


def write_all(
    directory: Path,
    results: dict[str, dict],
    votes: dict[str, pd.DataFrame],
    examples: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]],
    losses: dict[str, LossCurves],
) -> None:
    """Everything the evaluate stage draws; `examples` are (images, labels, predictions per model)."""
    images, labels, predictions = examples
    write_plot_data(directory, results, votes)
    write_transfer_data(directory, results, images.shape[2])
    save_losses(directory / "losses.png", losses)
    save_recall_bars(directory / "recall.png", results)
    save_confusions(directory / "confusion.png", results)
    save_position_accuracy(directory / "position.png", results, images.shape[2])
    save_prediction_grid(directory / "predictions.png", images, labels, predictions)


def write_plot_data(directory: Path, results: dict[str, dict], votes: dict[str, pd.DataFrame]) -> None:
    """Small CSVs that `dvc plots` overlays across models, commits and experiments."""
    for model, result in results.items():
        pd.DataFrame({"class": CLASS_NAMES, "recall": result["recall"]}).to_csv(
            directory / f"recall_{model}.csv", index=False
        )
        for axis in ("x", "y"):
            pd.DataFrame(result["position_accuracy"][axis]).to_csv(
                directory / f"position_{axis}_{model}.csv", index=False
            )
        names = np.asarray(CLASS_NAMES)
        circles = pd.DataFrame(
            {"actual": names[votes[model]["label"]], "predicted": names[votes[model]["predicted"]]}
        )
        circles.to_csv(directory / f"circles_{model}.csv", index=False)


def write_transfer_data(directory: Path, results: dict[str, dict], size: int) -> None:
    """Per model: position recall and mIoU against the image side (the trained size and `transfer`), and
    the equivariance errors, as CSVs that `dvc plots` overlays."""
    for model, result in results.items():
        scored = {size: result} | {int(side): scores for side, scores in result["transfer"].items()}
        rows = [
            {"size": side, "position_recall": position_recall(s["recall"]), "miou": s["miou"]}
            for side, s in sorted(scored.items())
        ]
        pd.DataFrame(rows).to_csv(directory / f"transfer_{model}.csv", index=False)
        errors = [
            {"transformation": f"{kind} {amount}", "error": error}
            for kind, by_amount in result["equivariance"].items()
            for amount, error in by_amount.items()
        ]
        pd.DataFrame(errors, columns=["transformation", "error"]).to_csv(
            directory / f"equivariance_{model}.csv", index=False
        )


def save_losses(path: Path, losses: dict[str, LossCurves]) -> None:
    """Training loss per step (smoothed over 10 steps) and validation loss of every model, one figure."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for (model, (train_path, val_path)), colour in zip(losses.items(), plt.cm.tab10.colors, strict=False):
        train, val = (pd.read_csv(path, sep="\t") for path in (train_path, val_path))
        smooth = train["loss"].rolling(10, min_periods=1).mean()
        ax.plot(train["step"], smooth, color=colour, alpha=0.8, label=f"{model} train")
        ax.plot(
            val["step"], val["loss"], color=colour, linestyle="--", marker="o", label=f"{model} validation"
        )
    ax.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="Training and validation loss")
    ax.legend(fontsize="small")
    _save(fig, path)


def save_recall_bars(path: Path, results: dict[str, dict]) -> None:
    """Per-class test recall of every model, side by side (the seed study's figure)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(results)
    for index, (model, result) in enumerate(results.items()):
        recall = [np.nan if r is None else r for r in result["recall"]]
        ax.bar(np.arange(len(CLASS_NAMES)) + index * width, recall, width, label=model)
    ax.set_xticks(np.arange(len(CLASS_NAMES)) + width * (len(results) - 1) / 2, CLASS_NAMES)
    ax.set(ylabel="recall", ylim=(0, 1.05), title="Test recall per class")
    ax.legend(fontsize="small", loc="lower right")
    _save(fig, path)


def save_confusions(path: Path, results: dict[str, dict]) -> None:
    """Row-normalised pixel confusion matrix of every model."""
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.8), squeeze=False)
    for ax, (model, result) in zip(axes[0], results.items(), strict=True):
        counts = np.asarray(result["confusion"], dtype=float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        for (row, col), value in np.ndenumerate(share):
            ax.text(
                col, row, f"{value:.2f}", ha="center", va="center", color="white" if value > 0.5 else "black"
            )
        ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=30, ha="right", fontsize="small")
        ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize="small")
        ax.set(title=model, xlabel="predicted", ylabel="true")
    _save(fig, path)


def save_position_accuracy(path: Path, results: dict[str, dict], size: int) -> None:
    """Circle accuracy against centre x (yellow) and centre y (red): where each model fails."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    titles = {"x": "yellow circles: accuracy vs centre x", "y": "red circles: accuracy vs centre y"}
    for ax, (axis, title) in zip(axes, titles.items(), strict=True):
        for model, result in results.items():
            rows = pd.DataFrame(result["position_accuracy"][axis])
            ax.plot(rows["centre"], rows["accuracy"].astype(float), marker="o", label=model)
        ax.axvline(size / 2, color="grey", linestyle=":", label="class boundary")
        ax.set(title=title, xlabel=f"centre {axis} (pixels)", ylabel="circle accuracy", ylim=(0, 1.05))
    axes[0].legend(fontsize="small")
    _save(fig, path)


def save_prediction_grid(
    path: Path, images: np.ndarray, labels: np.ndarray, predictions: dict[str, np.ndarray]
) -> None:
    """One row per test image: input, label, then each model's prediction."""
    columns = ["input", "label", *predictions]
    fig, axes = plt.subplots(
        len(images), len(columns), figsize=(2 * len(columns), 2 * len(images)), squeeze=False
    )
    for row, (image, label) in enumerate(zip(images, labels, strict=True)):
        axes[row, 0].imshow(image, interpolation="nearest")
        show_labels(axes[row, 1], label)
        for col, predicted in enumerate(predictions.values(), start=2):
            show_labels(axes[row, col], predicted[row])
    for ax, title in zip(axes[0], columns, strict=True):
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_axis_off()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
