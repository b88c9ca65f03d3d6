"""Equivariance errors against float64 loop references, a closed form, and networks equivariant by design."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from posconv.equivariance import rescale, scale_error, shift, translation_error

# Φ(f) = tanh(A f + B) + X: pointwise, plus the centred x-coordinate X_j = 2(j + 0.5)/W - 1 in every channel
A = np.array([[0.5, -0.3, 0.8], [-0.7, 0.2, 0.4]])
B = np.array([0.1, -0.2])


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _x_map(w: int) -> np.ndarray:
    return 2 * (np.arange(w) + 0.5) / w - 1


def _phi(f: torch.Tensor, coords: bool = True) -> torch.Tensor:
    mixed = torch.einsum("ck,nkhw->nchw", torch.as_tensor(A, dtype=f.dtype), f)
    out = torch.tanh(mixed + torch.as_tensor(B, dtype=f.dtype)[:, None, None])
    return out + torch.as_tensor(_x_map(f.shape[-1]), dtype=f.dtype) if coords else out


def _phi_loop(f: np.ndarray) -> np.ndarray:
    """_phi of one (3, H, W) image, pixel by pixel in float64."""
    _, h, w = f.shape
    out = np.empty((len(A), h, w))
    for c, i, j in itertools.product(range(len(A)), range(h), range(w)):
        out[c, i, j] = math.tanh(sum(A[c, k] * f[k, i, j] for k in range(3)) + B[c]) + _x_map(w)[j]
    return out


def _inside(h: int, w: int, i: int, j: int) -> bool:
    return 0 <= i < h and 0 <= j < w


def _shift_loop(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    h, w = x.shape[-2:]
    out = np.zeros_like(x)
    for i, j in itertools.product(range(h), range(w)):
        if _inside(h, w, i - dy, j - dx):
            out[..., i, j] = x[..., i - dy, j - dx]
    return out


def _translation_error_loop(images: np.ndarray, step: int) -> float:
    diff = norm = 0.0
    for f in images:
        _, h, w = f.shape
        phi = _phi_loop(f)
        for dy, dx in ((step, 0), (-step, 0), (0, step), (0, -step)):
            phi_moved = _phi_loop(_shift_loop(f, dy, dx))
            for i, j in itertools.product(range(h), range(w)):
                if _inside(h, w, i - dy, j - dx):  # the content of (i, j) exists in both frames
                    expected = phi[:, i - dy, j - dx]
                    diff += np.sum((phi_moved[:, i, j] - expected) ** 2)
                    norm += np.sum(expected**2)
    return math.sqrt(diff / norm)


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights, align_corners=False, the triangle widened by the shrink factor."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for o, j in itertools.product(range(n_out), range(n_in)):
        weights[o, j] = max(0.0, 1 - abs(j + 0.5 - (o + 0.5) * scale) / support)
    return weights / weights.sum(axis=1, keepdims=True)


def _conv3x3(seed: int = 1) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, 4, 3, padding=1).eval()


@pytest.mark.parametrize(
    ("dy", "dx"), [(0, 0), (2, 0), (-1, 0), (0, 3), (0, -2), (1, -3), (-2, 4), (5, 1), (0, -7), (-9, 9)]
)
def test_shift_matches_loop(dy: int, dx: int) -> None:
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float64).reshape(2, 3, 5, 7) + 1
    assert torch.equal(shift(x, dy, dx), torch.from_numpy(_shift_loop(x.numpy(), dy, dx)))


@pytest.mark.parametrize(
    ("factor", "size"), [(0.5, (4, 3)), (2.0, (16, 12)), (0.3, (2, 2)), (1.25, (10, 8)), (1 / 6, (1, 1))]
)
def test_rescale_sizes(factor: float, size: tuple[int, int]) -> None:
    assert rescale(torch.rand(2, 3, 8, 6), factor).shape == (2, 3, *size)


def test_rescale_by_1_is_the_identity() -> None:
    x = _images(2, 7, 5)
    assert torch.equal(rescale(x, 1.0), x)


@pytest.mark.parametrize("factor", [0.5, 0.6, 0.75, 1.5, 2.0])
def test_rescale_matches_separable_triangle_filter(factor: float) -> None:
    x = _images(2, 10, 8).double()
    h, w = round(10 * factor), round(8 * factor)
    expected = _triangle_weights(10, h) @ x.numpy() @ _triangle_weights(8, w).T
    torch.testing.assert_close(rescale(x, factor), torch.from_numpy(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("shape", "step"), [((9, 11), 1), ((9, 11), 3), ((12, 7), 2)])
def test_translation_error_matches_loop_reference(shape: tuple[int, int], step: int) -> None:
    images = _images(3, *shape)
    got = translation_error(_phi, images, step, batch_size=2)
    assert got == pytest.approx(_translation_error_loop(images.double().numpy(), step), rel=1e-6)


@pytest.mark.parametrize("step", [1, 4])
def test_translation_error_of_constant_images_in_closed_form(step: int) -> None:
    """Φ(T f) − T Φ(f) = X_j − X_(j−dx) = 2 dx / W in the interior: only the horizontal shifts count."""
    h, w, value = 6, 10, np.array([0.3, -0.6, 0.9])
    v = np.tanh(A @ value + B)
    diff = 2 * h * (w - step) * len(v) * (2 * step / w) ** 2

    def norm(columns: range) -> float:  # Σ over the channels and the source columns of (v_c + X_j)²
        return sum(float(np.sum((v + _x_map(w)[j]) ** 2)) for j in columns)

    total = 2 * (h - step) * norm(range(w)) + h * (norm(range(w - step)) + norm(range(step, w)))
    images = torch.tensor(value, dtype=torch.float32)[None, :, None, None].expand(2, 3, h, w)
    assert translation_error(_phi, images, step, batch_size=1) == pytest.approx(
        math.sqrt(diff / total), rel=1e-6
    )


def test_pointwise_network_is_translation_equivariant_in_the_interior() -> None:
    """The bias fills the vacated border of Φ(T f), where T Φ(f) is zero: it must not count."""
    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(3, 4, 1).eval()
    assert translation_error(pointwise, _images(4, 9, 8), 2, batch_size=3) < 1e-6
    assert translation_error(lambda f: _phi(f, coords=False), _images(4, 9, 8), 3, batch_size=3) < 1e-6


@pytest.mark.parametrize("step", [1, 3])
def test_zero_padded_conv_breaks_translation_only_at_the_border(step: int) -> None:
    """A 3x3 conv sees zero padding beyond the frame; content that leaves the frame changes its output
    there. Images that are zero in their outer `step` pixels lose no content: then the error is 0."""
    conv, images = _conv3x3(), _images(4, 12, 10)
    framed = torch.zeros_like(images)
    framed[..., step:-step, step:-step] = images[..., step:-step, step:-step]
    assert translation_error(conv, framed, step, batch_size=4) < 1e-6
    assert translation_error(conv, images, step, batch_size=4) > 0.05


@pytest.mark.parametrize("factor", [0.5, 0.7, 1.5, 2.0, 3.0])
def test_pointwise_linear_network_is_scale_equivariant(factor: float) -> None:
    """Interpolation is linear, channel-wise, with weights summing to 1: it commutes with A f + b."""
    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(3, 4, 1).eval()
    assert scale_error(pointwise, _images(3, 12, 10), factor, batch_size=2) < 1e-6


@pytest.mark.parametrize("factor", [0.5, 0.7, 1.5, 2.0])
def test_pointwise_square_is_not_scale_equivariant(factor: float) -> None:
    assert scale_error(torch.square, _images(3, 12, 10), factor, batch_size=2) > 0.05


def test_coordinates_raise_the_translation_error() -> None:
    conv, images = _conv3x3(), _images(4, 12, 10)
    coords = torch.as_tensor(_x_map(10), dtype=torch.float32)
    plain = translation_error(conv, images, 2, batch_size=4)
    assert translation_error(lambda f: conv(f) + coords, images, 2, batch_size=4) > 1.5 * plain


def test_batch_size_does_not_change_the_result() -> None:
    images = _images(10, 9, 8)
    for error, arg in ((translation_error, 2), (scale_error, 0.6), (scale_error, 1.5)):
        whole = error(_phi, images, arg, batch_size=10)
        assert whole > 0.01
        for batch_size in (1, 7, 10):
            channels_last = images.to(memory_format=torch.channels_last)
            for x in (images, channels_last):
                assert error(_phi, x, arg, batch_size=batch_size) == pytest.approx(whole, rel=1e-9, abs=0)


def _never(f: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the network ran on bad arguments")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: translation_error(_never, x, 0, 1), "step = 0"),
        (lambda x: translation_error(_never, x, -1, 1), "step = -1"),
        (lambda x: translation_error(_never, x, 6, 1), "step = 6"),  # 6x8 images
        (lambda x: translation_error(_never, x, 1, 0), "batch_size = 0"),
        (lambda x: translation_error(_never, x[:0], 1, 1), "no images"),
        (lambda x: scale_error(_never, x, 0.0, 1), "factor 0.0"),
        (lambda x: scale_error(_never, x, -2.0, 1), "factor -2.0"),
        (lambda x: scale_error(_never, x, 0.05, 1), "factor 0.05"),  # 0.3 x 0.4 pixels
        (lambda x: scale_error(_never, x, 0.5, 0), "batch_size = 0"),
        (lambda x: rescale(x, 0.0), "factor 0.0"),
        (lambda x: translation_error(lambda f: f[..., ::2, ::2], x, 1, 1), "logits of size"),
    ],
)
def test_bad_arguments_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_images(2, 6, 8))


def test_largest_step_is_accepted() -> None:
    assert translation_error(_phi, _images(2, 6, 8), 5, batch_size=1) > 0
