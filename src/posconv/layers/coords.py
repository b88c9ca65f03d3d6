"""Coordinate maps for the position-aware convolutions (DESIGN.md §3).

Convention "centered": a location is named by where it sits in the layer's *input*, pixel centres
normalised to [-1, 1] (pixel `i` of `W` at `2*(i+0.5)/W - 1`); a convolution output sits at its kernel
centre, input index `i*stride - pad_before + dilation*(k-1)/2`. So a place keeps one coordinate at every
depth, whatever the striding. Convention "seed" is the seed layer's `i/(W-1)` in [0, 1], for comparison.
Two controls keep the layers' parameters but take position away: "constant" maps are all ones, and
"shuffled" gives each output pixel the coordinate term of a random other pixel, redrawn at every call.

Maps are cached per (shape, geometry, convention, device, dtype): callers must not modify them.
The largest, CoordConv's unfolded patches, holds (2 or 3)*kH*kW numbers per output pixel.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F

Convention = Literal["centered", "seed", "constant", "shuffled"]
CONVENTIONS: tuple[str, ...] = typing.get_args(Convention)
Padding = tuple[int, int] | str  # as nn.Conv2d stores it: ints per axis, or "same" / "valid"

_Build = TypeVar("_Build", bound=Callable[..., torch.Tensor])


def check_convention(convention: str) -> None:
    """Fail at construction, not at the first forward, on a misspelt convention."""
    if convention not in CONVENTIONS:
        raise ValueError(f"coords = {convention!r}: expected one of {', '.join(CONVENTIONS)}")


def pad_amounts(padding: int | str, kernel: int, dilation: int) -> tuple[int, int]:
    """Padding (before, after) along one axis. For "same" PyTorch puts the odd pixel at the end."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        total = dilation * (kernel - 1)
        return total // 2, total - total // 2
    return int(padding), int(padding)


def _on_axis(padding: Padding, axis: int) -> int | str:
    return padding if isinstance(padding, str) else padding[axis]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 maps are computed in float64; every other dtype is rounded once, from float32."""
    return torch.promote_types(dtype, torch.float32)


def _index(size: int, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(size, device=device, dtype=_work_dtype(dtype))


def pixel_coords(
    size: int, convention: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Coordinates of the `size` pixels along one axis of a map."""
    i = _index(size, device, dtype)
    if convention == "constant":
        return torch.ones_like(i).to(dtype)
    if convention == "seed":
        return (i / max(size - 1, 1)).to(dtype)
    return ((2 * i + 1) / size - 1).to(dtype)


def centre_coords(
    in_size: int,
    out_size: int,
    kernel: int,
    stride: int,
    dilation: int,
    padding: int | str,
    convention: str,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coordinates of a convolution's `out_size` outputs along one axis: where their kernel centre sits."""
    if convention in ("seed", "constant"):
        return pixel_coords(out_size, convention, device, dtype)
    centre = _index(out_size, device, dtype) * stride - pad_amounts(padding, kernel, dilation)[0]
    centre = centre + dilation * (kernel - 1) / 2
    return ((2 * centre + 1) / in_size - 1).to(dtype)


def _cached(build: _Build) -> _Build:
    """Cache `build`'s maps by their arguments.

    A map is built outside inference mode, so one first made under `torch.inference_mode` still
    works with autograd later. Under `torch.compile` the map is built inside the graph instead
    (where it is a constant), because Dynamo does not trace through the cache.
    """

    @functools.lru_cache(maxsize=64)  # a network uses a few shapes per dtype
    def cached(*args: object) -> torch.Tensor:
        with torch.inference_mode(False):
            return build(*args)

    @functools.wraps(build)
    def get(*args: object) -> torch.Tensor:
        return build(*args) if torch.compiler.is_compiling() else cached(*args)

    return get  # type: ignore[return-value]


def _stack(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(2, H, W): X varying along the width, then Y varying along the height."""
    height, width = len(ys), len(xs)
    return torch.stack([xs.expand(height, width), ys[:, None].expand(height, width)])


@_cached
def input_grid(
    height: int, width: int, convention: str, with_r: bool, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(1, 2 or 3, H, W): CoordConv's extra input channels X, Y (and r = sqrt(X²+Y²))."""
    grid = _stack(
        pixel_coords(width, convention, device, dtype), pixel_coords(height, convention, device, dtype)
    )
    if with_r:
        grid = torch.cat([grid, grid.square().sum(0, keepdim=True).sqrt()])
    return grid[None]


@_cached
def output_grid(
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    padding: Padding,
    convention: str,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(2, H_out, W_out): X and Y of a convolution's outputs; per-axis arguments (H, W) as in nn.Conv2d."""
    axes = [
        centre_coords(
            in_size[axis],
            out_size[axis],
            kernel_size[axis],
            stride[axis],
            dilation[axis],
            _on_axis(padding, axis),
            convention,
            device,
            dtype,
        )
        for axis in (1, 0)
    ]
    return _stack(*axes)


@_cached
def input_patches(
    in_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    padding: Padding,
    padding_mode: str,
    convention: str,
    with_r: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(channels*kH*kW, H_out*W_out): the coordinate channels under every tap of every kernel position.

    `coord_weight.flatten(1) @ patches` is conv(coordinate channels, coord_weight) with the layer's
    padding: one small matrix product instead of a convolution whose input has only 2 or 3 channels.
    """
    grid = input_grid(*in_size, convention, with_r, device, dtype)
    width, height = (
        pad_amounts(_on_axis(padding, axis), kernel_size[axis], dilation[axis]) for axis in (1, 0)
    )
    grid = F.pad(grid, (*width, *height), mode="constant" if padding_mode == "zeros" else padding_mode)
    return F.unfold(grid, kernel_size, dilation=dilation, stride=stride)[0]


def positioned(basis: torch.Tensor, convention: str) -> torch.Tensor:
    """The basis a layer adds, (K, H_out*W_out); under "shuffled", its pixels in a fresh random order."""
    if convention != "shuffled":
        return basis
    return basis[:, torch.randperm(basis.shape[1], device=basis.device)]
