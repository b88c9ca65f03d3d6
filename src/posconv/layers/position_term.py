"""The position term `coefficients @ basis` that both position-aware layers add, and its gradients.

The term is one (1, C, H, W) map broadcast over the batch, added in place to the convolution's output
(conv backward does not need its output, so this saves an allocation and a pass); its coefficients'
gradient is one sum of the output's gradient over the batch, taken in the gradient's memory order.
"""

from __future__ import annotations

from typing import Any

import torch


def is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def term_map(
    coefficients: torch.Tensor, basis: torch.Tensor, height: int, channels_last: bool
) -> torch.Tensor:
    """`coefficients @ basis` as a (1, C, H, W) map in the output's memory layout, so adds stream through."""
    c, width = coefficients.shape[0], basis.shape[1] // height
    if channels_last:
        return (basis.T @ coefficients.T).view(1, height, width, c).permute(0, 3, 1, 2)
    return (coefficients @ basis).view(1, c, height, width)


def term_gradients(
    grad: torch.Tensor, basis: torch.Tensor, needs: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the term's coefficients and of a bias, from one sum of `grad` over the batch.

    The sum runs in the gradient's memory order: one streaming pass, the fastest reduction measured on
    CPU (autograd's broadcast backward sums a channels_last gradient far slower), and accumulates in the
    basis's dtype (float32 for a bfloat16 gradient under autocast).
    """
    n, c = grad.shape[:2]
    if is_channels_last(grad):  # products oriented as measured fastest for each layout
        per_pixel = grad.permute(0, 2, 3, 1).reshape(n, -1, c).sum(0, dtype=basis.dtype)  # (H*W, C)
        return (basis @ per_pixel).T if needs[0] else None, per_pixel.sum(0) if needs[1] else None
    per_pixel = grad.reshape(n, c, -1).sum(0, dtype=basis.dtype)  # (C, H*W)
    return per_pixel @ basis.T if needs[0] else None, per_pixel.sum(1) if needs[1] else None


def _term_like(y: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The term in `y`'s dtype, computed outside autocast in the coefficients' dtype.

    Under bfloat16 autocast the maps and their product stay float32 (a bfloat16 mantissa has 8 bits:
    coordinates 2/128 apart are barely resolved) and the finished term is rounded once to bfloat16, the
    output's dtype; PyTorch adds bfloat16 tensors in float32 and rounds the sum once. Measured here: a
    float32 output made bfloat16 training 1.17x faster than float32, against 1.4x for plain convolutions,
    and a bfloat16 += float32 add is 14x slower than a bfloat16 += bfloat16 one."""
    with torch.autocast(y.device.type, enabled=False):
        return term_map(coefficients, basis, y.shape[-2], is_channels_last(y)).to(y.dtype)


class _AddPositionTerm(torch.autograd.Function):
    """`y += coefficients @ basis` for every image of the batch, in place."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(basis)
        return y.add_(_term_like(y, coefficients, basis))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (basis,) = ctx.saved_tensors
        coefficients_grad, _ = term_gradients(grad, basis, (ctx.needs_input_grad[1], False))
        return grad, coefficients_grad, None


def add_position_term(y: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`y + coefficients @ basis`, the term broadcast over the batch, in place into `y`."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace mark_dirty; Inductor fuses the add itself
        return y.add_(_term_like(y, coefficients, basis))
    return _AddPositionTerm.apply(y, coefficients, basis)
