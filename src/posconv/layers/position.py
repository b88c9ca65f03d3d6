"""Layers that add a position term to `nn.Conv2d`'s output: the coordinate bias and CoordConv.

- `coordbias` (seed 000): `y = conv(x) + a_c*X + b_c*Y`, two learned scalars per output channel
  (`coords_per_input=True`: the seed's original pair per input channel too, summed over them).
- `coordconv` (Liu et al. 2018): the convolution also sees the input's coordinate channels X, Y (and r).

Both add a term that does not depend on the input: one (C_out, H, W) map per forward, a small matrix
product of the coordinate parameters with a cached basis (for coordconv, the coordinate channels
unfolded under the kernel: conv(coords, coord_weight) at batch size 1 as one GEMM, ~10x faster on CPU
than a convolution with 2 input channels). Its gradient is one sum over the batch.

One forward path: `nn.Conv2d`'s output, then the term added in place (`position_term`; under bfloat16
autocast the maps and the term are computed in float32). `fused` is an opt-in backend that moves the
add into oneDNN's convolution on CPU (DESIGN.md §4).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from posconv.layers import fused
from posconv.layers.coords import check_convention, input_patches, output_grid, positioned
from posconv.layers.position_term import add_position_term


class _PositionAware(nn.Conv2d):
    """`nn.Conv2d` plus a position term `coefficients @ basis`; a subclass says what the two are."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Any, *, coords: str, **conv_kwargs: Any
    ) -> None:
        check_convention(coords)
        super().__init__(in_channels, out_channels, kernel_size, **conv_kwargs)
        self.coords = coords

    def coefficients(self) -> torch.Tensor:
        """(C_out, K): the learned numbers that weigh the K maps of the basis."""
        raise NotImplementedError

    def basis(
        self, in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """(K, H_out*W_out): fixed maps over the output's pixels, cached."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.applies(self, x):
            return fused.conv_plus_term(self, x)
        y = self._conv_forward(x, self.weight, self.bias)
        coefficients = self.coefficients()
        dtype = torch.promote_types(y.dtype, coefficients.dtype)  # autocast's bfloat16 y: the term in fp32
        basis = self.positioned_basis((x.shape[-2], x.shape[-1]), (y.shape[-2], y.shape[-1]), y, dtype)
        return add_position_term(y, coefficients.to(dtype), basis)

    def positioned_basis(
        self, in_size: tuple[int, int], out_size: tuple[int, int], like: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The basis under the layer's coordinate convention, on `like`'s device, in `dtype`."""
        return positioned(self.basis(in_size, out_size, like.device, dtype), self.coords)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coords={self.coords}"


class CoordBias2d(_PositionAware):
    """`nn.Conv2d` plus `coord_bias`: `y = conv(x) + a_c*X + b_c*Y` at the kernel centres.

    Two forms of the seed layer (pskugit/custom-conv2d, models/customconv.py). The default is the
    published code's reduced form (commit a21ff8d): `coord_bias` (C_out, 2), 2*C_out numbers, zero at
    the start. `coords_per_input=True` is the original form (27d1ea5): `coord_bias` (C_out, C_in/groups,
    2), one (X, Y) pair per output and input channel, the term summed over the inputs, drawn like the
    kernel, U(±1/sqrt(fan_in)) (also without bias, where the source left it uninitialised). Both compute
    the same functions, a_c = sum_i a_ci: the original over-parametrises them with 2*C_out*C_in/groups
    numbers and starts elsewhere, so only the learning dynamics differ. The shape tells the forms apart.
    """

    def __init__(
        self, *shape: Any, coords: str = "centered", coords_per_input: bool = False, **conv_kwargs: Any
    ) -> None:
        """`shape`: in_channels, out_channels, kernel_size, as for `nn.Conv2d`."""
        super().__init__(*shape, coords=coords, **conv_kwargs)
        self.coords_per_input = coords_per_input
        per_input = (self.in_channels // self.groups,) if coords_per_input else ()
        self.coord_bias = nn.Parameter(self.weight.new_empty(self.out_channels, *per_input, 2))
        self._reset_coord_bias()

    def reset_parameters(self) -> None:
        """The kernel's draws first, as `nn.Conv2d`'s, then `coord_bias`'s (none for the default)."""
        super().reset_parameters()
        if hasattr(self, "coord_bias"):  # nn.Conv2d.__init__ calls this before coord_bias exists
            self._reset_coord_bias()

    def _reset_coord_bias(self) -> None:
        """Default: zero, so a coordbias network starts where its vanilla twin (same seed) does and
        learns position only as far as the loss asks for it. Per input: the source's uniform draw."""
        if self.coords_per_input:
            bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(self.weight)[0])
            nn.init.uniform_(self.coord_bias, -bound, bound)
        else:
            nn.init.zeros_(self.coord_bias)

    def coefficients(self) -> torch.Tensor:
        """(C_out, 2); the per-input form's sum over its inputs is the source's own sum."""
        return self.coord_bias.sum(1) if self.coords_per_input else self.coord_bias

    def basis(
        self, in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """X and Y of the kernel centres."""
        geometry = (self.kernel_size, self.stride, self.dilation, self.padding)
        return output_grid(in_size, out_size, *geometry, self.coords, device, dtype).flatten(1)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", coords_per_input=True" if self.coords_per_input else "")


class CoordConv2d(_PositionAware):
    """`nn.Conv2d` that also sees the input's coordinate channels X, Y (and r with `with_r`).

    `coord_weight` (C_out, 2 or 3, kH, kW) acts on them; for `groups=1`,
    `torch.cat([weight, coord_weight], 1)` is the weight of the classic concat-then-conv form, and
    for `groups > 1` every group sees the coordinate channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        *,
        coords: str = "centered",
        with_r: bool = False,
        **conv_kwargs: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, coords=coords, **conv_kwargs)
        self.with_r = with_r
        self.coord_weight = nn.Parameter(self.weight.new_empty(out_channels, 2 + with_r, *self.kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the concat form's `nn.Conv2d` would: weight, coord_weight and bias uniform in
        ±1/sqrt(fan_in), fan_in counting the coordinate channels (what kaiming_uniform_(a=√5) gives)."""
        if not hasattr(self, "coord_weight"):  # nn.Conv2d.__init__ calls this before coord_weight exists
            return
        fan_in = (self.weight.shape[1] + self.coord_weight.shape[1]) * math.prod(self.kernel_size)
        bound = fan_in**-0.5
        for parameter in (self.weight, self.coord_weight, self.bias):
            if parameter is not None:
                nn.init.uniform_(parameter, -bound, bound)

    def coefficients(self) -> torch.Tensor:
        return self.coord_weight.flatten(1)

    def basis(
        self, in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The coordinate channels under every tap of every kernel position."""
        geometry = (self.kernel_size, self.stride, self.dilation, self.padding, self.padding_mode)
        return input_patches(in_size, *geometry, self.coords, self.with_r, device, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, with_r={self.with_r}"
