"""Segmentation metrics: pixel scores, position errors and per-circle votes.

Pure functions on numpy arrays and the circle table; every value meant for JSON is a plain Python
number, and an undefined one (a class with no pixels) is `None`, never NaN. Pixels are counted with
one `np.bincount` per chunk of images, so a 2500-image test set of 128x128 scores in a few seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from posconv.errors import BadInput
from posconv.registry import BACKGROUND, BOTTOM_RED, LEFT_YELLOW, N_CLASSES, POSITION_CLASSES, RIGHT_YELLOW

YELLOW_CLASSES = (RIGHT_YELLOW, LEFT_YELLOW)
N_FAMILIES, YELLOW, RED = 3, 1, 2  # colour families; 0 is not a circle
# (family, true class, predicted class): right colour, wrong position (each class's positional twin)
POSITION_SWAPS = (
    (YELLOW, RIGHT_YELLOW, LEFT_YELLOW),
    (YELLOW, LEFT_YELLOW, RIGHT_YELLOW),
    (RED, BOTTOM_RED, BACKGROUND),
    (RED, BACKGROUND, BOTTOM_RED),
)
HOT, COLD = 191, 64  # circles are pure 0/255 channels; the background noise never exceeds 128
OWNER_VALUES = 256  # owners are uint8: one slot per draw order, 255 (background) included
CHUNK_PIXELS = 1 << 22  # pixels per bincount: bounds the int64 keys to 32 MB


def _check_shapes(**arrays: np.ndarray) -> None:
    shapes = {name: array.shape for name, array in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise BadInput(f"array shapes differ: {shapes}")


def _check_values(name: str, array: np.ndarray, n: int) -> None:
    """Out-of-range values would silently land in a neighbouring bincount cell: refuse them."""
    if array.size == 0:
        return
    low, high = array.min(), array.max()
    if low < 0 or high >= n:
        raise BadInput(f"{name} hold values {low}..{high}; expected 0..{n - 1}")


def _pair_counts(major: np.ndarray, minor: np.ndarray, n_major: int, n_minor: int) -> np.ndarray:
    """Per-image counts of each (major, minor) value pair, int64 (N, n_major, n_minor).

    One bincount on (image, major, minor) keys per chunk of images: vectorised, yet the int64
    keys of a 41 M pixel set never sit in memory at once.
    """
    n_images, n_pixels, n_keys = len(major), math.prod(major.shape[1:]), n_major * n_minor
    major, minor = major.reshape(n_images, n_pixels), minor.reshape(n_images, n_pixels)
    counts = np.zeros((n_images, n_keys), np.int64)
    step = max(1, CHUNK_PIXELS // max(n_pixels, 1))
    for start in range(0, n_images, step):
        rows = slice(start, min(start + step, n_images))
        offsets = np.arange(rows.stop - start)[:, None] * n_keys
        keys = offsets + major[rows].astype(np.int64) * n_minor + minor[rows]
        counts[rows] = np.bincount(keys.ravel(), minlength=offsets.size * n_keys).reshape(-1, n_keys)
    return counts.reshape(n_images, n_major, n_minor)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Pixel counts, int64 (n, n): rows are true classes, columns predicted ones."""
    _check_shapes(labels=labels, preds=preds)
    _check_values("labels", labels, n_classes)
    _check_values("preds", preds, n_classes)
    return _pair_counts(labels, preds, n_classes, n_classes).sum(axis=0)


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def _ratios(numerators: np.ndarray, denominators: np.ndarray) -> list[float | None]:
    return [_ratio(n, d) for n, d in zip(numerators, denominators, strict=True)]


def _mean(values: list[float | None]) -> float | None:
    """Mean of the defined values: a class absent from the data neither helps nor hurts."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def class_scores(confusion: np.ndarray) -> dict:
    """`recall`, `precision`, `iou` (lists by class), `miou` and `pixel_accuracy` of a confusion matrix."""
    hits, true, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    iou = _ratios(hits, true + predicted - hits)
    return {
        "recall": _ratios(hits, true),
        "precision": _ratios(hits, predicted),
        "iou": iou,
        "miou": _mean(iou),
        "pixel_accuracy": _ratio(hits.sum(), confusion.sum()),
    }


def position_recall(recall: list[float | None]) -> float | None:
    """Mean recall of the classes that depend on position: the seed study's headline quantity."""
    return _mean([recall[c] for c in POSITION_CLASSES])


def colour_families(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W): 0 not a circle, 1 yellow, 2 red, read from the pixel colours alone.

    Needs no circle table, so the position error rate works on any labelled data set. The
    thresholds assume 0..255 channels, hence uint8 only.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise BadInput(f"images are {images.dtype} {images.shape}; expected uint8 (N, H, W, 3)")
    red, green, blue = (images[..., c] for c in range(3))
    pure = (red > HOT) & (blue < COLD)
    return (pure & (green > HOT)) * np.uint8(YELLOW) + (pure & (green < COLD)) * np.uint8(RED)


def position_error_rate(labels: np.ndarray, preds: np.ndarray, families: np.ndarray) -> float | None:
    """Share of circle pixels given the right colour but the wrong position class.

    This isolates the error the study is about (not knowing where a pixel is) from colour errors:
    yellow predicted as the other yellow class, bottom red as background, top red as class 3.
    """
    _check_shapes(labels=labels, preds=preds, families=families)
    _check_values("labels", labels, N_CLASSES)
    _check_values("preds", preds, N_CLASSES)
    _check_values("families", families, N_FAMILIES)
    counts = _pair_counts(families * np.uint8(N_CLASSES) + labels, preds, N_FAMILIES * N_CLASSES, N_CLASSES)
    counts = counts.sum(axis=0).reshape(N_FAMILIES, N_CLASSES, N_CLASSES)
    errors = sum(counts[swap] for swap in POSITION_SWAPS)
    return _ratio(errors, counts[[YELLOW, RED]].sum())


def circle_votes(
    preds: np.ndarray, owners: np.ndarray, circles: pd.DataFrame, image_ids: np.ndarray
) -> pd.DataFrame:
    """The circles of `image_ids` with visible pixels, plus `predicted` and `correct` columns.

    `predicted` is the majority class over the circle's visible pixels (ties: lowest class), so a
    circle counts once whatever its size. Row i of `preds`/`owners` is global image `image_ids[i]`.
    """
    _check_shapes(preds=preds, owners=owners)
    _check_values("preds", preds, N_CLASSES)
    _check_values("owners", owners, OWNER_VALUES)
    rows = pd.Index(image_ids).get_indexer(circles["image"])
    keep = (rows >= 0) & (circles["visible"].to_numpy() > 0)
    votes = circles[keep].reset_index(drop=True)
    counts = _pair_counts(owners, preds, OWNER_VALUES, N_CLASSES)[rows[keep], votes["order"].to_numpy()]
    if not np.array_equal(counts.sum(axis=1), votes["visible"].to_numpy()):
        raise BadInput("circle table: `visible` disagrees with the owners map (different data sets?)")
    votes["predicted"] = counts.argmax(axis=1)
    votes["correct"] = votes["predicted"] == votes["label"]
    return votes


def circle_accuracy(votes: pd.DataFrame) -> float | None:
    """Share of circles whose majority vote is their true class."""
    return float(votes["correct"].mean()) if len(votes) else None


def _binned_accuracy(centres: pd.Series, correct: pd.Series, size: float, bins: int) -> list[dict]:
    index = np.clip((centres.to_numpy(float) * bins / size).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    hits = np.bincount(index, weights=correct.to_numpy(float), minlength=bins)
    return [
        {"centre": float((i + 0.5) * size / bins), "accuracy": _ratio(h, n), "circles": int(n)}
        for i, (n, h) in enumerate(zip(counts, hits, strict=True))
    ]


def position_accuracy(votes: pd.DataFrame, size: float, bins: int) -> dict:
    """Circle accuracy in `bins` equal bins over [0, size] of the coordinate that decides the class.

    `x`: yellow circles by centre x (left/right); `y`: red circles by centre y (top/bottom). A
    position-blind model fails near the boundary and, worse, on whole sides.
    """
    yellow = votes["label"].isin(YELLOW_CLASSES)
    return {
        "x": _binned_accuracy(votes.loc[yellow, "cx"], votes.loc[yellow, "correct"], size, bins),
        "y": _binned_accuracy(votes.loc[~yellow, "cy"], votes.loc[~yellow, "correct"], size, bins),
    }


def score(
    labels: np.ndarray,
    preds: np.ndarray,
    images: np.ndarray,
    votes: pd.DataFrame | None = None,
    bins: int = 8,
) -> dict:
    """Every metric as one JSON-ready dict; the circle metrics (from `circle_votes` of the same
    predictions) are None without votes."""
    confusion = confusion_matrix(labels, preds)
    result = {
        "confusion": confusion.tolist(),
        **class_scores(confusion),
        "position_error_rate": position_error_rate(labels, preds, colour_families(images)),
        "circle_accuracy": None,
        "position_accuracy": None,
    }
    if votes is not None:
        result["circle_accuracy"] = circle_accuracy(votes)
        result["position_accuracy"] = position_accuracy(votes, labels.shape[-1], bins)  # square images
    return result
