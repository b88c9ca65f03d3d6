"""Involution against independent references: per-pixel loops in float64, the reference's unfold form."""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_layers import _forward_and_grads
from torch import nn

from posconv.layers import acceleration
from posconv.layers import involution as involution_module
from posconv.layers.involution import (
    CoordInvolution2d,
    Involution2d,
    involution,
    parameter_count,
)

# PyTorch's note that an even kernel with padding="same" pads a copy of the input: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# (in_channels, out_channels, input H, W, options): strides 1/2/3, every padding mode, "same"/"valid",
# dilation, rectangular kernels, in != out and in == out, G from 1 to 4 (by groups and by group_channels)
GEOMETRIES: list[tuple[int, int, int, int, dict[str, Any]]] = [
    (4, 4, 7, 6, dict(kernel_size=3, padding=1)),
    (4, 8, 9, 7, dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect", groups=2)),
    (
        6,
        4,
        8,
        11,
        dict(
            kernel_size=(3, 5),
            stride=(2, 1),
            padding=(1, 2),
            dilation=(1, 2),
            padding_mode="circular",
            groups=4,
        ),
    ),
    (4, 4, 7, 6, dict(kernel_size=4, padding="same", padding_mode="replicate", bias=False, groups=2)),
    (4, 4, 8, 7, dict(kernel_size=3, padding=2, dilation=2, padding_mode="circular", reduction=2)),
    (3, 6, 9, 8, dict(kernel_size=3, stride=3, padding=2, dilation=2, groups=3, padding_mode="reflect")),
    (4, 8, 5, 6, dict(kernel_size=3, padding="valid", group_channels=2)),  # G = 8 // 2 = 4
    (8, 8, 8, 8, dict(kernel_size=3, stride=2, padding=1, groups=2)),  # the reference's own geometry
    (4, 4, 10, 9, dict(kernel_size=3, stride=2, padding=(3, 0), dilation=2)),  # kernels made in the padding
    (4, 4, 7, 7, dict(kernel_size=3, stride=3, padding=1, reduction=8)),  # last stride block partial; R = 1
    (2, 4, 6, 5, dict(kernel_size=1, stride=2, bias=False)),
]
# Groups of 16 channels: the compiled operator's vector kernel (the model's case), on images wide enough for
# its tiles of 16 pixels, a partial tile and the border columns; every padding mode, strides, dilation
VECTOR_GEOMETRIES: list[tuple[int, int, int, int, dict[str, Any]]] = [
    (16, 16, 5, 21, dict(kernel_size=3, padding=1)),  # the model's layer
    (8, 32, 4, 19, dict(kernel_size=3, padding=2, dilation=2, padding_mode="reflect")),  # G = 2
    (16, 32, 6, 23, dict(kernel_size=3, stride=2, padding=1, padding_mode="circular", reduction=2)),
    (32, 32, 5, 18, dict(kernel_size=(3, 5), padding=(2, 1), padding_mode="replicate", groups=2)),
]


def _ids(geometries: list[tuple]) -> list[str]:
    return [
        f"{i}to{o}-{h}x{w}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for i, o, h, w, kw in geometries
    ]


IDS, VECTOR_IDS = _ids(GEOMETRIES), _ids(VECTOR_GEOMETRIES)
BF16_TOLERANCE = 2e-2  # relative to the largest value: 8 mantissa bits (2^-8 = 0.004) and a few roundings


def _layer(
    geometry: tuple, cls: type[Involution2d] = Involution2d, dtype: torch.dtype = torch.float64, **options
) -> Involution2d:
    """The geometry's layer with every parameter drawn from U(-1, 1) (bias and coord_weight start at 0)."""
    c_in, c_out, _, _, kwargs = geometry
    torch.manual_seed(0)
    layer = cls(c_in, c_out, dtype=dtype, **kwargs, **options)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-1, 1)
    return layer


def _input(geometry: tuple, dtype: torch.dtype = torch.float64, batch: int = 2) -> torch.Tensor:
    c_in, _, h, w, _ = geometry
    return torch.randn(batch, c_in, h, w, generator=torch.Generator().manual_seed(2), dtype=dtype)


# ---- an independent reference: explicit loops over (b, c, i, j, u, v) in float64 ----


def _pads(layer: Involution2d) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), as nn.Conv2d itself pads this geometry."""
    probe = nn.Conv2d(1, 1, layer.kernel_size, padding=layer.padding, dilation=layer.dilation)
    left, right, top, bottom = probe._reversed_padding_repeated_twice
    return top, bottom, left, right


def _source_index(index: int, size: int, mode: str) -> int | None:
    """Which input pixel a padded position reads along one axis (None: a zero)."""
    if 0 <= index < size:
        return index
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -index if index < 0 else 2 * (size - 1) - index
    if mode == "replicate":
        return min(max(index, 0), size - 1)
    return index % size  # circular


def _coordinate(
    index: int, in_size: int, out_size: int, before: int, layer: Involution2d, axis: int
) -> float:
    """The output pixel's coordinate by the definitions (DESIGN.md §3): its kernel centre, or "seed"."""
    if layer.coords == "seed":
        return index / max(out_size - 1, 1)
    centre = index * layer.stride[axis] - before + layer.dilation[axis] * (layer.kernel_size[axis] - 1) / 2
    return (2 * centre + 1) / in_size - 1


def _loop_reference(layer: Involution2d, x: torch.Tensor) -> np.ndarray:
    """The layer by its definition, pixel by pixel (the module docstring's formula)."""
    p = {name: value.detach().double().numpy() for name, value in layer.named_parameters()}
    x = x.detach().double().numpy()
    batch, c_in, h, w = x.shape
    c = layer.out_channels
    if "project.weight" in p:  # the 1x1 channel mixing, in -> out
        mixed = np.zeros((batch, c, h, w))
        for b in range(batch):
            for o in range(c):
                for k in range(c_in):
                    mixed[b, o] += p["project.weight"][o, k, 0, 0] * x[b, k]
        x = mixed
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    top, bottom, left, right = _pads(layer)
    hp, wp = h + top + bottom, w + left + right
    h_out, w_out = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    r = p["reduce.weight"].shape[0]
    taps = kh * kw
    per_group = c // (p["span.weight"].shape[0] // taps)

    def value(b: int, ch: int, row: int, col: int) -> float:  # x~: the padded input
        i, j = (
            _source_index(row - top, h, layer.padding_mode),
            _source_index(col - left, w, layer.padding_mode),
        )
        return 0.0 if i is None or j is None else float(x[b, ch, i, j])

    out = np.zeros((batch, c, h_out, w_out))
    for b in range(batch):
        for i in range(h_out):
            for j in range(w_out):
                # the generator's input: the stride block of x~ at the kernel centre, averaged
                r0, q0 = i * sh + dh * (kh - 1) // 2, j * sw + dw * (kw - 1) // 2
                block = [
                    (row, col) for row in range(r0, min(r0 + sh, hp)) for col in range(q0, min(q0 + sw, wp))
                ]
                mean = [sum(value(b, ch, *rc) for rc in block) / len(block) for ch in range(c)]
                hidden = []
                for k in range(r):
                    s = p["reduce.bias"][k] + sum(
                        p["reduce.weight"][k, ch, 0, 0] * mean[ch] for ch in range(c)
                    )
                    if "coord_weight" in p:
                        s += p["coord_weight"][k, 0] * _coordinate(j, w, w_out, left, layer, 1)
                        s += p["coord_weight"][k, 1] * _coordinate(i, h, h_out, top, layer, 0)
                    hidden.append(max(s, 0.0))
                kernel = [
                    p["span.bias"][o] + sum(p["span.weight"][o, k, 0, 0] * hidden[k] for k in range(r))
                    for o in range(p["span.weight"].shape[0])
                ]
                for ch in range(c):
                    total = p["bias"][ch] if "bias" in p else 0.0
                    for u in range(kh):
                        for v in range(kw):
                            weight = kernel[(ch // per_group) * taps + u * kw + v]
                            total += weight * value(b, ch, i * sh + u * dh, j * sw + v * dw)
                    out[b, ch, i, j] = total
    return out


def _check_reference(layer: Involution2d, x: torch.Tensor) -> None:
    got = layer(x)
    expected = torch.from_numpy(_loop_reference(layer, x))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# ---- exactness ----


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_involution_equals_the_loop_reference(geometry: tuple) -> None:
    _check_reference(_layer(geometry), _input(geometry))


@pytest.mark.parametrize("geometry", GEOMETRIES[1:4] + GEOMETRIES[8:10], ids=IDS[1:4] + IDS[8:10])
@pytest.mark.parametrize("coords", ["centered", "seed"])
def test_coord_involution_equals_the_loop_reference(geometry: tuple, coords: str) -> None:
    layer = _layer(geometry, CoordInvolution2d, coords=coords)
    assert layer.coord_weight.abs().min() > 0
    _check_reference(layer, _input(geometry))


def test_the_reference_geometry_is_the_reference_formula() -> None:
    """Odd kernel, padding d*(k-1)//2 zeros, size a multiple of the stride: d-li14/involution's forward
    (BatchNorm aside) as it is written there, AvgPool2d(s, s) for the generator and nn.Unfold patches."""
    for stride, dilation in ((1, 1), (2, 1), (2, 2), (1, 3)):
        kwargs = dict(kernel_size=3, stride=stride, padding=dilation, dilation=dilation, groups=2)
        layer = _layer((8, 8, 8, 8, kwargs))  # G = 2 groups of 4 channels
        x = _input((8, 8, 8, 8, {}))
        pooled = F.avg_pool2d(x, stride, stride) if stride > 1 else x
        weight = layer.span(torch.relu(layer.reduce(pooled)))
        b, _, h, w = weight.shape
        weight = weight.view(b, 2, 9, h, w).unsqueeze(2)
        patches = F.unfold(x, 3, dilation, dilation, stride).view(b, 2, 4, 9, h, w)
        expected = (weight * patches).sum(3).view(b, 8, h, w) + layer.bias.view(1, 8, 1, 1)
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_shifted_products_equal_the_unfold_formulation(geometry: tuple, channels_last: bool) -> None:
    """The functional forms on random inputs and kernels, forward and both gradients."""
    _, c, h, w, _ = geometry
    layer = _layer(geometry)
    options = dict(
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        padding_mode=layer.padding_mode,
    )
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, c, h, w, generator=generator, dtype=torch.float64)
    h_out, w_out = layer(_input(geometry)).shape[-2:]
    kernel = torch.randn(2, layer.groups * math.prod(layer.kernel_size), h_out, w_out, dtype=torch.float64)
    if channels_last:
        x, kernel = (t.contiguous(memory_format=torch.channels_last) for t in (x, kernel))
    results = []
    for form in ("fast", "unfold"):
        k = kernel.clone().requires_grad_()
        results.append(_forward_and_grads(lambda t, f=form, k=k: involution(t, k, **options, form=f), x, [k]))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert results[0][0].is_contiguous(memory_format=torch.channels_last) == channels_last


def _gradcheck(layer: Involution2d, x: torch.Tensor, fast_mode: bool) -> None:
    names = [name for name, _ in layer.named_parameters()]

    def forward(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    inputs = (x.requires_grad_(), *(p.detach().requires_grad_() for p in layer.parameters()))
    assert len(inputs) == 1 + len(names) >= 5
    assert torch.autograd.gradcheck(forward, inputs, fast_mode=fast_mode)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("cls", [Involution2d, CoordInvolution2d])
def test_gradcheck(geometry: tuple, cls: type[Involution2d]) -> None:
    """Finite differences in float64 agree with the layer's backward (its own autograd function), for the
    input and every parameter: in fast mode (random projections of the Jacobian) on every geometry..."""
    _gradcheck(_layer(geometry, cls), _input(geometry, batch=1), fast_mode=True)


@pytest.mark.parametrize("cls", [Involution2d, CoordInvolution2d])
def test_gradcheck_every_jacobian_entry(cls: type[Involution2d]) -> None:
    """...and entry by entry on a small striding, reflecting, channel-changing one."""
    geometry = (3, 4, 5, 6, dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect", groups=2))
    _gradcheck(_layer(geometry, cls), _input(geometry, batch=1), fast_mode=False)


def test_gradgradcheck_of_the_shifted_products() -> None:
    """The custom backward is itself differentiable (gradient penalties, double backward)."""
    x = torch.randn(1, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(1, 2 * 9, 2, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def forward(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return involution(x, kernel, 3, stride=2, padding=1, padding_mode="reflect", bias=bias)

    assert torch.autograd.gradgradcheck(forward, (x, kernel, bias), fast_mode=True)


# ---- the semantics: bias, channels, purity ----


def test_bias_is_an_output_offset_and_the_projection_has_none() -> None:
    geometry = GEOMETRIES[1]
    layer = _layer(geometry)
    assert layer.project is not None and layer.project.bias is None and layer.bias.shape == (8,)
    x = _input(geometry)
    without = layer(x) - layer.bias.view(1, 8, 1, 1)
    no_bias = Involution2d(4, 8, bias=False, dtype=torch.float64, **geometry[4])
    no_bias.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "bias"})
    assert no_bias.bias is None and "bias" not in dict(no_bias.named_parameters())
    torch.testing.assert_close(no_bias(x), without, rtol=1e-12, atol=1e-12)
    assert Involution2d(4, 4, 3).project is None
    assert not Involution2d(4, 8, 3).bias.any()  # zero at initialisation


def test_the_layer_is_a_pure_function_of_its_input() -> None:
    """No BatchNorm in the generator: train and eval agree, and an image's output ignores the batch."""
    geometry = GEOMETRIES[7]
    layer = _layer(geometry)
    x = _input(geometry)
    train = layer.train()(x)
    torch.testing.assert_close(layer.eval()(x), train, rtol=0, atol=0)
    torch.testing.assert_close(layer(x[1:]), train[1:], rtol=1e-12, atol=1e-12)
    assert not [m for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_groups_and_the_conv2d_signature() -> None:
    """nn.Conv2d's positional order; G = groups, else out_channels // group_channels, at least 1."""
    layer = Involution2d(3, 64, 3, 2, 1, 1, None, False, "reflect")
    assert (layer.stride, layer.padding, layer.bias, layer.padding_mode) == ((2, 2), (1, 1), None, "reflect")
    assert layer.groups == 4 and layer.span.out_channels == 4 * 9 and layer.reduce.out_channels == 16
    assert Involution2d(8, 8, 3).groups == 1
    assert Involution2d(8, 8, 3, groups=8, reduction=16).reduce.out_channels == 1
    assert Involution2d(32, 32, 3, group_channels=8).groups == 4
    assert "groups=4" in repr(layer) and "coords=seed" in repr(CoordInvolution2d(4, 4, 3, coords="seed"))


# ---- dtypes, layouts, precision ----


@pytest.mark.parametrize("geometry", GEOMETRIES[1:3] + GEOMETRIES[5:6], ids=IDS[1:3] + IDS[5:6])
@pytest.mark.parametrize("cls", [Involution2d, CoordInvolution2d])
def test_channels_last_gives_the_same_numbers_and_keeps_the_format(geometry: tuple, cls: type) -> None:
    layer = _layer(geometry, cls)
    if cls is CoordInvolution2d:
        assert layer.coord_weight.abs().min() > 0
    x = _input(geometry)
    expected = _forward_and_grads(layer, x, list(layer.parameters()))
    for module_format in (torch.contiguous_format, torch.channels_last):
        layer = layer.to(memory_format=module_format)
        got = _forward_and_grads(
            layer, x.contiguous(memory_format=torch.channels_last), list(layer.parameters())
        )
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert layer(x).is_contiguous()  # an NCHW input stays NCHW
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_in_a_dtype_returns_that_dtype(dtype: torch.dtype) -> None:
    geometry = GEOMETRIES[1]
    layer = _layer(geometry)
    expected = layer(_input(geometry))
    got = layer.to(dtype)(_input(geometry).to(dtype))
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(
        got.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()
    )


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"]
)
@pytest.mark.parametrize("geometry", GEOMETRIES + VECTOR_GEOMETRIES[:2], ids=IDS + VECTOR_IDS[:2])
def test_bfloat16_autocast_follows_float64(geometry: tuple, memory_format: torch.memory_format) -> None:
    """Under bfloat16 autocast the output (bfloat16, as nn.Conv2d's) and every gradient are float64's within
    BF16_TOLERANCE; parameter gradients stay float32, the format is kept.

    The output and the input's gradient are compared with their own largest magnitude. A parameter's
    gradient is a sum over the batch and the pixels of terms rounded to bfloat16 (the kernels' gradient
    has the kernels' autocast dtype) that may cancel, so its error is absolute: the parameters' gradients
    are compared with the largest magnitude among them all (measured: a 1-element span.bias gradient of
    0.13 off by 0.02 where the largest is 2.1)."""
    cls = CoordInvolution2d if geometry[4].get("stride", 1) == 2 else Involution2d
    layer = _layer(geometry, cls)
    expected = _forward_and_grads(layer, _input(geometry), list(layer.parameters()))
    layer = layer.to(torch.float32, memory_format=memory_format)
    x = _input(geometry).to(torch.float32, memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _forward_and_grads(layer, x, list(layer.parameters()))
    assert got[0].dtype == torch.bfloat16 and got[0].is_contiguous(memory_format=memory_format)
    assert all(g.dtype == torch.float32 for g in got[1:])
    parameter_scale = max(e.abs().max().item() for e in expected[2:])
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        scale = e.abs().max().item() if index < 2 else parameter_scale
        torch.testing.assert_close(g.double(), e, rtol=BF16_TOLERANCE, atol=BF16_TOLERANCE * scale)


# ---- the position-aware variant ----


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_coord_involution_starts_as_the_plain_layer_exactly(channels_last: bool) -> None:
    """Same seed, same draws: equal weights, coord_weight zero, bitwise equal outputs and gradients."""
    for c_in, c_out, h, w, kwargs in GEOMETRIES:
        torch.manual_seed(7)
        plain = Involution2d(c_in, c_out, **kwargs)
        torch.manual_seed(7)
        coord = CoordInvolution2d(c_in, c_out, **kwargs)
        assert not coord.coord_weight.any() and coord.coord_weight.shape == (coord.reduce.out_channels, 2)
        for key, value in plain.state_dict().items():
            assert torch.equal(coord.state_dict()[key], value), key
        x = _input((c_in, c_out, h, w, kwargs), torch.float32)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        got = _forward_and_grads(coord, x, [p for k, p in coord.named_parameters() if k != "coord_weight"])
        expected = _forward_and_grads(plain, x, list(plain.parameters()))
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e), kwargs


def test_translation_equivariance_is_broken_only_by_the_coordinates_as_the_loop_reference_says() -> None:
    """Circular padding at stride 1: the plain layer commutes with a circular shift of its input; with
    non-zero coordinate weights the output of the shifted input is not the shifted output, and both
    outputs are the loop reference's (which adds the coordinate terms explicitly)."""
    geometry = (4, 4, 7, 8, dict(kernel_size=3, padding=1, padding_mode="circular", groups=2))
    x = _input(geometry)
    shifted = torch.roll(x, shifts=(2, 3), dims=(2, 3))
    plain = _layer(geometry)
    torch.testing.assert_close(plain(shifted), torch.roll(plain(x), (2, 3), (2, 3)), rtol=1e-12, atol=1e-12)
    coord = _layer(geometry, CoordInvolution2d)
    coord.load_state_dict(plain.state_dict() | {"coord_weight": coord.coord_weight.detach()})
    moved, expected = coord(shifted), torch.roll(coord(x), (2, 3), (2, 3))
    assert (moved - expected).abs().max() > 0.1
    for image in (x, shifted):
        _check_reference(coord, image)


def test_constant_and_shuffled_coordinates_are_the_controls() -> None:
    """ "constant": the coordinate weights act as a reduce bias; "shuffled": pixels' terms permuted anew."""
    geometry = GEOMETRIES[0]
    x = _input(geometry)
    constant = _layer(geometry, CoordInvolution2d, coords="constant")
    plain = _layer(geometry)
    constant.load_state_dict(plain.state_dict() | {"coord_weight": constant.coord_weight.detach()})
    with torch.no_grad():
        plain.reduce.bias += constant.coord_weight.sum(1)
    torch.testing.assert_close(constant(x), plain(x), rtol=1e-12, atol=1e-12)
    shuffled = _layer(geometry, CoordInvolution2d, coords="shuffled")
    centred = _layer(geometry, CoordInvolution2d)
    first, second = shuffled(x), shuffled(x)
    assert not torch.allclose(first, second) and not torch.allclose(first, centred(x))


# ---- options ----


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(groups=3), ValueError, r"groups = 3: .*divides out_channels = 8"),
        (dict(groups=0), ValueError, r"groups = 0: expected an integer >= 1"),
        (dict(group_channels=0), ValueError, r"group_channels = 0"),
        (dict(reduction=0), ValueError, r"reduction = 0: expected an integer >= 1"),
        (dict(reduction=-2), ValueError, r"reduction = -2"),
        (dict(reduction=2.0), TypeError, r"reduction = 2.0: expected an int"),
        (dict(padding="full"), ValueError, r"padding = 'full': expected 'same', 'valid'"),
        (dict(padding="same", stride=2), ValueError, r"padding = 'same' needs stride 1"),
        (dict(padding=-1), ValueError, r"padding = -1: expected integers >= 0"),
        (dict(padding_mode="mirror"), ValueError, r"padding_mode = 'mirror': expected one of zeros, reflect"),
        (dict(stride=0), ValueError, r"stride = 0"),
        (dict(dilation=(1, 2, 3)), TypeError, r"dilation = \(1, 2, 3\): expected an int or a pair"),
        (dict(kernel_size=1.5), TypeError, r"kernel_size = 1.5"),
        (dict(bias=None), TypeError, r"bias = None: expected a bool"),
        (dict(coords="polar"), ValueError, r"coords = 'polar': expected one of centered, seed"),
    ],
)
def test_bad_options_are_refused_naming_the_option(kwargs: dict, error: type, match: str) -> None:
    kwargs = {"kernel_size": 3} | kwargs
    cls = CoordInvolution2d if "coords" in kwargs else Involution2d
    with pytest.raises(error, match=match):
        cls(4, 8, **kwargs)


def test_a_group_count_from_group_channels_that_does_not_divide_is_refused() -> None:
    with pytest.raises(ValueError, match=r"group_channels = 16: gives 50 // 16 = 3 kernel groups"):
        Involution2d(50, 50, 3)


def test_the_functional_form_checks_its_kernel() -> None:
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match=r"kernel of shape \(1, 9, 4, 4\).*expected \(B, G\*9, 6, 6\)"):
        involution(x, torch.randn(1, 9, 4, 4), 3, padding=1)
    with pytest.raises(ValueError, match="G dividing the 4 channels"):
        involution(x, torch.randn(1, 27, 6, 6), 3, padding=1, form="unfold")
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        Involution2d(4, 4, 3, dilation=4)(x)
    with pytest.raises(ValueError, match="form = 'loops': expected one of fast, unfold"):
        involution(x, torch.randn(1, 36, 6, 6), 3, padding=1, form="loops")  # type: ignore[arg-type]


def test_the_two_forms_add_the_bias_alike() -> None:
    generator = torch.Generator().manual_seed(5)
    x, kernel, bias = (
        torch.randn(*shape, generator=generator, dtype=torch.float64)
        for shape in [(2, 4, 6, 5), (2, 18, 3, 3), (4,)]
    )
    fast = involution(x, kernel, 3, stride=2, padding=1, bias=bias)
    unfold = involution(x, kernel, 3, stride=2, padding=1, bias=bias, form="unfold")
    torch.testing.assert_close(fast, unfold, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fast, involution(x, kernel, 3, stride=2, padding=1))


# ---- parameter count ----

MODEL_WIDTHS = [(3, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]


@pytest.mark.parametrize(
    "options",
    [{}, dict(bias=False), dict(groups=8), dict(reduction=3, group_channels=4), dict(kernel_size=(3, 5))],
)
@pytest.mark.parametrize("cls", [Involution2d, CoordInvolution2d])
def test_parameter_count_is_the_modules(options: dict, cls: type) -> None:
    for c_in, c_out in [*MODEL_WIDTHS, (5, 3)]:
        kwargs = {"kernel_size": 3} | options
        if c_out % kwargs.get("groups", 1):
            continue
        layer = cls(c_in, c_out, **kwargs)
        count = parameter_count(
            c_in,
            c_out,
            kwargs["kernel_size"],
            kwargs.get("reduction", 4),
            kwargs.get("group_channels", 16),
            groups=kwargs.get("groups"),
            bias=kwargs.get("bias", True),
            coords=cls is CoordInvolution2d,
        )
        assert count == sum(p.numel() for p in layer.parameters()), (c_in, c_out, options)


def test_parameter_counts_at_the_models_widths() -> None:
    """The numbers DESIGN.md may quote: involution (k=3, reduction 4, 16 channels a group) vs nn.Conv2d."""
    involution_counts = [parameter_count(c_in, c_out, 3) for c_in, c_out in MODEL_WIDTHS]
    conv_counts = [
        sum(p.numel() for p in nn.Conv2d(c_in, c_out, 3).parameters()) for c_in, c_out in MODEL_WIDTHS
    ]
    assert involution_counts == [177, 129, 970, 458, 3764, 1716]
    assert conv_counts == [448, 2320, 4640, 9248, 18496, 36928]
    coord_counts = [parameter_count(c_in, c_out, 3, coords=True) for c_in, c_out in MODEL_WIDTHS]
    assert coord_counts == [
        count + 2 * max(c_out // 4, 1)
        for count, (_, c_out) in zip(involution_counts, MODEL_WIDTHS, strict=True)
    ]


# ---- state dicts, compile ----


@pytest.mark.parametrize("cls", [Involution2d, CoordInvolution2d])
def test_state_dict_round_trip(cls: type) -> None:
    geometry = GEOMETRIES[1]
    layer = _layer(geometry, cls)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(5)
    fresh = cls(4, 8, dtype=torch.float64, **geometry[4])
    x = _input(geometry)
    assert not torch.allclose(fresh(x), layer(x))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), layer(x))
    assert set(fresh.state_dict()) >= {
        "project.weight",
        "reduce.weight",
        "reduce.bias",
        "span.weight",
        "bias",
    }


def _compiled_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    geometry = GEOMETRIES[1]
    layer = _layer(geometry, CoordInvolution2d, torch.float32)
    x = _input(geometry, torch.float32).contiguous(memory_format=torch.channels_last)
    expected = _forward_and_grads(layer, x, list(layer.parameters()))
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    got = _forward_and_grads(compiled, x, list(layer.parameters()))
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_compile_traces_the_layer_in_one_graph() -> None:
    """Dynamo with fullgraph=True and AOTAutograd (backend aot_eager, a few seconds): no graph break, the
    custom autograd function's backward traced."""
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compile_with_inductor_matches_eager() -> None:
    """The default backend: about 30 s of compilation on 2 CPU cores."""
    _compiled_matches_eager("inductor")


# ---- the compiled operator (posconv.layers.involution's default path on CPU) ----

SRC = Path(involution_module.__file__).resolve().parents[2]
HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler here: the layers run eagerly")
def test_the_operator_is_built_and_runs_here() -> None:
    """With a compiler the default path is the C++ operator (so the tests above exercise it)."""
    layer = _layer(VECTOR_GEOMETRIES[0])
    assert involution_module.native_ready()
    layer(_input(VECTOR_GEOMETRIES[0]))
    assert acceleration.backends()[involution_module.OP] == "cpp"


@pytest.mark.parametrize("geometry", VECTOR_GEOMETRIES, ids=VECTOR_IDS)
@pytest.mark.parametrize("cls", [Involution2d, CoordInvolution2d])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_groups_of_16_channels_equal_the_loop_reference(
    geometry: tuple, cls: type, channels_last: bool
) -> None:
    """The operator's vector kernel (channels_last, 16 channels a group) and its NCHW one, by definition."""
    x = _input(geometry)
    _check_reference(
        _layer(geometry, cls), x.contiguous(memory_format=torch.channels_last) if channels_last else x
    )


@pytest.mark.parametrize("geometry", VECTOR_GEOMETRIES[:3], ids=VECTOR_IDS[:3])
def test_gradcheck_of_groups_of_16_channels(geometry: tuple) -> None:
    x = _input(geometry, batch=1).contiguous(memory_format=torch.channels_last)
    _gradcheck(_layer(geometry, CoordInvolution2d), x, fast_mode=True)


@pytest.mark.parametrize("geometry", GEOMETRIES + VECTOR_GEOMETRIES, ids=IDS + VECTOR_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_the_operator_equals_the_eager_formulation(
    geometry: tuple, channels_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output and every gradient of the operator against the PyTorch formulation that runs without it."""
    layer = _layer(geometry, CoordInvolution2d)
    x = _input(geometry)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    compiled = _forward_and_grads(layer, x, list(layer.parameters()))
    monkeypatch.setattr(involution_module, "_native", False)
    eager = _forward_and_grads(layer, x, list(layer.parameters()))
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_an_input_without_gradient_as_the_first_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image into the first layer needs no gradient: the operator skips it, the parameters' agree."""
    geometry = VECTOR_GEOMETRIES[1]
    layer = _layer(geometry, CoordInvolution2d)
    x = _input(geometry).contiguous(memory_format=torch.channels_last)
    grads = []
    for native in (True, False):
        monkeypatch.setattr(involution_module, "_native", native)
        y = layer(x)
        grads.append(torch.autograd.grad(y.square().sum(), list(layer.parameters())))
    assert not x.requires_grad and x.grad is None
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_double_backward_through_the_layer() -> None:
    """create_graph=True: the operator's backward is then the eager formulation's, itself differentiable."""
    geometry = (4, 16, 4, 5, dict(kernel_size=3, padding=1, padding_mode="reflect"))
    layer = _layer(geometry, CoordInvolution2d)
    names = [name for name, _ in layer.named_parameters()]

    def forward(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    x = _input(geometry, batch=1).contiguous(memory_format=torch.channels_last).requires_grad_()
    parameters = [p.detach().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradgradcheck(forward, (x, *parameters), fast_mode=True)


def test_inference_and_no_grad_give_the_same_output() -> None:
    geometry = VECTOR_GEOMETRIES[0]
    layer, x = (
        _layer(geometry, CoordInvolution2d),
        _input(geometry).contiguous(memory_format=torch.channels_last),
    )
    expected = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_a_padding_that_f_pad_refuses_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reflecting by the input's size or wrapping around twice: a ValueError on either path."""
    x = torch.randn(1, 4, 3, 5)
    for native in (True, False):
        monkeypatch.setattr(involution_module, "_native", native)
        with pytest.raises(ValueError, match=r"padding_mode = 'reflect': each must be smaller than .* 3 x 5"):
            Involution2d(4, 4, 3, padding=3, padding_mode="reflect")(x)
        with pytest.raises(ValueError, match=r"padding_mode = 'circular': each must be at most .* 3 x 5"):
            Involution2d(4, 4, 5, padding=4, padding_mode="circular")(x)
        assert Involution2d(4, 4, 5, padding=(2, 4), padding_mode="reflect")(x).shape == (1, 4, 3, 9)


def test_an_outer_torch_compile_keeps_the_operator_forward_and_backward() -> None:
    """Dynamo traces the model in one graph and AOTAutograd's forward and backward graphs call the
    operator and its backward (so Inductor compiles around them; no eager recomputation for the backward)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, set[str]] = {}

    def grab(name: str) -> Any:
        def compiler(graph: torch.fx.GraphModule, inputs: list) -> Any:
            graphs[name] = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
            return make_boxed_func(graph.forward)

        return compiler

    torch._dynamo.reset()
    model = nn.Sequential(
        Involution2d(16, 16, 3, padding=1), CoordInvolution2d(16, 32, 3, stride=2, padding=1)
    )
    x = torch.randn(2, 16, 12, 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    backend = aot_autograd(fw_compiler=grab("forward"), bw_compiler=grab("backward"))
    torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    assert "posconv_involution.forward.default" in graphs["forward"]
    assert "posconv_involution.backward.default" in graphs["backward"]


@pytest.mark.slow
def test_inductor_around_the_operator_at_three_sizes() -> None:
    """A model compiled with Inductor (fullgraph), as the pipeline's evaluate uses it: 128 px, then 96 and
    192 px (the sizes' own recompilation is Dynamo's; the operator takes any size)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        Involution2d(3, 16, 3, padding=1), nn.ReLU(), CoordInvolution2d(16, 16, 3, padding=1)
    )
    model = model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    for size in (128, 96, 192):
        x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
        expected = _forward_and_grads(model, x, list(model.parameters()))
        got = _forward_and_grads(compiled, x, list(model.parameters()))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


# ---- the fallback: a subprocess without a compiler, or with acceleration off ----

CHILD = """
import sys, torch
from posconv.layers import acceleration, involution
from test_involution import VECTOR_GEOMETRIES, CoordInvolution2d, _forward_and_grads, _input, _layer
involution._BUILD_TIMEOUT_S = float(sys.argv[2])
geometry = VECTOR_GEOMETRIES[1]
layer = _layer(geometry, CoordInvolution2d)
x = _input(geometry).contiguous(memory_format=torch.channels_last)
torch.save(_forward_and_grads(layer, x, list(layer.parameters())), sys.argv[1])
layer(x)  # a second forward: still one warning
print(acceleration.backends())
"""


def _child(tmp_path: Path, env: dict[str, str], timeout_s: float = 300) -> tuple[str, list[torch.Tensor]]:
    """Run CHILD with `env` and an empty extension cache: (its stderr, its output and gradients)."""
    script, results = tmp_path / "child.py", tmp_path / "results.pt"
    script.write_text(CHILD)
    paths = os.pathsep.join([str(SRC), str(Path(__file__).parent)])
    env = {**os.environ, "PYTHONPATH": paths, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), **env}
    done = subprocess.run(
        [sys.executable, str(script), str(results), str(timeout_s)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "{'involution': 'eager'}"
    return done.stderr, torch.load(results)


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"CXX": "/nonexistent/c++"}, "no C++ compiler ('/nonexistent/c++' not found; set CXX)"),
        ({"CXX": "false"}, "its C++ operator did not build (exit status 1)"),
        ({"POSCONV_ACCELERATE": "0"}, "POSCONV_ACCELERATE=0"),
    ],
    ids=["no-compiler", "failed-build", "switched-off"],
)
def test_without_the_operator_one_warning_and_the_same_numbers(
    tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    """One warning line, the eager backend recorded, and the compiled path's output and gradients."""
    stderr, results = _child(tmp_path, env)
    assert stderr.count("posconv: involution:") == 1
    assert f"posconv: involution: {reason}; running its eager implementation" in stderr
    geometry = VECTOR_GEOMETRIES[1]
    layer = _layer(geometry, CoordInvolution2d)
    x = _input(geometry).contiguous(memory_format=torch.channels_last)
    for got, expected in zip(results, _forward_and_grads(layer, x, list(layer.parameters())), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        assert got.stride() == expected.stride()


def test_a_stuck_compiler_is_killed_at_the_build_timeout(tmp_path: Path) -> None:
    """A compiler that never returns (and a child of it holding its pipes): the build gives up at the
    timeout, one warning line, the eager path."""
    stuck = tmp_path / "stuck-c++"
    stuck.write_text("#!/bin/sh\nsleep 300 &\nwait\n")
    stuck.chmod(0o755)
    stderr, _ = _child(tmp_path, {"CXX": str(stuck)}, timeout_s=2)
    assert "posconv: involution: its C++ operator did not build within 2.0 s" in stderr


BUILDER = """
from posconv.layers import acceleration, involution
print(involution.native_ready(), acceleration.backends())
"""
BARRIER = """#!/bin/sh
touch "$BARRIER/$$"
n=0
while [ "$(ls "$BARRIER" | wc -l)" -lt 2 ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n + 1)); done
exec "$REAL_CXX" "$@"
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler here")
def test_two_processes_building_at_once_each_load_a_whole_library(tmp_path: Path) -> None:
    """Two processes (xdist workers, DVC queue workers) compile into one empty cache at the same time (a
    compiler wrapper holds each until both have started): both run the operator, and the cache holds
    one library and no partial file."""
    (tmp_path / "barrier").mkdir()
    wrapper = tmp_path / "c++"
    wrapper.write_text(BARRIER)
    wrapper.chmod(0o755)
    (tmp_path / "builder.py").write_text(BUILDER)
    env = {**os.environ, "PYTHONPATH": str(SRC), "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    env |= {
        "CXX": str(wrapper),
        "REAL_CXX": os.environ.get("CXX", "c++"),
        "BARRIER": str(tmp_path / "barrier"),
    }
    command = [sys.executable, str(tmp_path / "builder.py")]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs == ["True {'involution': 'cpp'}\n"] * 2
    assert len(list((tmp_path / "barrier").iterdir())) == 2  # both compiled
    built = list((tmp_path / "cache" / "posconv_involution").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"


# ---- under DistributedDataParallel ----

RANKS = """
import sys, torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from posconv.layers.involution import CoordInvolution2d, Involution2d


def model() -> nn.Module:
    torch.manual_seed(0)
    layers = [Involution2d(8, 16, 3, padding=1), nn.ReLU(), CoordInvolution2d(16, 16, 3, padding=1)]
    return nn.Sequential(*layers).to(torch.float64, memory_format=torch.channels_last)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 6, 18, generator=generator, dtype=torch.float64)
    weights = torch.randn(4, 16, 6, 18, generator=generator, dtype=torch.float64)
    return x.contiguous(memory_format=torch.channels_last), weights


def rank(index: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=index, world_size=2)
    ddp = DistributedDataParallel(model())
    x, weights = batch()
    share = slice(2 * index, 2 * index + 2)
    (ddp(x[share]) * weights[share]).sum().backward()  # DDP averages the 2 ranks' gradients
    if index == 0:
        torch.save([p.grad for p in ddp.module.parameters()], f"{folder}/grads.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(rank, args=(sys.argv[1],), nprocs=2)
"""


@pytest.mark.slow
def test_two_ddp_ranks_get_the_gradients_of_the_whole_batch(tmp_path: Path) -> None:
    """gloo DDP over the operator: the averaged gradients of two half batches are the whole batch's."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp_path)])}
    subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, check=True, timeout=300)
    sys.path.insert(0, str(tmp_path))
    try:
        import ranks  # the script's own model and batch
    finally:
        sys.path.remove(str(tmp_path))
    model = ranks.model()
    x, weights = ranks.batch()
    (model(x) * weights).sum().div(2).backward()  # the average of the two halves' sums
    for got, expected in zip(
        torch.load(tmp_path / "grads.pt"), [p.grad for p in model.parameters()], strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
