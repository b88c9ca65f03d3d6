"""Involution (Li et al., CVPR 2021), and a position-aware variant whose kernels also see X and Y.

Involution inverts convolution's sharing: one kernel per output pixel, generated from the input at that
pixel, shared across the channels of a group (G groups of C/G channels) instead of one kernel per channel
pair shared across space:

    y[b, c, i, j] = bias[c] + sum over taps (u, v) of k[b, g(c), u, v, i, j] * x~[b, c, i*sh+u*dh, j*sw+v*dw]

with x~ the input padded as nn.Conv2d pads it (any `padding`, `padding_mode`), g(c) = c // (C/G), and
`k(i, j) = span(ReLU(reduce(xbar(i, j))))`: `reduce` a 1x1 convolution C -> max(C // reduction, 1) with
bias, `span` a 1x1 convolution to G*kh*kw. `xbar(i, j)` is the input where the kernel is used: the mean of
the sh x sw block of x~ whose top-left pixel is the output's kernel centre (row i*sh + dh*(kh-1)//2 of
x~; blocks running past x~'s end average the pixels they cover). At stride 1 that is the pixel under the
kernel centre; in the reference's geometry (odd kernel, padding dilation*(k-1)/2, size divisible by the
stride) it is exactly the reference's AvgPool2d(s, s) of the input, and it is defined for every other.

Choices, and why:
- Involution keeps channels. `in_channels != out_channels` puts a bias-free 1x1 convolution in -> out
  first (RedNet's split: involution aggregates in space, 1x1 convolutions mix channels), so the layer
  drops in for any nn.Conv2d; with in == out there is none.
- `bias` is one learned offset per output channel added after the involution, as nn.Conv2d's bias is
  (zero at initialisation). A bias in the projection would reach the output multiplied by each pixel's
  kernel sum: not an offset, and absent when in == out.
- No BatchNorm inside the kernel generator (the reference has reduce -> BN -> ReLU): `reduce` has a bias
  instead, so the layer is a pure function of its input, the same in train and eval mode and for any
  batch, like the project's other layers; normalisation around it is the model's business.
- `groups` is the number of kernel groups G, not nn.Conv2d's; None means C // group_channels (at least
  1). G must divide C. `padding` takes ints, pairs, "valid", and "same" at stride 1 (as nn.Conv2d;
  an even kernel pads its odd pixel at the end); "same" at stride > 1 and other strings are refused.
- Fast path: `involution` accumulates kh*kw shifted products (a strided, dilated slice of x~ times that
  tap's kernel map broadcast over the group's channels, added in place into the output) in a custom
  autograd function that saves only x~ and the kernels and scatters the gradient back the same way. It
  never holds the unfolded input, B*C*kh*kw*H*W numbers, that `involution(..., form="unfold")` (the
  reference's formulation, kept for tests and the benchmark) builds and saves for backward.
- Precision: the aggregation computes in at least float32. Under autocast the 1x1 convolutions run in
  the autocast dtype, the aggregation in float32, and the output is rounded once to the autocast dtype
  (the dtype nn.Conv2d would return). The output keeps the input's memory format.

Parameters (`parameter_count`), with C = out_channels, R = max(C // reduction, 1), G kernel groups,
K = kh*kw: `[in != out]*in*out + (C + 1)*R + (R + 1)*G*K + [bias]*C (+ 2*R for CoordInvolution2d)`.

`CoordInvolution2d` (position-aware): the kernel generator also sees the coordinates X, Y of the output
pixel (the kernel centre, `posconv.layers.coords` conventions): `reduce(xbar) + coord_weight @ (X, Y)` before
the ReLU, i.e. `reduce` with two extra coordinate input channels. `coord_weight` starts at zero, so the
layer starts as the Involution2d with the same weights and the same random draws.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from posconv.layers.coords import check_convention, output_grid, pad_amounts, positioned
from posconv.layers.position_term import add_position_term, is_channels_last

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
Pair = tuple[int, int]
Geometry = tuple[Pair, Pair, Pair, Pair]  # kernel_size, stride, dilation, output size
Form = Literal["fast", "unfold"]  # the functional form: shifted products, or the reference's unfold
_FORMS: tuple[Form, ...] = ("fast", "unfold")


# ---- options ----


def _pair(value: Any, option: str, minimum: int) -> Pair:
    """An int or a pair of ints, each at least `minimum`, as (H, W)."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{option} = {value!r}: expected an int or a pair of ints")
    if min(values) < minimum:
        raise ValueError(f"{option} = {value!r}: expected integers >= {minimum}")
    return values  # type: ignore[return-value]


def _padding(padding: Any, stride: Pair) -> Pair | str:
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding = {padding!r}: expected 'same', 'valid', an int or a pair of ints")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding = 'same' needs stride 1 (as in nn.Conv2d), got stride = {stride}")
        return padding
    return _pair(padding, "padding", 0)


def _positive_int(value: Any, option: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{option} = {value!r}: expected an int")
    if value < 1:
        raise ValueError(f"{option} = {value!r}: expected an integer >= 1")
    return value


def kernel_groups(channels: int, groups: int | None, group_channels: int) -> int:
    """G: `groups` if given, else channels // group_channels (at least 1); it must divide `channels`."""
    if groups is None:
        count = max(channels // _positive_int(group_channels, "group_channels"), 1)
        if channels % count:
            raise ValueError(
                f"group_channels = {group_channels}: gives {channels} // {group_channels} = {count} kernel "
                f"groups, which do not divide out_channels = {channels}; choose group_channels or groups so "
                f"that the group count divides out_channels"
            )
        return count
    _positive_int(groups, "groups")
    if channels % groups:
        raise ValueError(
            f"groups = {groups}: expected a number of kernel groups that divides out_channels = {channels}"
        )
    return groups


def parameter_count(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Pair,
    reduction: int = 4,
    group_channels: int = 16,
    *,
    groups: int | None = None,
    bias: bool = True,
    coords: bool = False,
) -> int:
    """Parameters of an Involution2d (CoordInvolution2d with `coords`), by the module docstring's formula."""
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    c = out_channels
    r = max(c // _positive_int(reduction, "reduction"), 1)
    g = kernel_groups(c, groups, group_channels)
    projection = in_channels * out_channels if in_channels != out_channels else 0
    return projection + (c + 1) * r + (r + 1) * g * kh * kw + bias * c + coords * 2 * r


# ---- the operation ----


def padded(
    x: torch.Tensor, kernel_size: Pair, dilation: Pair, padding: Pair | str, padding_mode: str
) -> torch.Tensor:
    """x~: `x` padded as nn.Conv2d pads it ("same": the odd pixel at the end)."""
    (top, bottom), (left, right) = (
        pad_amounts(padding if isinstance(padding, str) else padding[axis], kernel_size[axis], dilation[axis])
        for axis in (0, 1)
    )
    if not (top or bottom or left or right):
        return x
    xp = F.pad(x, (left, right, top, bottom), mode="constant" if padding_mode == "zeros" else padding_mode)
    if is_channels_last(x) and not is_channels_last(xp):  # circular padding returns NCHW
        xp = xp.contiguous(memory_format=torch.channels_last)
    return xp


def output_size(padded_size: Pair, kernel_size: Pair, stride: Pair, dilation: Pair) -> Pair:
    size = tuple(
        (p - d * (k - 1) - 1) // s + 1
        for p, k, s, d in zip(padded_size, kernel_size, stride, dilation, strict=True)
    )
    if min(size) < 1:
        raise ValueError(
            f"padded input {tuple(padded_size)} is smaller than the dilated kernel "
            f"(kernel_size = {kernel_size}, dilation = {dilation})"
        )
    return size  # type: ignore[return-value]


def generator_input(
    xp: torch.Tensor, kernel_size: Pair, stride: Pair, dilation: Pair, out_size: Pair
) -> torch.Tensor:
    """xbar: the mean of the stride-sized block of x~ at each output's kernel centre, (B, C, H_out, W_out)."""
    (top, left) = (d * (k - 1) // 2 for k, d in zip(kernel_size, dilation, strict=True))
    source = xp[..., top:, left:]
    if stride != (1, 1):
        source = F.avg_pool2d(source, stride, stride, ceil_mode=True)
    return source[..., : out_size[0], : out_size[1]]


def _taps(kernel_size: Pair, stride: Pair, dilation: Pair, out_size: Pair):
    """(tap index, rows, columns): the slice of x~ that each tap multiplies, row-major as nn.Unfold."""
    for u in range(kernel_size[0]):
        rows = slice(u * dilation[0], u * dilation[0] + (out_size[0] - 1) * stride[0] + 1, stride[0])
        for v in range(kernel_size[1]):
            cols = slice(v * dilation[1], v * dilation[1] + (out_size[1] - 1) * stride[1] + 1, stride[1])
            yield u * kernel_size[1] + v, rows, cols


class _ShiftedProducts(torch.autograd.Function):
    """`bias + sum over taps of slice(x~) * kernel[tap]`, saving only x~ and the kernels (one dtype)."""

    @staticmethod
    def forward(
        ctx: Any,
        xp: torch.Tensor,
        kernel: torch.Tensor,
        bias: torch.Tensor | None,
        geometry: Geometry,
        channels_last: bool,
    ) -> torch.Tensor:
        kernel_size, _, _, (h, w) = geometry
        b, c = xp.shape[:2]
        g = kernel.shape[1] // (kernel_size[0] * kernel_size[1])
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((b, c, h, w), dtype=xp.dtype, device=xp.device, memory_format=memory_format)
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.view(1, c, 1, 1).expand_as(out))
        grouped, kernels = out.unflatten(1, (g, c // g)), kernel.unflatten(1, (g, -1))
        for tap, rows, cols in _taps(*geometry):
            grouped.addcmul_(xp[:, :, rows, cols].unflatten(1, (g, c // g)), kernels[:, :, tap, None])
        ctx.save_for_backward(xp, kernel)
        ctx.geometry, ctx.has_bias = geometry, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xp, kernel = ctx.saved_tensors
        c = xp.shape[1]
        g = kernel.shape[1] // (ctx.geometry[0][0] * ctx.geometry[0][1])
        grouped, kernels = grad.unflatten(1, (g, c // g)), kernel.unflatten(1, (g, -1))
        xp_grad = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        kernel_grads = []
        for tap, rows, cols in _taps(*ctx.geometry):
            if xp_grad is not None:
                xp_grad[:, :, rows, cols].unflatten(1, (g, c // g)).addcmul_(
                    grouped, kernels[:, :, tap, None]
                )
            if ctx.needs_input_grad[1]:
                kernel_grads.append((grouped * xp[:, :, rows, cols].unflatten(1, (g, c // g))).sum(2))
        kernel_grad = torch.stack(kernel_grads, 2).flatten(1, 2) if kernel_grads else None
        bias_grad = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return xp_grad, kernel_grad, bias_grad, None, None


def _aggregate(
    xp: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, geometry: Geometry, channels_last: bool
) -> torch.Tensor:
    """`_ShiftedProducts` computed in at least float32, returned in the promoted dtype of `xp` and `kernel`
    (under autocast: the kernel's, the dtype nn.Conv2d would return)."""
    out_dtype = torch.promote_types(xp.dtype, kernel.dtype)
    if torch.is_autocast_enabled(xp.device.type):
        out_dtype = kernel.dtype
    dtype = torch.promote_types(out_dtype, torch.float32)
    bias = None if bias is None else bias.to(dtype)
    y = _ShiftedProducts.apply(xp.to(dtype), kernel.to(dtype), bias, geometry, channels_last)
    return y.to(out_dtype)


def _prepare(
    x: torch.Tensor,
    kernel: torch.Tensor,
    options: tuple[Any, Any, Any, Any, str],
) -> tuple[torch.Tensor, Geometry, int]:
    """x~, the geometry (kernel_size, stride, dilation, output size) and G, the kernel checked."""
    kernel_size, stride, padding, dilation, padding_mode = options
    kernel_size, stride, dilation = (
        _pair(kernel_size, "kernel_size", 1),
        _pair(stride, "stride", 1),
        _pair(dilation, "dilation", 1),
    )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode = {padding_mode!r}: expected one of {', '.join(PADDING_MODES)}")
    xp = padded(x, kernel_size, dilation, _padding(padding, stride), padding_mode)
    out_size = output_size(tuple(xp.shape[-2:]), kernel_size, stride, dilation)
    taps = kernel_size[0] * kernel_size[1]
    groups = kernel.shape[1] // taps if kernel.dim() == 4 else 0
    expected = (x.shape[0], groups * taps, *out_size)
    if not groups or tuple(kernel.shape) != expected or x.shape[1] % groups:
        raise ValueError(
            f"kernel of shape {tuple(kernel.shape)} for input {tuple(x.shape)}: expected (B, G*{taps}, "
            f"{out_size[0]}, {out_size[1]}) with G dividing the {x.shape[1]} channels"
        )
    return xp, (kernel_size, stride, dilation, out_size), groups


def involution(
    x: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: int | Pair,
    stride: int | Pair = 1,
    padding: int | Pair | str = 0,
    dilation: int | Pair = 1,
    padding_mode: str = "zeros",
    bias: torch.Tensor | None = None,
    *,
    form: Form = "fast",
) -> torch.Tensor:
    """Aggregate `x` (B, C, H, W) with per-pixel `kernel` (B, G*kh*kw, H_out, W_out) by shifted products.

    Taps are row-major in the kernel's channels (group g, tap u*kw + v at channel g*kh*kw + u*kw + v),
    as the reference's view of its span output. Computes in at least float32; returns the promoted dtype
    of `x` and `kernel` (under autocast the kernel's) in `x`'s memory format. `form="unfold"` is the
    reference's formulation instead (`_involution_unfold`), for tests and benchmarks.
    """
    if form not in _FORMS:
        raise ValueError(f"form = {form!r}: expected one of {', '.join(_FORMS)}")
    xp, geometry, groups = _prepare(x, kernel, (kernel_size, stride, padding, dilation, padding_mode))
    if form == "unfold":
        return _involution_unfold(xp, kernel, bias, geometry, groups)
    return _aggregate(xp, kernel, bias, geometry, is_channels_last(x))


def _involution_unfold(
    xp: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, geometry: Geometry, groups: int
) -> torch.Tensor:
    """The reference's formulation of `involution`: unfold x~ into (B, G, C/G, kh*kw, H_out, W_out)
    patches, multiply by the kernels and sum over the taps (plus the bias). Autograd saves the unfolded
    input. In the operands' promoted dtype, contiguous."""
    kernel_size, stride, dilation, out_size = geometry
    b, c = xp.shape[:2]
    patches = F.unfold(xp, kernel_size, dilation=dilation, stride=stride)
    patches = patches.view(b, groups, c // groups, -1, *out_size)
    y = (kernel.unflatten(1, (groups, -1)).unsqueeze(2) * patches).sum(3).view(b, c, *out_size)
    return y if bias is None else y + bias[:, None, None]


# ---- the layers ----


class Involution2d(nn.Module):
    """Involution with nn.Conv2d's signature (see the module docstring for its semantics)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Pair,
        stride: int | Pair = 1,
        padding: int | Pair | str = 0,
        dilation: int | Pair = 1,
        groups: int | None = None,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        reduction: int = 4,
        group_channels: int = 16,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _padding(padding, self.stride)
        self.dilation = _pair(dilation, "dilation", 1)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode = {padding_mode!r}: expected one of {', '.join(PADDING_MODES)}")
        self.padding_mode = padding_mode
        self.reduction = _positive_int(reduction, "reduction")
        self.group_channels = _positive_int(group_channels, "group_channels")
        self.groups = kernel_groups(out_channels, groups, group_channels)
        self.reduced_channels = max(out_channels // reduction, 1)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.project = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False, **factory)
            if in_channels != out_channels
            else None
        )
        self.reduce = nn.Conv2d(out_channels, self.reduced_channels, 1, **factory)
        self.span = nn.Conv2d(self.reduced_channels, self.groups * taps, 1, **factory)
        if not isinstance(bias, bool):
            raise TypeError(f"bias = {bias!r}: expected a bool")
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None

    def reset_parameters(self) -> None:
        """The 1x1 convolutions as nn.Conv2d initialises them; the output bias at zero."""
        for conv in (self.project, self.reduce, self.span):
            if conv is not None:
                conv.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def generator_features(self, x: torch.Tensor, xp: torch.Tensor, out_size: Pair) -> torch.Tensor:
        """`reduce(xbar)`, the kernel generator before its ReLU, from x and x~."""
        centres = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation, strict=True))
        pads = [
            pad_amounts(self._padding_on(axis), self.kernel_size[axis], self.dilation[axis])
            for axis in (0, 1)
        ]
        if self.stride == (1, 1) and centres == (pads[0][0], pads[1][0]) and out_size == tuple(x.shape[-2:]):
            return self.reduce(x)  # "same" padding at stride 1: xbar is x itself, not a strided view of x~
        return self.reduce(generator_input(xp, self.kernel_size, self.stride, self.dilation, out_size))

    def _padding_on(self, axis: int) -> int | str:
        return self.padding if isinstance(self.padding, str) else self.padding[axis]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = is_channels_last(x)  # the output's format is the input's, whatever the projection's
        if self.project is not None:
            x = self.project(x)
        xp = padded(x, self.kernel_size, self.dilation, self.padding, self.padding_mode)
        out_size = output_size(tuple(xp.shape[-2:]), self.kernel_size, self.stride, self.dilation)
        kernel = self.span(torch.relu(self.generator_features(x, xp, out_size)))
        geometry = (self.kernel_size, self.stride, self.dilation, out_size)
        return _aggregate(xp, kernel, self.bias, geometry, channels_last)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
            f", padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
            f", reduction={self.reduction}, bias={self.bias is not None}"
        )
        return text + ("" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode}")


class CoordInvolution2d(Involution2d):
    """Involution whose kernel generator also sees X, Y of the output pixels: `coord_weight` (R, 2)."""

    def __init__(self, *args: Any, coords: str = "centered", **kwargs: Any) -> None:
        """`args`, `kwargs`: Involution2d's; `coords` a `posconv.layers.coords` convention."""
        check_convention(coords)
        super().__init__(*args, **kwargs)
        self.coords = coords
        weight = self.reduce.weight
        self.coord_weight = nn.Parameter(weight.new_zeros(self.reduced_channels, 2))

    def reset_parameters(self) -> None:
        """Involution2d's initialisation, and `coord_weight` at zero: the plain layer's start."""
        super().reset_parameters()
        nn.init.zeros_(self.coord_weight)

    def generator_features(self, x: torch.Tensor, xp: torch.Tensor, out_size: Pair) -> torch.Tensor:
        """`reduce(xbar) + coord_weight @ (X, Y)`, the coordinates of the output pixels (kernel centres)."""
        features = super().generator_features(x, xp, out_size)
        dtype = torch.promote_types(features.dtype, self.coord_weight.dtype)  # autocast: the term in fp32
        geometry = (self.kernel_size, self.stride, self.dilation, self.padding)
        in_size = (x.shape[-2], x.shape[-1])
        grid = output_grid(in_size, out_size, *geometry, self.coords, x.device, dtype)
        basis = positioned(grid.flatten(1), self.coords)
        return add_position_term(features, self.coord_weight.to(dtype), basis)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coords={self.coords}"
