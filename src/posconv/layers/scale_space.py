"""Deep Scale-Spaces (Worrall & Welling, NeurIPS 2019, "Deep Scale-spaces: Equivariance Over Scale"), and
seed 004's two variants, each a drop-in for nn.Conv2d.

**Lifting.** The input x is lifted to a stack of L levels, (B, C, L, H, W): level 0 is x itself, level
k >= 1 is x blurred by Lindeberg's discrete Gaussian of scale (variance, in pixels²)

    t_k = s0² · (b^(2k) − 1),    kernel T_t(n) = exp(−t) · I_n(t),  n ∈ Z,

I_n the modified Bessel function of the first kind of integer order n, applied along the rows and then
the columns (separable), as the official code (danielewworrall/deep-scale-spaces, `BesselConv2d`)
defines it. Read as scale-space theory: x is an image of the scene at an inner scale s0 (pixels), and
level k is the same scene at scale s0·b^k, because the discrete Gaussian is a semigroup
(T_t T_u = T_{t+u}) and s0² + t_k = (s0·b^k)². `discrete_gaussian` sums the Bessel series in log space
in float64 (positive terms, no cancellation: within 3e-13 of mpmath up to t = 1024). The kernel is
truncated at the official radius R = 4·ceil(sqrt(t)) (4 standard deviations or more) and renormalised
to sum 1, as the official code does: the mass cut off is at most 6.4e-5 for every t (measured with
mpmath for t from 0.1 to 1024), so a blurred value moves by at most ~1.3e-4 of the image's largest
magnitude per axis. Outside the image the blur reads what `padding_mode` gives (zeros, as the official
code, by default); any radius works at any size (reflect reflects again and again).

DSS v2 (`BilinearScaleSpaceConv2d`, seed 004 §2.1) lifts by bilinear interpolation instead: level k is x
shrunk by b^k (to floor(H / b^k) x floor(W / b^k), at least 1, plain bilinear, align_corners=False, no
antialiasing, as "bilinear interpolation" says) and stretched back to H x W the same way. Seed 004 keeps
each level at its own size and max-pools them down to the smallest; a drop-in for nn.Conv2d must return
the input's grid, and the scale convolution's levels must share one, so every level returns to H x W
and the rest of the layer is DSS's. Only the lifting differs between the two.

**Scale convolution.** One kernel w is shared over the levels: output level s reads the lifted levels
s .. s+interaction−1 (`interaction` of them) and convolves level s+j with w's slice j dilated by
dilation·b^s, padding scaled alike (padding·b^s), so each level sees the same pattern b^s times larger.
w is stored as an nn.Conv2d weight over the stacked levels, (C_out, C_in/groups·interaction, kH, kW),
input channel c·interaction + j holding channel c at level s+j (4-D, so that `Module.to(memory_format=
torch.channels_last)`, which the pipeline applies to the model, takes it). At the top levels fewer than
`interaction` levels exist: level s reads levels s .. L−1 with w's first L−s slices, the missing
levels counting as zero (the official `Dconv2d`'s truncation); those levels lose the equivariance.
The dilation must be a whole number of pixels at every level, so `base` must be an integer >= 2: a base
of 1.5 is refused (the official code truncates int(1.5^s) = 1, 1, 2, 3, 5, ..., which no longer grows by
the base and breaks the equivariance).

Options and defaults: `base` b = 2, `zero_scale` s0 = 0.5 px (the official default), `levels` L = 4
(scales s0·b^k = 0.5, 1, 2, 4 px; dilations 1, 2, 4, 8), `interaction` 2 (1 <= interaction <= levels).

**Scale pooling.** The layer returns the maximum over the L output levels: a feature's strongest response
whatever its scale, invariant to a shift along the scale axis (seed 004's summary says average pooling;
scale-channel networks use either). Max routes each output's gradient to one level: where two levels
are within rounding of each other the gradient's route can flip (tests compare gradients before it).

**Where the scale axis meets the FCN.** The factory's contract is (B, C_in, H, W) -> (B, C_out, H', W'):
the FCN builds every convolution with `make_conv` and never branches on the layer type. So each layer
lifts its own input, convolves over positions and scales, and pools over scales before it returns. With
`placement: first` this is the paper's design cut short: lift at the input, one scale convolution, pool
over scales after the first layer; everything after it is an ordinary CNN. Under `placement: encoder`
every encoder layer lifts its (already pooled) input anew: a chain of scale-pooled layers, not the
paper's deep network, which carries the scale axis from layer to layer. Carrying it through would need
the model to know about the axis (5-D tensors between layers, pooling before the decoder): the model
would branch on the layer type, which the project does not do. Cost of one layer: the lifting (two
matrix products per level, (H + W) multiply-adds per pixel and channel) plus L convolutions, output
level s with min(interaction, L − s) times the input channels: sum over s of min(I, L − s) times the
plain convolution's arithmetic (7x at L = 4, I = 2), plus the pooling's elementwise passes. Measured
(forward and backward at 3 -> 16, 128 px, batch 8, channels_last, one thread of the 2-core CPU): 7-8x
nn.Conv2d for dss and dss_bilinear, ~70x for dss_deform (L deformable convolutions); a training step of
the width-16 FCN with the layer first: 1.7-1.8x vanilla's, 10x for dss_deform.

Geometry. nn.Conv2d's whole signature: `stride` (the same at every level), `dilation` (the base
dilation, times b^s at level s), `groups` (the channels of a group read every level), `bias` (one per
output channel, shared by the levels), `padding_mode` (the scale convolution and the Gaussian blur both
read the padding there). `padding` must keep each output on its kernel centre, 2·padding =
dilation·(kernel_size − 1) per axis (so 1 for a 3x3 kernel; "same" at stride 1 where that is an integer;
"valid" with a 1-pixel kernel): only then do the levels, dilated differently, give outputs of one size
on one grid. Other paddings are refused.

**Deformable DSS** (`DeformScaleSpaceConv2d`, seed 004 §2.2): the scale convolution's taps read at
learned offsets, weighed by learned masks, through `posconv.layers.deform.deform_conv2d`. Offsets and
mask logits come from one convolution `offset_weight` (3·G·kH·kW, C_in·interaction, kH, kW), shared over
the levels and dilated as the scale convolution is; level s multiplies its offsets by b^s (the
deformation is measured in the level's own units, so a pattern b times larger deforms b times as far),
and mask = 2·sigmoid(logit) as `DeformConv2d`. `offset_weight` and `offset_bias` start at zero: the
layer starts exactly as DSS with the same weights and the same random draws. The offsets are computed in
float32 under autocast, as `DeformConv2d`'s.

Initialisation: as nn.Conv2d draws it, fan-in counting the interaction levels (C_in/groups · interaction
· kH · kW); the official code draws He-normal weights and sets the bias to 1.

Parameters: C_out·(C_in/groups)·interaction·kH·kW + C_out (bias), plus 3·G·kH·kW·(C_in·interaction·kH·kW
+ 1) for the deformable layer: 880 (dss, dss_bilinear) and 2,365 (dss_deform) at 3 -> 16, 3x3, the
defaults, against nn.Conv2d's 448.

Precision: the lifting runs in at least float32 outside autocast (its matrices are float32 constants);
under autocast the scale convolution follows autocast (bfloat16) and the output is its dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from posconv.layers.coords import _cached
from posconv.layers.deform import deform_conv2d
from posconv.layers.involution import PADDING_MODES, Pair, _pair, _positive_int
from posconv.layers.position_term import is_channels_last

__all__ = [
    "BilinearScaleSpaceConv2d",
    "DeformScaleSpaceConv2d",
    "ScaleSpaceConv2d",
    "bessel_scales",
    "blur_radius",
    "discrete_gaussian",
    "parameter_count",
]


# ---- the discrete Gaussian and the lifting ----


def bessel_scales(base: int, zero_scale: float, levels: int) -> tuple[float, ...]:
    """t_k = s0²·(b^(2k) − 1) for k = 0 .. levels − 1 (t_0 = 0: level 0 is the input itself)."""
    return tuple(zero_scale**2 * (base ** (2 * k) - 1) for k in range(levels))


def blur_radius(t: float) -> int:
    """The official truncation: 4·ceil(sqrt(t)) taps on each side."""
    return 4 * math.ceil(math.sqrt(t))


def discrete_gaussian(t: float, radius: int) -> torch.Tensor:
    """exp(−t)·I_n(t) for n = −radius .. radius, float64, not renormalised (the full series sums to 1).

    I_n(t) = sum_m (t/2)^(2m+n) / (m! (m+n)!): every term is positive, so summing exp(log term) with
    logsumexp loses nothing to cancellation or overflow. Terms beyond m = t/2 + 10·sqrt(t) + 25 are below
    float64's resolution of the sum."""
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"t = {t!r}: expected a positive, finite scale")
    n = torch.arange(radius + 1, dtype=torch.float64)[:, None]
    m = torch.arange(math.ceil(t / 2 + 10 * math.sqrt(t) + 25), dtype=torch.float64)
    log_terms = (2 * m + n) * math.log(t / 2) - torch.lgamma(m + 1) - torch.lgamma(m + n + 1) - t
    half = torch.logsumexp(log_terms, dim=1).exp()
    return torch.cat([half.flip(0)[:-1], half])


def _source_index(size: int, before: int, after: int, padding_mode: str) -> torch.Tensor:
    """For each position of an axis extended by `before` and `after`, the input index it reads (−1: a zero).

    "reflect" mirrors about the end pixels again and again (period 2·(size − 1)), so it is defined for any
    extension; within one reflection it is F.pad's."""
    q = torch.arange(-before, size + after)
    if padding_mode == "zeros":
        return torch.where((q >= 0) & (q < size), q, -1)
    if padding_mode == "replicate":
        return q.clamp(0, size - 1)
    if padding_mode == "circular":
        return q.remainder(size)
    if size == 1:  # reflect
        return torch.zeros_like(q)
    r = q.remainder(2 * (size - 1))
    return torch.where(r < size, r, 2 * (size - 1) - r)


@_cached
def _blur_matrices(
    size: int, scales: tuple[float, ...], padding_mode: str, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(levels − 1, size, size): row i of matrix k blurs pixel i by T_{t_k}, truncated and renormalised,
    the taps outside the axis read where `padding_mode` says."""
    matrices = torch.zeros(len(scales) - 1, size, size, dtype=torch.float64)
    rows = torch.arange(size)[:, None]
    for k, t in enumerate(scales[1:]):
        radius = blur_radius(t)
        kernel = discrete_gaussian(t, radius)
        columns = _source_index(size, radius, radius, padding_mode)[rows + torch.arange(2 * radius + 1)]
        inside = columns >= 0  # (size, taps): tap j of row i reads column columns[i, j]
        values = (kernel / kernel.sum()).expand(size, -1)
        matrices[k].index_put_(
            (rows.expand_as(columns)[inside], columns[inside]), values[inside], accumulate=True
        )
    return matrices.to(device, dtype)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def gaussian_lift(x: torch.Tensor, scales: tuple[float, ...], padding_mode: str) -> torch.Tensor:
    """(B, C, L, H, W): x, then x blurred by the discrete Gaussian of each scale t_k (k >= 1); computed in
    at least float32 outside autocast, returned in x's dtype."""
    if len(scales) == 1:
        return x[:, :, None]
    dtype = _work_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        rows = _blur_matrices(x.shape[-2], scales, padding_mode, x.device, dtype)
        columns = _blur_matrices(x.shape[-1], scales, padding_mode, x.device, dtype)
        blurred = rows @ (x.to(dtype)[:, :, None] @ columns.transpose(-1, -2))
    return torch.cat([x[:, :, None], blurred.to(x.dtype)], 2)


def bilinear_lift(x: torch.Tensor, base: int, levels: int) -> torch.Tensor:
    """(B, C, L, H, W): x, then x shrunk by base^k and stretched back, bilinearly (DSS v2); computed in
    at least float32 outside autocast, returned in x's dtype."""
    height, width = x.shape[-2:]
    stack = [x]
    with torch.autocast(x.device.type, enabled=False):
        for k in range(1, levels):
            small = (max(height // base**k, 1), max(width // base**k, 1))
            shrunk = F.interpolate(x.to(_work_dtype(x)), size=small, mode="bilinear", align_corners=False)
            stretched = F.interpolate(shrunk, size=(height, width), mode="bilinear", align_corners=False)
            stack.append(stretched.to(x.dtype))
    return torch.stack(stack, 2)


def _pad(x: torch.Tensor, pads: tuple[int, int, int, int], padding_mode: str) -> torch.Tensor:
    """x padded by (top, bottom, left, right) in `padding_mode`, for any amount (`_source_index`)."""
    top, bottom, left, right = pads
    if padding_mode == "zeros":
        return F.pad(x, (left, right, top, bottom))
    rows = _source_index(x.shape[-2], top, bottom, padding_mode).to(x.device)
    columns = _source_index(x.shape[-1], left, right, padding_mode).to(x.device)
    return x.index_select(-2, rows).index_select(-1, columns)


class _MaxOverLevels(torch.autograd.Function):
    """The elementwise maximum of the levels (same shapes); each output's gradient goes to the level that
    holds the maximum, the lowest among equals. Saves one uint8 map of winners: autograd's chain of
    torch.maximum saves masks per pair and spends its backward in masked_fill_ (measured: ~4x slower
    than this for four 8 x 16 x 128 x 128 levels on the 2-core CPU)."""

    @staticmethod
    def forward(ctx: Any, *levels: torch.Tensor) -> torch.Tensor:
        best, winner = levels[0], torch.zeros_like(levels[0], dtype=torch.uint8)
        for level_index, level in enumerate(levels[1:], 1):
            winner = torch.where(level > best, level_index, winner)
            best = torch.maximum(best, level)
        ctx.save_for_backward(winner)
        return best

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (winner,) = ctx.saved_tensors
        return tuple(
            torch.where(winner == level_index, grad, 0) if needed else None
            for level_index, needed in enumerate(ctx.needs_input_grad)
        )


# ---- options ----


def _base(base: Any) -> int:
    if not isinstance(base, int) or isinstance(base, bool) or base < 2:
        raise ValueError(
            f"base = {base!r}: expected an integer >= 2 (the scale convolution dilates its kernel by "
            f"base^level, which must be a whole number of pixels; the official code truncates "
            f"int(base^level), which no longer grows by the base)"
        )
    return base


def _zero_scale(zero_scale: Any) -> float:
    if isinstance(zero_scale, bool) or not isinstance(zero_scale, (int, float)):
        raise TypeError(f"zero_scale = {zero_scale!r}: expected a number")
    if not (zero_scale > 0 and math.isfinite(zero_scale)):
        raise ValueError(f"zero_scale = {zero_scale!r}: expected a positive, finite inner scale (pixels)")
    return float(zero_scale)


def _centred_padding(padding: Any, kernel_size: Pair, dilation: Pair, stride: Pair) -> Pair:
    """The padding in pixels per axis, which must be dilation·(k − 1)/2 so that every level's output sits
    on its kernel centre and all levels share one output grid."""
    centred = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation, strict=True))
    exact = all(d * (k - 1) % 2 == 0 for k, d in zip(kernel_size, dilation, strict=True))
    if padding == "same" and stride != (1, 1):
        raise ValueError(f"padding = 'same' needs stride 1 (as in nn.Conv2d), got stride = {stride}")
    given = centred if padding == "same" else (0, 0) if padding == "valid" else _pair(padding, "padding", 0)
    if not exact or given != centred:
        raise ValueError(
            f"padding = {padding!r}: a scale-space layer pads each level by dilation·(kernel_size − 1)/2 "
            f"times its dilation factor, so that every level's output sits on its kernel centre; with "
            f"kernel_size = {kernel_size} and dilation = {dilation} that needs "
            + ("an odd kernel or an even dilation" if not exact else f"padding = {centred}")
        )
    return centred  # type: ignore[return-value]


def _divisor(value: Any, option: str, **counts: int) -> int:
    value = _positive_int(value, option)
    if any(count % value for count in counts.values()):
        names = " and ".join(f"{name} = {count}" for name, count in counts.items())
        raise ValueError(f"{option} = {value}: expected a divisor of {names}")
    return value


def parameter_count(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Pair,
    interaction: int = 2,
    *,
    groups: int = 1,
    bias: bool = True,
    offset_groups: int | None = None,
) -> int:
    """Parameters by the module docstring's formula; `offset_groups` for the deformable layer."""
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    taps = kh * kw
    count = out_channels * in_channels // groups * interaction * taps + bias * out_channels
    if offset_groups is not None:
        count += 3 * offset_groups * taps * (in_channels * interaction * taps + 1)
    return count


# ---- the layers ----


class _ScaleConv2d(nn.Module):
    """The scale convolution and scale pooling, shared by the three layers; subclasses define `lift`."""

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
        *,
        base: int = 2,
        levels: int = 4,
        interaction: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        self.padding = _centred_padding(padding, self.kernel_size, self.dilation, self.stride)
        self.groups = _divisor(groups, "groups", in_channels=in_channels, out_channels=out_channels)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode = {padding_mode!r}: expected one of {', '.join(PADDING_MODES)}")
        self.padding_mode = padding_mode
        self.base = _base(base)
        self.levels = _positive_int(levels, "levels")
        self.interaction = _positive_int(interaction, "interaction")
        if interaction > levels:
            raise ValueError(f"interaction = {interaction}: expected at most levels = {levels}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias = {bias!r}: expected a bool")
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // self.groups * interaction, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's draws, its fan-in counting the interaction levels."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def lift(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_in, levels, H, W)."""
        raise NotImplementedError

    def level_geometry(self, level: int) -> tuple[Pair, Pair]:
        """(padding, dilation) of output level `level`: the base geometry times base^level."""
        factor = self.base**level
        return (
            (self.padding[0] * factor, self.padding[1] * factor),
            (self.dilation[0] * factor, self.dilation[1] * factor),
        )

    def level_input(self, lifted: torch.Tensor, level: int, channels_last: bool) -> torch.Tensor:
        """The levels output level `level` reads, (B, C_in·n, H, W), channel c·n + j holding level
        `level` + j of channel c (n = min(interaction, levels − level)), padded by the level's padding
        unless it is zero padding (which the convolution does)."""
        stack = lifted[:, :, level : level + self.interaction]
        frame = stack.reshape(stack.shape[0], -1, *stack.shape[-2:])
        if channels_last:
            frame = frame.contiguous(memory_format=torch.channels_last)
        if self.padding_mode == "zeros":
            return frame
        (ph, pw), _ = self.level_geometry(level)
        return _pad(frame, (ph, ph, pw, pw), self.padding_mode)

    def level_weight(self, weight: torch.Tensor, level: int) -> torch.Tensor:
        """`weight` (its channels c·interaction + j) cut to the n levels `level_input` holds."""
        n = min(self.interaction, self.levels - level)
        if n == self.interaction:
            return weight
        return weight.unflatten(1, (-1, self.interaction))[:, :, :n].flatten(1, 2)

    def _conv_padding(self, level: int) -> Pair:
        return self.level_geometry(level)[0] if self.padding_mode == "zeros" else (0, 0)

    def convolve_level(self, frame: torch.Tensor, level: int) -> torch.Tensor:
        """Output level `level` from its `level_input`."""
        _, dilation = self.level_geometry(level)
        weight = self.level_weight(self.weight, level)
        return F.conv2d(
            frame, weight, self.bias, self.stride, self._conv_padding(level), dilation, self.groups
        )

    def scale_convolution(self, lifted: torch.Tensor, channels_last: bool = False) -> list[torch.Tensor]:
        """The `levels` output levels, each (B, C_out, H', W'), before scale pooling."""
        return [
            self.convolve_level(self.level_input(lifted, level, channels_last), level)
            for level in range(self.levels)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = is_channels_last(x)
        outputs = self.scale_convolution(self.lift(x), channels_last)
        y = outputs[0] if len(outputs) == 1 else _MaxOverLevels.apply(*outputs)
        return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
            f", padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
            f", bias={self.bias is not None}, base={self.base}, levels={self.levels}"
            f", interaction={self.interaction}"
        )
        return text + ("" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode}")


class ScaleSpaceConv2d(_ScaleConv2d):
    """DSS: the Gaussian (Bessel) lifting, the scale convolution, max over scales (module docstring)."""

    def __init__(self, *args: Any, zero_scale: float = 0.5, **kwargs: Any) -> None:
        """`args`, `kwargs`: nn.Conv2d's signature, plus `base`, `levels`, `interaction`; `zero_scale` s0,
        the input's inner scale in pixels (the official default 0.5)."""
        self.zero_scale = _zero_scale(zero_scale)
        super().__init__(*args, **kwargs)
        self.scales = bessel_scales(self.base, self.zero_scale, self.levels)

    def lift(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_lift(x, self.scales, self.padding_mode)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, zero_scale={self.zero_scale}"


class BilinearScaleSpaceConv2d(_ScaleConv2d):
    """DSS v2 (seed 004): bilinear shrink-and-stretch lifting, then DSS's scale convolution and pooling."""

    def lift(self, x: torch.Tensor) -> torch.Tensor:
        return bilinear_lift(x, self.base, self.levels)


class DeformScaleSpaceConv2d(ScaleSpaceConv2d):
    """Deformable DSS (seed 004): DSS whose scale convolution reads at learned offsets (module docstring)."""

    def __init__(self, *args: Any, offset_groups: int = 1, **kwargs: Any) -> None:
        """`args`, `kwargs`: ScaleSpaceConv2d's; `offset_groups` G must divide in_channels."""
        super().__init__(*args, **kwargs)
        self.offset_groups = _divisor(offset_groups, "offset_groups", in_channels=self.in_channels)
        taps = self.kernel_size[0] * self.kernel_size[1]
        shape = (3 * offset_groups * taps, self.in_channels * self.interaction, *self.kernel_size)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.offset_weight = nn.Parameter(torch.zeros(shape, **factory))  # no random draws (docstring)
        self.offset_bias = nn.Parameter(torch.zeros(shape[0], **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "offset_weight"):  # the base class calls this before they exist
            nn.init.zeros_(self.offset_weight)
            nn.init.zeros_(self.offset_bias)

    def offsets_and_mask(self, frame: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Level `level`'s offsets in pixels (times base^level) and masks in (0, 2), float32 or wider."""
        _, dilation = self.level_geometry(level)
        weight = self.level_weight(self.offset_weight, level)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        with torch.autocast(frame.device.type, enabled=False):
            out = F.conv2d(
                frame.to(dtype),
                weight.to(dtype),
                self.offset_bias.to(dtype),
                self.stride,
                self._conv_padding(level),
                dilation,
            )
        split = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :split] * self.base**level, 2 * torch.sigmoid(out[:, split:])

    def convolve_level(self, frame: torch.Tensor, level: int) -> torch.Tensor:
        _, dilation = self.level_geometry(level)
        offset, mask = self.offsets_and_mask(frame, level)
        weight = self.level_weight(self.weight, level)
        return deform_conv2d(
            frame, offset, weight, self.bias, self.stride, self._conv_padding(level), dilation, mask
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset_groups={self.offset_groups}"
