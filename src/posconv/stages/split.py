"""Stage `split`: stratified train/val/test indices into `data/split.npz`, class statistics into
`metrics/data.json`.

`python -m posconv.stages.split` reads `seed`, `split` and `generate.images` from params.yaml, and only the
label maps of the data set. Images are grouped by which classes they contain, and each group is
shared out in proportion, so every split holds all four classes at similar pixel frequencies.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from posconv import registry
from posconv.cli import parser
from posconv.config import load_params
from posconv.data import LABELS, class_pixel_counts, load_labels, save_split, stratified_split
from posconv.errors import BadInput
from posconv.io import atomic_outputs, json_text
from posconv.stages import run_stage

logger = logging.getLogger(__name__)
SCENES = Path(registry.SCENES)
STREAM = 1  # tells the split's random stream apart from the data set's (scenes.STREAM)


def presence_strata(counts: np.ndarray) -> np.ndarray:
    """Stratum of each image: a bit per class it contains (0..15), from its (N, classes) pixel counts."""
    return (counts > 0) @ (1 << np.arange(counts.shape[1]))


def split_metrics(counts: np.ndarray, split: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per split: its image count and class pixel fractions, as nested dicts `dvc metrics show` lists."""
    metrics = {}
    for name, indices in split.items():
        pixels = counts[indices].sum(axis=0)
        fractions = {
            cls: round(float(p / pixels.sum()), 6)
            for cls, p in zip(registry.CLASS_NAMES, pixels, strict=True)
        }
        metrics[name] = {"images": len(indices), "pixel_fraction": fractions}
    return metrics


def main(argv: list[str]) -> None:
    parser(__name__, __doc__).parse_args(argv)
    params = load_params()
    labels = load_labels(SCENES)
    if len(labels) != params.generate.images:
        raise BadInput(
            f"{SCENES / LABELS}: holds {len(labels)} images, expected generate.images = "
            f"{params.generate.images} (run the generate stage again)"
        )
    counts = class_pixel_counts(labels)  # load_labels refused classes outside 0..3
    rng = np.random.default_rng([params.seed, STREAM])
    split = stratified_split(presence_strata(counts), params.split_sizes(), rng)
    metrics = split_metrics(counts, split)
    with atomic_outputs(registry.SPLIT, registry.DATA_METRICS) as (split_path, metrics_path):
        save_split(split_path, split)
        metrics_path.write_text(json_text(metrics))
    logger.info(
        "split: %s images (seed %d, stratified by classes present) -> %s, %s",
        " / ".join(f"{m['images']} {name}" for name, m in metrics.items()),
        params.seed,
        registry.SPLIT,
        registry.DATA_METRICS,
    )


if __name__ == "__main__":
    run_stage(main)
