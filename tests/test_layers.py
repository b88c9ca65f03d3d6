"""The layers against independent references: concat-then-conv, per-pixel loops, and nn.Conv2d itself."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from posconv.layers import LAYER_OPTIONS, CoordBias2d, CoordConv2d, fused, make_conv
from posconv.layers.position_term import term_map
from posconv.model import FCN, ModelSpec, load_model, save_model
from posconv.registry import FACTORY_LAYERS, LAYERS

# PyTorch's note that an even kernel with padding="same" pads a copy of the input: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# (input H, W, conv kwargs): strides, paddings (ints, tuples, strings), dilations, groups, bias, every mode
GEOMETRIES: list[tuple[int, int, dict[str, Any]]] = [
    (9, 7, dict(kernel_size=3, padding=1)),
    (9, 7, dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect")),
    (
        8,
        11,
        dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="circular"),
    ),
    (7, 6, dict(kernel_size=4, padding="same", padding_mode="replicate", bias=False)),
    (6, 9, dict(kernel_size=2, padding="same", dilation=3, groups=2)),
    (9, 8, dict(kernel_size=3, stride=3, padding=2, dilation=2, groups=2, padding_mode="reflect")),
    (5, 3, dict(kernel_size=3, padding="valid")),  # a 1-pixel-wide output
    (4, 5, dict(kernel_size=1, stride=2)),
    (7, 7, dict(kernel_size=3, stride=3, padding=1)),  # zero padding in pixels, as in the model:
    (10, 9, dict(kernel_size=3, stride=2, padding=(2, 1), dilation=2, groups=2, bias=False)),
]
IDS = [f"{h}x{w}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for h, w, kw in GEOMETRIES]
PER_INPUT = "coordbias-per-input"  # the seed's original coordbias (coords_per_input=True), for `_layer`
AWARE = ["coordbias", PER_INPUT, "coordconv"]  # the layers with a cached position term


def _layer(
    name: str, kwargs: dict[str, Any], dtype: torch.dtype = torch.float64, **options: Any
) -> nn.Conv2d:
    """Layer `name` (or PER_INPUT), given those of `options` it takes."""
    torch.manual_seed(0)
    name, fixed = ("coordbias", {"coords_per_input": True}) if name == PER_INPUT else (name, {})
    own = {key: value for key, value in options.items() if key in LAYER_OPTIONS[name]}
    return make_conv(name, 4, 6, dtype=dtype, **own, **fixed, **kwargs)


def _randomise(layer: nn.Module) -> nn.Module:
    """Non-zero values everywhere (coord_bias starts at zero)."""
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-1, 1)
    return layer


def _plain(layer: nn.Conv2d, in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    """A plain nn.Conv2d with the layer's geometry, for functional_call with reference weights."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    ).to(layer.weight.dtype)


def _weights(weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"weight": weight} | ({} if bias is None else {"bias": bias})


def _pixel_coords(size: int, convention: str) -> torch.Tensor:
    i = torch.arange(size, dtype=torch.float64)
    return (2 * i + 1) / size - 1 if convention == "centered" else i / max(size - 1, 1)


def _coordinate_channels(h: int, w: int, convention: str, with_r: bool) -> torch.Tensor:
    x = _pixel_coords(w, convention).expand(h, w)
    y = _pixel_coords(h, convention)[:, None].expand(h, w)
    channels = [x, y, (x**2 + y**2).sqrt()] if with_r else [x, y]
    return torch.stack(channels)


def _concat_reference(layer: CoordConv2d, x: torch.Tensor) -> torch.Tensor:
    """Classic CoordConv: every group's input slice gets the coordinate channels; convolve group by group."""
    n, _, h, w = x.shape
    coords = _coordinate_channels(h, w, layer.coords, layer.with_r).expand(n, -1, h, w).to(x.dtype)
    c_in, c_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
    plain = _plain(layer, c_in + coords.shape[1], c_out)
    outputs = []
    for g in range(layer.groups):
        out = slice(g * c_out, (g + 1) * c_out)
        bias = None if layer.bias is None else layer.bias[out]
        params = _weights(torch.cat([layer.weight[out], layer.coord_weight[out]], 1), bias)
        outputs.append(
            functional_call(plain, params, torch.cat([x[:, g * c_in : (g + 1) * c_in], coords], 1))
        )
    return torch.cat(outputs, 1)


def _kernel_centre_coords(in_size: int, out_size: int, layer: nn.Conv2d, axis: int) -> torch.Tensor:
    """By the definition, with PyTorch's own padding split (`_reversed_padding_repeated_twice`)."""
    before = layer._reversed_padding_repeated_twice[2 * (1 - axis)]
    centre = torch.arange(out_size, dtype=torch.float64) * layer.stride[axis] - before
    centre = centre + layer.dilation[axis] * (layer.kernel_size[axis] - 1) / 2
    return (2 * centre + 1) / in_size - 1


def _loop_reference(layer: CoordBias2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) + sum_i (a_ci*X + b_ci*Y), the position term summed pixel by pixel and pair by pair: one
    (X, Y) pair per input channel i in the seed's original form, one in all in the reduced form."""
    plain = _plain(layer, layer.in_channels, layer.out_channels, layer.groups)
    conv = functional_call(plain, _weights(layer.weight, layer.bias), x)
    (h_in, w_in), (h, w) = x.shape[-2:], conv.shape[-2:]
    xs, ys = _kernel_centre_coords(w_in, w, layer, 1), _kernel_centre_coords(h_in, h, layer, 0)
    if layer.coords == "seed":
        xs, ys = _pixel_coords(w, "seed"), _pixel_coords(h, "seed")
    pairs = layer.coord_bias.view(layer.out_channels, -1, 2)  # (C_out, C_in/groups or 1, 2)
    term = [
        [[sum(a * xs[j] + b * ys[i] for a, b in pairs[c]) for j in range(w)] for i in range(h)]
        for c in range(layer.out_channels)
    ]
    return conv + torch.stack([torch.stack([torch.stack(row) for row in plane]) for plane in term])


def _forward_and_grads(module: Any, x: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The output, then the gradients of a random projection of it w.r.t. the input and `params`."""
    x = x.detach().requires_grad_()
    y = module(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = torch.empty_like(y).copy_(weights)  # y's dtype and memory layout, as a real upstream gradient
    return [y, *torch.autograd.grad((y * weights).sum(), [x, *params])]


def _parameters(layer: nn.Module) -> list[torch.Tensor]:
    return list(layer.parameters())


def _input(h: int, w: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(2), dtype=dtype)


# ---- the factory ----


def test_factory_builds_every_registered_layer_with_its_own_options() -> None:
    assert tuple(LAYER_OPTIONS) == FACTORY_LAYERS
    assert LAYERS == ("vanilla", "coordbias", "coordconv")  # the pipeline's train stages
    shape = dict(stride=2, bias=False)
    assert type(make_conv("vanilla", 3, 5, 3, **shape)) is nn.Conv2d
    bias = make_conv("coordbias", 3, 5, (3, 5), coords="seed", **shape)
    assert isinstance(bias, CoordBias2d) and bias.coord_bias.shape == (5, 2) and bias.coords == "seed"
    conv = make_conv("coordconv", 3, 5, (3, 5), coords="seed", with_r=True, **shape)
    assert isinstance(conv, CoordConv2d) and conv.coord_weight.shape == (5, 3, 3, 5) and conv.bias is None
    assert make_conv("coordconv", 3, 5, 3).coord_weight.shape == (5, 2, 3, 3)
    per_input = make_conv("coordbias", 4, 6, 3, groups=2, coords_per_input=True)
    assert isinstance(per_input, CoordBias2d) and per_input.coord_bias.shape == (6, 2, 2)
    assert "coords_per_input=True" in repr(per_input) and "coords_per_input" not in repr(bias)


@pytest.mark.parametrize("name", FACTORY_LAYERS)
def test_every_factory_layer_serves_as_the_encoders_convolution(name: str, tmp_path: Path) -> None:
    """In place of every encoder convolution (3 -> w channels first): the network runs forward and
    backward, its every parameter gets a gradient, and it survives a save and a load."""
    torch.manual_seed(0)
    model = FCN(ModelSpec(name, width=8))
    x = torch.randn(2, 3, 24, 24)
    logits = model(x)
    logits.square().mean().backward()
    assert logits.shape == (2, 4, 24, 24)
    assert all(p.grad is not None for p in model.parameters())
    save_model(model, tmp_path / "model.pt")
    assert torch.equal(load_model(tmp_path / "model.pt", layer=name).eval()(x), model.eval()(x))


@pytest.mark.parametrize(
    ("name", "options", "unused"),
    [
        ("vanilla", dict(coords="seed"), "coords"),
        ("vanilla", dict(with_r=True), "with_r"),
        ("coordbias", dict(with_r=True), "with_r"),
        ("coordconv", dict(coord=True), "coord"),
        ("involution", dict(coords="seed"), "coords"),
        ("deform", dict(reduction=2), "reduction"),
        ("coorddeform", dict(with_r=True), "with_r"),
        ("vanilla", dict(coords_per_input=True), "coords_per_input"),
        ("coordconv", dict(coords_per_input=True), "coords_per_input"),
        ("coorddeform", dict(coords_per_input=True), "coords_per_input"),
        ("dss", dict(coords="seed"), "coords"),
        ("dss_bilinear", dict(zero_scale=0.5), "zero_scale"),
        ("dss_deform", dict(reduction=2), "reduction"),
        ("local", dict(coords="seed"), "coords"),
    ],
)
def test_factory_refuses_options_the_layer_does_not_take(name: str, options: dict, unused: str) -> None:
    """Nothing is dropped: an option the layer would ignore is a programming error (TypeError)."""
    with pytest.raises(TypeError, match=f"layer '{name}' takes no option {unused}"):
        make_conv(name, 3, 5, 3, **options)


def test_factory_rejects_unknown_names_and_conventions() -> None:
    with pytest.raises(ValueError, match="vanilla, coordbias, coordconv"):
        make_conv("coordnet", 3, 5, 3)
    for name in ("coordbias", "coordconv"):
        with pytest.raises(ValueError, match="centered, seed"):
            make_conv(name, 3, 5, 3, coords="polar")


def test_initialisation() -> None:
    """coordbias: zero, with vanilla's random draws; coordconv: the concat form's U(±1/sqrt(fan_in))."""
    torch.manual_seed(3)
    vanilla = make_conv("vanilla", 16, 32, 3)
    torch.manual_seed(3)
    bias = make_conv("coordbias", 16, 32, 3)
    assert torch.equal(bias.weight, vanilla.weight) and torch.equal(bias.bias, vanilla.bias)
    assert not bias.coord_bias.any()
    conv = make_conv("coordconv", 16, 32, 3)
    bound = 1 / math.sqrt((16 + 2) * 9)  # below the plain conv's 1/sqrt(16*9)
    for parameter in (conv.weight, conv.coord_weight, conv.bias):
        assert 0.8 * bound < parameter.abs().max() <= bound


# ---- exactness ----


@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("coords", ["centered", "seed"])
def test_coordconv_equals_concat_then_conv(h: int, w: int, kwargs: dict[str, Any], coords: str) -> None:
    layer = _layer("coordconv", kwargs, coords=coords, with_r=coords == "centered")
    params = _parameters(layer)
    got = _forward_and_grads(layer, _input(h, w), params)
    expected = _forward_and_grads(lambda x: _concat_reference(layer, x), _input(h, w), params)
    assert len(got) == 2 + len(params) >= 4
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("coords", ["centered", "seed"])
@pytest.mark.parametrize("name", ["coordbias", PER_INPUT])
def test_coordbias_equals_conv_plus_per_pixel_sum(
    h: int, w: int, kwargs: dict[str, Any], coords: str, name: str
) -> None:
    layer = _randomise(_layer(name, kwargs, coords=coords))
    params = _parameters(layer)
    got = _forward_and_grads(layer, _input(h, w), params)
    expected = _forward_and_grads(lambda x: _loop_reference(layer, x), _input(h, w), params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES, ids=IDS)
def test_coordbias_sits_on_the_input_pixel_under_the_kernel_centre(h: int, w: int, kwargs: dict) -> None:
    """Ask PyTorch's own convolution which input pixels the central taps read: the mean of their
    coordinates is the output's coordinate wherever all central taps fall inside the image."""
    kwargs = kwargs | {"padding_mode": "zeros", "groups": 1}
    layer = make_conv("coordbias", 1, 2, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        layer.weight.zero_()
        layer.coord_bias.copy_(torch.eye(2))
        if layer.bias is not None:
            layer.bias.zero_()
        coords = layer(torch.zeros(1, 1, h, w, dtype=torch.float64))[0]
        probe = nn.Conv2d(1, 1, **kwargs | {"bias": False}).double()
        probe.weight.zero_()
        rows, cols = (slice((k - 1) // 2, k // 2 + 1) for k in probe.kernel_size)
        probe.weight[..., rows, cols] = 1 / probe.weight[..., rows, cols].numel()
        inside = probe(torch.ones(1, 1, h, w, dtype=torch.float64))[0, 0] > 1 - 1e-9
        for axis, channel in enumerate(_coordinate_channels(h, w, "centered", with_r=False)):
            seen = probe(channel[None, None])[0, 0]
            torch.testing.assert_close(coords[axis][inside], seen[inside], rtol=0, atol=1e-12)
    assert inside.any()


@pytest.mark.parametrize("name", AWARE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_zero_coordinate_parameters_equal_vanilla_exactly(
    name: str, dtype: torch.dtype, channels_last: bool
) -> None:
    for h, w, kwargs in GEOMETRIES:
        layer = _layer(name, kwargs, dtype)
        vanilla = _layer("vanilla", kwargs, dtype)
        vanilla.load_state_dict(layer.state_dict(), strict=False)
        with torch.no_grad():
            for key, parameter in layer.named_parameters():
                if key.startswith("coord_"):
                    parameter.zero_()
        x = _input(h, w, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(layer(x), vanilla(x)), kwargs


# ---- the seed's original coordbias: one (X, Y) pair per output and input channel ----


def _coordinate_count(layer: nn.Module) -> int:
    """The parameters beyond nn.Conv2d's weight and bias."""
    return sum(p.numel() for key, p in layer.named_parameters() if key not in ("weight", "bias"))


@pytest.mark.parametrize(("c_in", "c_out", "groups"), [(3, 16, 1), (16, 32, 1), (4, 6, 2), (8, 8, 8)])
def test_per_input_coordbias_has_a_pair_per_input_and_output_channel(
    c_in: int, c_out: int, groups: int
) -> None:
    per_input = make_conv("coordbias", c_in, c_out, 3, groups=groups, coords_per_input=True)
    assert _coordinate_count(per_input) == 2 * (c_in // groups) * c_out
    assert _coordinate_count(make_conv("coordbias", c_in, c_out, 3, groups=groups)) == 2 * c_out


@pytest.mark.parametrize(("width", "per_input", "reduced"), [(16, 15_968, 448), (64, 254_336, 1_792)])
def test_encoder_coordinate_parameters_of_the_two_forms(width: int, per_input: int, reduced: int) -> None:
    """Over the encoder's six convolutions (their shapes read off the FCN), 2*sum(C_in*C_out) numbers
    per input against 2*sum(C_out) reduced."""
    w = width
    shapes = [(3, w), (w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w)]
    encoder = FCN(ModelSpec("vanilla", width=w)).encoder
    assert [(m.in_channels, m.out_channels) for m in encoder.modules() if isinstance(m, nn.Conv2d)] == shapes
    assert 2 * sum(c_in * c_out for c_in, c_out in shapes) == per_input
    for form, total in ((True, per_input), (False, reduced)):
        layers = [make_conv("coordbias", *shape, 3, padding=1, coords_per_input=form) for shape in shapes]
        assert sum(map(_coordinate_count, layers)) == total


@pytest.mark.parametrize(("groups", "bias"), [(1, True), (4, False)])
def test_per_input_coordbias_is_drawn_as_the_source_after_the_kernel(groups: int, bias: bool) -> None:
    """U(±1/sqrt(fan_in)), fan_in = (C_in/groups)*kH*kW as for the kernel, drawn after the kernel: its
    weight and bias are nn.Conv2d's of the same seed. reset_parameters draws it anew."""
    bound = 1 / math.sqrt(16 // groups * 9)
    torch.manual_seed(3)
    vanilla = nn.Conv2d(16, 32, 3, groups=groups, bias=bias)
    expected = torch.empty(32, 16 // groups, 2).uniform_(-bound, bound)
    torch.manual_seed(3)
    layer = make_conv("coordbias", 16, 32, 3, groups=groups, bias=bias, coords_per_input=True)
    assert all(torch.equal(layer.state_dict()[key], v) for key, v in vanilla.state_dict().items())
    assert torch.equal(layer.coord_bias, expected)
    first = layer.coord_bias.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(layer.coord_bias, first)
    for coord_bias in (first, layer.coord_bias):
        assert 0.8 * bound < coord_bias.abs().max() <= bound


@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES, ids=IDS)
def test_per_input_coordbias_is_the_reduced_form_with_its_inputs_summed(
    h: int, w: int, kwargs: dict[str, Any]
) -> None:
    """The same function: the reduced layer given coord_bias.sum(1) has the same output and input
    gradient, and every input channel's pair gets the reduced pair's gradient (the over-parametrisation)."""
    per_input = _randomise(_layer(PER_INPUT, kwargs))
    reduced = _layer("coordbias", kwargs)
    reduced.load_state_dict(per_input.state_dict() | {"coord_bias": per_input.coord_bias.detach().sum(1)})
    got = _forward_and_grads(per_input, _input(h, w), [per_input.coord_bias])
    expected = _forward_and_grads(reduced, _input(h, w), [reduced.coord_bias])
    expected[-1] = expected[-1][:, None].expand_as(got[-1])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# ---- the seed's first open question ----


def test_behind_batchnorm_a_plain_bias_gets_no_gradient_but_the_coordinate_bias_does() -> None:
    """BatchNorm removes each channel's mean: a constant bias cancels, one that varies in space does not."""
    torch.manual_seed(4)
    layer = _randomise(make_conv("coordbias", 3, 8, 3, padding=1, dtype=torch.float64))
    model = nn.Sequential(layer, nn.BatchNorm2d(8, dtype=torch.float64)).train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    (model(x) * torch.randn(4, 8, 16, 16, dtype=torch.float64)).sum().backward()
    assert layer.bias.grad.abs().max() < 1e-10
    assert layer.coord_bias.grad.abs().min() > 1e-3


# ---- dtypes, layouts, modes, compile, state dicts ----


@pytest.mark.parametrize("name", AWARE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_float32(name: str, dtype: torch.dtype) -> None:
    layer = _randomise(_layer(name, dict(kernel_size=3, stride=2, padding=1), torch.float32))
    x = _input(9, 7, torch.float32)
    expected = _forward_and_grads(layer, x, _parameters(layer))
    half = layer.to(dtype)
    got = _forward_and_grads(half, x.to(dtype), _parameters(half))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e, rtol=0.05, atol=0.05 * e.abs().max().item())


BF16_TOLERANCE = 2e-2  # relative to the largest value: 8 mantissa bits (2^-8 = 0.004) and a few roundings


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"]
)
@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("name", [*LAYERS, PER_INPUT])
def test_bfloat16_autocast_follows_float64(
    h: int, w: int, kwargs: dict[str, Any], name: str, memory_format: torch.memory_format
) -> None:
    """Under bfloat16 autocast every layer gives float64's output and gradients within BF16_TOLERANCE of
    their largest magnitude; the parameters' gradients stay float32 and the memory format is kept."""
    layer = _randomise(_layer(name, kwargs, with_r=True))
    expected = _forward_and_grads(layer, _input(h, w), _parameters(layer))
    layer = layer.to(torch.float32, memory_format=memory_format)
    x = _input(h, w).to(torch.float32, memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _forward_and_grads(layer, x, _parameters(layer))
    assert got[0].is_contiguous(memory_format=memory_format)
    assert all(g.dtype == torch.float32 for g in got[2:])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(
            g.double(), e, rtol=BF16_TOLERANCE, atol=BF16_TOLERANCE * e.abs().max().item()
        )


@pytest.mark.parametrize("name", AWARE)
def test_under_autocast_the_position_term_is_computed_in_float32(name: str) -> None:
    """With the convolution's weights and bias zero, the output is the position term alone: under
    bfloat16 autocast it is float64's term rounded once to bfloat16 (within half a bfloat16 ulp), which
    a term whose maps or product were computed in bfloat16 misses."""
    layer = _randomise(_layer(name, dict(kernel_size=3, padding=1), torch.float32))
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    x = _input(16, 16, torch.float32)
    expected = layer.double()(x.double())
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16 and expected.abs().max() > 0.1
    half_ulp = torch.ldexp(torch.ones_like(expected), torch.frexp(expected).exponent - 9)  # of bfloat16
    assert ((got.double() - expected).abs() <= half_ulp * (1 + 1e-6)).all()
    coarse = term_map(
        layer.coefficients().bfloat16(),
        layer.positioned_basis((16, 16), (16, 16), x, torch.bfloat16),
        16,
        False,
    )
    assert not ((coarse.double() - expected).abs() <= half_ulp * (1 + 1e-6)).all()


@pytest.mark.parametrize("name", AWARE)
def test_channels_last_is_kept_and_gives_the_same_numbers(name: str) -> None:
    layer = _randomise(_layer(name, dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect")))
    x = _input(10, 9)
    expected = _forward_and_grads(layer, x, _parameters(layer))
    layer = layer.to(memory_format=torch.channels_last)
    got = _forward_and_grads(layer, x.contiguous(memory_format=torch.channels_last), _parameters(layer))
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("name", AWARE)
@pytest.mark.skipif(not fused.available(), reason="this torch build lacks the fused oneDNN op")
def test_the_fused_backend_where_it_applies_and_follows_float64(
    h: int, w: int, kwargs: dict[str, Any], name: str
) -> None:
    """Switched on, zero padding given in pixels takes the fused convolution (bias and term in its
    epilogue, their gradients from one batch sum); the other paddings take the plain path. Both give
    float64's numbers."""
    layer = _randomise(_layer(name, kwargs))
    expected = _forward_and_grads(layer, _input(h, w), _parameters(layer))
    layer = layer.to(torch.float32, memory_format=torch.channels_last)
    x = _input(h, w).to(torch.float32, memory_format=torch.channels_last)
    with fused.switched(True):
        got = _forward_and_grads(layer, x, _parameters(layer))
    fusable = kwargs.get("padding_mode", "zeros") == "zeros" and not isinstance(kwargs.get("padding", 0), str)
    assert (got[0].grad_fn.name() == "_ConvPlusTermBackward") == fusable
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert len(got) == 2 + len(_parameters(layer))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


@pytest.mark.skipif(not fused.available(), reason="this torch build lacks the fused oneDNN op")
@pytest.mark.parametrize("name", AWARE)
def test_fused_backend_gives_the_plain_paths_outputs_and_gradients_twice_over(name: str) -> None:
    """Same layer, same channels_last input, backend off then on: the same output, and the same
    gradients through a gradient penalty, which differentiates the layer twice."""
    layer = _randomise(_layer(name, dict(kernel_size=3, stride=2, padding=1), torch.float32))
    layer = layer.to(memory_format=torch.channels_last)
    results = []
    for on in (False, True):
        x = _input(9, 7, torch.float32).contiguous(memory_format=torch.channels_last).requires_grad_()
        with fused.switched(on):
            y = layer(x)
            assert (y.grad_fn.name() == "_ConvPlusTermBackward") == on
            (input_grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            penalty_grads = torch.autograd.grad(input_grad.square().sum(), _parameters(layer))
        results.append([y, input_grad, *penalty_grads])
    for on, off in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5 * off.abs().max().item())


@pytest.mark.parametrize("name", AWARE)
def test_at_batch_size_one_the_output_may_be_modified_in_place(name: str) -> None:
    """At batch 1 the term broadcast over the batch is already dense; the output must still be a tensor
    of its own, not a view, or autograd refuses an in-place op after the layer (ReLU(inplace=True))."""
    layer = _randomise(_layer(name, dict(kernel_size=3, padding=1), torch.float32))
    layer = layer.to(memory_format=torch.channels_last)
    x = _input(8, 8, torch.float32)[:1].contiguous(memory_format=torch.channels_last)
    expected = layer(x).relu()
    with fused.switched(True):  # where the output is a broadcast term filled in
        got = torch.relu_(layer(x))
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("name", AWARE)
def test_inference_mode_first_does_not_break_autograd_later(name: str) -> None:
    layer = _layer(name, dict(kernel_size=3, padding=1))
    x = _input(17, 13)  # a shape no other test uses, so the maps are first built in inference mode
    with torch.inference_mode():
        expected = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_frozen_coordinate_parameters_get_no_gradient() -> None:
    layer = _layer("coordbias", dict(kernel_size=3, padding=1))
    layer.coord_bias.requires_grad_(False)
    layer(_input(8, 8)).sum().backward()
    assert layer.coord_bias.grad is None and layer.weight.grad is not None


def test_compiled_layers_match_eager() -> None:
    model = nn.Sequential(
        make_conv("coordbias", 4, 6, 3, padding=1),
        make_conv("coordconv", 6, 5, 3, stride=2, padding=1, padding_mode="reflect", with_r=True),
        make_conv("coordbias", 5, 3, 3, padding=1, coords_per_input=True),
    )
    _randomise(model)
    x = _input(10, 9, torch.float32)
    expected = _forward_and_grads(model, x, _parameters(model))
    got = _forward_and_grads(torch.compile(model, fullgraph=True), x, _parameters(model))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [*LAYERS, PER_INPUT])
def test_state_dict_round_trip(name: str) -> None:
    layer = _randomise(_layer(name, dict(kernel_size=3, padding=1), coords="seed", with_r=True))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(5)
    fresh = _layer(name, dict(kernel_size=3, padding=1), coords="seed", with_r=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = _input(6, 7)
    assert torch.equal(fresh(x), layer(x))


def test_the_two_coordbias_forms_refuse_each_others_state_dicts() -> None:
    """The shape of coord_bias tells the forms apart: a checkpoint never loads into the other form."""
    per_input, reduced = (_layer(name, dict(kernel_size=3)) for name in (PER_INPUT, "coordbias"))
    for source, target in ((per_input, reduced), (reduced, per_input)):
        with pytest.raises(RuntimeError, match="size mismatch for coord_bias"):
            target.load_state_dict(source.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name", AWARE)
def test_cuda_bfloat16_channels_last_follows_cpu(name: str) -> None:
    layer = _randomise(_layer(name, dict(kernel_size=3, padding=1, padding_mode="replicate"), torch.float32))
    x = _input(12, 10, torch.float32)
    expected = _forward_and_grads(layer, x, _parameters(layer))
    layer = layer.to("cuda", torch.bfloat16, memory_format=torch.channels_last)
    x = x.to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last)
    got = _forward_and_grads(layer, x, _parameters(layer))
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.float().cpu(), e, rtol=0.05, atol=0.05 * e.abs().max().item())


# ---- the study's controls: the same parameters without position information ----


def _position_term(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """What the layer adds to the plain convolution with its own weights."""
    plain = _plain(layer, 4, 6)
    return layer(x) - functional_call(plain, _weights(layer.weight, layer.bias), (x,))


def test_constant_coordinates_make_coordbias_a_plain_bias() -> None:
    layer = _randomise(_layer("coordbias", {"kernel_size": 3, "padding": 1}, coords="constant"))
    term = _position_term(layer, _input(7, 9))
    expected = layer.coord_bias.sum(1).detach()  # a*1 + b*1 per channel, the same at every pixel
    torch.testing.assert_close(term, expected[None, :, None, None].expand_as(term))


@pytest.mark.parametrize("name", AWARE)
def test_shuffled_coordinates_permute_the_position_term_anew_at_every_call(name: str) -> None:
    x = _input(6, 8)
    centred = _randomise(_layer(name, {"kernel_size": 3, "padding": 1}))
    shuffled = _layer(name, {"kernel_size": 3, "padding": 1}, coords="shuffled")
    shuffled.load_state_dict(centred.state_dict())
    reference = _position_term(centred, x).flatten(2)
    first, second = (_position_term(shuffled, x).flatten(2) for _ in range(2))
    for term in (first, second):  # same values per channel, at other pixels, the same for every image
        torch.testing.assert_close(term.sort(-1).values, reference.sort(-1).values)
        torch.testing.assert_close(term[0], term[1])
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)


@pytest.mark.parametrize("name", AWARE)
def test_the_default_path_calls_no_private_op(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the private oneDNN op replaced by one that raises, the default layers still run, forward and
    backward, in the setting the fused backend would take."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the default path called the private op")

    monkeypatch.setattr(fused, "_CONV_ADD", type("Refusing", (), {"binary": staticmethod(refuse)})())
    assert not fused.enabled()
    layer = _layer(name, dict(kernel_size=3, padding=1), torch.float32).to(memory_format=torch.channels_last)
    layer(_input(8, 8, torch.float32).contiguous(memory_format=torch.channels_last)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    with fused.switched(True), pytest.raises(AssertionError, match="private op"):  # the probe works
        layer(_input(8, 8, torch.float32).contiguous(memory_format=torch.channels_last))


def test_switching_the_fused_backend_on_without_its_op_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_CONV_ADD", None)
    with pytest.warns(RuntimeWarning, match="keep the plain PyTorch path") as warned:
        assert fused.enable(True) is False
    assert len(warned) == 1 and not fused.enabled()


@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES[1:4:2], ids=IDS[1:4:2])
@pytest.mark.parametrize("name", ["coordbias", "coordconv"])  # not PER_INPUT: its extra sum(1) is autograd's
def test_gradcheck(h: int, w: int, kwargs: dict[str, Any], name: str) -> None:
    """Finite differences in float64 agree with the layer's own backward, input and every parameter
    (on a striding, reflecting geometry and a "same"-padded, replicating one without bias)."""
    layer = _randomise(_layer(name, kwargs, with_r=True))
    names = [key for key, _ in layer.named_parameters()]

    def forward(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    inputs = (_input(h, w)[:1].requires_grad_(), *(p.detach().requires_grad_() for p in layer.parameters()))
    assert torch.autograd.gradcheck(forward, inputs)
