"""The scene rules of DESIGN.md §2, checked against a plain re-computation from the circle table."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from posconv.scenes import CIRCLE_COLUMNS, background, draw_scenes, image_stream, perlin_noise, unit_vectors

RGB = {"yellow": (255, 255, 0), "red": (255, 0, 0)}


def expected_class(colour: str, cx: float, cy: float, size: int) -> int:
    if colour == "yellow":
        return 1 if cx > size / 2 else 2
    return 3 if cy > size / 2 else 0


def paint_table(circles: pd.DataFrame, n: int, size: int, first_id: int) -> dict[str, np.ndarray]:
    """Owners, labels and circle colours per pixel, painted circle by circle in draw order."""
    owners = np.full((n, size, size), 255)
    labels = np.zeros((n, size, size), int)
    rgb = np.zeros((n, size, size, 3), int)
    centre = np.arange(size) + 0.5
    for c in circles.sort_values(["image", "order"]).itertuples():
        inside = (centre[None, :] - c.cx) ** 2 + (centre[:, None] - c.cy) ** 2 <= c.radius**2
        image = c.image - first_id
        owners[image][inside] = c.order
        labels[image][inside] = expected_class(c.colour, c.cx, c.cy, size)
        rgb[image][inside] = RGB[c.colour]
    return {"owners": owners, "labels": labels, "rgb": rgb}


def check_scenes(n: int, size: int, seed: int, first_id: int = 0) -> None:
    scenes = draw_scenes(n, size, image_stream(seed, first_id), first_id=first_id)
    assert scenes.images.shape == (n, size, size, 3) and scenes.images.dtype == np.uint8
    assert scenes.labels.shape == scenes.owners.shape == (n, size, size)
    assert scenes.labels.dtype == scenes.owners.dtype == np.uint8
    table = scenes.circles
    assert tuple(table.columns) == CIRCLE_COLUMNS and len(table) == 3 * n
    np.testing.assert_array_equal(table["image"], np.repeat(np.arange(first_id, first_id + n), 3))
    np.testing.assert_array_equal(table["order"], np.tile([0, 1, 2], n))

    want = paint_table(table, n, size, first_id)
    np.testing.assert_array_equal(scenes.owners, want["owners"])
    np.testing.assert_array_equal(scenes.labels, want["labels"])
    covered = want["owners"] != 255
    np.testing.assert_array_equal(scenes.images[covered], want["rgb"][covered])
    assert (scenes.images[~covered] <= 128).all()  # background intensity 0.5 of 255, rounded

    classes = [expected_class(c.colour, c.cx, c.cy, size) for c in table.itertuples()]
    np.testing.assert_array_equal(table["label"], classes)
    visible = [(want["owners"][c.image - first_id] == c.order).sum() for c in table.itertuples()]
    np.testing.assert_array_equal(table["visible"], visible)

    r = table["radius"]
    assert ((r >= size / 12) & (r < size / 12 + size / 8)).all()
    left = table["cx"] <= size / 2
    assert (table["cx"] - r >= np.where(left, 0, size / 2)).all()
    assert (table["cx"] + r <= np.where(left, size / 2, size)).all()
    assert ((table["cy"] - r >= 0) & (table["cy"] + r <= size)).all()
    assert set(table["colour"]) <= {"yellow", "red"}


def test_pixels_follow_the_circle_table() -> None:
    check_scenes(n=24, size=64, seed=3)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([16, 20, 24, 32, 44]),
    n=st.integers(1, 4),
    first_id=st.integers(0, 10**6),
)
def test_rules_hold_for_any_seed(seed: int, size: int, n: int, first_id: int) -> None:
    check_scenes(n, size, seed, first_id)


def test_red_circles_in_the_top_half_are_background() -> None:
    scenes = draw_scenes(64, 32, image_stream(5, 0))
    top_red = scenes.circles.query("colour == 'red' and cy <= 16")
    assert len(top_red) > 0
    for c in top_red.itertuples():
        on_top = scenes.owners[c.image] == c.order
        assert on_top.any() == (c.visible > 0)
        assert (scenes.labels[c.image][on_top] == 0).all()
        assert (scenes.images[c.image][on_top] == RGB["red"]).all()


def test_random_choices_are_balanced() -> None:
    table = draw_scenes(1000, 16, image_stream(0, 0)).circles
    assert abs((table["colour"] == "yellow").mean() - 0.5) < 0.04
    assert abs((table["cx"] <= 8).mean() - 0.5) < 0.04
    assert set(table["label"]) == {0, 1, 2, 3}


def reference_perlin(gradients: np.ndarray, size: int) -> np.ndarray:
    """Textbook Perlin noise, pixel by pixel: dot products at 4 corners, quintic fade."""
    cell = size / 4
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    noise = np.zeros((size, size))
    for j in range(size):
        for i in range(size):
            x, y = (i + 0.5) / cell, (j + 0.5) / cell
            x0, y0 = int(x), int(y)
            dots = [[gradients[y0 + a, x0 + b] @ (x - x0 - b, y - y0 - a) for b in (0, 1)] for a in (0, 1)]
            u, v = fade(x - x0), fade(y - y0)
            top, bottom = (row[0] * (1 - u) + row[1] * u for row in dots)
            noise[j, i] = top * (1 - v) + bottom * v
    return noise


def test_perlin_noise_matches_textbook_formula() -> None:
    theta = np.random.default_rng(0).uniform(0, 2 * np.pi, (5, 5))
    gradients = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    fast = perlin_noise(gradients.astype(np.float32)[None], 24)[0]
    np.testing.assert_allclose(fast, reference_perlin(gradients, 24), atol=1e-5)


def test_background_channels_span_zero_to_half_intensity() -> None:
    noise = background(np.random.default_rng(1).random((8, 3, 5, 5)), 32)
    assert noise.shape == (8, 3, 32, 32) and noise.dtype == np.uint8
    assert (noise.min(axis=(2, 3)) == 0).all()
    assert np.isin(noise.max(axis=(2, 3)), [127, 128]).all()


def test_an_image_depends_only_on_seed_and_id() -> None:
    whole = draw_scenes(6, 32, image_stream(9, 0))
    part = draw_scenes(2, 32, image_stream(9, 3), first_id=3)
    np.testing.assert_array_equal(part.images, whole.images[3:5])
    np.testing.assert_array_equal(part.labels, whole.labels[3:5])
    pd.testing.assert_frame_equal(part.circles, whole.circles.iloc[9:15].reset_index(drop=True))
    other = draw_scenes(6, 32, image_stream(10, 0))
    assert not np.array_equal(other.images, whole.images)


def test_gradient_directions_are_cos_and_sin_to_float32_rounding() -> None:
    turns = np.random.default_rng(3).random(100_000)
    angle = 2 * np.pi * (turns - 0.5)
    vectors = unit_vectors(turns).astype(np.float64)
    np.testing.assert_allclose(vectors, np.stack([np.cos(angle), np.sin(angle)], -1), rtol=0, atol=6e-8)
