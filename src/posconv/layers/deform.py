"""Deformable convolution v2 (Zhu et al. 2019, "Deformable ConvNets v2: More Deformable, Better Results").

Every tap k of the kernel reads the input at a learned, fractional place and is weighed by a learned
modulation m_k, both per output pixel:

    y(o) = b + sum_k W_k · m_k(o) · x(p0(o) + p_k + Δp_k(o)),   p0 = stride·o - padding, p_k = dilation·k,

x read by bilinear interpolation, zero outside the input (as zero padding is). Conventions as
torchvision's `deform_conv2d`: `offset` is (N, 2·G·kH·kW, H_out, W_out), channels ordered per offset
group, per tap (row-major over kH, kW), (Δy, Δx) in pixels; `mask` is (N, G·kH·kW, H_out, W_out), one
channel per offset group per tap; offset group g moves and weighs input channels [g·C/G, (g+1)·C/G).

**One form, exact at rest.** The output is computed as the plain convolution plus the deformation's
correction,

    y = conv(x; W, b) + sum_k W_k · (m_k · s_k - x_k),

s_k the bilinear samples of tap k, x_k the plain convolution's samples of that tap (the zero-padded
input shifted by p_k). With zero offsets and unit masks every s_k *is* x_k, bit for bit, so the
correction is exactly zero and the layer is bit for bit its `nn.Conv2d` twin, which is how
`DeformConv2d` starts (its `reset_parameters`). Summing the taps in any other order could not be.
In the two places where the plain samples appear (conv(x) and x_k) x is detached: the value is
unchanged and the gradient is the deformable convolution's own, the plain convolution's input
gradient (which the two terms would cancel) being neither computed nor cancelled.

**Two paths.** The form runs on one of two implementations, the same numbers to rounding:

*The C++ path* (`_Deform`), wherever it can (`_fast_path`). A C++ operator (`deform_cpu.cpp`; built at
first use by `posconv.layers.native` with the machine's compiler, no torch headers: ~2 s once, ~5 ms to
load in every later process) writes the correction's columns m_k·s_k - x_k, a bilinear im2col in
channels-last order (a row per output pixel; in it per convolution group the taps, per tap the
channels), and one PyTorch matrix product per group with the weight gives the correction. Backward: the
columns' gradient dy·W (a product); the C++ adjoint, which scatters the input's gradient to the four
corners, sums the offsets' and masks' gradients over the channels, and writes the m·s columns over the
gradient's; and the weight's gradient dyᵀ·(m·s) (a product): W's gradient of conv(x; W) + W·(m·s - x) is
that of W·(m·s), so the plain convolution's weight gradient is neither computed nor cancelled either.
Nothing but the inputs is kept for backward (the samples are recomputed). The batch goes through in
chunks of whole images whose columns fit `_CHUNK_BYTES`; OpenMP runs the forward over output rows, the
backward over images and offset groups (and channel blocks where those are fewer than the threads), each
task scattering into its own image's channels and writing its own partial sums of the offsets' and
masks' gradients, added up after in a fixed order: no atomics, the same numbers on every run. Why: the
eager path's per-tap gathers and grid_sample's backward scatter cost ~11x nn.Conv2d; here the work is
matrix products (MKL's) and one pass of the sampling each way, which reads a corner once per vector of
channels. Measured forward+backward against nn.Conv2d (batch 8, 3x3, padding 1, float32, 2 threads,
offsets drawn away from zero, the contenders interleaved in one run, median of 10, on a 2-core machine
shared with other jobs): at 64->64 channels and 64x64 the layer 3.3x channels last in the quietest run
(3.4x NCHW), 3.6-4.3x with the machine 2-4x oversubscribed, 3.0x on one thread; the op alone 2.7x
(2.9x), 2.7-4.3x, 2.4x; the eager path 9-23x, 7.7x on one thread. At the model's 16 and 32 channels the
layer 5-8x, the op 3-6.5x: there the sampling, per pixel and tap, is shared by few channels, the matrix
products are thin (16 or 32 wide: MKL runs them at a third to half nn.Conv2d's rate), and the offset
convolution (27 output channels) alone costs 0.8-1.7 nn.Conv2d. The layer keeps 14 MiB for backward at
the shape above against the eager path's 165 MiB.

*The eager path* (`_eager`: per tap `grid_sample`, plain autograd) runs off the CPU; inside
torch.compile, which compiles it (measured: Inductor's code for it is no faster than eager, 10x
nn.Conv2d above, after a 2-minute compile); and, after one warning line (`acceleration.fall_back`),
with POSCONV_ACCELERATE=0 or where the library cannot be built or loaded (no compiler, a failed build,
a compiler hung past `native.BUILD_TIMEOUT_S`). `acceleration.backends()["deform"]` says which ran
("cpp" or "eager"). Second derivatives: the C++ path's backward, when it is itself differentiated
(create_graph=True: grad mode is on inside backward), differentiates the eager form from the saved
inputs instead, so gradient penalties work without an option, at the eager path's cost.

Both paths take every geometry: groups, offset groups, stride, dilation, rectangular kernels, every
padding (the layer pads its frame first), float32 and float64, bfloat16 autocast, either memory format.

**Sampling on the eager path.** `grid_sample` per tap (bilinear, zeros outside, align_corners=False), on
the input padded with zeros at the bottom and right to a power-of-two height and width: there the
normalised coordinate of an integer place, (2p+1)/2^k - 1, and grid_sample's way back to p are exact
in binary floating point, so integer places are read exactly, which the exactness above needs (against
the input's own size the round trip is off by an ulp for most sizes, and a sample at p - ε mixes in a
neighbour). The padding is a copy of the input, up to ~4x its area (65 -> 128), none for power-of-two
sizes. Each tap's samples, modulated, minus its plain samples, go through the tap's (C_out,
C_in/groups) slice of the weight (one batched matrix product) and are accumulated. The C++ path needs
no such frame: it computes a place in pixels, integer part plus offset, one rounding.

**Autograd on the eager path, measured.** Plain autograd. Per tap it keeps the samples (for the masks'
gradient) and the residual (for the weight's): in training about what the column form
(`deform_conv2d(..., form="unfold")`, kept for the tests and the benchmark) keeps, in inference far
less; in time the two are level (`python -m posconv.tools.bench families`). Custom autograd.Functions
in PyTorch that keep nothing per tap and recompute it in backward were measured and not kept: 1.4-1.8x
slower than this form (corner gathers with scatter_add; sparse sampling matrices), and autograd
through the corner gathers 2x.

**Precision.** Places are computed in float32 (float64 for float64 inputs), never in a low-precision
type: integer part plus offset (then normalised, on the eager path). Under bfloat16 autocast the plain
convolution is autocast's bfloat16 one; offsets, masks, sampling and the correction run in float32, the
correction added rounded once to bfloat16. A place is resolved to about 2^-24 of the frame's size (4e-6
px at 64 px) in float32.

**Non-differentiable places.** Bilinear interpolation has kinks where a place crosses an integer row or
column (and where a corner enters or leaves the input): there the gradient w.r.t. the offsets is the
one-sided one of `grid_sample` (the cell below/right), on both paths. Zero offsets sit exactly on
kinks: the first step's offset gradient is that one-sided one.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from posconv.layers import acceleration, native
from posconv.layers.coords import check_convention, output_grid, positioned
from posconv.layers.position_term import add_position_term

__all__ = [
    "CoordDeformConv2d",
    "DeformConv2d",
    "deform_conv2d",
]

Form = Literal["fast", "unfold"]  # the functional form: the exact one, or the textbook column one
_FORMS: tuple[Form, ...] = ("fast", "unfold")
Conv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (frame, weight, bias)


class _Geometry(NamedTuple):
    """Where tap (i, j) of output (oy, ox) reads: (oy·sh - top + i·dh, ox·sw - left + j·dw) + offset."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    pad_before: tuple[int, int]  # (top, left): the sampling frame's origin in the input
    dilation: tuple[int, int]
    groups: int


# ---- checks ----


def _check_divides(option: str, value: int, in_channels: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or in_channels % value:
        raise ValueError(
            f"{option} = {value!r}: expected a positive integer that divides in_channels = {in_channels}"
        )


def _check_operands(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    out_size: tuple[int, int],
) -> tuple[int, int]:
    """(groups, offset_groups) read from the shapes, as torchvision does; a ValueError names what is off."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"input and weight: expected 4-d tensors, got {x.dim()}-d and {weight.dim()}-d")
    n, c = x.shape[:2]
    taps = weight.shape[2] * weight.shape[3]
    if weight.shape[1] < 1 or c % weight.shape[1]:
        raise ValueError(
            f"weight: expected (C_out, C_in/groups, kH, kW) for C_in = {c}, got {tuple(weight.shape)}"
        )
    groups = c // weight.shape[1]
    if weight.shape[0] % groups:
        raise ValueError(f"weight: C_out = {weight.shape[0]} is not divisible by groups = {groups}")
    offset_groups = offset.shape[1] // (2 * taps) if offset.dim() == 4 else 0
    expected = (n, 2 * offset_groups * taps, *out_size)
    if offset_groups < 1 or c % offset_groups or tuple(offset.shape) != expected:
        raise ValueError(
            f"offset: expected (N, 2·offset_groups·kH·kW, H_out, W_out) = (N={n}, 2·G·{taps}, "
            f"{out_size[0]}, {out_size[1]}) with G dividing C_in = {c}, got {tuple(offset.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (n, offset_groups * taps, *out_size):
        raise ValueError(
            f"mask: expected (N, offset_groups·kH·kW, H_out, W_out) = "
            f"{(n, offset_groups * taps, *out_size)}, got {tuple(mask.shape)}"
        )
    return groups, offset_groups


def _out_size(in_size: int, kernel: int, stride: int, before: int, after: int, dilation: int) -> int:
    return (in_size + before + after - dilation * (kernel - 1) - 1) // stride + 1


# ---- the correction: per tap, grid_sample, modulation, minus the plain samples, the tap's weight ----


def _power_of_two(size: int) -> int:
    return 1 << (size - 1).bit_length()


def _zero_padding(in_size: tuple[int, int], geometry: _Geometry, out: tuple[int, int]) -> tuple[int, ...]:
    """F.pad's (left, right, top, bottom) that puts every tap's window inside the padded input."""
    amounts = []
    for axis in (1, 0):
        before, stride = geometry.pad_before[axis], geometry.stride[axis]
        reach = stride * (out[axis] - 1) + geometry.dilation[axis] * (geometry.kernel_size[axis] - 1)
        amounts += [before, max(0, reach + 1 - before - in_size[axis])]
    return tuple(amounts)


def _window(
    padded: torch.Tensor, tap: tuple[int, int], geometry: _Geometry, out: tuple[int, int]
) -> torch.Tensor:
    """The plain convolution's samples of tap (i, j): a strided window of the zero-padded input."""
    (i, j), (sh, sw), (dh, dw) = tap, geometry.stride, geometry.dilation
    return padded[
        ..., i * dh : i * dh + sh * (out[0] - 1) + 1 : sh, j * dw : j * dw + sw * (out[1] - 1) + 1 : sw
    ]


def _sampling_grids(
    offset: torch.Tensor, geometry: _Geometry, frame_size: tuple[int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """One `grid_sample` grid (N·G, H_out, W_out, 2) per tap: tap (i, j) of output (oy, ox) reads
    (oy·sh - top + i·dh + Δy, ox·sw - left + j·dw + Δx), normalised (align_corners=False) against the
    frame's power-of-two size, which makes integer places exact binary fractions."""
    (kh, kw), (sh, sw), (top, left), (dh, dw), _ = geometry
    n, channels, ho, wo = offset.shape
    taps = kh * kw
    device = offset.device
    # (taps, N·G, H_out, W_out, (Δy, Δx)): one contiguous grid per tap after unbind
    offset = offset.to(dtype).reshape(n * channels // (2 * taps), taps, 2, ho, wo).permute(1, 0, 3, 4, 2)
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw).view(taps, 1, 1, 1)
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh).view(taps, 1, 1, 1)
    rows = tap_y + (torch.arange(ho, device=device, dtype=dtype) * sh - top).view(ho, 1) + offset[..., 0]
    cols = tap_x + (torch.arange(wo, device=device, dtype=dtype) * sw - left) + offset[..., 1]
    height, width = frame_size
    return torch.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], -1).unbind(0)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _correction(
    frame: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    geometry: _Geometry,
    out_size: tuple[int, int],
) -> torch.Tensor:
    """sum_k W_k · (m_k·s_k - x_k): (N, C_out, H_out, W_out) in the compute dtype, outside autocast."""
    n, c, h, w = frame.shape
    taps = geometry.kernel_size[0] * geometry.kernel_size[1]
    offset_groups, groups = offset.shape[1] // (2 * taps), geometry.groups
    dtype = _compute_dtype(frame, offset, weight)
    with torch.autocast(frame.device.type, enabled=False):
        frame, weight = frame.to(dtype), weight.to(dtype)
        height, width = _power_of_two(h), _power_of_two(w)
        planes = frame if (height, width) == (h, w) else F.pad(frame, (0, width - w, 0, height - h))
        planes = planes.contiguous().view(n * offset_groups, c // offset_groups, height, width)
        # minus the plain samples, detached (module docstring), as (N·G, C/G, ...) planes
        left, right, top, bottom = _zero_padding((h, w), geometry, out_size)
        minus_plain = frame.new_zeros(
            n * offset_groups, c // offset_groups, top + h + bottom, left + w + right
        )
        minus_plain.view(n, c, *minus_plain.shape[-2:])[..., top : top + h, left : left + w].sub_(
            frame.detach()
        )
        grids = _sampling_grids(offset, geometry, (height, width), dtype)
        if mask is not None:
            masks = mask.to(dtype).reshape(n * offset_groups, taps, 1, *out_size).unbind(1)
        z = None
        for k, tap in enumerate(_taps(geometry)):
            samples = F.grid_sample(
                planes, grids[k], mode="bilinear", padding_mode="zeros", align_corners=False
            )
            plain = _window(minus_plain, tap, geometry, out_size)
            residual = plain + samples if mask is None else torch.addcmul(plain, samples, masks[k])
            columns = residual.reshape(n * groups, c // groups, out_size[0] * out_size[1])
            matrices = _tap_matrices(weight, tap, n, groups)
            z = torch.bmm(matrices, columns) if z is None else z.baddbmm_(matrices, columns)
    return z.view(n, weight.shape[0], *out_size)


def _taps(geometry: _Geometry) -> list[tuple[int, int]]:
    kh, kw = geometry.kernel_size
    return [(i, j) for i in range(kh) for j in range(kw)]


def _tap_matrices(weight: torch.Tensor, tap: tuple[int, int], n: int, groups: int) -> torch.Tensor:
    """(N·groups, C_out/groups, C_in/groups): tap (i, j) of the weight, one matrix per image and group."""
    c_out, c_in = weight.shape[:2]
    matrices = weight[:, :, tap[0], tap[1]].reshape(1, groups, c_out // groups, c_in)
    return matrices.expand(n, -1, -1, -1).reshape(n * groups, c_out // groups, c_in)


def _eager(
    conv: Conv,
    frame: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: _Geometry,
) -> torch.Tensor:
    """The deformable convolution as plain autograd: `conv` of the detached frame plus the correction."""
    y = conv(frame.detach(), weight, bias)
    z = _correction(frame, offset, mask, weight, geometry, (y.shape[-2], y.shape[-1]))
    return y.add_(z.to(y.dtype))


def _deform(
    conv: Conv,
    frame: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: _Geometry,
) -> torch.Tensor:
    """conv(frame, weight, bias) plus the deformation's correction, on the fast path where it runs
    (`_fast_path`), else eagerly. `conv` is the layer's plain convolution of the frame."""
    if _fast_path(frame):
        return _Deform.apply(conv, frame, offset, mask, weight, bias, geometry)
    return _eager(conv, frame, offset, mask, weight, bias, geometry)


# ---- the fast path: the C++ columns (deform_cpu.cpp) around PyTorch's matrix products ----

_SOURCE = Path(__file__).with_name("deform_cpu.cpp")
_FLAGS = ("-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")  # deform_cpu.cpp says why
_OP = "deform"


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The C++ library, built at first use (`native.load`), or why it cannot be had."""
    try:
        return native.load(_SOURCE, _FLAGS)
    except native.BuildError as error:
        return str(error)


def _fast_path(frame: torch.Tensor) -> bool:
    """Whether the fast path runs: a CPU tensor, outside torch.compile (which compiles the eager form),
    acceleration on and the library built. Where acceleration is off or the library could not be
    built, `fall_back` gives its one warning line; the choice is recorded either way."""
    if frame.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    library = _library() if acceleration.enabled() else f"{acceleration.SWITCH}=0"
    if isinstance(library, str):
        acceleration.fall_back(_OP, library)
        return False
    acceleration.record(_OP, "cpp")
    return True


class _NativeGeometry(ctypes.Structure):
    """deform_cpu.cpp's Geometry, for a chunk of n images."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "n", "c", "h", "w", "out_h", "out_w", "kernel_h", "kernel_w", "stride_h", "stride_w",
            "top", "left", "dilation_h", "dilation_w", "groups", "offset_groups", "threads", "blocks",
        )
    ]  # fmt: skip


# Columns are built a chunk of whole images at a time, in a buffer of at most this size: under glibc's
# 32 MB mmap threshold it is reused from the heap, where a larger one is mapped afresh and
# page-faulted on every call (measured: allocating and filling 75 MB costs ~10x refilling it, as much
# as one of the matrix products); and a chunk's columns stay in the L3 cache for their product.
_CHUNK_BYTES = 24 * 2**20


class _Operands(NamedTuple):
    """The C++ path's operands in the compute dtype and the layouts deform_cpu.cpp reads."""

    frame: torch.Tensor  # (N, H, W, C)
    offset: torch.Tensor  # (N, H_out, W_out, 2·G·K)
    mask: torch.Tensor | None  # (N, H_out, W_out, G·K)
    matrices: torch.Tensor  # (groups, C_out/groups, K·C_in/groups), columns ordered tap, then channel
    geometry: _NativeGeometry  # of the whole batch

    def chunk_images(self) -> int:
        """Whole images per chunk of the batch: a multiple of the thread count where that fits in
        _CHUNK_BYTES (the backward gives each thread its own images), else fewer, down to one image
        whose channels the backward splits among the threads."""
        g = self.geometry
        image = g.out_h * g.out_w * g.kernel_h * g.kernel_w * g.c * self.frame.element_size()
        images = max(1, _CHUNK_BYTES // image)
        return min(g.n, images - images % g.threads if images >= g.threads else images)

    def chunks(self) -> Iterator[tuple[slice, slice, _NativeGeometry]]:
        """(images, their column rows, their geometry) per chunk of the batch."""
        g, step = self.geometry, self.chunk_images()
        for start in range(0, g.n, step):
            images = slice(start, min(g.n, start + step))
            chunk = _NativeGeometry.from_buffer_copy(g)
            chunk.n = images.stop - images.start
            # channel blocks of at least 8 channels, enough for every thread to have a task
            tasks = chunk.n * g.offset_groups
            chunk.blocks = min(-(-g.threads // tasks), max(1, g.c // g.offset_groups // 8))
            pixels = g.out_h * g.out_w
            yield images, slice(images.start * pixels, images.stop * pixels), chunk

    def buffer(self) -> torch.Tensor:
        """Room for one chunk's column matrix."""
        g = self.geometry
        return self.frame.new_empty(self.chunk_images() * g.out_h * g.out_w * g.kernel_h * g.kernel_w * g.c)

    def columns(self, buffer: torch.Tensor, rows: slice) -> torch.Tensor:
        """The (groups, rows, K·C_in/groups) column matrix of `rows` in `buffer`, contiguous."""
        groups, _, width = self.matrices.shape
        return buffer[: groups * (rows.stop - rows.start) * width].view(groups, -1, width)


def _operands(
    frame: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    geometry: _Geometry,
    out_size: tuple[int, int],
) -> _Operands:
    dtype = _compute_dtype(frame, offset, weight)
    n, c, h, w = frame.shape
    (kh, kw), (sh, sw), (top, left), (dh, dw), groups = geometry
    c_out = weight.shape[0]
    matrices = weight.to(dtype).reshape(groups, c_out // groups, c // groups, kh * kw).transpose(2, 3)
    sizes = (n, c, h, w, *out_size, kh, kw, sh, sw, top, left, dh, dw, groups)
    offset_groups = offset.shape[1] // (2 * kh * kw)
    return _Operands(
        *(_channels_last(t, dtype) for t in (frame, offset, mask)),
        matrices.reshape(groups, c_out // groups, -1),
        _NativeGeometry(*sizes, offset_groups, torch.get_num_threads(), 1),
    )


def _channels_last(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(N, C, H, W) -> (N, H, W, C) contiguous, in `dtype`: a view of a channels-last tensor."""
    return tensor.to(dtype).permute(0, 2, 3, 1).contiguous() if tensor is not None else None


def _pointer(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr() if tensor is not None else None)


def _kernel(name: str, dtype: torch.dtype, geometry: _NativeGeometry, *tensors: torch.Tensor | None) -> None:
    """deform_cpu.cpp's `name` for `dtype`, on `tensors` (contiguous, that dtype) and the geometry."""
    library = _library()
    assert not isinstance(library, str)  # _fast_path chose the fast path
    kernel = getattr(library, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")
    kernel(ctypes.byref(geometry), *map(_pointer, tensors))


def _images(tensors: Iterable[torch.Tensor | None], images: slice) -> list[torch.Tensor | None]:
    return [t[images] if t is not None else None for t in tensors]


def _native_correction(o: _Operands, out_size: tuple[int, int]) -> torch.Tensor:
    """The correction, (N, C_out, H_out, W_out): a chunk's columns, then their product with the weight."""
    groups, per_group, _ = o.matrices.shape
    n, (ho, wo) = o.geometry.n, out_size
    z = o.frame.new_empty(groups, n * ho * wo, per_group)
    buffer = o.buffer()
    for images, rows, chunk in o.chunks():
        columns = o.columns(buffer, rows)
        _kernel("deform_columns", columns.dtype, chunk, *_images(o[:3], images), columns)
        torch.bmm(columns, o.matrices.transpose(1, 2), out=z[:, rows])
    return z.view(groups, n, ho, wo, per_group).permute(1, 0, 4, 2, 3).reshape(n, groups * per_group, ho, wo)


def _native_gradients(o: _Operands, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The gradients of the frame, offsets, masks (in deform_cpu.cpp's layouts) and weight matrices."""
    groups, per_group, _ = o.matrices.shape
    dz = dy.to(o.frame.dtype).permute(0, 2, 3, 1).reshape(-1, groups, per_group).transpose(0, 1)
    dframe, doffset = torch.zeros_like(o.frame), torch.empty_like(o.offset)
    dmask = torch.empty_like(o.mask) if o.mask is not None else None
    dmatrices = torch.zeros_like(o.matrices)
    buffer = o.buffer()
    for images, rows, chunk in o.chunks():
        # the columns' gradient, then, written over it by the adjoint, mask·sample's columns
        columns = torch.bmm(dz[:, rows], o.matrices, out=o.columns(buffer, rows))
        # the offsets' and masks' gradients, a partial sum per channel block, added up after
        totals = _images((doffset, dmask), images)
        partials = [t.new_empty(chunk.blocks, *t.shape) if t is not None else None for t in totals]
        operands = (*_images(o[:3], images), columns, dframe[images], *partials)
        _kernel("deform_columns_backward", columns.dtype, chunk, *operands)
        for partial, total in zip(partials, totals, strict=True):
            if partial is not None:
                torch.sum(partial, 0, out=total)
        dmatrices.baddbmm_(dz[:, rows].transpose(1, 2), columns)
    return dframe, doffset, dmask, dmatrices


class _Deform(torch.autograd.Function):
    """`_eager`'s function, the correction's columns built and differentiated in C++ (module docstring).

    Saves only its inputs; backward recomputes the samples. Where backward is itself differentiated
    (create_graph=True, so grad mode is on inside backward) it differentiates `_eager` instead, whose
    graph autograd can differentiate again."""

    @staticmethod
    def forward(
        ctx: Any,
        conv: Conv,
        frame: torch.Tensor,
        offset: torch.Tensor,
        mask: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        geometry: _Geometry,
    ) -> torch.Tensor:
        y = conv(frame, weight, bias)
        ctx.save_for_backward(frame, offset, mask, weight, bias)
        ctx.conv, ctx.geometry = conv, geometry
        out_size = (y.shape[-2], y.shape[-1])
        with torch.autocast(frame.device.type, enabled=False):
            z = _native_correction(_operands(frame, offset, mask, weight, geometry, out_size), out_size)
        return y.add_(z.to(y.dtype))

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs, wanted = ctx.saved_tensors, ctx.needs_input_grad[1:6]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                y = _eager(ctx.conv, *inputs, ctx.geometry)
                used = [t for t, want in zip(inputs, wanted, strict=True) if want]
                grads = iter(torch.autograd.grad(y, used, dy, create_graph=True))
            return None, *(next(grads) if want else None for want in wanted), None
        frame, offset, mask, weight, bias = inputs
        with torch.autocast(frame.device.type, enabled=False):
            o = _operands(frame, offset, mask, weight, ctx.geometry, (dy.shape[-2], dy.shape[-1]))
            dframe, doffset, dmask, dmatrices = _native_gradients(o, dy)
            kh, kw = ctx.geometry.kernel_size
            dweight = dmatrices.reshape(weight.shape[0], kh * kw, -1).transpose(1, 2).reshape(weight.shape)
            grads = (
                dframe.permute(0, 3, 1, 2).to(frame.dtype),
                doffset.permute(0, 3, 1, 2).to(offset.dtype),
                dmask.permute(0, 3, 1, 2).to(mask.dtype) if mask is not None else None,
                dweight.to(weight.dtype),
                dy.sum((0, 2, 3), dtype=o.frame.dtype).to(bias.dtype) if bias is not None else None,
            )
        return None, *(g if want else None for g, want in zip(grads, wanted, strict=True)), None


# ---- the functional forms ----


def _functional_geometry(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> tuple[_Geometry, tuple[int, int], tuple[int, int]]:
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kernel = (weight.shape[2], weight.shape[3])
    out = tuple(
        _out_size(x.shape[2 + a], kernel[a], stride[a], padding[a], padding[a], dilation[a]) for a in (0, 1)
    )
    groups, _ = _check_operands(x, offset, mask, weight, out)
    return _Geometry(kernel, stride, padding, dilation, groups), padding, out


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: torch.Tensor | None = None,
    *,
    form: Form = "fast",
) -> torch.Tensor:
    """Deformable convolution, torchvision's signature and conventions (module docstring); zero padding.

    groups and offset groups are read from the shapes: groups = C_in / weight.shape[1], offset groups =
    offset.shape[1] / (2·kH·kW). `mask=None` is DCNv1 (every mask 1). Output in the input's memory format.
    `form="fast"` is the exact form of the module docstring; `form="unfold"` the textbook column form
    (`_deform_unfold`), an independent formulation for tests and benchmarks.
    """
    if form not in _FORMS:
        raise ValueError(f"form = {form!r}: expected one of {', '.join(_FORMS)}")
    geometry, padding, out = _functional_geometry(input, offset, mask, weight, stride, padding, dilation)
    if form == "unfold":
        return _deform_unfold(input, offset, weight, bias, mask, geometry, out)

    def conv(frame: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(frame, weight, bias, geometry.stride, padding, geometry.dilation, geometry.groups)

    return _deform(conv, input, offset, mask, weight, bias, geometry)


def _deform_unfold(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    geometry: _Geometry,
    out: tuple[int, int],
) -> torch.Tensor:
    """`deform_conv2d` in its textbook form, operands checked: every tap of every output pixel sampled
    by one `grid_sample` into an (N, C_in·kH·kW, H_out·W_out) column matrix (modulated), then one matrix
    product per group with the (C_out, C_in/groups·kH·kW) weight. Plain autograd.

    `grid_sample` reads places normalised to [-1, 1]; align_corners=False (pixel i at (2i+1)/size - 1),
    which, unlike align_corners=True, also holds for a 1-pixel axis. The normalisation rounds, so this
    form is not exact at integer places as the fast form is. Sampling in float32 or float64; under
    autocast the matrix product follows autocast.
    """
    (kh, kw), (sh, sw), (top, left), (dh, dw), groups = geometry
    ho, wo = out
    n, c, h, w = input.shape
    taps = kh * kw
    offset_groups = offset.shape[1] // (2 * taps)
    dtype = _compute_dtype(input, offset)
    device = input.device
    with torch.autocast(device.type, enabled=False):
        offset = offset.to(dtype).reshape(n * offset_groups, taps, 2, ho, wo)
        tap_y = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw)
        tap_x = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh)
        rows = tap_y[:, None, None] + (torch.arange(ho, device=device, dtype=dtype) * sh - top)[:, None]
        cols = tap_x[:, None, None] + (torch.arange(wo, device=device, dtype=dtype) * sw - left)[None, :]
        rows, cols = rows + offset[:, :, 0], cols + offset[:, :, 1]  # (N·G, K, H_out, W_out)
        grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], -1)
        planes = input.to(dtype).reshape(n * offset_groups, c // offset_groups, h, w)
        columns = F.grid_sample(
            planes, grid.view(n * offset_groups, taps * ho, wo, 2), align_corners=False, padding_mode="zeros"
        ).view(n * offset_groups, c // offset_groups, taps, ho * wo)
        if mask is not None:
            columns = columns * mask.to(dtype).reshape(n * offset_groups, 1, taps, ho * wo)
    columns = columns.reshape(n, groups, c // groups * taps, ho * wo)
    y = weight.reshape(groups, -1, c // groups * taps) @ columns  # (N, groups, C_out/groups, P)
    y = y.reshape(n, -1, ho, wo)
    if bias is not None:
        y = y + bias.to(y.dtype)[:, None, None]
    return y.contiguous(memory_format=_memory_format(input))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


# ---- the layers ----


class DeformConv2d(nn.Conv2d):
    """`nn.Conv2d` whose taps read at learned offsets, weighed by learned masks (DCNv2).

    Takes `nn.Conv2d`'s whole signature, plus `offset_groups` (G): offsets and masks come from
    `offset_conv`, an ordinary convolution of the layer's input with the layer's kernel size, stride,
    padding, dilation and padding mode, 3·G·kH·kW channels: the offsets (2·G·kH·kW, layout as
    torchvision) then the mask logits (G·kH·kW), mask = 2·sigmoid(logit).

    Padding: every `nn.Conv2d` padding is taken: ints, tuples, "same", "valid". With padding_mode
    "zeros", samples outside the input are zero. With "reflect", "replicate" or "circular" the input is
    first padded in that mode (as nn.Conv2d does) and the taps sample that padded frame, zero beyond it.
    groups and offset_groups must each divide in_channels (ValueError otherwise).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        offset_groups: int = 1,
    ) -> None:
        _check_divides("groups", groups, in_channels)
        _check_divides("offset_groups", offset_groups, in_channels)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self.offset_groups = offset_groups
        # skip_init: built without drawing random numbers (it is zeroed anyway), so the layer's weight,
        # its bias and every draw after it are those of nn.Conv2d under the same seed
        self.offset_conv = nn.utils.skip_init(
            nn.Conv2d,
            self.in_channels,
            3 * offset_groups * math.prod(self.kernel_size),
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        self._zero_offsets()

    def reset_parameters(self) -> None:
        """The weight and bias as nn.Conv2d draws them; `offset_conv` zero, so offsets 0 and masks
        2·sigmoid(0) = 1: the layer starts exactly as the plain convolution with the same weights and
        the same random draws, so a deformable network starts where its vanilla twin (same seed) does
        and deforms only as far as the loss asks. (DCNv2's sigmoid mask is 0.5 at init: its layer
        starts as half the plain convolution, and its network elsewhere than its twin.) The masks live
        in (0, 2): a tap can be damped to nothing or amplified up to twice."""
        super().reset_parameters()
        if hasattr(self, "offset_conv"):  # nn.Conv2d.__init__ calls this before offset_conv exists
            self._zero_offsets()

    def _zero_offsets(self) -> None:
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def offsets_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2·G·kH·kW, H_out, W_out) offsets in pixels and (N, G·kH·kW, H_out, W_out) masks in (0, 2),
        float32 (float64 for a float64 layer).

        Under autocast `offset_conv` runs in its parameters' dtype (float32), not bfloat16: offsets are
        places, and bfloat16 would round a 3.7 px offset to 1/64 px; the offsets' gradient, which jumps
        where a place crosses a pixel row or column, would then follow that rounding (measured: 10-25%
        off float64's in a small layer, against <0.1% for the rest)."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                out = self.offset_conv(x.to(self.offset_conv.weight.dtype))
        else:
            out = self.offset_conv(x)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        split = 2 * self.offset_groups * math.prod(self.kernel_size)
        return out[:, :split], 2 * torch.sigmoid(out[:, split:])

    def _geometry(self, pad_before: tuple[int, int]) -> _Geometry:
        return _Geometry(self.kernel_size, self.stride, pad_before, self.dilation, self.groups)

    def _conv_unpadded(
        self, frame: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.conv2d(frame, weight, bias, self.stride, 0, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offsets_and_mask(x)
        left, _, top, _ = self._reversed_padding_repeated_twice
        if self.padding_mode == "zeros":
            frame, pad_before, conv = x, (top, left), self._conv_forward
        else:  # what nn.Conv2d does: pad in the mode, then convolve unpadded; the taps sample that frame
            frame = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            pad_before, conv = (0, 0), self._conv_unpadded
        y = _deform(conv, frame, offset, mask, self.weight, self.bias, self._geometry(pad_before))
        return y.contiguous(memory_format=_memory_format(x))  # circular padding loses channels last

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset_groups={self.offset_groups}"


class CoordDeformConv2d(DeformConv2d):
    """`DeformConv2d` plus `coord_bias` (C_out, 2): `y = deform(x) + a_c*X + b_c*Y` at the output pixels.

    X, Y are the kernel centres' coordinates under `coords` (`posconv.layers.coords`, as `CoordBias2d`): where
    the undeformed kernel sits, the output pixel's place, not where the deformed taps read.
    `coord_bias` starts at zero, so the layer starts as `DeformConv2d`, hence as the plain convolution.
    """

    def __init__(self, *shape: Any, coords: str = "centered", **kwargs: Any) -> None:
        check_convention(coords)
        super().__init__(*shape, **kwargs)
        self.coords = coords
        self.coord_bias = nn.Parameter(self.weight.new_zeros(self.out_channels, 2))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "coord_bias"):
            nn.init.zeros_(self.coord_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        dtype = torch.promote_types(y.dtype, self.coord_bias.dtype)  # autocast's bfloat16 y: term in fp32
        geometry = (self.kernel_size, self.stride, self.dilation, self.padding, self.coords)
        grid = output_grid((x.shape[-2], x.shape[-1]), (y.shape[-2], y.shape[-1]), *geometry, y.device, dtype)
        return add_position_term(y, self.coord_bias.to(dtype), positioned(grid.flatten(1), self.coords))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coords={self.coords}"
