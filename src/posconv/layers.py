"""Position-aware convolutions, built by name so that a model never branches on the layer type.

- `vanilla`: `nn.Conv2d`.
- `coordbias` (seed 000): `y = conv(x) + a_c*X + b_c*Y`, two learned scalars per output channel.
- `coordconv` (Liu et al. 2018): the convolution also sees the input's coordinate channels X, Y (and r).

Both add a position term that does not depend on the input: one (C_out, H, W) map per forward, a
small matrix product of the coordinate parameters with a cached basis (for coordconv, the coordinate
channels unfolded under the kernel: conv(coords, coord_weight) at batch size 1 as one GEMM, ~10x
faster on CPU than a convolution with 2 input channels). Its gradient is one sum over the batch.

Two ways to add it. Float32 channels_last on CPU with zero padding (the model's training setting) runs
oneDNN's convolution with the term added in its epilogue, and takes the bias's gradient from the
term's batch sum. Everywhere else the term is added in place to `nn.Conv2d`'s output (conv backward
does not need its output, so this saves an allocation and a pass).
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


def _term(coefficients: torch.Tensor, basis: torch.Tensor, height: int, channels_last: bool) -> torch.Tensor:
    """`coefficients @ basis` as a (1, C, H, W) map in the output's memory layout, so adds stream through."""
    c, width = coefficients.shape[0], basis.shape[1] // height
    if channels_last:
        return (basis.T @ coefficients.T).view(1, height, width, c).permute(0, 3, 1, 2)
    return (coefficients @ basis).view(1, c, height, width)


def _term_gradients(
    grad: torch.Tensor, basis: torch.Tensor, needs: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the term's coefficients and of a bias, from one sum of `grad` over the batch.

    The sum runs in the gradient's memory order: one streaming pass, the fastest reduction measured on
    CPU (autograd's broadcast backward sums a channels_last gradient far slower).
    """
    n, c = grad.shape[:2]
    if _is_channels_last(grad):  # products oriented as measured fastest for each layout
        per_pixel = grad.permute(0, 2, 3, 1).reshape(n, -1, c).sum(0)  # (H*W, C)
        return (basis @ per_pixel).T if needs[0] else None, per_pixel.sum(0) if needs[1] else None
    per_pixel = grad.reshape(n, c, -1).sum(0)  # (C, H*W)
    return per_pixel @ basis.T if needs[0] else None, per_pixel.sum(1) if needs[1] else None


class _AddPositionTerm(torch.autograd.Function):
    """`y += coefficients @ basis` for every image of the batch, in place."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(basis)
        y.add_(_term(coefficients, basis, y.shape[-2], _is_channels_last(y)))
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (basis,) = ctx.saved_tensors
        coefficients_grad, _ = _term_gradients(grad, basis, (ctx.needs_input_grad[1], False))
        return grad, coefficients_grad, None


_Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]  # stride, padding, dilation, groups

# oneDNN's convolution that adds a tensor in its epilogue (what Inductor's CPU fusions call)
_CONV_ADD = (
    getattr(torch.ops.mkldnn, "_convolution_pointwise_", None)
    if torch.backends.mkldnn.is_available()
    else None
)


class _ConvPlusTerm(torch.autograd.Function):
    """`conv(x) + coefficients @ basis` with the add inside oneDNN's convolution, bias included.

    The output is first filled with the term and the convolution adds into it. A fresh output costs
    page faults that outweigh a 3-channel convolution's arithmetic; filling it is that same first touch,
    so the term rides along instead of costing a pass of its own. In the backward, the batch sum that
    gives the term's gradient also gives the bias's, so the convolution skips its own bias reduction.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        coefficients: torch.Tensor,
        basis: torch.Tensor,
        geometry: _Geometry,
        height: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, basis)
        ctx.geometry = geometry
        stride, padding, dilation, groups = geometry
        term = _term(coefficients, basis, height, channels_last=True)
        y = term.expand(len(x), -1, -1, -1).clone(memory_format=torch.channels_last)  # a copy at batch 1 too
        _CONV_ADD.binary(y, x, weight, bias, padding, stride, dilation, groups, "add", None, None, [], None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, basis = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], False]  # the bias's gradient comes from the term's batch sum
        conv_backward = torch.ops.aten.convolution_backward
        grad_x, grad_weight, _ = conv_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, mask
        )
        coefficients_grad, bias_grad = _term_gradients(grad, basis, (needs[3], needs[2]))
        return grad_x, grad_weight, bias_grad, coefficients_grad, None, None, None


def _fusable(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Where the fused convolution is measured faster (with glibc's default allocator): float32
    channels_last on CPU, zero padding given in pixels, outside autocast and torch.compile."""
    return (
        _CONV_ADD is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and _is_channels_last(x)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


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
        in_size = (x.shape[-2], x.shape[-1])
        if _fusable(self, x):
            out_size = self._output_size(in_size)
            basis = self._positioned_basis(in_size, out_size, x)
            geometry = (self.stride, self.padding, self.dilation, self.groups)
            return _ConvPlusTerm.apply(
                x, self.weight, self.bias, self.coefficients(), basis, geometry, out_size[0]
            )
        y = self._conv_forward(x, self.weight, self.bias)
        basis = self._positioned_basis(in_size, (y.shape[-2], y.shape[-1]), y)
        coefficients = self.coefficients().to(y.dtype)
        if torch.compiler.is_compiling():  # Dynamo cannot trace mark_dirty; Inductor fuses the add itself
            return y.add_(_term(coefficients, basis, y.shape[-2], _is_channels_last(y)))
        return _AddPositionTerm.apply(y, coefficients, basis)

    def _positioned_basis(
        self, in_size: tuple[int, int], out_size: tuple[int, int], like: torch.Tensor
    ) -> torch.Tensor:
        return positioned(self.basis(in_size, out_size, like.device, like.dtype), self.coords)

    def _output_size(self, in_size: tuple[int, int]) -> tuple[int, int]:
        """The output's (H, W) before convolving, for padding given in pixels."""
        h, w = (
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                in_size, self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )
        return h, w

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coords={self.coords}"


class CoordBias2d(_PositionAware):
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
        super().__init__(in_channels, out_channels, kernel_size, coords=coords, **conv_kwargs)
        self.coord_bias = nn.Parameter(self.weight.new_zeros(out_channels, 2))

    def reset_parameters(self) -> None:
        """Zero `coord_bias`: the layer starts as the plain convolution with the same weights and the
        same random draws, so a coordbias network starts where its vanilla twin (same seed) does and
        learns position only as far as the loss asks for it."""
        super().reset_parameters()
        if hasattr(self, "coord_bias"):  # nn.Conv2d.__init__ calls this before coord_bias exists
            nn.init.zeros_(self.coord_bias)

    def coefficients(self) -> torch.Tensor:
        return self.coord_bias

    def basis(
        self, in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """X and Y of the kernel centres."""
        geometry = (self.kernel_size, self.stride, self.dilation, self.padding)
        return output_grid(in_size, out_size, *geometry, self.coords, device, dtype).flatten(1)


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
