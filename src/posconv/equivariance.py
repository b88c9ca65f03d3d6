"""How much a segmentation network breaks equivariance, measured as in Worrall & Welling (2019,
"Deep Scale-Spaces"): for a transformation T of the image f and the network Φ (image -> per-pixel logits
of the same height and width), the error is ‖Φ(T f) − T Φ(f)‖ / ‖T Φ(f)‖, 0 for an equivariant Φ.

The two are compared only where both are defined: a shift leaves a border with no content, which no
network can be asked to predict. Sums of squares are pooled over all images (and shifts) before the
ratio, so the result does not depend on the batch size. A Φ whose T Φ(f) is zero everywhere gives NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) float -> (N, C, H, W) float, any H, W
# (float32 batch, its logits) -> pairs (Φ(T f), T Φ(f)) restricted to where both are defined
_Pairs = Callable[[torch.Tensor, torch.Tensor], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def _kept(size: int, d: int) -> slice:
    """Indices along one axis of a frame shifted by `d` whose content comes from inside the original."""
    return slice(min(max(d, 0), size), max(size + min(d, 0), 0))


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Content moves dy pixels down and dx right; vacated pixels are zero (no wrap-around), so a
    network cannot see across the image's edge."""
    h, w = x.shape[-2:]
    moved = torch.zeros_like(x)
    moved[..., _kept(h, dy), _kept(w, dx)] = x[..., _kept(h, -dy), _kept(w, -dx)]
    return moved


def _rescaled_size(h: int, w: int, factor: float) -> tuple[int, int]:
    size = round(h * factor), round(w * factor)
    if factor <= 0 or min(size) < 1:
        raise ValueError(f"scale factor {factor} turns a {h}x{w} image into {size[0]}x{size[1]} pixels")
    return size


def rescale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Bilinear resize to (round(H*factor), round(W*factor)), align_corners=False; antialiased when
    shrinking, so that small structures average out rather than alias."""
    size = _rescaled_size(*x.shape[-2:], factor)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)


@torch.inference_mode()
def _pooled_error(images: torch.Tensor, logits: Logits, batch_size: int, pairs: _Pairs) -> float:
    """sqrt(Σ‖Φ(T f) − T Φ(f)‖² / Σ‖T Φ(f)‖²) over all pairs, the sums in float64."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: expected at least 1")
    if len(images) == 0:
        raise ValueError("no images: the error of an empty set is undefined")
    diff = norm = torch.zeros((), dtype=torch.float64, device=images.device)
    for batch in images.split(batch_size):
        x = batch.to(torch.float32)
        phi = logits(x).to(torch.float32)
        if phi.shape[-2:] != x.shape[-2:]:
            got, want = tuple(phi.shape[-2:]), tuple(x.shape[-2:])
            raise ValueError(f"logits of size {got} for images of {want}: Φ must keep height and width")
        for transformed, expected in pairs(x, phi):
            expected = expected.double()
            diff = diff + (transformed.double() - expected).square().sum()
            norm = norm + expected.square().sum()
    return (diff / norm).sqrt().item()


def translation_error(logits: Logits, images: torch.Tensor, step: int, batch_size: int) -> float:
    """Pooled over the four shifts (step, 0), (-step, 0), (0, step), (0, -step) and all images, over the
    interior of each shifted frame (the pixels whose content exists in both frames), so that the
    vacated border, zero in T Φ(f) but not in Φ(T f), is not counted as an error."""
    h, w = images.shape[-2:]
    if not 1 <= step < min(h, w):
        raise ValueError(f"step = {step}: expected 1 <= step < {min(h, w)} for {h}x{w} images")
    shifts = ((step, 0), (-step, 0), (0, step), (0, -step))

    def pairs(x: torch.Tensor, phi: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for dy, dx in shifts:
            inside = (..., _kept(h, dy), _kept(w, dx))
            yield logits(shift(x, dy, dx))[inside], shift(phi, dy, dx)[inside]

    return _pooled_error(images, logits, batch_size, pairs)


def scale_error(logits: Logits, images: torch.Tensor, factor: float, batch_size: int) -> float:
    """T = rescale(·, factor); Φ(T f) and T Φ(f) are both defined on the whole rescaled frame."""
    _rescaled_size(*images.shape[-2:], factor)  # fail before running the network

    def pairs(x: torch.Tensor, phi: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield logits(rescale(x, factor)), rescale(phi, factor)

    return _pooled_error(images, logits, batch_size, pairs)
