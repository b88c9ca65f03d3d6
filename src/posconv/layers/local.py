"""A locally connected layer: nn.Conv2d with a kernel of its own at every output location (seed 003's
"spatial-specific filter", before involution generates the filters from the input instead).

    y[b, o, i, j] = bias[o, i, j] + sum over c, (u, v) of weight[o, c, u, v, i, j] · x~[b, g(o)·C/G + c,
                                                            i·sh + u·dh, j·sw + v·dw]

x~ the input padded as nn.Conv2d pads it (any `padding`, `padding_mode`), g(o) the group of output
channel o, c over the C_in/groups channels of that group. nn.Conv2d's whole signature is honoured; the
bias is per location too, (C_out, H_out, W_out) (Keras's LocallyConnected2D does the same): every
location is its own affine map, and a shared bias would be the one thing the locations share.

**The weights depend on the output size**, so the layer is lazy (`torch.nn.LazyModuleMixin`, as
nn.LazyConv2d): its first forward lays the weight field out on that call's output grid and draws it as
nn.Conv2d draws its weight and bias (U(±1/sqrt(fan_in)) at every location). The optimizer must see the
parameters, so a pipeline runs one forward first (`posconv.model.materialize`); a saved model reloads
into a fresh lazy layer (the state dict gives the shapes, its extra state the input size the field was
laid out for).

**At another image size** the weight field is resampled, not refused: the pipeline evaluates every model
at other sizes (transfer to 96 and 192 px from 128) and under rescaling, and a place keeps its
coordinate across sizes (DESIGN.md §3, `coords.centre_coords`, convention "centered": an output sits at
its kernel centre, normalised to the input). The kernel at a new output location is the field read at
that location's coordinate, linearly along each axis between the two field locations around it
(bilinear over the grid), clamped to the outermost ones beyond them. At the size it was laid out for
the field is used as is, bit for bit. So a rule learned at "the right half" stays at the right half at
96 or 192 px; the kernels between field locations are interpolated, which no training constrained.

Parameters: H_out·W_out·(C_out·C_in/groups·kH·kW + C_out·[bias]), the nn.Conv2d count at every output
location: 7,340,032 for the FCN's first encoder layer at width 16 and 128 px (3 -> 16, 3x3, 128 x 128
outputs: 16,384 x 448), and 158,990,336 if every encoder layer is local (128² · (448 + 2,320) + 64² ·
(4,640 + 9,248) + 32² · (18,496 + 36,928)).

Computation: kH·kW·C_in/groups shifted products accumulated in place into the output (each a strided
slice of x~ times that tap's (C_out, H_out, W_out) weight map, broadcast over the batch), in a custom
autograd function that saves only x~ and the weight; no unfolded copy of the input. A per-location
matrix product (batched over the 16,384 locations) was measured 5-10x slower on the CPU: each small
product costs more to dispatch than to compute. Measured (forward and backward at 3 -> 16, 128 px,
batch 8, one thread of the 2-core CPU): 3x nn.Conv2d channels_last, 6-7x NCHW; a training step of the
width-16 FCN with the layer first: 1.5x vanilla's. Precision: in at least float32; under autocast the
output is rounded once to the autocast dtype (the dtype nn.Conv2d would return). The output keeps the
input's memory format.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from posconv.layers.coords import centre_coords
from posconv.layers.involution import (
    PADDING_MODES,
    Pair,
    _padding,
    _pair,
    _positive_int,
    _taps,
    output_size,
    pad_sizes,
    padded,
)
from posconv.layers.position_term import is_channels_last

__all__ = ["LocalConv2d", "parameter_count"]


def parameter_count(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Pair,
    out_size: Pair,
    groups: int = 1,
    bias: bool = True,
) -> int:
    """H_out·W_out·(C_out·C_in/groups·kH·kW + C_out·[bias])."""
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    return out_size[0] * out_size[1] * out_channels * (in_channels // groups * kh * kw + bias)


class _LocalProducts(torch.autograd.Function):
    """`bias + sum over (c, tap) of slice(x~) · weight[:, c, tap]`, saving only x~ and the weight.

    xp (B, C_in, Hp, Wp); weight (C_out, C_in/G, kH·kW, H_out, W_out); bias (C_out, H_out, W_out) or None;
    one dtype. Every output channel group g reads input channels [g·C_in/G, (g+1)·C_in/G)."""

    @staticmethod
    def forward(
        ctx: Any,
        xp: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        geometry: tuple[Pair, Pair, Pair, Pair],
        groups: int,
    ) -> torch.Tensor:
        b = xp.shape[0]
        c_out, per_group, _, h, w = weight.shape
        out = torch.zeros((b, c_out, h, w), dtype=xp.dtype, device=xp.device)
        if bias is not None:
            out += bias
        grouped_out = out.unflatten(1, (groups, -1))  # (B, G, C_out/G, H, W)
        grouped_in, grouped_weight = xp.unflatten(1, (groups, per_group)), weight.unflatten(0, (groups, -1))
        for c in range(per_group):
            for tap, rows, cols in _taps(*geometry):
                grouped_out.addcmul_(grouped_in[:, :, c, None, rows, cols], grouped_weight[:, :, c, tap])
        ctx.save_for_backward(xp, weight)
        ctx.geometry, ctx.groups, ctx.has_bias = geometry, groups, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xp, weight = ctx.saved_tensors
        groups, per_group = ctx.groups, weight.shape[1]
        grad = grad.contiguous()  # the weight's layout (NCHW), as in forward
        grouped_grad = grad.unflatten(1, (groups, -1))
        grouped_in, grouped_weight = xp.unflatten(1, (groups, per_group)), weight.unflatten(0, (groups, -1))
        xp_grad = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        weight_grad = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for c in range(per_group):
            for tap, rows, cols in _taps(*ctx.geometry):
                if xp_grad is not None:
                    xp_grad.unflatten(1, (groups, per_group))[:, :, c, rows, cols].add_(
                        (grouped_grad * grouped_weight[:, :, c, tap]).sum(2)
                    )
                if weight_grad is not None:  # summed over the batch image by image: no batch-sized temporary
                    target = weight_grad.unflatten(0, (groups, -1))[:, :, c, tap]
                    for image in range(len(grad)):
                        target.addcmul_(grouped_grad[image], grouped_in[image, :, c, None, rows, cols])
        bias_grad = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return xp_grad, weight_grad, bias_grad, None, None


def _linear_resampling(
    old: torch.Tensor, new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(below, above, fraction): each new coordinate between field locations `below` and `above` (indices
    into `old`, evenly spaced and increasing), `fraction` of the way; clamped beyond the ends."""
    last = len(old) - 1
    if last == 0:
        zero = torch.zeros(len(new), dtype=torch.long, device=new.device)
        return zero, zero, torch.zeros_like(new)
    u = ((new - old[0]) / (old[1] - old[0])).clamp(0, last)
    below = u.floor().clamp(max=last - 1)
    return below.long(), below.long() + 1, u - below


def _resample(field: torch.Tensor, dim: int, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`field` linearly interpolated along `dim` from locations at coordinates `old` to `new`."""
    below, above, fraction = _linear_resampling(old, new)
    shape = [1] * field.dim()
    shape[dim] = len(new)
    fraction = fraction.to(field.dtype).view(shape)
    return torch.lerp(field.index_select(dim, below), field.index_select(dim, above), fraction)


class LocalConv2d(LazyModuleMixin, nn.Module):
    """Locally connected layer with nn.Conv2d's signature; lazy: see the module docstring.

    `weight` (C_out, C_in/groups, kH, kW, H_out, W_out): an nn.Conv2d weight at every output location;
    `bias` (C_out, H_out, W_out). `padding` takes ints, pairs, "valid", and "same" at stride 1 (as
    nn.Conv2d); `groups` must divide both channel counts.
    """

    cls_to_become = None
    weight: UninitializedParameter | nn.Parameter
    bias: UninitializedParameter | nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Pair,
        stride: int | Pair = 1,
        padding: int | Pair | str = 0,
        dilation: int | Pair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _padding(padding, self.stride)
        self.dilation = _pair(dilation, "dilation", 1)
        self.groups = _positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups = {groups}: expected a divisor of in_channels = {in_channels} and "
                f"out_channels = {out_channels}"
            )
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode = {padding_mode!r}: expected one of {', '.join(PADDING_MODES)}")
        self.padding_mode = padding_mode
        if not isinstance(bias, bool):
            raise TypeError(f"bias = {bias!r}: expected a bool")
        self.weight = UninitializedParameter(device=device, dtype=dtype)
        self.bias = UninitializedParameter(device=device, dtype=dtype) if bias else None
        self.field_input_size: Pair | None = None  # the input size the field was laid out for

    # ---- laziness ----

    def _pad_sizes(self) -> tuple[int, int, int, int]:
        return pad_sizes(self.kernel_size, self.dilation, self.padding)

    def _output_size(self, in_size: Pair) -> Pair:
        top, bottom, left, right = self._pad_sizes()
        padded_size = (in_size[0] + top + bottom, in_size[1] + left + right)
        return output_size(padded_size, self.kernel_size, self.stride, self.dilation)

    def initialize_parameters(self, x: torch.Tensor) -> None:  # type: ignore[override]
        """At the first forward: the field on this input's output grid, drawn as nn.Conv2d draws."""
        if not self.has_uninitialized_params():
            return
        in_size = (x.shape[-2], x.shape[-1])
        out = self._output_size(in_size)
        with torch.no_grad():
            self.weight.materialize(
                (self.out_channels, self.in_channels // self.groups, *self.kernel_size, *out)
            )
            if self.bias is not None:
                self.bias.materialize((self.out_channels, *out))
            self.field_input_size = in_size
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(±1/sqrt(fan_in)) at every location, weight and bias, fan_in = C_in/groups·kH·kW."""
        if self.has_uninitialized_params():
            return
        bound = 1 / math.sqrt(self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def get_extra_state(self) -> dict[str, Any]:
        return {"field_input_size": self.field_input_size}

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """LazyModuleMixin's own version leaves the extra state out (nn.Module's writes it): put it back."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "_extra_state"] = self.get_extra_state()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        size = state["field_input_size"]
        self.field_input_size = None if size is None else (int(size[0]), int(size[1]))

    # ---- the field at any size ----

    def _coordinates(self, in_size: Pair, out: Pair, axis: int, device: torch.device) -> torch.Tensor:
        padding = self.padding if isinstance(self.padding, str) else self.padding[axis]
        geometry = (self.kernel_size[axis], self.stride[axis], self.dilation[axis], padding)
        return centre_coords(in_size[axis], out[axis], *geometry, "centered", device, torch.float64)

    def field(self, in_size: Pair, out: Pair) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias for an input of `in_size` (output `out`): the parameters themselves at the
        size the field was laid out for, else the field resampled to the output grid (module docstring)."""
        laid_out = self.field_input_size
        if laid_out is None:
            raise RuntimeError("LocalConv2d has no field yet: it is laid out at the first forward")
        if in_size == laid_out:
            return self.weight, self.bias
        field_out = self._output_size(laid_out)
        weight, bias = self.weight, self.bias
        for axis, dim in ((0, -2), (1, -1)):
            old = self._coordinates(laid_out, field_out, axis, weight.device)
            new = self._coordinates(in_size, out, axis, weight.device)
            weight = _resample(weight, dim, old, new)
            bias = None if bias is None else _resample(bias, dim, old, new)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = padded(x, self._pad_sizes(), self.padding_mode)
        out = output_size(tuple(xp.shape[-2:]), self.kernel_size, self.stride, self.dilation)
        weight, bias = self.field((x.shape[-2], x.shape[-1]), out)
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        dtype = torch.promote_types(out_dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            weight = weight.to(dtype).flatten(2, 3)
            bias = None if bias is None else bias.to(dtype)
            geometry = (self.kernel_size, self.stride, self.dilation, out)
            # NCHW inside: products of channels_last slices and NCHW weight maps run ~4x slower
            y = _LocalProducts.apply(xp.to(dtype).contiguous(), weight, bias, geometry, self.groups)
        memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return y.to(out_dtype).contiguous(memory_format=memory_format)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
            f", padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
            f", bias={self.bias is not None}, field_input_size={self.field_input_size}"
        )
        return text + ("" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode}")
