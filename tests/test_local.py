"""The locally connected layer against independent references: loops over output pixels in float64,
nn.Conv2d when every location holds the same kernel, finite differences, and the resampled field by
its definition."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_layers import GEOMETRIES, IDS, _forward_and_grads
from torch import nn

from posconv.layers import make_conv
from posconv.layers.local import LocalConv2d, parameter_count
from posconv.model import FCN, ModelSpec, count_parameters, load_model, materialize, save_model

# PyTorch's note that an even kernel with padding="same" pads a copy of the input: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

F64 = torch.float64
NUMPY_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
BF16_TOLERANCE = 2e-2  # relative to the largest value, as the other layers' tests


def _input(h: int, w: int, dtype: torch.dtype = F64, channels: int = 4, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(2), dtype=dtype)


def _layer(
    kwargs: dict[str, Any], h: int, w: int, dtype: torch.dtype = F64, channels: int = 4
) -> LocalConv2d:
    """4 -> 6 channels (as test_layers' geometries), laid out at h x w, every parameter from U(-1, 1)."""
    torch.manual_seed(0)
    layer = LocalConv2d(channels, 6, dtype=dtype, **kwargs)
    layer(_input(h, w, dtype, channels))
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-1, 1)
    return layer


def _pads(layer: LocalConv2d) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), as nn.Conv2d itself pads this geometry."""
    probe = nn.Conv2d(1, 1, layer.kernel_size, padding=layer.padding, dilation=layer.dilation)
    left, right, top, bottom = probe._reversed_padding_repeated_twice
    return top, bottom, left, right


def _loop_reference(
    layer: LocalConv2d, x: torch.Tensor, weight: np.ndarray | None = None, bias: np.ndarray | None = None
) -> np.ndarray:
    """y[b, o, i, j] = bias[o, i, j] + sum over c, u, v of weight[o, c, u, v, i, j] ·
    x~[b, g(o)·C/G + c, i·sh + u·dh, j·sw + v·dw], one output pixel at a time; x~ padded by numpy.pad.
    The layer's own parameters unless `weight` and `bias` are given."""
    weight = layer.weight.detach().numpy() if weight is None else weight
    if bias is None and layer.bias is not None:
        bias = layer.bias.detach().numpy()
    top, bottom, left, right = _pads(layer)
    xp = np.pad(
        x.detach().numpy(), ((0, 0), (0, 0), (top, bottom), (left, right)), NUMPY_MODES[layer.padding_mode]
    )
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    c_out, per_group, _, _, h_out, w_out = weight.shape
    out = np.zeros((x.shape[0], c_out, h_out, w_out))
    for b in range(x.shape[0]):
        for o in range(c_out):
            g = o // (c_out // layer.groups)
            for i in range(h_out):
                for j in range(w_out):
                    patch = xp[
                        b, g * per_group : (g + 1) * per_group, i * sh : i * sh + dh * (kh - 1) + 1 : dh
                    ]
                    patch = patch[:, :, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                    out[b, o, i, j] = np.sum(weight[o, :, :, :, i, j] * patch)
                    out[b, o, i, j] += 0 if bias is None else bias[o, i, j]
    return out


# ---- exactness ----


@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES, ids=IDS)
def test_the_layer_equals_the_loops(h: int, w: int, kwargs: dict[str, Any]) -> None:
    layer = _layer(kwargs, h, w)
    x = _input(h, w)
    got = layer(x)
    expected = _loop_reference(layer, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES, ids=IDS)
def test_one_kernel_at_every_location_is_nn_conv2d_outputs_and_gradients(
    h: int, w: int, kwargs: dict
) -> None:
    """Every location given nn.Conv2d's kernel and bias: the same output and input gradient, and the
    weight's gradient summed over the locations is nn.Conv2d's (the layer's gradient, location by
    location, is the plain convolution's before its sum over space)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, dtype=F64, **kwargs)
    layer = _layer(kwargs, h, w)
    with torch.no_grad():
        layer.weight.copy_(conv.weight[..., None, None].expand_as(layer.weight))
        if conv.bias is not None:
            layer.bias.copy_(conv.bias[:, None, None].expand_as(layer.bias))
    got = _forward_and_grads(layer, _input(h, w), list(layer.parameters()))
    expected = _forward_and_grads(conv, _input(h, w), list(conv.parameters()))
    got[2] = got[2].sum((-2, -1))
    if conv.bias is not None:
        got[3] = got[3].sum((-2, -1))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("h", "w", "kwargs"), [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[9]], ids=[IDS[1], IDS[3], IDS[9]]
)
def test_gradcheck(h: int, w: int, kwargs: dict[str, Any]) -> None:
    """Finite differences in float64 against the custom backward: input, weight field, bias field (a
    random projection of the Jacobian, fast_mode: the fields hold hundreds of numbers)."""
    layer = _layer(kwargs, h, w)
    names = [key for key, _ in layer.named_parameters()]

    def forward(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    inputs = (
        _input(h, w, batch=1).requires_grad_(),
        *(p.detach().requires_grad_() for p in layer.parameters()),
    )
    assert torch.autograd.gradcheck(forward, inputs, fast_mode=True)


def test_gradcheck_every_jacobian_entry() -> None:
    layer = _layer(dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect", groups=2), 5, 4)
    names = [key for key, _ in layer.named_parameters()]

    def forward(x: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    inputs = (
        _input(5, 4, batch=1).requires_grad_(),
        *(p.detach().requires_grad_() for p in layer.parameters()),
    )
    assert torch.autograd.gradcheck(forward, inputs)


# ---- other sizes: the field resampled ----


def _field_coordinates(layer: LocalConv2d, in_size: int, out_size: int, axis: int) -> list[float]:
    """By the definition (DESIGN.md §3): an output sits at its kernel centre, normalised to the input."""
    before = _pads(layer)[2 * axis]
    k, s, d = layer.kernel_size[axis], layer.stride[axis], layer.dilation[axis]
    return [(2 * (i * s - before + d * (k - 1) / 2) + 1) / in_size - 1 for i in range(out_size)]


def _interpolated(field: np.ndarray, old: list[float], new: list[float], axis: int) -> np.ndarray:
    """`field` along `axis` read at each new coordinate: between the two old locations around it, by
    linear interpolation, or the outermost one beyond them."""
    rows = []
    for place in new:
        if place <= old[0] or len(old) == 1:
            rows.append(np.take(field, 0, axis))
        elif place >= old[-1]:
            rows.append(np.take(field, len(old) - 1, axis))
        else:
            below = max(i for i, c in enumerate(old) if c <= place)
            fraction = (place - old[below]) / (old[below + 1] - old[below])
            rows.append(
                (1 - fraction) * np.take(field, below, axis) + fraction * np.take(field, below + 1, axis)
            )
    return np.stack(rows, axis % field.ndim)


@pytest.mark.parametrize(
    ("kwargs", "laid_out", "other"),
    [
        (dict(kernel_size=3, padding=1), (8, 6), (16, 12)),
        (dict(kernel_size=3, padding=1), (8, 6), (5, 9)),
        (dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect"), (9, 8), (14, 5)),
        (dict(kernel_size=(3, 5), padding="valid", dilation=(2, 1), groups=2), (9, 8), (12, 11)),
        (dict(kernel_size=1, bias=False), (1, 4), (3, 6)),  # a 1-location axis: its kernel everywhere
    ],
)
def test_at_another_size_the_field_is_read_at_the_new_locations(
    kwargs: dict, laid_out: tuple, other: tuple
) -> None:
    """The layer at another input size equals the loops with the field interpolated, axis by axis, at the
    new output locations' coordinates (kernel centres, normalised to the input)."""
    layer = _layer(kwargs, *laid_out)
    x = _input(*other)
    y = layer(x)
    fields = [layer.weight.detach().numpy()]
    if layer.bias is not None:
        fields.append(layer.bias.detach().numpy())
    old_out = layer.weight.shape[-2:]
    for axis in (0, 1):
        old = _field_coordinates(layer, laid_out[axis], old_out[axis], axis)
        new = _field_coordinates(layer, other[axis], y.shape[2 + axis], axis)
        fields = [_interpolated(field, old, new, axis - 2) for field in fields]
    expected = _loop_reference(layer, x, *fields)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=0, atol=1e-10)


def test_at_the_size_it_was_laid_out_for_the_field_is_the_parameters_themselves() -> None:
    layer = _layer(dict(kernel_size=3, padding=1), 8, 6)
    weight, bias = layer.field((8, 6), (8, 6))
    assert weight is layer.weight and bias is layer.bias
    twice = layer.field((16, 12), (16, 12))[0]
    assert twice.shape[-2:] == (16, 12)
    # doubling the grid: the outermost locations keep their kernels, the others mix two neighbours 3:1
    torch.testing.assert_close(twice[..., 0, 0], layer.weight[..., 0, 0])
    torch.testing.assert_close(
        twice[..., 1, 0], 0.75 * layer.weight[..., 0, 0] + 0.25 * layer.weight[..., 1, 0]
    )


def test_a_rule_in_the_right_half_stays_in_the_right_half_at_every_size() -> None:
    """A field that is 1 in the right half and 0 in the left at 128 px passes the input through in the
    right half (1x1 kernel) at 96 and 192 px too, away from the one column where it is interpolated."""
    layer = LocalConv2d(1, 1, 1, bias=False, dtype=F64)
    layer(torch.zeros(1, 1, 128, 128, dtype=F64))
    with torch.no_grad():
        layer.weight.zero_()[..., 64:] = 1
    for size in (96, 128, 192):
        y = layer(torch.ones(1, 1, size, size, dtype=F64))[0, 0]
        half = size // 2
        assert (y[:, half + 1 :] == 1).all() and (y[:, : half - 1] == 0).all()


# ---- laziness, state ----


def test_the_field_is_laid_out_at_the_first_forward_and_drawn_as_nn_conv2d_draws() -> None:
    layer = make_conv("local", 3, 16, 3, padding=1)
    assert isinstance(layer, LocalConv2d) and layer.has_uninitialized_params()
    with pytest.raises(RuntimeError, match="no field yet"):
        layer.field((8, 8), (8, 8))
    layer(torch.zeros(2, 3, 20, 12))
    assert layer.weight.shape == (16, 3, 3, 3, 20, 12) and layer.bias.shape == (16, 20, 12)
    assert layer.field_input_size == (20, 12)
    bound = 1 / math.sqrt(27)
    for parameter in (layer.weight, layer.bias):
        assert 0.99 * bound < parameter.abs().max() <= bound
    assert parameter_count(3, 16, 3, (20, 12)) == sum(p.numel() for p in layer.parameters()) == 240 * 448


def test_state_dict_round_trip_into_a_fresh_lazy_layer() -> None:
    """The state dict's shapes and its extra state (the input size the field was laid out for) rebuild
    the layer, at that size and at another."""
    kwargs = dict(kernel_size=3, stride=2, padding=1, groups=2)
    layer = _layer(kwargs, 9, 7)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(5)
    fresh = LocalConv2d(4, 6, dtype=F64, **kwargs)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"weight", "bias", "_extra_state"} and state["_extra_state"] == {
        "field_input_size": (9, 7)
    }
    fresh.load_state_dict(state)
    for size in ((9, 7), (13, 10)):
        x = _input(*size)
        assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize(("h", "w", "kwargs"), [GEOMETRIES[1], GEOMETRIES[2]], ids=[IDS[1], IDS[2]])
def test_channels_last_gives_the_same_numbers_and_keeps_the_format(h: int, w: int, kwargs: dict) -> None:
    layer = _layer(kwargs, h, w)
    expected = _forward_and_grads(layer, _input(h, w), list(layer.parameters()))
    layer = layer.to(memory_format=torch.channels_last)
    got = _forward_and_grads(
        layer, _input(h, w).contiguous(memory_format=torch.channels_last), list(layer.parameters())
    )
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"]
)
@pytest.mark.parametrize(("h", "w", "kwargs"), GEOMETRIES[:5], ids=IDS[:5])
def test_bfloat16_autocast_follows_float64(
    h: int, w: int, kwargs: dict, memory_format: torch.memory_format
) -> None:
    """Under bfloat16 autocast the output is bfloat16 (as nn.Conv2d's), in the input's format, and it and
    every gradient are float64's within BF16_TOLERANCE of their largest magnitude (the layer computes in
    float32 and rounds the output once); the parameters' gradients stay float32."""
    layer = _layer(kwargs, h, w)
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


def test_the_layer_traces_whole_forward_and_backward_at_any_size() -> None:
    """torch.compile(fullgraph=True) takes the laid-out layer, backward included, at its size and at another
    (the resampling), without a graph break (AOTAutograd): the same output and gradients as eager."""
    torch._dynamo.reset()
    layer = _layer(dict(kernel_size=3, stride=2, padding=1), 9, 7, torch.float32, channels=2)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)  # symbolic: ~40 s
    for size in ((9, 7), (12, 10)):
        x = _input(*size, torch.float32, channels=2)
        expected = _forward_and_grads(layer, x, list(layer.parameters()))
        got = _forward_and_grads(compiled, x, list(layer.parameters()))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ---- options ----


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            dict(groups=4),
            ValueError,
            r"groups = 4: expected a divisor of in_channels = 6 and out_channels = 8",
        ),
        (dict(padding="same", stride=2), ValueError, r"padding = 'same' needs stride 1"),
        (dict(padding="full"), ValueError, r"padding = 'full': expected 'same', 'valid'"),
        (dict(padding_mode="mirror"), ValueError, r"padding_mode = 'mirror': expected one of zeros"),
        (dict(bias=1), TypeError, r"bias = 1: expected a bool"),
        (dict(kernel_size=0), ValueError, r"kernel_size = 0: expected integers >= 1"),
        (dict(dilation=(1, 2, 3)), TypeError, r"dilation = \(1, 2, 3\): expected an int or a pair of ints"),
    ],
)
def test_bad_options_are_refused_naming_the_option(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        LocalConv2d(6, 8, **(dict(kernel_size=3) | kwargs))


def test_the_factory_builds_it_by_name_and_refuses_every_option_beyond_nn_conv2d() -> None:
    assert isinstance(make_conv("local", 3, 16, 3, padding=1, padding_mode="reflect"), LocalConv2d)
    for option in ("coords", "size", "offset_groups"):
        with pytest.raises(
            TypeError, match=f"layer 'local' takes no option {option} \\(its own options: none\\)"
        ):
            make_conv("local", 3, 16, 3, **{option: 1})


# ---- in the network ----


def test_parameter_counts_in_the_network() -> None:
    """The first encoder layer at width 16 and 128 px holds 128² x 448; every encoder layer local, the
    formula over the encoder's shapes (checked against the modules at 32 px) gives 158,990,336."""
    model = materialize(FCN(ModelSpec("local", width=16, placement="first")), 128)
    first = model.encoder[0][0]
    assert sum(p.numel() for p in first.parameters()) == parameter_count(3, 16, 3, (128, 128)) == 7_340_032
    assert count_parameters(model) - count_parameters(FCN(ModelSpec("vanilla", width=16))) == 7_340_032 - 448
    every = materialize(FCN(ModelSpec("local", width=16, placement="encoder")), 32)
    layers = [m for m in every.encoder.modules() if isinstance(m, LocalConv2d)]
    sizes = [32, 32, 16, 16, 8, 8]
    shapes = [(m.in_channels, m.out_channels) for m in layers]
    assert shapes == [(3, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]
    for m, size in zip(layers, sizes, strict=True):
        assert sum(p.numel() for p in m.parameters()) == parameter_count(
            m.in_channels, m.out_channels, 3, (size, size)
        )
    at_128 = sum(
        parameter_count(c_in, c_out, 3, (s, s))
        for (c_in, c_out), s in zip(shapes, [128, 128, 64, 64, 32, 32], strict=True)
    )
    assert at_128 == 158_990_336


def test_materialize_lays_out_lazy_layers_without_touching_anything_else() -> None:
    """One forward in eval mode without gradients: the BatchNorm statistics and the training mode stay;
    a model without lazy layers is returned as it is, without a forward or a random draw."""
    model = FCN(ModelSpec("local", width=8, placement="first", encoder_batchnorm=True))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [n.running_mean.clone() for n in norms]
    assert materialize(model, 48) is model and model.training
    assert model.encoder[0][0].weight.shape[-2:] == (48, 48)
    assert all(torch.equal(n.running_mean, b) for n, b in zip(norms, before, strict=True))
    assert all(n.num_batches_tracked == 0 for n in norms)
    vanilla = FCN(ModelSpec("vanilla", width=8))
    state = torch.get_rng_state()
    assert materialize(vanilla, 48) is vanilla and torch.equal(torch.get_rng_state(), state)
    torch.optim.Adam(model.parameters())  # every parameter materialised
    model.to(memory_format=torch.channels_last)  # what the pipeline's `place` does


def test_the_first_encoder_convolution_at_every_size_the_pipeline_uses(tmp_path: Path) -> None:
    """FCN(width 16, placement first) laid out at 128 px, then at 128 px and the sizes of transfer and the
    study (96, 192, 64, 48): forward and backward, every parameter a gradient; the saved model reloads
    into a fresh lazy layer and gives the same logits at another size."""
    torch.manual_seed(0)
    model = materialize(FCN(ModelSpec("local", width=16, placement="first")), 128)
    assert type(model.encoder[0][0]) is LocalConv2d
    for size in (128, 96, 192, 64, 48):
        model.zero_grad()
        logits = model(torch.rand(1, 3, size, size))
        logits.square().mean().backward()
        assert logits.shape == (1, 4, size, size)
        assert all(p.grad is not None for p in model.parameters())
    save_model(model, tmp_path / "model.pt")
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(load_model(tmp_path / "model.pt", layer="local").eval()(x), model.eval()(x))
