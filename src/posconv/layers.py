"""Position-aware convolutions, built by name so that a model never branches on the layer type.

- `vanilla`: `nn.Conv2d`.
- `coordbias` (seed 000): `y = conv(x) + a_c*X + b_c*Y`, two learned scalars per output channel.
- `coordconv` (Liu et al. 2018): the convolution also sees the input's coordinate channels X, Y (and r).

Both add a position term that does not depend on the input: one (C_out, H, W) map per forward, a
small matrix product of the coordinate parameters with a cached basis (for coordconv, the coordinate
channels unfolded under the kernel: conv(coords, coord_weight) at batch size 1 as one GEMM, ~10x
faster on CPU than a convolution with 2 input channels). It is added in place to the convolution's
output: conv backward does not need its output, so this saves an allocation and a pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from posconv.coords import check_convention, input_patches, output_grid, positioned


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _term(coefficients: torch.Tensor, basis: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`coefficients @ basis` as a (1, C, H, W) map in y's memory layout, so the add streams through both."""
    (c, _), (h, w) = coefficients.shape, y.shape[-2:]
    if _is_channels_last(y):
        return (basis.T @ coefficients.T).view(1, h, w, c).permute(0, 3, 1, 2)
    return (coefficients @ basis).view(1, c, h, w)


class _AddPositionTerm(torch.autograd.Function):
    """`y += coefficients @ basis` for every image of the batch, in place.

    The backward sums the gradient over the batch in its memory order (one streaming pass, the
    fastest reduction measured on CPU; autograd's own broadcast backward sums a channels_last
    gradient far slower), then takes one small product with the basis.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(basis)
        y.add_(_term(coefficients, basis, y))
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        if not ctx.needs_input_grad[1]:
            return grad, None, None
        (basis,) = ctx.saved_tensors
        n, c = grad.shape[:2]
        if _is_channels_last(grad):
            per_pixel = grad.permute(0, 2, 3, 1).reshape(n, -1, c).sum(0)  # (H*W, C)
            return grad, (basis @ per_pixel).T, None
        return grad, grad.reshape(n, c, -1).sum(0) @ basis.T, None


def _add_position_term(y: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`y += coefficients @ basis`: (C_out, K) learned numbers times K fixed maps over the output's pixels."""
    coefficients = coefficients.to(y.dtype)
    if torch.compiler.is_compiling():  # Dynamo cannot trace mark_dirty; Inductor fuses the add itself
        return y.add_(_term(coefficients, basis, y))
    return _AddPositionTerm.apply(y, coefficients, basis)


class CoordBias2d(nn.Conv2d):
    """`nn.Conv2d` plus `coord_bias` (C_out, 2): `y = conv(x) + a_c*X + b_c*Y` at the kernel centres."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        *,
        coords: str = "centered",
        **conv_kwargs: Any,
    ) -> None:
        check_convention(coords)
        super().__init__(in_channels, out_channels, kernel_size, **conv_kwargs)
        self.coords = coords
        self.coord_bias = nn.Parameter(self.weight.new_zeros(out_channels, 2))

    def reset_parameters(self) -> None:
        """Zero `coord_bias`: the layer starts as the plain convolution with the same weights and the
        same random draws, so a coordbias network starts where its vanilla twin (same seed) does and
        learns position only as far as the loss asks for it."""
        super().reset_parameters()
        if hasattr(self, "coord_bias"):  # nn.Conv2d.__init__ calls this before coord_bias exists
            nn.init.zeros_(self.coord_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        grid = output_grid(
            tuple(x.shape[-2:]),
            tuple(y.shape[-2:]),
            self.kernel_size,
            self.stride,
            self.dilation,
            self.padding,
            self.coords,
            y.device,
            y.dtype,
        )
        return _add_position_term(y, self.coord_bias, positioned(grid.flatten(1), self.coords))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coords={self.coords}"


class CoordConv2d(nn.Conv2d):
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
        check_convention(coords)
        super().__init__(in_channels, out_channels, kernel_size, **conv_kwargs)
        self.coords = coords
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        patches = input_patches(
            tuple(x.shape[-2:]),
            self.kernel_size,
            self.stride,
            self.dilation,
            self.padding,
            self.padding_mode,
            self.coords,
            self.with_r,
            y.device,
            y.dtype,
        )
        return _add_position_term(y, self.coord_weight.flatten(1), positioned(patches, self.coords))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coords={self.coords}, with_r={self.with_r}"


_BUILDERS: dict[str, Callable[..., nn.Conv2d]] = {
    "vanilla": lambda *shape, coords, with_r, **kwargs: nn.Conv2d(*shape, **kwargs),
    "coordbias": lambda *shape, coords, with_r, **kwargs: CoordBias2d(*shape, coords=coords, **kwargs),
    "coordconv": lambda *shape, coords, with_r, **kwargs: CoordConv2d(
        *shape, coords=coords, with_r=with_r, **kwargs
    ),
}
LAYER_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def make_conv(
    name: str,
    in_channels: int,
    out_channels: int,
    kernel_size: Any,
    *,
    coords: str = "centered",
    with_r: bool = False,
    **conv_kwargs: Any,
) -> nn.Conv2d:
    """Build layer `name` with the full `nn.Conv2d` signature; a layer ignores options it has no use for."""
    if name not in _BUILDERS:
        raise ValueError(f"layer {name!r}: expected one of {', '.join(LAYER_NAMES)}")
    return _BUILDERS[name](
        in_channels, out_channels, kernel_size, coords=coords, with_r=with_r, **conv_kwargs
    )
