"""Deep Scale-Spaces against independent references: scipy.special.ive, numpy.pad and loops over
output pixels in float64, test_deform's loop reference for the deformable variant, finite differences,
and the scale-shift property the family exists for."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F
from test_deform import _naive
from test_layers import _forward_and_grads

from posconv.layers import make_conv
from posconv.layers.scale_space import (
    BilinearScaleSpaceConv2d,
    DeformScaleSpaceConv2d,
    ScaleSpaceConv2d,
    _pad,
    bessel_scales,
    blur_radius,
    discrete_gaussian,
    gaussian_lift,
    parameter_count,
)
from posconv.model import FCN, ModelSpec, load_model, save_model
from posconv.registry import SCALE_SPACE

F64 = torch.float64
NUMPY_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
CLASSES = {
    "dss": ScaleSpaceConv2d,
    "dss_bilinear": BilinearScaleSpaceConv2d,
    "dss_deform": DeformScaleSpaceConv2d,
}
BF16_TOLERANCE = 2e-2  # relative to the largest value, as the other layers' tests

# (C_in, C_out, input H, W, options): every padding mode, strides 1-3, groups, dilation, rectangular
# kernels, "same", a 1x1 kernel, base 2 and 3, interaction 1 to levels; small images whose blur radius
# (up to 16 px) and top-level padding exceed the image, so padding is read far out
GEOMETRIES: list[tuple[int, int, int, int, dict[str, Any]]] = [
    (3, 4, 7, 9, dict(kernel_size=3, padding=1, levels=3)),
    (4, 6, 9, 7, dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect", groups=2, levels=4)),
    (
        2,
        3,
        8,
        11,
        dict(kernel_size=(3, 5), padding=(1, 4), dilation=(1, 2), padding_mode="circular", levels=3),
    ),
    (2, 4, 6, 6, dict(kernel_size=3, padding="same", padding_mode="replicate", bias=False, base=3, levels=2)),
    (4, 2, 7, 8, dict(kernel_size=1, stride=2, padding="valid", levels=3, interaction=3)),
    (2, 2, 9, 9, dict(kernel_size=3, stride=3, padding=2, dilation=2, levels=3, interaction=1)),
    (2, 3, 5, 6, dict(kernel_size=3, padding=1, levels=1, interaction=1)),  # no lifting: a plain conv
]
IDS = [f"{i}to{o}-{h}x{w}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for i, o, h, w, kw in GEOMETRIES]


def _layer(name: str, geometry: tuple, dtype: torch.dtype = F64, **options: Any) -> Any:
    """The geometry's layer, every parameter drawn from U(-1, 1) (the offsets from U(-0.5, 0.5))."""
    c_in, c_out, _, _, kwargs = geometry
    if name == "dss_bilinear":
        kwargs = {key: value for key, value in kwargs.items() if key != "zero_scale"}
    torch.manual_seed(0)
    layer = CLASSES[name](c_in, c_out, dtype=dtype, **kwargs, **options)
    with torch.no_grad():
        for key, parameter in layer.named_parameters():
            scale = 0.5 if key.startswith("offset") else 1.0
            parameter.uniform_(-scale, scale)
    return layer


def _input(geometry: tuple, dtype: torch.dtype = F64, batch: int = 2) -> torch.Tensor:
    c_in, _, h, w, _ = geometry
    return torch.randn(batch, c_in, h, w, generator=torch.Generator().manual_seed(2), dtype=dtype)


# ---- the discrete Gaussian against scipy.special.ive ----


def _reference_kernel(t: float, radius: int) -> np.ndarray:
    """exp(-t)·I_|n|(t), n = -radius .. radius: scipy's exponentially scaled Bessel function, float64."""
    return scipy.special.ive(np.abs(np.arange(-radius, radius + 1)), t)


def test_the_scales_and_radii_are_the_official_ones() -> None:
    assert bessel_scales(2, 0.5, 4) == (0.0, 0.75, 3.75, 15.75)  # s0²·(b^(2k) − 1)
    assert bessel_scales(3, 1.0, 3) == (0.0, 8.0, 80.0)
    assert [blur_radius(t) for t in (0.75, 3.75, 15.75, 16.0, 16.5)] == [4, 8, 16, 16, 20]


@pytest.mark.parametrize("t", [1e-3, 0.75, 3.75, 15.75, 63.75, 255.75, 1023.75])
def test_the_discrete_gaussian_is_exp_minus_t_times_bessel_i(t: float) -> None:
    radius = blur_radius(t)
    got = discrete_gaussian(t, radius)
    expected = torch.from_numpy(_reference_kernel(t, radius))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("t", [0.1, 0.75, 3.75, 15.75, 63.75, 255.75, 1023.75])
def test_the_official_radius_cuts_off_less_than_6_4e_5_of_the_mass(t: float) -> None:
    """The whole kernel sums to 1; at R = 4·ceil(sqrt(t)) the tails hold at most 6.4e-5 (measured: 6.39e-5
    at t = 3.75, the largest of these), which the module docstring states."""
    whole = _reference_kernel(t, 50 * blur_radius(t)).sum()
    assert abs(whole - 1) < 1e-12
    tail = 1 - _reference_kernel(t, blur_radius(t)).sum()
    assert 0 <= tail < 6.4e-5


def test_the_discrete_gaussian_is_a_semigroup() -> None:
    """T_t * T_u = T_{t+u}: the property that makes level k the image at scale s0·b^k (untruncated
    kernels, radius 40, where the tails are below 1e-17)."""
    t, u = 0.75, 3.0
    product = np.convolve(discrete_gaussian(t, 40).numpy(), discrete_gaussian(u, 40).numpy())[40:-40]
    np.testing.assert_allclose(product, discrete_gaussian(t + u, 40).numpy(), rtol=0, atol=1e-15)


# ---- the lifting against loops over pixels ----


def _blur_axis(x: np.ndarray, kernel: np.ndarray, axis: int, mode: str) -> np.ndarray:
    """x correlated with `kernel` along `axis` (-2 rows, -1 columns), one output pixel at a time, reading
    outside through numpy.pad."""
    radius = len(kernel) // 2
    pads = [(0, 0)] * x.ndim
    pads[axis] = (radius, radius)
    padded = np.pad(x, pads, mode=NUMPY_MODES[mode])
    out = np.zeros_like(x)
    for i in range(x.shape[axis]):
        window = np.take(padded, range(i, i + 2 * radius + 1), axis=axis)
        index = [slice(None)] * x.ndim
        index[axis] = i
        out[tuple(index)] = np.tensordot(window, kernel, axes=([axis % x.ndim], [0]))
    return out


def _reference_lift(x: np.ndarray, scales: tuple[float, ...], mode: str) -> np.ndarray:
    """Level 0 x; level k: rows then columns blurred by scipy's kernel at the official radius,
    renormalised."""
    levels = [x]
    for t in scales[1:]:
        kernel = _reference_kernel(t, blur_radius(t))
        kernel = kernel / kernel.sum()
        levels.append(_blur_axis(_blur_axis(x, kernel, -2, mode), kernel, -1, mode))
    return np.stack(levels, 2)


@pytest.mark.parametrize("mode", list(NUMPY_MODES))
@pytest.mark.parametrize(("h", "w"), [(9, 7), (1, 5), (24, 20)])
def test_the_lifting_equals_the_scipy_reference(mode: str, h: int, w: int) -> None:
    """Four levels (radii 4, 8, 16: beyond these images, so reflect reflects again and again)."""
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1), dtype=F64)
    scales = bessel_scales(2, 0.5, 4)
    got = gaussian_lift(x, scales, mode)
    expected = _reference_lift(x.numpy(), scales, mode)
    assert got.shape == (2, 3, 4, h, w)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", list(NUMPY_MODES))
def test_padding_reads_as_numpy_pad_for_any_amount(mode: str) -> None:
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    pads = (9, 2, 0, 13)  # top, bottom, left, right: beyond the image
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), pads[:2], pads[2:]), mode=NUMPY_MODES[mode])
    np.testing.assert_array_equal(_pad(x, pads, mode).numpy(), expected)


# ---- the scale convolution against loops over output pixels ----


def _reference_levels(layer: Any, lifted: np.ndarray) -> list[np.ndarray]:
    """Output level s by its definition: bias + sum over j < n, c, (u, v) of
    w[o, c, j, u, v] · lifted~[b, g(o)·C/G + c, s + j, y·sh + u·dh·b^s, x·sw + v·dw·b^s], lifted~ padded by
    padding·b^s through numpy.pad, n = min(interaction, levels - s); one output pixel at a time."""
    c_out, kh, kw, interaction = layer.out_channels, *layer.kernel_size, layer.interaction
    weight = layer.weight.detach().numpy().reshape(c_out, -1, interaction, kh, kw)  # channel c·I + j
    bias = None if layer.bias is None else layer.bias.detach().numpy()
    batch, c_in, levels, h, w = lifted.shape
    per_group = weight.shape[1]
    groups = c_in // per_group
    outputs = []
    for s in range(levels):
        n = min(interaction, levels - s)
        factor = layer.base**s
        (ph, pw), (dh, dw) = [p * factor for p in layer.padding], [d * factor for d in layer.dilation]
        sh, sw = layer.stride
        padded = np.pad(
            lifted, ((0, 0), (0, 0), (0, 0), (ph, ph), (pw, pw)), mode=NUMPY_MODES[layer.padding_mode]
        )
        h_out, w_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out = np.zeros((batch, c_out, h_out, w_out))
        for y in range(h_out):
            for x in range(w_out):
                rows = [y * sh + u * dh for u in range(kh)]
                cols = [x * sw + v * dw for v in range(kw)]
                patch = padded[:, :, s : s + n][:, :, :, rows][:, :, :, :, cols]  # (B, C, n, kh, kw)
                for o in range(c_out):
                    g = o // (c_out // groups)
                    group = patch[:, g * per_group : (g + 1) * per_group]
                    out[:, o, y, x] = np.einsum("bcjuv,cjuv->b", group, weight[o, :, :n])
                    out[:, o, y, x] += 0 if bias is None else bias[o]
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("name", ["dss", "dss_bilinear"])
def test_the_scale_convolution_equals_the_loops(geometry: tuple, name: str) -> None:
    layer = _layer(name, geometry)
    lifted = layer.lift(_input(geometry))
    got = layer.scale_convolution(lifted)
    expected = _reference_levels(layer, lifted.numpy())
    assert len(got) == layer.levels
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g.detach().numpy(), e, rtol=0, atol=1e-10)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_dss_is_the_maximum_over_levels_of_the_references(geometry: tuple) -> None:
    """The whole layer: scipy's lifting, the loops' levels, the maximum over them."""
    layer = _layer("dss", geometry)
    x = _input(geometry)
    lifted = _reference_lift(x.numpy(), layer.scales, layer.padding_mode)
    expected = np.max(np.stack(_reference_levels(layer, lifted)), 0)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=0, atol=1e-10)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): PyTorch's bilinear resize along one axis (align_corners=False), by its definition:
    output i reads the input at (i + 0.5)·n_in/n_out − 0.5, clamped at 0, between its two neighbours."""
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        place = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        below = min(math.floor(place), n_in - 1)
        above = min(below + 1, n_in - 1)
        matrix[i, below] += 1 - (place - below)
        matrix[i, above] += place - below
    return matrix


@pytest.mark.parametrize(("h", "w", "base", "levels"), [(16, 12, 2, 4), (9, 7, 2, 4), (20, 9, 3, 3)])
def test_the_bilinear_lifting_shrinks_by_the_base_and_stretches_back(
    h: int, w: int, base: int, levels: int
) -> None:
    layer = BilinearScaleSpaceConv2d(3, 4, 3, padding=1, base=base, levels=levels, dtype=F64)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(4), dtype=F64)
    lifted = layer.lift(x).numpy()
    np.testing.assert_array_equal(lifted[:, :, 0], x.numpy())
    for k in range(1, levels):
        small_h, small_w = max(h // base**k, 1), max(w // base**k, 1)
        rows = _bilinear_matrix(small_h, h) @ _bilinear_matrix(h, small_h)
        cols = _bilinear_matrix(small_w, w) @ _bilinear_matrix(w, small_w)
        expected = np.einsum("ij,bcjl,kl->bcik", rows, x.numpy(), cols)
        np.testing.assert_allclose(lifted[:, :, k], expected, rtol=0, atol=1e-12)


# ---- the deformable variant ----


@pytest.mark.parametrize(
    "geometry", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[5]], ids=[IDS[0], IDS[1], IDS[5]]
)
def test_dss_deform_equals_the_deform_loops_at_every_level(geometry: tuple) -> None:
    """Each level by test_deform's loop reference, with the offsets of a plain float64 convolution by
    `offset_weight`, times base^level, and masks 2·sigmoid: then the maximum over levels."""
    layer = _layer("dss_deform", geometry, offset_groups=2 if geometry[0] % 2 == 0 else 1)
    x = _input(geometry)
    lifted = layer.lift(x)
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    levels = []
    for s in range(layer.levels):
        n = min(layer.interaction, layer.levels - s)
        factor = layer.base**s
        padding = [p * factor for p in layer.padding]
        dilation = [d * factor for d in layer.dilation]
        frame = lifted[:, :, s : s + n].reshape(x.shape[0], -1, *x.shape[-2:])
        if layer.padding_mode != "zeros":
            pads = ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2)
            frame = torch.from_numpy(np.pad(frame.numpy(), pads, mode=NUMPY_MODES[layer.padding_mode]))
            padding = [0, 0]
        offset_weight = layer.offset_weight.unflatten(1, (-1, layer.interaction))[:, :, :n].reshape(
            3 * layer.offset_groups * taps, -1, *layer.kernel_size
        )
        raw = F.conv2d(frame, offset_weight, layer.offset_bias, layer.stride, padding, dilation).detach()
        split = 2 * layer.offset_groups * taps
        offset, mask = raw[:, :split] * factor, 2 * torch.sigmoid(raw[:, split:])
        weight = layer.weight.unflatten(1, (-1, layer.interaction))[:, :, :n]
        weight = weight.reshape(layer.out_channels, -1, *layer.kernel_size).detach()
        bias = None if layer.bias is None else layer.bias.detach()
        out_size = tuple(offset.shape[-2:])
        levels.append(_naive(frame, offset, mask, weight, bias, layer.stride, padding, dilation, out_size))
    expected = torch.stack(levels).amax(0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_dss_deform_starts_as_dss_with_the_same_draws(channels_last: bool) -> None:
    """offset_weight and offset_bias start at zero and draw nothing: zero offsets, unit masks."""
    torch.manual_seed(7)
    deform = DeformScaleSpaceConv2d(3, 8, 3, padding=1, offset_groups=3)
    torch.manual_seed(7)
    plain = ScaleSpaceConv2d(3, 8, 3, padding=1)
    assert torch.equal(deform.weight, plain.weight) and torch.equal(deform.bias, plain.bias)
    assert not deform.offset_weight.any() and not deform.offset_bias.any()
    x = torch.randn(2, 3, 16, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(deform(x), plain(x), rtol=1e-6, atol=1e-6)


# ---- the property the family exists for: a rescaled input shifts the stack by one level ----


def _scene_image(size: int, shrink: int, inner_scale: float) -> torch.Tensor:
    """The image, at inner scale s0, of a scene of five Gaussian blobs (variances 16-36 px², centres in
    the middle third, signed amplitudes) shrunk by `shrink` about pixel 0; pixel j sits at coordinate j.
    A blob of variance W seen at scale s0 is a Gaussian of variance W + s0², peak scaled by W/(W + s0²)."""
    g = torch.Generator().manual_seed(0)
    centres = (36 + 24 * torch.rand(5, 2, generator=g, dtype=F64)) / shrink
    variances = (16 + 20 * torch.rand(5, generator=g, dtype=F64)) / shrink**2
    amplitudes = 2 * torch.rand(5, generator=g, dtype=F64) - 1
    j = torch.arange(size, dtype=F64)
    image = torch.zeros(size, size, dtype=F64)
    for (cy, cx), w, a in zip(centres, variances, amplitudes, strict=True):
        v = w + inner_scale**2
        image += a * w / v * torch.exp(-((j[:, None] - cy) ** 2 + (j - cx) ** 2) / (2 * v))
    return image[None, None]


# measured 3.0e-4, 2.3e-3, 7.4e-3 at k = 0, 1, 2 (b = 2, s0 = 0.5); the bound is twice that
SHIFT_TOLERANCE = (6e-4, 5e-3, 1.5e-2)


def test_shrinking_the_scene_by_the_base_shifts_the_lifted_stack_by_one_level() -> None:
    """Scale-space theory (continuous): if f is the scene seen at inner scale s0 and f' the scene shrunk by
    b seen at the same inner scale, level k of lift(f') at pixel i is level k + 1 of lift(f) at pixel b·i,
    because both are the scene at scale s0·b^(k+1) in f's pixels (s0² + t_k = (s0·b^k)², and variances
    scale by b²). The images are sampled analytic blobs, zero to 1e-12 at the borders, so the borders do
    not enter. On the pixel grid it is approximate: the discrete Gaussian T_t has the variance t of the
    continuous one but a fourth cumulant t instead of 0, a relative difference ~t/(8·(var + t)²) that the
    two sides feel at different scales; smoother blobs make it smaller. Tolerances: SHIFT_TOLERANCE, of
    the level's largest magnitude. A Bessel scale t_k = s0·(b^(2k) − 1) is off by 2.6-3.1%."""
    base, inner_scale = 2, 0.5
    layer = ScaleSpaceConv2d(1, 1, 3, padding=1, base=base, zero_scale=inner_scale, levels=4, dtype=F64)
    fine = layer.lift(_scene_image(96, 1, inner_scale))[0, 0]
    coarse = layer.lift(_scene_image(48, base, inner_scale))[0, 0]
    for k, tolerance in enumerate(SHIFT_TOLERANCE):
        expected = fine[k + 1, ::base, ::base]
        error = (coarse[k] - expected).abs().max() / expected.abs().max()
        assert error < tolerance, (k, error.item())


def test_the_scale_convolution_commutes_with_subsampling_exactly() -> None:
    """The exact half of the equivariance: level k + 1's kernel is dilated by b^(k+1), so subsampling a
    stack by b and convolving level k equals convolving level k + 1 and subsampling, to rounding (zero
    padding; the image's size a multiple of b). Any stack will do: the second's levels are the first's
    levels 1.. subsampled, plus one unrelated level at the top. Levels whose interaction reaches the top
    (k + interaction > levels - 1) read different stacks and are not compared."""
    layer = _layer("dss", (2, 3, 0, 0, dict(kernel_size=3, padding=1, levels=5, interaction=2)))
    g = torch.Generator().manual_seed(8)
    fine = torch.randn(2, 2, 5, 40, 32, generator=g, dtype=F64)
    coarse = torch.cat([fine[:, :, 1:, ::2, ::2], torch.randn(2, 2, 1, 20, 16, generator=g, dtype=F64)], 2)
    fine_levels, coarse_levels = layer.scale_convolution(fine), layer.scale_convolution(coarse)
    for k in range(layer.levels - layer.interaction):
        torch.testing.assert_close(coarse_levels[k], fine_levels[k + 1][..., ::2, ::2], rtol=0, atol=1e-12)


# ---- gradients, layouts, precision, state ----


@pytest.mark.parametrize(
    "geometry", [GEOMETRIES[1], GEOMETRIES[2], GEOMETRIES[3]], ids=[IDS[1], IDS[2], IDS[3]]
)
@pytest.mark.parametrize("name", ["dss", "dss_bilinear"])
def test_gradcheck(geometry: tuple, name: str) -> None:
    """Finite differences in float64 against autograd: input, weight and bias."""
    layer = _layer(name, geometry)
    names = [key for key, _ in layer.named_parameters()]

    def forward(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    inputs = (
        _input(geometry, batch=1).requires_grad_(),
        *(p.detach().requires_grad_() for p in layer.parameters()),
    )
    assert torch.autograd.gradcheck(forward, inputs)


def test_gradcheck_dss_deform() -> None:
    """With offsets whose fractional parts stay in (0.2, 0.8) at every level (offset bias in [0.3, 0.45],
    times 1, 2, 4; offset weights 1e-3), away from bilinear interpolation's kinks at integer places."""
    geometry = (2, 2, 6, 5, dict(kernel_size=3, padding=1, levels=3))
    layer = _layer("dss_deform", geometry)
    taps = 9
    with torch.no_grad():
        layer.offset_weight.mul_(2e-3)
        layer.offset_bias[: 2 * taps].uniform_(0.3, 0.45)
    names = [key for key, _ in layer.named_parameters()]

    def forward(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    x = _input(geometry, batch=1).clamp(-1, 1)
    inputs = (x.requires_grad_(), *(p.detach().requires_grad_() for p in layer.parameters()))
    assert torch.autograd.gradcheck(forward, inputs, fast_mode=True)


@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[2]], ids=[IDS[1], IDS[2]])
@pytest.mark.parametrize("name", SCALE_SPACE)
def test_channels_last_gives_the_same_numbers_and_keeps_the_format(geometry: tuple, name: str) -> None:
    layer = _layer(name, geometry)
    expected = _forward_and_grads(layer, _input(geometry), list(layer.parameters()))
    layer = layer.to(memory_format=torch.channels_last)
    x = _input(geometry).contiguous(memory_format=torch.channels_last)
    got = _forward_and_grads(layer, x, list(layer.parameters()))
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def _levels(layer: Any) -> Any:
    """The layer before scale pooling: its L output levels stacked, (B, C_out, L, H', W')."""

    def stacked(x: torch.Tensor) -> torch.Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return torch.stack(layer.scale_convolution(layer.lift(x), channels_last), 2)

    return stacked


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"]
)
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=IDS[:3])
@pytest.mark.parametrize("name", SCALE_SPACE)
def test_bfloat16_autocast_follows_float64(
    geometry: tuple, name: str, memory_format: torch.memory_format
) -> None:
    """Under bfloat16 autocast the output (bfloat16, as nn.Conv2d's, the format kept) is float64's within
    BF16_TOLERANCE of its largest magnitude; so are the levels before pooling and their gradients (the
    parameters': of the largest among them), which stay float32. Gradients are compared before the
    pooling: where two levels are within bfloat16's rounding the maximum's winner, and with it the route
    of the gradient, can flip (measured: 2 of 504 input-gradient entries off by 0.77 of 17)."""
    layer = _layer(name, geometry)
    x = _input(geometry)
    expected_output = layer(x)
    expected = _forward_and_grads(_levels(layer), x, list(layer.parameters()))
    layer = layer.to(torch.float32, memory_format=memory_format)
    x = x.to(torch.float32, memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(x)
        got = _forward_and_grads(_levels(layer), x, list(layer.parameters()))
    assert output.dtype == torch.bfloat16 and output.is_contiguous(memory_format=memory_format)
    scale = expected_output.abs().max().item()
    torch.testing.assert_close(
        output.double(), expected_output, rtol=BF16_TOLERANCE, atol=BF16_TOLERANCE * scale
    )
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    parameter_scale = max(e.abs().max().item() for e in expected[2:])
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        scale = e.abs().max().item() if index < 2 else parameter_scale
        torch.testing.assert_close(g.double(), e, rtol=BF16_TOLERANCE, atol=BF16_TOLERANCE * scale)


@pytest.mark.parametrize("name", SCALE_SPACE)
def test_state_dict_round_trip(name: str) -> None:
    geometry = GEOMETRIES[1]
    layer = _layer(name, geometry)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(5)
    c_in, c_out, _, _, kwargs = geometry
    fresh = CLASSES[name](c_in, c_out, dtype=F64, **kwargs)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = _input(geometry)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("name", SCALE_SPACE)
def test_the_layers_trace_whole_forward_and_backward(name: str) -> None:
    """torch.compile(fullgraph=True) takes each layer, backward included, without a graph break
    (AOTAutograd, a couple of seconds; Inductor's code generation is left to the slow tests of the
    project): the same output and gradients as eager."""
    torch._dynamo.reset()
    geometry = (2, 3, 7, 6, dict(kernel_size=3, padding=1, padding_mode="reflect", levels=3))
    layer = _layer(name, geometry, torch.float32)
    x = _input(geometry, torch.float32)
    expected = _forward_and_grads(layer, x, list(layer.parameters()))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = _forward_and_grads(compiled, x, list(layer.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ---- options ----


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(base=1.5), ValueError, r"base = 1.5: expected an integer >= 2 \(the scale convolution dilates"),
        (dict(base=1), ValueError, r"base = 1: expected an integer >= 2"),
        (dict(base=2.0), ValueError, r"base = 2.0: expected an integer >= 2"),
        (dict(zero_scale=0), ValueError, r"zero_scale = 0: expected a positive, finite inner scale"),
        (dict(zero_scale=math.inf), ValueError, r"zero_scale = inf: expected a positive, finite"),
        (dict(zero_scale="1"), TypeError, r"zero_scale = '1': expected a number"),
        (dict(levels=0), ValueError, r"levels = 0: expected an integer >= 1"),
        (dict(interaction=5), ValueError, r"interaction = 5: expected at most levels = 4"),
        (dict(interaction=0), ValueError, r"interaction = 0: expected an integer >= 1"),
        (dict(padding=0), ValueError, r"padding = 0: .* that needs padding = \(1, 1\)"),
        (dict(padding="valid"), ValueError, r"padding = 'valid': .* padding = \(1, 1\)"),
        (dict(padding=(1, 2)), ValueError, r"padding = \(1, 2\): .* padding = \(1, 1\)"),
        (dict(padding=1, stride=2, dilation=3), ValueError, r"padding = 1: .*needs padding = \(3, 3\)"),
        (dict(kernel_size=2, padding="same"), ValueError, r"needs an odd kernel or an even dilation"),
        (dict(padding="same", stride=2), ValueError, r"padding = 'same' needs stride 1"),
        (
            dict(groups=4),
            ValueError,
            r"groups = 4: expected a divisor of in_channels = 6 and out_channels = 8",
        ),
        (dict(padding_mode="mirror"), ValueError, r"padding_mode = 'mirror': expected one of zeros"),
        (dict(bias=1), TypeError, r"bias = 1: expected a bool"),
        (dict(stride=0), ValueError, r"stride = 0: expected integers >= 1"),
    ],
)
def test_bad_options_are_refused_naming_the_option(kwargs: dict, error: type, message: str) -> None:
    options = dict(kernel_size=3, padding=1) | kwargs
    for cls in (ScaleSpaceConv2d, BilinearScaleSpaceConv2d, DeformScaleSpaceConv2d):
        if cls is BilinearScaleSpaceConv2d and "zero_scale" in kwargs:
            continue
        with pytest.raises(error, match=message):
            cls(6, 8, **options)


def test_offset_groups_must_divide_the_input_channels() -> None:
    with pytest.raises(ValueError, match=r"offset_groups = 4: expected a divisor of in_channels = 6"):
        DeformScaleSpaceConv2d(6, 8, 3, padding=1, offset_groups=4)


@pytest.mark.parametrize(
    ("name", "options", "unused"),
    [
        ("dss", dict(coords="seed"), "coords"),
        ("dss", dict(offset_groups=2), "offset_groups"),
        ("dss_bilinear", dict(zero_scale=1.0), "zero_scale"),
        ("dss_bilinear", dict(offset_groups=1), "offset_groups"),
        ("dss_deform", dict(with_r=True), "with_r"),
    ],
)
def test_the_factory_builds_each_by_name_and_refuses_what_it_does_not_take(
    name: str, options: dict, unused: str
) -> None:
    layer = make_conv(name, 3, 16, 3, padding=1, base=3, levels=3, interaction=3)
    assert type(layer) is CLASSES[name] and layer.base == 3 and layer.weight.shape == (16, 9, 3, 3)
    with pytest.raises(TypeError, match=f"layer '{name}' takes no option {unused}"):
        make_conv(name, 3, 16, 3, padding=1, **options)


@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel", "options"),
    [(3, 16, 3, {}), (16, 32, 3, dict(interaction=3, levels=3)), (4, 6, (3, 5), dict(groups=2, bias=False))],
)
@pytest.mark.parametrize("name", SCALE_SPACE)
def test_parameter_count_is_the_modules(c_in: int, c_out: int, kernel: Any, options: dict, name: str) -> None:
    padding = tuple((k - 1) // 2 for k in ((kernel, kernel) if isinstance(kernel, int) else kernel))
    layer = make_conv(name, c_in, c_out, kernel, padding=padding, **options)
    offset_groups = 1 if name == "dss_deform" else None
    count = parameter_count(
        c_in,
        c_out,
        kernel,
        options.get("interaction", 2),
        groups=options.get("groups", 1),
        bias=options.get("bias", True),
        offset_groups=offset_groups,
    )
    assert sum(p.numel() for p in layer.parameters()) == count
    if (c_in, c_out, kernel, options) == (3, 16, 3, {}):
        assert count == (2365 if name == "dss_deform" else 880)  # the FCN's first layer; nn.Conv2d: 448


# ---- in the network ----


@pytest.mark.parametrize("name", SCALE_SPACE)
def test_the_first_encoder_convolution_at_every_size_the_pipeline_uses(name: str, tmp_path: Path) -> None:
    """FCN(width 16, placement first) at 128 px and at the sizes of transfer and the study (96, 192, 64,
    48): forward and backward, every parameter a gradient; the saved model reloads and gives the same
    logits."""
    torch.manual_seed(0)
    model = FCN(ModelSpec(name, width=16, placement="first"))
    assert type(model.encoder[0][0]) is CLASSES[name]
    for size in (128, 96, 192, 64, 48):
        model.zero_grad()
        x = torch.rand(1, 3, size, size)
        logits = model(x)
        logits.square().mean().backward()
        assert logits.shape == (1, 4, size, size)
        assert all(p.grad is not None for p in model.parameters())
    save_model(model, tmp_path / "model.pt")
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(load_model(tmp_path / "model.pt", layer=name).eval()(x), model.eval()(x))
