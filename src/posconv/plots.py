"""Figures of the study, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from posconv.registry import CLASS_NAMES

# One colour per class, the same in every figure: background, yellow right, yellow left, red bottom.
LABEL_COLOURS = ("#1a1a1a", "#ff9f1c", "#2ec4b6", "#e71d36")
LABEL_CMAP = ListedColormap(LABEL_COLOURS, name="posconv_labels")


def save_preview(images: np.ndarray, labels: np.ndarray, path: str | Path, columns: int = 2) -> None:
    """Save a grid of `images` (n, H, W, 3), each beside its colour-coded label map."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(4 * columns, 2 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        row, col = divmod(index, columns)
        axes[row, 2 * col].imshow(image, interpolation="nearest")
        show_labels(axes[row, 2 * col + 1], label)
    handles = [Patch(color=c, label=n) for c, n in zip(LABEL_COLOURS, CLASS_NAMES, strict=True)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (2 * rows + 0.6), 1, 1))
    fig.savefig(path, format="png", dpi=100)  # format: `path` may be a temporary name
    plt.close(fig)


def show_labels(ax: plt.Axes, label: np.ndarray) -> None:
    ax.imshow(label, cmap=LABEL_CMAP, vmin=0, vmax=len(LABEL_COLOURS) - 1, interpolation="nearest")
