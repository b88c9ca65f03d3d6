"""Figures of the study, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

# One colour per class, the same in every figure: background, yellow right, yellow left, red bottom.
LABEL_COLOURS = ("#1a1a1a", "#ff9f1c", "#2ec4b6", "#e71d36")
LABEL_CMAP = ListedColormap(LABEL_COLOURS, name="posconv_labels")
PREVIEW_GAP = 4  # white pixels between tiles
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save_preview(images: np.ndarray, labels: np.ndarray, path: str | Path, columns: int = 2) -> None:
    """Save a grid of `images` (n, H, W, 3), each beside its label map in LABEL_COLOURS, as a PNG.

    Composed with numpy and encoded by `write_png`, so that the same data gives the same bytes on every
    CPU: the `generate` stage's outputs are the data set's reproducible fingerprint (matplotlib's and
    Pillow's encoders pick SIMD code by CPU, and their compressed bytes may differ).
    """
    n, height, width, _ = images.shape
    palette = np.array([matplotlib.colors.to_rgb(c) for c in LABEL_COLOURS]) * 255
    tiles = np.stack([images, palette.round().astype(np.uint8)[labels]], axis=1)  # (n, 2, H, W, 3)
    rows = -(-n // columns)
    tiles = np.concatenate([tiles, np.full((rows * columns - n, *tiles.shape[1:]), 255, np.uint8)])
    grid = np.pad(tiles, [(0, 0), (0, 0), (PREVIEW_GAP, 0), (PREVIEW_GAP, 0), (0, 0)], constant_values=255)
    grid = grid.reshape(rows, columns * 2, *grid.shape[2:]).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * (height + PREVIEW_GAP), columns * 2 * (width + PREVIEW_GAP), 3)
    write_png(path, np.pad(grid, [(0, PREVIEW_GAP), (0, PREVIEW_GAP), (0, 0)], constant_values=255))


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG of `rgb` (H, W, 3) uint8, compressed by the standard library's zlib."""
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)  # filter 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    Path(path).write_bytes(
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def show_labels(ax: plt.Axes, label: np.ndarray) -> None:
    ax.imshow(label, cmap=LABEL_CMAP, vmin=0, vmax=len(LABEL_COLOURS) - 1, interpolation="nearest")
