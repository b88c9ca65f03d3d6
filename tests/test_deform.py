"""Deformable convolution v2 against a reference written out as loops, the column form, and nn.Conv2d."""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_layers import _forward_and_grads
from torch import nn

from posconv.layers import acceleration, native
from posconv.layers import deform as deform_module
from posconv.layers.deform import CoordDeformConv2d, DeformConv2d, Form, deform_conv2d

pytestmark = [
    # PyTorch's note that an even kernel with padding="same" pads a copy of the input: expected here
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
    # the eager path's tests switch acceleration off, on purpose
    pytest.mark.filterwarnings("ignore:posconv. deform. POSCONV_ACCELERATE=0"),
]

F64 = torch.float64
PATHS = ["cpp", "eager"]  # the fast form's two implementations (module docstring of deform.py)


def _require_the_library() -> None:
    """Skip where no compiler exists (the C++ path cannot run there); fail where one exists and the
    library does not build, which is a bug."""
    library = deform_module._library()
    if isinstance(library, str):
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"no C++ compiler: {library}")
        pytest.fail(library)


@pytest.fixture
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str | None]:
    """The fast form's implementation the test runs ("cpp", or "eager" with acceleration off), checked
    after the test to be the one that ran; None for a test of the column form alone."""
    chosen = request.param
    if chosen == "eager":
        monkeypatch.setenv(acceleration.SWITCH, "0")
    elif chosen == "cpp":
        _require_the_library()
    yield chosen
    if chosen is not None:
        assert acceleration.backends()["deform"] == chosen


# ---- the reference: the definition, one output number at a time, in Python floats ----


def _bilinear(plane: list[list[float]], y: float, x: float) -> float:
    """The four corners around (y, x), each weighed by the area of the opposite sub-rectangle; a corner
    outside the plane reads zero."""
    height, width = len(plane), len(plane[0])
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0

    def read(row: int, col: int) -> float:
        return plane[row][col] if 0 <= row < height and 0 <= col < width else 0.0

    return (
        (1 - ly) * (1 - lx) * read(y0, x0)
        + (1 - ly) * lx * read(y0, x0 + 1)
        + ly * (1 - lx) * read(y0 + 1, x0)
        + ly * lx * read(y0 + 1, x0 + 1)
    )


def _naive(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    pad_before: tuple[int, int],
    dilation: tuple[int, int],
    out_size: tuple[int, int],
) -> torch.Tensor:
    """y[b, o, oy, ox] = bias[o] + sum over c, (i, j) of weight[o, c, i, j] · mask · x[b, c](place), the
    place (oy·sh - top + i·dh + Δy, ox·sw - left + j·dw + Δx); channel 2·(g·K + i·kW + j) of `offset`
    is Δy of offset group g and tap (i, j), the next one Δx; channel g·K + i·kW + j of `mask` its mask."""
    xs, offsets, weights = x.tolist(), offset.tolist(), weight.tolist()
    masks = mask.tolist() if mask is not None else None
    biases = bias.tolist() if bias is not None else None
    n, c_in = x.shape[:2]
    c_out, per_group, kh, kw = weight.shape
    groups, taps = c_in // per_group, kh * kw
    offset_groups = offset.shape[1] // (2 * taps)
    out = torch.zeros(n, c_out, *out_size, dtype=F64)
    for b in range(n):
        for o in range(c_out):
            group = o // (c_out // groups)
            for oy in range(out_size[0]):
                for ox in range(out_size[1]):
                    total = biases[o] if biases is not None else 0.0
                    for ci in range(per_group):
                        c = group * per_group + ci
                        g = c // (c_in // offset_groups)
                        for i in range(kh):
                            for j in range(kw):
                                k = g * taps + i * kw + j
                                dy, dx = offsets[b][2 * k][oy][ox], offsets[b][2 * k + 1][oy][ox]
                                m = masks[b][k][oy][ox] if masks is not None else 1.0
                                y = oy * stride[0] - pad_before[0] + i * dilation[0] + dy
                                x_ = ox * stride[1] - pad_before[1] + j * dilation[1] + dx
                                total += weights[o][ci][i][j] * m * _bilinear(xs[b][c], y, x_)
                    out[b, o, oy, ox] = total
    return out


def test_the_reference_interpolates_as_defined() -> None:
    """The reference's own check: bilinear values worked out by hand, zero outside."""
    plane = [[1.0, 2.0], [3.0, 5.0]]
    assert _bilinear(plane, 0, 0) == 1 and _bilinear(plane, 1, 1) == 5
    assert _bilinear(plane, 0.5, 0.5) == (1 + 2 + 3 + 5) / 4
    assert _bilinear(plane, 0.25, 1) == 0.75 * 2 + 0.25 * 5
    assert _bilinear(plane, -0.5, 0) == 0.5 * 1  # half the weight on a row outside the plane
    assert _bilinear(plane, 1, 1.5) == 0.5 * 5 and _bilinear(plane, 7, -3) == 0


# ---- operands ----

# (input H, W, C_in, C_out, functional kwargs, offset groups): symmetric paddings, as the functional takes
FUNCTIONAL: list[tuple[int, int, int, int, dict[str, Any], int]] = [
    (6, 5, 2, 3, dict(padding=1), 1),
    (7, 8, 2, 3, dict(stride=2, padding=1), 1),
    (6, 7, 2, 2, dict(padding=2, dilation=2), 1),
    (5, 6, 2, 3, dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2)), 2),
    (5, 5, 4, 4, dict(padding=1, groups=2), 2),
    (4, 6, 4, 2, dict(padding=(1, 0), groups=2, bias=False), 4),
    (5, 3, 2, 2, dict(), 1),  # no padding: a 3x1 output, odd sizes on both axes
]
FUNCTIONAL_KERNELS = [3, 3, 3, (2, 3), 3, (3, 1), 3]
FUNCTIONAL_IDS = [
    f"{h}x{w}-k{k}-" + "-".join(f"{a}={b}" for a, b in kw.items()) + f"-og{g}"
    for (h, w, _, _, kw, g), k in zip(FUNCTIONAL, FUNCTIONAL_KERNELS, strict=True)
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _operands(
    h: int,
    w: int,
    c_in: int,
    c_out: int,
    kwargs: dict[str, Any],
    offset_groups: int,
    kernel: Any,
    seed: int = 0,
) -> dict[str, Any]:
    """Random input, weight, bias, offsets and masks (float64) for `deform_conv2d`'s geometry.

    Offsets: normal with 2 px spread, so many places fall outside the input; one in five rounded to an
    integer (exact places, and places on the border); one in twenty pushed 100 px out (all corners out).
    Masks uniform in [0, 2), the layer's range."""
    g = _generator(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    stride, padding, dilation = (
        nn.modules.utils._pair(kwargs.get(key, default))
        for key, default in (("stride", 1), ("padding", 0), ("dilation", 1))
    )
    groups = kwargs.get("groups", 1)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    offset = 2 * torch.randn(2, 2 * offset_groups * kh * kw, ho, wo, generator=g, dtype=F64)
    pick = torch.rand(offset.shape, generator=g, dtype=F64)
    offset = torch.where(pick < 0.2, offset.round(), offset)
    offset = torch.where(pick > 0.95, offset.sign() * 100, offset)
    return dict(
        input=torch.randn(2, c_in, h, w, generator=g, dtype=F64),
        offset=offset,
        weight=torch.randn(c_out, c_in // groups, kh, kw, generator=g, dtype=F64),
        bias=torch.randn(c_out, generator=g, dtype=F64) if kwargs.get("bias", True) else None,
        mask=2 * torch.rand(2, offset_groups * kh * kw, ho, wo, generator=g, dtype=F64),
        stride=stride,
        padding=padding,
        dilation=dilation,
    )


def _call(form: Form, operands: dict[str, Any]) -> torch.Tensor:
    return deform_conv2d(**operands, form=form)


def _reference(operands: dict[str, Any]) -> torch.Tensor:
    o = operands
    out_size = (o["offset"].shape[2], o["offset"].shape[3])
    return _naive(
        o["input"],
        o["offset"],
        o["mask"],
        o["weight"],
        o["bias"],
        o["stride"],
        o["padding"],
        o["dilation"],
        out_size,
    )


# ---- forward: the fast form (both paths) and the column form against the loops ----

FORMS = [("fast", "cpp"), ("fast", "eager"), ("unfold", None)]
FORM_IDS = ["fast-cpp", "fast-eager", "unfold"]


@pytest.mark.parametrize(
    ("h", "w", "c_in", "c_out", "kwargs", "offset_groups", "kernel"),
    [(*g, k) for g, k in zip(FUNCTIONAL, FUNCTIONAL_KERNELS, strict=True)],
    ids=FUNCTIONAL_IDS,
)
@pytest.mark.parametrize(("form", "path"), FORMS, indirect=["path"], ids=FORM_IDS)
def test_forward_equals_the_loops(
    h: int,
    w: int,
    c_in: int,
    c_out: int,
    kwargs: dict,
    offset_groups: int,
    kernel: Any,
    form: Form,
    path: str | None,
) -> None:
    operands = _operands(h, w, c_in, c_out, kwargs, offset_groups, kernel)
    expected = _reference(operands)
    got = _call(form, operands)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("form", "path"), FORMS, indirect=["path"], ids=FORM_IDS)
def test_without_a_mask_every_tap_weighs_one(form: Form, path: str | None) -> None:
    """DCNv1: `mask=None` is the layer with every mask 1, its gradients those of unit masks."""
    operands = _operands(6, 5, 2, 3, dict(padding=1), 1, 3) | {"mask": None}
    torch.testing.assert_close(_call(form, operands), _reference(operands), rtol=1e-10, atol=1e-10)
    grads = []
    for mask in (None, torch.ones_like(_operands(6, 5, 2, 3, dict(padding=1), 1, 3)["mask"])):
        leaves = {key: operands[key].clone().requires_grad_() for key in ("input", "offset", "weight")}
        y = _call(form, operands | leaves | {"mask": mask})
        grads.append(torch.autograd.grad(y, list(leaves.values()), torch.ones_like(y)))
    for without, ones in zip(*grads, strict=True):
        torch.testing.assert_close(without, ones, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_places_beyond_the_input_read_zero(path: str) -> None:
    """Every tap pushed far out: only the bias is left (the plain convolution and its subtraction cancel)."""
    operands = _operands(6, 5, 2, 3, dict(padding=1), 1, 3)
    operands["offset"] = torch.full_like(operands["offset"], -1e4)
    expected = operands["bias"][:, None, None].expand(2, -1, 6, 5)
    torch.testing.assert_close(deform_conv2d(**operands), expected, rtol=0, atol=1e-12)


def test_the_two_forms_agree_in_float32_and_both_know_the_offset_layout() -> None:
    """Swapping Δy and Δx (a transposed offset layout) changes the output: the loops pin the layout."""
    operands = _operands(7, 8, 2, 3, dict(stride=2, padding=1), 1, 3, seed=3)
    fast = deform_conv2d(**operands)
    swapped = operands | {"offset": operands["offset"].unflatten(1, (-1, 2)).flip(2).flatten(1, 2)}
    assert not torch.allclose(deform_conv2d(**swapped), fast)
    single = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in operands.items()}
    unfold = deform_conv2d(**single, form="unfold")
    torch.testing.assert_close(deform_conv2d(**single), unfold, rtol=1e-4, atol=1e-4)


# ---- gradients ----


def _away_from_integers(offset: torch.Tensor, seed: int) -> torch.Tensor:
    """Offsets whose fractional parts lie in [0.2, 0.8]: bilinear interpolation is differentiable there
    (places are integer + fraction, and it has kinks wherever a place crosses an integer row or column;
    finite differences across a kink disagree with either one-sided derivative)."""
    fraction = 0.2 + 0.6 * torch.rand(offset.shape, generator=_generator(seed), dtype=F64)
    return offset.floor() + fraction


@pytest.mark.parametrize(
    ("h", "w", "c_in", "c_out", "kwargs", "offset_groups", "kernel", "fast_mode"),
    [
        (4, 5, 2, 2, dict(stride=2, padding=1), 1, 3, False),
        (4, 4, 4, 2, dict(padding=(1, 0), dilation=(1, 2), groups=2), 2, (2, 2), True),
    ],
    ids=["stride2", "groups2-og2-dilated"],
)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_gradcheck_functional(
    h: int,
    w: int,
    c_in: int,
    c_out: int,
    kwargs: dict,
    offset_groups: int,
    kernel: Any,
    fast_mode: bool,
    path: str,
) -> None:
    """Finite differences agree with autograd w.r.t. input, offsets, masks, weight and bias: every
    Jacobian entry on one geometry, a random projection of them (fast_mode) on the other."""
    operands = _operands(h, w, c_in, c_out, kwargs, offset_groups, kernel, seed=4)
    operands["offset"] = _away_from_integers(operands["offset"].clamp(-3, 3), seed=5)
    names = ["input", "offset", "mask", "weight", "bias"]
    geometry = {key: operands[key] for key in ("stride", "padding", "dilation")}

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        return deform_conv2d(**dict(zip(names, tensors, strict=True)), **geometry)

    inputs = tuple(
        operands[key][:1].clone() if key in ("input", "offset", "mask") else operands[key] for key in names
    )
    assert torch.autograd.gradcheck(forward, tuple(t.requires_grad_() for t in inputs), fast_mode=fast_mode)


def _randomised(layer: DeformConv2d, seed: int = 6, offset_scale: float = 0.3) -> DeformConv2d:
    """Every parameter non-zero. The offset convolution's weights are scaled so that offsets spread over
    a pixel or two: random, hence (almost surely, and for these seeds) away from integers."""
    g = _generator(seed)
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            scale = offset_scale if name.startswith("offset_conv") else 1.0
            parameter.copy_(scale * (2 * torch.rand(parameter.shape, generator=g, dtype=F64) - 1))
    return layer


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=(2, 3), stride=2, padding=1, offset_groups=2),
        dict(kernel_size=2, padding="same", padding_mode="reflect", groups=2, bias=False),
    ],
    ids=["stride2-og2", "same-reflect-groups2"],
)
@pytest.mark.parametrize("cls", [DeformConv2d, CoordDeformConv2d])
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_gradcheck_layer_every_parameter(kwargs: dict, cls: type, path: str) -> None:
    """Input, weight, bias, the offset convolution's weight and bias (and coord_bias); fast_mode (a random
    projection of the Jacobian: the full one takes a forward per entry of the offset convolution)."""
    layer = _randomised(cls(2, 2, dtype=F64, **kwargs))
    names = [name for name, _ in layer.named_parameters()]
    assert any(name.startswith("offset_conv") for name in names)

    def forward(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    x = torch.randn(1, 2, 4, 5, generator=_generator(7), dtype=F64)
    inputs = (x.requires_grad_(), *(p.detach().clone().requires_grad_() for p in layer.parameters()))
    assert torch.autograd.gradcheck(forward, inputs, fast_mode=True)  # a random projection of the Jacobian


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_second_derivatives_agree_with_the_column_form(path: str) -> None:
    """A gradient penalty differentiates twice: the column form and the eager path are plain autograd over
    grid_sample; the C++ path's backward, asked for a graph (create_graph), differentiates the eager form."""
    operands = _operands(5, 5, 2, 2, dict(padding=1), 1, 3, seed=8)
    operands["offset"] = _away_from_integers(operands["offset"].clamp(-3, 3), seed=9)
    results = []
    for form in ("fast", "unfold"):
        leaves = {key: operands[key].clone().requires_grad_() for key in ("input", "offset", "weight")}
        y = _call(form, operands | leaves)
        (input_grad,) = torch.autograd.grad(y.square().sum(), leaves["input"], create_graph=True)
        results.append(torch.autograd.grad(input_grad.square().sum(), list(leaves.values())))
    for fast, unfold in zip(*results, strict=True):
        torch.testing.assert_close(fast, unfold, rtol=1e-9, atol=1e-9)


# ---- the layer: its offsets and masks, every padding ----

# (input H, W, layer kwargs): every nn.Conv2d padding, every mode
LAYER_GEOMETRIES: list[tuple[int, int, dict[str, Any]]] = [
    (6, 5, dict(kernel_size=3, padding=1)),
    (7, 6, dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect", offset_groups=2)),
    (6, 7, dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 2), dilation=(2, 1), padding_mode="circular")),
    (5, 6, dict(kernel_size=2, padding="same", padding_mode="replicate", bias=False)),
    (6, 5, dict(kernel_size=2, padding="same", dilation=2, groups=2)),
    (5, 4, dict(kernel_size=3, padding="valid", offset_groups=4)),
]
LAYER_IDS = [f"{h}x{w}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for h, w, kw in LAYER_GEOMETRIES]


def _layer(kwargs: dict[str, Any], dtype: torch.dtype = F64, cls: type = DeformConv2d, **options: Any) -> Any:
    torch.manual_seed(0)
    return cls(4, 6, dtype=dtype, **kwargs, **options)


def _input(h: int, w: int, dtype: torch.dtype = F64, seed: int = 2) -> torch.Tensor:
    return torch.randn(2, 4, h, w, generator=_generator(seed), dtype=dtype)


def _frame(layer: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """What the taps sample: the input padded in the layer's mode (zeros: not padded, the reference reads
    zero outside), and the frame's origin."""
    left, _, top, _ = layer._reversed_padding_repeated_twice
    if layer.padding_mode == "zeros":
        return x, (top, left)
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0, 0)


@pytest.mark.parametrize(("h", "w", "kwargs"), LAYER_GEOMETRIES, ids=LAYER_IDS)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_layer_equals_the_loops_with_its_own_offsets_and_masks(
    h: int, w: int, kwargs: dict, path: str
) -> None:
    """The offsets are the offset convolution's first 2·G·K channels, the masks 2·sigmoid of the rest."""
    layer = _randomised(_layer(kwargs), offset_scale=0.5)
    x = _input(h, w)
    with torch.no_grad():
        out = F.conv2d(
            _frame(layer.offset_conv, x)[0],
            layer.offset_conv.weight,
            layer.offset_conv.bias,
            layer.stride,
            0 if layer.padding_mode != "zeros" else layer.padding,
            layer.dilation,
        )
        split = 2 * layer.offset_groups * math.prod(layer.kernel_size)
        offset, mask = out[:, :split], 2 * torch.sigmoid(out[:, split:])
        assert offset.abs().max() > 0.5 and (mask - 1).abs().max() > 0.1
        frame, pad_before = _frame(layer, x)
        expected = _naive(
            frame,
            offset,
            mask,
            layer.weight,
            layer.bias,
            layer.stride,
            pad_before,
            layer.dilation,
            out.shape[-2:],
        )
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


# ---- initialisation: exactly the plain convolution, with the same random draws ----


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_at_init_the_layer_is_exactly_nn_conv2d_with_the_same_draws(
    dtype: torch.dtype,
    channels_last: bool,
    path: str,
) -> None:
    """Same seed: same weight and bias, same random stream afterwards (the zero offset convolution draws
    nothing), and bit for bit the same output, on sizes where grid_sample's own normalisation would not
    read integer places exactly (odd, and one above a power of two)."""
    for h, w, kwargs in [
        *LAYER_GEOMETRIES,
        (9, 7, dict(kernel_size=3, stride=2, padding=1)),
        (17, 33, dict(kernel_size=3)),
    ]:
        conv_kwargs = {k: v for k, v in kwargs.items() if k != "offset_groups"}
        torch.manual_seed(1)
        layer = DeformConv2d(4, 6, dtype=dtype, **kwargs)
        after_layer = torch.rand(3)
        torch.manual_seed(1)
        conv = nn.Conv2d(4, 6, dtype=dtype, **conv_kwargs)
        after_conv = torch.rand(3)
        assert torch.equal(after_layer, after_conv), kwargs
        assert torch.equal(layer.weight, conv.weight), kwargs
        assert (layer.bias is None and conv.bias is None) or torch.equal(layer.bias, conv.bias)
        assert not layer.offset_conv.weight.any() and not layer.offset_conv.bias.any()
        x = _input(h, w, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        offset, mask = layer.offsets_and_mask(x)
        assert not offset.any() and bool((mask == 1).all())
        y = layer(x)
        assert torch.equal(y, conv(x)), kwargs
        assert y.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_zero_offsets_and_unit_masks_give_exactly_f_conv2d(dtype: torch.dtype, path: str) -> None:
    for (h, w, c_in, c_out, kwargs, offset_groups), kernel in zip(
        FUNCTIONAL, FUNCTIONAL_KERNELS, strict=True
    ):
        operands = _operands(h, w, c_in, c_out, kwargs, offset_groups, kernel)
        operands = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in operands.items()}
        operands["offset"], operands["mask"] = operands["offset"].zero_(), operands["mask"].fill_(1)
        groups = c_in // operands["weight"].shape[1]
        geometry = {key: operands[key] for key in ("stride", "padding", "dilation")}
        expected = F.conv2d(
            operands["input"], operands["weight"], operands["bias"], groups=groups, **geometry
        )
        assert torch.equal(deform_conv2d(**operands), expected), kwargs


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_at_init_gradients_are_the_plain_convolutions(path: str) -> None:
    """The same numbers to float32 rounding (computed differently: through the samples, not convolution's
    transpose); the offset convolution gets a gradient, so the layer can start deforming."""
    torch.manual_seed(1)
    layer = DeformConv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect")
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect")
    grads = []
    for module in (layer, conv):
        x = _input(9, 8, torch.float32).requires_grad_()
        y = module(x)
        weights = torch.randn(y.shape, generator=_generator(3))
        grads.append(torch.autograd.grad((y * weights).sum(), [x, module.weight, module.bias]))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    x = _input(9, 8, torch.float32)
    layer(x).square().sum().backward()
    assert layer.offset_conv.weight.grad.abs().max() > 0 and layer.offset_conv.bias.grad.abs().max() > 0


# ---- layouts and precision ----


@pytest.mark.parametrize(("h", "w", "kwargs"), LAYER_GEOMETRIES[:3], ids=LAYER_IDS[:3])
@pytest.mark.parametrize("cls", [DeformConv2d, CoordDeformConv2d])
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_channels_last_gives_the_numbers_of_nchw(h: int, w: int, kwargs: dict, cls: type, path: str) -> None:
    layer = _randomised(_layer(kwargs, cls=cls), offset_scale=0.5)
    expected = _forward_and_grads(layer, _input(h, w), list(layer.parameters()))
    layer = layer.to(memory_format=torch.channels_last)
    x = _input(h, w).contiguous(memory_format=torch.channels_last)
    got = _forward_and_grads(layer, x, list(layer.parameters()))
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


BF16_TOLERANCE = 2e-2  # of the largest magnitude: 8 mantissa bits (2^-8 = 0.004) and a few roundings


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"]
)
@pytest.mark.parametrize(("h", "w", "kwargs"), LAYER_GEOMETRIES[:3], ids=LAYER_IDS[:3])
@pytest.mark.parametrize("cls", [DeformConv2d, CoordDeformConv2d])
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_bfloat16_autocast_follows_float64(
    h: int,
    w: int,
    kwargs: dict,
    cls: type,
    memory_format: torch.memory_format,
    path: str,
) -> None:
    """Output and every gradient within BF16_TOLERANCE of float64's largest magnitude; output bfloat16 as
    autocast's convolution's, parameter gradients float32, memory format kept."""
    layer = _randomised(_layer(kwargs, cls=cls), offset_scale=0.5)
    expected = _forward_and_grads(layer, _input(h, w), list(layer.parameters()))
    layer = layer.to(torch.float32, memory_format=memory_format)
    x = _input(h, w).to(torch.float32, memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _forward_and_grads(layer, x, list(layer.parameters()))
    assert got[0].dtype == torch.bfloat16 and got[0].is_contiguous(memory_format=memory_format)
    assert all(g.dtype == torch.float32 for g in got[1:])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(
            g.double(), e, rtol=BF16_TOLERANCE, atol=BF16_TOLERANCE * e.abs().max().item()
        )


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_under_autocast_sampling_places_stay_float32(path: str) -> None:
    """Half-pixel offsets far from the origin: in bfloat16 (8 bits) the place 200.5 is 200 or 202, which
    reads one pixel instead of the mean of two. Float32 places give the mean, within bfloat16 rounding."""
    layer = DeformConv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1)
        layer.offset_conv.bias[1] = 0.5  # Δx = 0.5 everywhere; Δy and the mask logit stay 0
    x = torch.randn(1, 1, 1, 300, generator=_generator(10))
    expected = torch.cat([(x[..., :-1] + x[..., 1:]) / 2, x[..., -1:] / 2], -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


# ---- the coordinate variant ----


def _kernel_centre_coords(in_size: int, out_size: int, layer: nn.Conv2d, axis: int) -> torch.Tensor:
    """By the definition: the undeformed kernel's centre, normalised at pixel centres to [-1, 1]."""
    before = layer._reversed_padding_repeated_twice[2 * (1 - axis)]
    centre = torch.arange(out_size, dtype=F64) * layer.stride[axis] - before
    centre = centre + layer.dilation[axis] * (layer.kernel_size[axis] - 1) / 2
    return (2 * centre + 1) / in_size - 1


def _coordinate_term(
    layer: CoordDeformConv2d, in_size: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """a_c·X + b_c·Y, pixel by pixel."""
    if layer.coords == "centered":
        xs = _kernel_centre_coords(in_size[1], out_size[1], layer, 1)
        ys = _kernel_centre_coords(in_size[0], out_size[0], layer, 0)
    else:  # "seed": i/(W_out-1)
        xs = torch.arange(out_size[1], dtype=F64) / max(out_size[1] - 1, 1)
        ys = torch.arange(out_size[0], dtype=F64) / max(out_size[0] - 1, 1)
    a, b = layer.coord_bias.unbind(1)
    term = [
        [[a[c] * xs[j] + b[c] * ys[i] for j in range(out_size[1])] for i in range(out_size[0])]
        for c in range(layer.out_channels)
    ]
    return torch.stack([torch.stack([torch.stack(row) for row in plane]) for plane in term])


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_coord_variant_starts_as_the_deformable_and_the_plain_convolution(path: str) -> None:
    for h, w, kwargs in LAYER_GEOMETRIES:
        coord = _layer(kwargs, torch.float32, CoordDeformConv2d)
        deform = _layer(kwargs, torch.float32)
        torch.manual_seed(0)
        conv = nn.Conv2d(
            4, 6, dtype=torch.float32, **{k: v for k, v in kwargs.items() if k != "offset_groups"}
        )
        assert not coord.coord_bias.any() and coord.coord_bias.shape == (6, 2)
        x = _input(h, w, torch.float32)
        y = coord(x)
        assert torch.equal(y, deform(x)) and torch.equal(y, conv(x)), kwargs


@pytest.mark.parametrize(("h", "w", "kwargs"), LAYER_GEOMETRIES, ids=LAYER_IDS)
@pytest.mark.parametrize("coords", ["centered", "seed"])
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_coord_variant_adds_the_coordinate_term_at_the_output_pixels(
    h: int,
    w: int,
    kwargs: dict,
    coords: str,
    path: str,
) -> None:
    coord = _randomised(_layer(kwargs, cls=CoordDeformConv2d, coords=coords), offset_scale=0.5)
    assert coord.coord_bias.abs().min() > 0
    deform = _layer(kwargs)
    deform.load_state_dict({k: v for k, v in coord.state_dict().items() if k != "coord_bias"})
    params = list(coord.parameters())
    x = _input(h, w)

    def expected_form(x: torch.Tensor) -> torch.Tensor:
        y = torch.func.functional_call(
            deform, {name: p for name, p in coord.named_parameters() if name != "coord_bias"}, (x,)
        )
        return y + _coordinate_term(coord, (h, w), (y.shape[-2], y.shape[-1]))

    got = _forward_and_grads(coord, x, params)
    expected = _forward_and_grads(expected_form, x, params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


# ---- options, state dicts, compile ----


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(groups=3), r"groups = 3: expected a positive integer that divides in_channels = 4"),
        (
            dict(offset_groups=3),
            r"offset_groups = 3: expected a positive integer that divides in_channels = 4",
        ),
        (dict(offset_groups=0), r"offset_groups = 0: expected a positive integer"),
        (dict(offset_groups=2.0), r"offset_groups = 2.0: expected a positive integer"),
        (dict(coords="polar"), r"coords = 'polar': expected one of centered, seed"),
    ],
)
def test_bad_options_are_refused_naming_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoordDeformConv2d(4, 6, 3, **kwargs)
    if "coords" not in kwargs:
        with pytest.raises(ValueError, match=message):
            DeformConv2d(4, 6, 3, **kwargs)


def test_bad_operands_are_refused_naming_the_operand() -> None:
    operands = _operands(6, 5, 2, 3, dict(padding=1), 1, 3)
    for name, bad, message in [
        ("offset", operands["offset"][:, :-2], r"offset: expected \(N, 2·offset_groups·kH·kW"),
        ("offset", operands["offset"][..., :-1], r"offset: expected"),
        ("mask", operands["mask"][:, :-1], r"mask: expected \(N, offset_groups·kH·kW"),
        ("weight", operands["weight"][:, :, None], r"input and weight: expected 4-d"),
        ("weight", torch.zeros(3, 3, 3, 3, dtype=F64), r"weight: expected \(C_out, C_in/groups"),
    ]:
        with pytest.raises(ValueError, match=message):
            deform_conv2d(**operands | {name: bad})


@pytest.mark.parametrize("cls", [DeformConv2d, CoordDeformConv2d])
def test_state_dict_round_trip(cls: type) -> None:
    layer = _randomised(_layer(dict(kernel_size=3, padding=1, offset_groups=2), cls=cls))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(5)
    fresh = cls(4, 6, 3, padding=1, offset_groups=2, dtype=F64)
    state = torch.load(buffer, weights_only=True)
    assert {"weight", "bias", "offset_conv.weight", "offset_conv.bias"} <= set(state)
    fresh.load_state_dict(state)
    x = _input(6, 7)
    assert torch.equal(fresh(x), layer(x))


def _compiled_against_eager(backend: str) -> None:
    torch._dynamo.reset()
    layer = _randomised(CoordDeformConv2d(2, 3, 2, padding=1, dtype=torch.float32), offset_scale=0.5)
    x = torch.randn(1, 2, 5, 4, generator=_generator(11))
    expected = _forward_and_grads(layer, x, list(layer.parameters()))
    got = _forward_and_grads(
        torch.compile(layer, fullgraph=True, backend=backend), x, list(layer.parameters())
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_the_layer_traces_whole_forward_and_backward() -> None:
    """fullgraph: Dynamo and AOTAutograd take the whole layer, backward included, without a graph break
    (grid_sample, no data-dependent branch); a couple of seconds, unlike Inductor's code generation."""
    _compiled_against_eager("aot_eager")


@pytest.mark.slow  # Inductor compiles forward and backward: 20-30 s on 2 cores with a cold cache
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_layer_matches_eager() -> None:
    _compiled_against_eager("inductor")


def test_an_unknown_form_is_refused() -> None:
    operands = _operands(6, 5, 2, 3, dict(padding=1), 1, 3)
    with pytest.raises(ValueError, match="form = 'loops': expected one of fast, unfold"):
        deform_conv2d(**operands, form="loops")  # type: ignore[arg-type]


# ---- the C++ path: what runs, the build, the fall back ----


def test_the_cpp_path_is_recorded_and_switching_it_off_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_the_library()
    layer = _randomised(_layer(dict(kernel_size=3, padding=1)), offset_scale=0.5)
    x = _input(6, 5)
    fast = layer(x)
    assert acceleration.backends()["deform"] == "cpp"
    monkeypatch.setenv(acceleration.SWITCH, "0")
    acceleration.record("deform", "cpp")  # as if the C++ path had run last, whatever ran before
    with pytest.warns(
        UserWarning, match="posconv: deform: POSCONV_ACCELERATE=0; running its eager"
    ) as caught:
        eager = layer(x)
        layer(x)
    assert len(caught) == 1 and acceleration.backends()["deform"] == "eager"
    torch.testing.assert_close(fast, eager, rtol=1e-12, atol=1e-12)


def _fake_compiler(folder: Path, body: str) -> Path:
    """An executable answering --version like a compiler, doing `body` when asked to compile."""
    script = folder / "fake-c++"
    script.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\n{body}\n')
    script.chmod(0o755)
    return script


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty library cache, and the library forgotten: the next call builds it (or fails to) anew, and
    the tests after this one load the real library again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    deform_module._library.cache_clear()
    yield tmp_path / "cache" / "posconv"
    deform_module._library.cache_clear()


@pytest.mark.parametrize(
    ("compiler", "message"),
    [
        (None, r"missing-c\+\+ cannot run"),
        ("echo 'error: something is wrong' >&2; exit 1", r"failed \(exit 1\): error: something is wrong"),
        ("sleep 60 & wait", r"ran past 1 s and was killed"),  # a compiler that hangs, in a child process
    ],
    ids=["missing", "failing", "hanging"],
)
def test_a_compiler_that_cannot_build_falls_back_with_one_warning(
    compiler: str | None,
    message: str,
    fresh_build: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The eager path runs, after one warning line that says why; nothing is left in the cache; a hung
    compiler is killed, with its children, after BUILD_TIMEOUT_S."""
    executable = tmp_path / "missing-c++" if compiler is None else _fake_compiler(tmp_path, compiler)
    monkeypatch.setenv("CXX", str(executable))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 1)
    layer = _randomised(_layer(dict(kernel_size=3, padding=1)), offset_scale=0.5)
    x = _input(6, 5)
    acceleration.record("deform", "cpp")
    started = time.monotonic()
    with pytest.warns(UserWarning, match=rf"posconv: deform: .*{message}.*; running its eager") as caught:
        y = layer(x)
        layer(x)
    assert time.monotonic() - started < 30
    assert len(caught) == 1 and acceleration.backends()["deform"] == "eager"
    assert not fresh_build.exists() or not list(fresh_build.iterdir())
    monkeypatch.setenv(acceleration.SWITCH, "0")
    assert torch.equal(y, layer(x))  # the eager path's numbers


def test_a_cold_build_leaves_one_library_and_is_used(fresh_build: Path) -> None:
    layer = _randomised(_layer(dict(kernel_size=3, padding=1)), offset_scale=0.5)
    layer(_input(6, 5))
    assert acceleration.backends()["deform"] == "cpp"
    assert [path.suffix for path in fresh_build.iterdir()] == [".so"]


def test_concurrent_first_builds_share_one_library(tmp_path: Path) -> None:
    """Two processes building into one empty cache at once (two pytest workers) both load a whole
    library, and one file is left: each writes its own file and renames it into place. The compiler is
    wrapped to log each build and wait a second before it, so that the two builds surely overlap."""
    _require_the_library()
    log = tmp_path / "builds.log"
    real = shutil.which(os.environ.get("CXX", "c++"))
    wrapper = _fake_compiler(tmp_path, f'echo build >> "{log}"; sleep 1; exec "{real}" "$@"')
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('native', sys.argv[1])\n"
        "native = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(native)\n"
        "native.load(native.Path(sys.argv[2]), tuple(sys.argv[3:])).deform_columns_f32\n"
    )
    command = [
        sys.executable,
        "-c",
        script,
        native.__file__,
        str(deform_module._SOURCE),
        *deform_module._FLAGS,
    ]
    cache = tmp_path / "cache"
    environment = os.environ | {"XDG_CACHE_HOME": str(cache), "CXX": str(wrapper)}
    workers = [subprocess.Popen(command, env=environment, stderr=subprocess.PIPE) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err.decode()
    assert log.read_text().split() == ["build", "build"]  # neither found the other's library
    assert [path.suffix for path in (cache / "posconv").iterdir()] == [".so"]


@pytest.fixture
def four_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(threads)


def test_chunks_and_channel_blocks_give_the_loops(
    monkeypatch: pytest.MonkeyPatch, four_threads: None
) -> None:
    """A batch cut into one-image chunks, each image's channels split in four blocks for four threads (the
    backward's channel blocks, whose partial offset and mask gradients are added up after), across a
    convolution group boundary: the loops' output, the eager path's gradients, the same on every run."""
    _require_the_library()
    monkeypatch.setattr(deform_module, "_CHUNK_BYTES", 1)
    operands = _operands(5, 4, 32, 4, dict(padding=1, groups=2), 1, 3, seed=12)
    names = ["input", "offset", "mask", "weight"]
    geometry = deform_module._Geometry((3, 3), (1, 1), (1, 1), (1, 1), 2)
    o = deform_module._operands(*map(operands.get, names), geometry, (5, 4))
    assert [(chunk.n, chunk.blocks) for _, _, chunk in o.chunks()] == [(1, 4), (1, 4)]
    torch.testing.assert_close(deform_conv2d(**operands), _reference(operands), rtol=1e-10, atol=1e-10)
    results = []
    for switch in ("1", "1", "0"):
        monkeypatch.setenv(acceleration.SWITCH, switch)
        leaves = {name: operands[name].clone().requires_grad_() for name in [*names, "bias"]}
        y = deform_conv2d(**operands | leaves)
        projection = torch.randn(y.shape, generator=_generator(13), dtype=F64)
        results.append(torch.autograd.grad(y, list(leaves.values()), projection))
    cpp, again, eager = results
    assert all(torch.equal(a, b) for a, b in zip(cpp, again, strict=True))
    for got, expected in zip(cpp, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
