"""Opt-in backend: the position term added inside oneDNN's convolution, on CPU.

`enable()` switches it on for every position-aware layer; it is off by default, so the layers run
plain PyTorch. Where it applies (float32 channels_last on CPU, zero padding given in pixels, outside
autocast and torch.compile) the layer calls `torch.ops.mkldnn._convolution_pointwise_`, a private op
that Inductor's CPU fusions call: it fills the output with the term and the convolution adds into it.
A fresh output costs page faults that outweigh a 3-channel convolution's arithmetic; filling it is that
same first touch, so the term rides along (the layer benchmark has both rows). Everywhere else, and
where this torch build lacks the op (`enable()` says so once), the plain path runs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from posconv.layers.position_term import is_channels_last, term_gradients, term_map

_Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]  # stride, padding, dilation, groups

# oneDNN's convolution that adds a tensor in its epilogue (what Inductor's CPU fusions call)
_CONV_ADD = (
    getattr(torch.ops.mkldnn, "_convolution_pointwise_", None)
    if torch.backends.mkldnn.is_available()
    else None
)
_enabled = False


def available() -> bool:
    """Whether this torch build has the fused op."""
    return _CONV_ADD is not None


def enable(on: bool = True) -> bool:
    """Switch the backend on or off for every position-aware layer; returns whether it is now on.

    Switching on without the op warns once and leaves the plain path running.
    """
    global _enabled
    if on and not available():
        warnings.warn(
            "posconv.layers.fused: this torch build has no torch.ops.mkldnn._convolution_pointwise_; "
            "the layers keep the plain PyTorch path",
            RuntimeWarning,
            stacklevel=2,
        )
    _enabled = on and available()
    return _enabled


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """The backend on or off inside the block (forward and backward), as it was after."""
    before = _enabled
    enable(on)
    try:
        yield
    finally:
        enable(before)


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` takes the fused op: switched on, and where it was measured faster (with glibc's
    default allocator): float32 channels_last on CPU, zero padding given in pixels, outside autocast
    and torch.compile."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and is_channels_last(x)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class _ConvPlusTerm(torch.autograd.Function):
    """`conv(x) + coefficients @ basis` with the add inside oneDNN's convolution, bias included.

    The output is first filled with the term and the convolution adds into it. A fresh output costs
    page faults that outweigh a 3-channel convolution's arithmetic; filling it is that same first touch,
    so the term rides along instead of costing a pass of its own. In the backward, the batch sum that
    gives the term's gradient also gives the bias's, so the convolution skips its own bias reduction.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        coefficients: torch.Tensor,
        basis: torch.Tensor,
        geometry: _Geometry,
        height: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, basis)
        ctx.geometry = geometry
        stride, padding, dilation, groups = geometry
        term = term_map(coefficients, basis, height, channels_last=True)
        y = term.expand(len(x), -1, -1, -1).clone(memory_format=torch.channels_last)  # a copy at batch 1 too
        _CONV_ADD.binary(y, x, weight, bias, padding, stride, dilation, groups, "add", None, None, [], None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, basis = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], False]  # the bias's gradient comes from the term's batch sum
        conv_backward = torch.ops.aten.convolution_backward
        grad_x, grad_weight, _ = conv_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, mask
        )
        coefficients_grad, bias_grad = term_gradients(grad, basis, (needs[3], needs[2]))
        return grad_x, grad_weight, bias_grad, coefficients_grad, None, None, None


def _output_size(conv: nn.Conv2d, in_size: tuple[int, int]) -> tuple[int, int]:
    """The output's (H, W) before convolving, for padding given in pixels."""
    h, w = (
        (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for size, pad, dilation, kernel, stride in zip(
            in_size, conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    )
    return h, w


def conv_plus_term(conv: Any, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` of a position-aware layer with its term and bias in oneDNN's epilogue."""
    in_size = (x.shape[-2], x.shape[-1])
    out_size = _output_size(conv, in_size)
    basis = conv.positioned_basis(in_size, out_size, x, x.dtype)
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
    return _ConvPlusTerm.apply(x, conv.weight, conv.bias, conv.coefficients(), basis, geometry, out_size[0])
