"""Coordinate maps against values worked out by hand (DESIGN.md §3)."""

from __future__ import annotations

import pytest
import torch

from posconv.layers.coords import centre_coords, check_convention, input_grid, output_grid, pixel_coords

CPU = torch.device("cpu")


def _axis(
    in_size: int, out_size: int, kernel: int, stride: int, padding: int | str, convention: str, dilation=1
):
    return centre_coords(
        in_size, out_size, kernel, stride, dilation, padding, convention, dtype=torch.float64
    )


@pytest.mark.parametrize(
    ("geometry", "centered", "seed"),
    [
        # the seed's figure: 7 px, k=3, stride 3, padding 1: kernel centres on input pixels 0, 3, 6
        ((7, 3, 3, 3, 1), [-6 / 7, 0, 6 / 7], [0, 0.5, 1]),
        # 8 px, k=3, stride 2, padding 1: centres on pixels 0, 2, 4, 6
        ((8, 4, 3, 2, 1), [-7 / 8, -3 / 8, 1 / 8, 5 / 8], [0, 1 / 3, 2 / 3, 1]),
        # "valid" 5 px, k=3: centres on pixels 1, 2, 3
        ((5, 3, 3, 1, "valid"), [-2 / 5, 0, 2 / 5], [0, 0.5, 1]),
        # "same" with an even kernel: 1 pixel of padding before, 2 after; centres half a pixel right
        ((4, 4, 4, 1, "same"), [-1 / 2, 0, 1 / 2, 1], [0, 1 / 3, 2 / 3, 1]),
        # a 1-pixel output: the centre of a 3-pixel input, and no division by zero in "seed"
        ((3, 1, 3, 1, 0), [0], [0]),
    ],
)
def test_centre_coords_by_hand(geometry: tuple, centered: list[float], seed: list[float]) -> None:
    for convention, expected in (("centered", centered), ("seed", seed)):
        got = _axis(*geometry, convention=convention)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_dilation_moves_the_centre() -> None:
    """k=3, dilation 2, padding 2, stride 1: the centre tap sits on the output's own pixel."""
    got = _axis(5, 5, 3, 1, 2, "centered", dilation=2)
    torch.testing.assert_close(got, pixel_coords(5, "centered", dtype=torch.float64))


def test_pixel_coords_by_hand() -> None:
    torch.testing.assert_close(pixel_coords(4, "centered"), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(pixel_coords(4, "seed"), torch.tensor([0, 1 / 3, 2 / 3, 1]))
    for convention in ("centered", "seed"):
        assert pixel_coords(1, convention).tolist() == [0.0]


def test_output_grid_layout_on_a_non_square_map() -> None:
    """Channel 0 is X (varies along the width), channel 1 is Y (varies along the height)."""
    grid = output_grid((8, 7), (4, 3), (3, 3), (2, 3), (1, 1), (1, 1), "centered", CPU, torch.float64)
    assert grid.shape == (2, 4, 3)
    torch.testing.assert_close(grid[0], torch.tensor([-6 / 7, 0, 6 / 7], dtype=torch.float64).expand(4, 3))
    y = torch.tensor([-7 / 8, -3 / 8, 1 / 8, 5 / 8], dtype=torch.float64)
    torch.testing.assert_close(grid[1], y[:, None].expand(4, 3))


def test_input_grid_with_r() -> None:
    grid = input_grid(2, 4, "centered", True, CPU, torch.float64)
    assert grid.shape == (1, 3, 2, 4)
    x, y = torch.tensor([-0.75, -0.25, 0.25, 0.75]), torch.tensor([-0.5, 0.5])
    expected_r = (x[None, :] ** 2 + y[:, None] ** 2).sqrt()
    torch.testing.assert_close(grid[0, 2], expected_r.double())
    torch.testing.assert_close(input_grid(1, 1, "seed", False, CPU, torch.float32), torch.zeros(1, 2, 1, 1))


def test_maps_are_cached_per_dtype_and_never_require_grad() -> None:
    first = input_grid(5, 6, "seed", False, CPU, torch.float32)
    assert input_grid(5, 6, "seed", False, CPU, torch.float32) is first
    other = input_grid(5, 6, "seed", False, CPU, torch.bfloat16)
    assert other.dtype == torch.bfloat16 and other is not first
    assert not first.requires_grad and not other.requires_grad


def test_a_map_first_made_in_inference_mode_is_a_normal_tensor() -> None:
    with torch.inference_mode():
        grid = output_grid((13, 11), (13, 11), (3, 3), (1, 1), (1, 1), "same", "centered", CPU, torch.float32)
    assert not grid.is_inference()


def test_unknown_convention() -> None:
    with pytest.raises(ValueError, match="centered, seed"):
        check_convention("polar")


def test_centered_coordinates_mean_the_same_place_at_every_image_side() -> None:
    """Transfer (evaluate.sizes): a centered coordinate is a place relative to the image, X = 2u - 1
    at relative position u. Averaging a 2x larger image's map over 2x2 blocks gives the smaller map
    exactly, for the input and for a deeper layer after a 2x2 pool (the FCN's 1/2-resolution convs)."""
    for small in (48, 96):
        fine, coarse = (pixel_coords(n, "centered", dtype=torch.float64) for n in (2 * small, small))
        torch.testing.assert_close(fine.view(-1, 2).mean(1), coarse, rtol=0, atol=1e-15)
        conv = ((3, 3), (1, 1), (1, 1), (1, 1), "centered", CPU, torch.float64)  # a 3x3 "same" conv
        deeper = output_grid((small, small), (small, small), *conv)
        larger = output_grid((2 * small,) * 2, (2 * small,) * 2, *conv)
        pooled = torch.nn.functional.avg_pool2d(larger[None], 2)[0]
        torch.testing.assert_close(pooled, deeper, rtol=0, atol=1e-15)


def test_seed_coordinates_drift_by_less_than_a_pixel_between_image_sides() -> None:
    """The seed's i / (W - 1) is relative too, but not block-consistent: off by at most 1/(W - 1)."""
    fine, coarse = (pixel_coords(n, "seed", dtype=torch.float64) for n in (192, 96))
    drift = (fine.view(-1, 2).mean(1) - coarse).abs().max().item()
    assert 0 < drift <= 1 / 95
