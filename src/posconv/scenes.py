"""The study's scenes: three coloured circles on Perlin noise, labelled by colour *and position*.

Everything works on a whole batch at once with numpy: no Python loop runs per pixel, per lattice
cell or per image, which is what makes generation fast (DESIGN.md §2 has the rules).

The bytes do not depend on the CPU: every float that reaches a pixel comes from elementwise +, -, x, /
and comparisons (each correctly rounded by IEEE 754 whatever the instruction set), exact min and max,
and counter-based random draws; no BLAS call, no reduction whose order depends on SIMD width or
threads, no library cos or sin (DESIGN.md §2, "Same bytes on every CPU").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

COLOURS = {"yellow": (255, 255, 0), "red": (255, 0, 0)}
CIRCLES = 3
CIRCLE_COLUMNS = ("image", "order", "colour", "cx", "cy", "radius", "label", "visible")
BACKGROUND_OWNER = 255
LATTICE = 5  # lattice points per axis: the noise cell is size/4
INTENSITY = 0.5  # background noise spans [0, INTENSITY]
NOISE_DRAWS = 3 * LATTICE * LATTICE  # one gradient angle per channel and lattice point
CIRCLE_DRAWS = 5  # colour, side, radius, cx, cy
DRAWS_PER_IMAGE = NOISE_DRAWS + CIRCLES * CIRCLE_DRAWS
STREAM = 0  # tells the data set's random stream apart from others drawn from the same seed


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes: `owners` is the draw order of the circle on top at each pixel (255: none)."""

    images: np.ndarray  # uint8 (n, size, size, 3)
    labels: np.ndarray  # uint8 (n, size, size), classes 0..3
    owners: np.ndarray  # uint8 (n, size, size)
    circles: pd.DataFrame  # one row per circle, columns CIRCLE_COLUMNS


def image_stream(seed: int, first_id: int) -> np.random.Generator:
    """The data set's random stream, positioned at image `first_id`'s draws.

    Each image takes exactly DRAWS_PER_IMAGE uniforms from one counter-based (Philox) stream, so an
    image depends only on the seed and its id: not on the chunking, nor on how many images there are.
    """
    key = np.random.SeedSequence([seed, STREAM]).generate_state(2, np.uint64)
    start = first_id * DRAWS_PER_IMAGE
    bits = np.random.Philox(key=key, counter=start // 4)  # each counter step gives 4 draws
    bits.random_raw(start % 4)
    return np.random.Generator(bits)


def _lattice_weights(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis: each pixel's lattice cell (size,), and the float32 weights (4, size) of the cell's
    two lattice points: fade, and fade times offset (1 - f, f, (1 - f) t, f (t - 1)).

    Perlin noise is linear in the gradients with weights that depend only on pixel position.
    """
    position = (np.arange(size) + 0.5) / (size / (LATTICE - 1))  # pixel centres, in cells
    cell = np.floor(position).astype(np.intp)
    t = position - cell
    fade = t * t * t * (t * (t * 6 - 15) + 10)
    return cell, np.stack([1 - fade, fade, (1 - fade) * t, fade * (t - 1)]).astype(np.float32)


def perlin_noise(gradients: np.ndarray, size: int) -> np.ndarray:
    """Perlin noise (..., size, size) from unit gradients (..., LATTICE, LATTICE, 2) [row, col, (x, y)].

    Separable: along x for every lattice row, then along y. Each pixel's value is a sum of two products
    per axis, written out so that it is the same sequence of IEEE 754 operations on every CPU (a matrix
    product would hand the sums to the BLAS library, whose kernels, chosen by CPU, round differently).
    """
    cell, (low, high, low_offset, high_offset) = _lattice_weights(size)
    gx, gy = gradients[..., 0], gradients[..., 1]
    along_x = gx[..., cell] * low_offset + gx[..., cell + 1] * high_offset  # (..., LATTICE, size)
    weight_x = gy[..., cell] * low + gy[..., cell + 1] * high
    noise = np.empty((*gradients.shape[:-3], size, size), np.float32)
    for row in range(LATTICE - 1):  # the pixel rows of each lattice cell, a slice since cells ascend
        rows = slice(*np.searchsorted(cell, [row, row + 1]))
        y = (rows, None)  # the y weights of those rows, as a column
        noise[..., rows, :] = (
            low[y] * along_x[..., row, None, :] + high[y] * along_x[..., row + 1, None, :]
        ) + (low_offset[y] * weight_x[..., row, None, :] + high_offset[y] * weight_x[..., row + 1, None, :])
    return noise


_TAYLOR_TERMS = 15  # of cos and of sin on [-pi, pi]; the first left out, pi^30/30!, is about 3e-18


def unit_vectors(turns: np.ndarray) -> np.ndarray:
    """(cos, sin) of the angle 2*pi*(turns - 1/2), float32 (..., 2), for turns in [0, 1).

    numpy's and the C library's cos and sin choose SIMD or FMA code by CPU and differ in the last bit
    between them; a Taylor polynomial evaluated with +, - and x alone, each correctly rounded by
    IEEE 754 on any instruction set, gives the same bits on every CPU.
    """
    x = (turns - 0.5) * (2 * math.pi)
    square = x * x
    cos = sin = 0.0
    for k in reversed(range(_TAYLOR_TERMS)):  # Horner in x^2: sum of (-1)^k x^2k / (2k)! and / (2k+1)!
        sign = -1 if k % 2 else 1
        cos = cos * square + sign / math.factorial(2 * k)
        sin = sin * square + sign / math.factorial(2 * k + 1)
    return np.stack([cos, x * sin], axis=-1).astype(np.float32)


def background(angles: np.ndarray, size: int) -> np.ndarray:
    """uint8 noise (n, 3, size, size), channels first, from gradient angles (n, 3, LATTICE, LATTICE) in turns.

    Each channel is min-max scaled to [0, INTENSITY], then x*255 is rounded (half up).
    """
    noise = perlin_noise(unit_vectors(angles), size)
    flat = noise.reshape(len(noise) * 3, -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    scale = INTENSITY * 255 / np.maximum(high - low, np.finfo(np.float32).tiny)
    flat *= scale[:, None]
    flat += (0.5 - low * scale)[:, None]
    return flat.astype(np.uint8).reshape(noise.shape)


def place_circles(draws: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Circles from uniform draws (n, CIRCLES, CIRCLE_DRAWS): arrays (n, CIRCLES) by property."""
    yellow, left = draws[..., 0] < 0.5, draws[..., 1] < 0.5
    radius = size / 12 + draws[..., 2] * size / 8
    cx = radius + draws[..., 3] * (size / 2 - 2 * radius) + np.where(left, 0, size / 2)
    cy = radius + draws[..., 4] * (size - 2 * radius)
    label = np.where(yellow, np.where(cx > size / 2, 1, 2), np.where(cy > size / 2, 3, 0))
    return {"yellow": yellow, "cx": cx, "cy": cy, "radius": radius, "label": label}


def owners_of(cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, size: int) -> np.ndarray:
    """Draw order of the circle on top at each pixel, uint8 (n, size, size), 255 where none.

    Circles are given as (n, CIRCLES) arrays; a pixel is inside if its centre is within the radius.
    """
    centre = np.arange(size) + 0.5
    dx2 = (centre - cx[..., None]) ** 2
    room = radius[..., None] ** 2 - (centre - cy[..., None]) ** 2  # how much dx2 each row allows
    owners = np.full((len(cx), size, size), BACKGROUND_OWNER, np.uint8)
    for order in range(CIRCLES):
        np.copyto(owners, np.uint8(order), where=dx2[:, order, None, :] <= room[:, order, :, None])
    return owners


def _paint(on_top: list[np.ndarray], values: np.ndarray) -> np.ndarray:
    """Per pixel, the uint8 value (n, CIRCLES) of the circle on top; 0 where there is none."""
    return sum(mask * values[:, order, None, None] for order, mask in enumerate(on_top))


def _table(circles: dict[str, np.ndarray], visible: np.ndarray, first_id: int) -> pd.DataFrame:
    """The circle table, one row per circle, in image then draw order."""
    n = len(visible)
    return pd.DataFrame(
        {
            "image": np.repeat(np.arange(first_id, first_id + n), CIRCLES),
            "order": np.tile(np.arange(CIRCLES), n),
            "colour": np.where(circles["yellow"], "yellow", "red").ravel(),
            "cx": circles["cx"].ravel(),
            "cy": circles["cy"].ravel(),
            "radius": circles["radius"].ravel(),
            "label": circles["label"].ravel(),
            "visible": visible.ravel(),
        }
    )


def draw_scenes(n: int, size: int, rng: np.random.Generator, first_id: int = 0) -> Scenes:
    """Draw `n` scenes of `size` px; image ids start at `first_id` (in the circle table).

    All draws come from one `rng.random((n, DRAWS_PER_IMAGE))`, so the first k of n scenes are the
    k scenes the same rng would give.
    """
    draws = rng.random((n, DRAWS_PER_IMAGE))
    circles = place_circles(draws[:, NOISE_DRAWS:].reshape(n, CIRCLES, CIRCLE_DRAWS), size)
    owners = owners_of(circles["cx"], circles["cy"], circles["radius"], size)
    on_top = [owners == order for order in range(CIRCLES)]
    image = background(draws[:, :NOISE_DRAWS].reshape(n, 3, LATTICE, LATTICE), size)
    rgb = np.where(circles["yellow"][..., None], COLOURS["yellow"], COLOURS["red"]).astype(np.uint8)
    covered = owners != BACKGROUND_OWNER
    for channel in range(3):
        np.copyto(image[:, channel], _paint(on_top, rgb[..., channel]), where=covered)
    visible = np.stack([m.view(np.uint8).sum(axis=(1, 2), dtype=np.int64) for m in on_top], axis=1)
    return Scenes(
        images=np.stack([image[:, c] for c in range(3)], axis=-1),  # ~4x faster than a transposed copy
        labels=_paint(on_top, circles["label"].astype(np.uint8)),
        owners=owners,
        circles=_table(circles, visible, first_id),
    )
