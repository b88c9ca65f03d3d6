"""Involution (Li et al., CVPR 2021), and a position-aware variant whose kernels also see X and Y.

Involution inverts convolution's sharing: one kernel per output pixel, generated from the input at that
pixel, shared across the channels of a group (G groups of C/G channels) instead of one kernel per channel
pair shared across space:

    y[b, c, i, j] = bias[c] + sum over taps (u, v) of k[b, g(c), u, v, i, j] * x~[b, c, i*sh+u*dh, j*sw+v*dw]

with x~ the input padded as nn.Conv2d pads it (any `padding`, `padding_mode`), g(c) = c // (C/G), and
`k(i, j) = span(ReLU(reduce(xbar(i, j))))`: `reduce` a 1x1 convolution C -> max(C // reduction, 1) with
bias, `span` a 1x1 convolution to G*kh*kw. `xbar(i, j)` is the input where the kernel is used: the mean of
the sh x sw block of x~ whose top-left pixel is the output's kernel centre (row i*sh + dh*(kh-1)//2 of
x~; blocks running past x~'s end average the pixels they cover). At stride 1 that is the pixel under the
kernel centre; in the reference's geometry (odd kernel, padding dilation*(k-1)/2, size divisible by the
stride) it is exactly the reference's AvgPool2d(s, s) of the input, and it is defined for every other.

Choices, and why:
- Involution keeps channels. `in_channels != out_channels` puts a bias-free 1x1 convolution in -> out
  first (RedNet's split: involution aggregates in space, 1x1 convolutions mix channels), so the layer
  drops in for any nn.Conv2d; with in == out there is none.
- `bias` is one learned offset per output channel added after the involution, as nn.Conv2d's bias is
  (zero at initialisation). A bias in the projection would reach the output multiplied by each pixel's
  kernel sum: not an offset, and absent when in == out.
- No BatchNorm inside the kernel generator (the reference has reduce -> BN -> ReLU): `reduce` has a bias
  instead, so the layer is a pure function of its input, the same in train and eval mode and for any
  batch, like the project's other layers; normalisation around it is the model's business.
- `groups` is the number of kernel groups G, not nn.Conv2d's; None means C // group_channels (at least
  1). G must divide C. `padding` takes ints, pairs, "valid", and "same" at stride 1 (as nn.Conv2d;
  an even kernel pads its odd pixel at the end); "same" at stride > 1 and other strings are refused.
- Fast path: `involution` accumulates kh*kw shifted products (a strided, dilated slice of x~ times that
  tap's kernel map broadcast over the group's channels, added in place into the output) in a custom
  autograd function that saves only x~ and the kernels and scatters the gradient back the same way. It
  never holds the unfolded input, B*C*kh*kw*H*W numbers, that `involution(..., form="unfold")` (the
  reference's formulation, kept for tests and the benchmark) builds and saves for backward.
- Precision: the aggregation computes in at least float32. Under autocast the 1x1 convolutions run in
  the autocast dtype, the aggregation in float32, and the output is rounded once to the autocast dtype
  (the dtype nn.Conv2d would return). The output keeps the input's memory format.

Parameters (`parameter_count`), with C = out_channels, R = max(C // reduction, 1), G kernel groups,
K = kh*kw: `[in != out]*in*out + (C + 1)*R + (R + 1)*G*K + [bias]*C (+ 2*R for CoordInvolution2d)`.

`CoordInvolution2d` (position-aware): the kernel generator also sees the coordinates X, Y of the output
pixel (the kernel centre, `posconv.layers.coords` conventions): `reduce(xbar) + coord_weight @ (X, Y)` before
the ReLU, i.e. `reduce` with two extra coordinate input channels. `coord_weight` starts at zero, so the
layer starts as the Involution2d with the same weights and the same random draws.
"""

from __future__ import annotations

import hashlib
import os
import platform
import signal
import subprocess
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from posconv.layers import acceleration
from posconv.layers.coords import check_convention, output_grid, pad_amounts, positioned
from posconv.layers.position_term import is_channels_last

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
Pair = tuple[int, int]
Geometry = tuple[Pair, Pair, Pair, Pair]  # kernel_size, stride, dilation, output size
Form = Literal["fast", "unfold"]  # the functional form: shifted products, or the reference's unfold
_FORMS: tuple[Form, ...] = ("fast", "unfold")


# ---- options ----


def _pair(value: Any, option: str, minimum: int) -> Pair:
    """An int or a pair of ints, each at least `minimum`, as (H, W)."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{option} = {value!r}: expected an int or a pair of ints")
    if min(values) < minimum:
        raise ValueError(f"{option} = {value!r}: expected integers >= {minimum}")
    return values  # type: ignore[return-value]


def _padding(padding: Any, stride: Pair) -> Pair | str:
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding = {padding!r}: expected 'same', 'valid', an int or a pair of ints")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding = 'same' needs stride 1 (as in nn.Conv2d), got stride = {stride}")
        return padding
    return _pair(padding, "padding", 0)


def _positive_int(value: Any, option: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{option} = {value!r}: expected an int")
    if value < 1:
        raise ValueError(f"{option} = {value!r}: expected an integer >= 1")
    return value


def kernel_groups(channels: int, groups: int | None, group_channels: int) -> int:
    """G: `groups` if given, else channels // group_channels (at least 1); it must divide `channels`."""
    if groups is None:
        count = max(channels // _positive_int(group_channels, "group_channels"), 1)
        if channels % count:
            raise ValueError(
                f"group_channels = {group_channels}: gives {channels} // {group_channels} = {count} kernel "
                f"groups, which do not divide out_channels = {channels}; choose group_channels or groups so "
                f"that the group count divides out_channels"
            )
        return count
    _positive_int(groups, "groups")
    if channels % groups:
        raise ValueError(
            f"groups = {groups}: expected a number of kernel groups that divides out_channels = {channels}"
        )
    return groups


def parameter_count(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Pair,
    reduction: int = 4,
    group_channels: int = 16,
    *,
    groups: int | None = None,
    bias: bool = True,
    coords: bool = False,
) -> int:
    """Parameters of an Involution2d (CoordInvolution2d with `coords`), by the module docstring's formula."""
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    c = out_channels
    r = max(c // _positive_int(reduction, "reduction"), 1)
    g = kernel_groups(c, groups, group_channels)
    projection = in_channels * out_channels if in_channels != out_channels else 0
    return projection + (c + 1) * r + (r + 1) * g * kh * kw + bias * c + coords * 2 * r


# ---- the operation ----


def pad_sizes(kernel_size: Pair, dilation: Pair, padding: Pair | str) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): how nn.Conv2d pads ("same": the odd pixel at the end)."""
    (top, bottom), (left, right) = (
        pad_amounts(padding if isinstance(padding, str) else padding[axis], kernel_size[axis], dilation[axis])
        for axis in (0, 1)
    )
    return top, bottom, left, right


def check_padding(size: Pair, sizes: tuple[int, int, int, int], padding_mode: str) -> None:
    """Refuse what F.pad refuses: reflecting by the input's size or more, wrapping around more than once."""
    too_large = {"reflect": lambda pad, n: pad >= n, "circular": lambda pad, n: pad > n}.get(padding_mode)
    if too_large and any(too_large(pad, size[index // 2]) for index, pad in enumerate(sizes)):
        rule = "smaller than" if padding_mode == "reflect" else "at most"
        raise ValueError(
            f"padding (top, bottom, left, right) = {sizes} with padding_mode = {padding_mode!r}: "
            f"each must be {rule} the input's size, {size[0]} x {size[1]}"
        )


def padded(x: torch.Tensor, sizes: tuple[int, int, int, int], padding_mode: str) -> torch.Tensor:
    """x~: `x` padded by `sizes` (top, bottom, left, right), in x's memory format."""
    if not any(sizes):
        return x
    top, bottom, left, right = sizes
    xp = F.pad(x, (left, right, top, bottom), mode="constant" if padding_mode == "zeros" else padding_mode)
    if is_channels_last(x) and not is_channels_last(xp):  # circular padding returns NCHW
        xp = xp.contiguous(memory_format=torch.channels_last)
    return xp


def output_size(padded_size: Pair, kernel_size: Pair, stride: Pair, dilation: Pair) -> Pair:
    size = tuple(
        (p - d * (k - 1) - 1) // s + 1
        for p, k, s, d in zip(padded_size, kernel_size, stride, dilation, strict=True)
    )
    if min(size) < 1:
        raise ValueError(
            f"padded input {tuple(padded_size)} is smaller than the dilated kernel "
            f"(kernel_size = {kernel_size}, dilation = {dilation})"
        )
    return size  # type: ignore[return-value]


def generator_input(
    xp: torch.Tensor, kernel_size: Pair, stride: Pair, dilation: Pair, out_size: Pair
) -> torch.Tensor:
    """xbar: the mean of the stride-sized block of x~ at each output's kernel centre, (B, C, H_out, W_out)."""
    (top, left) = (d * (k - 1) // 2 for k, d in zip(kernel_size, dilation, strict=True))
    source = xp[..., top:, left:]
    if stride != (1, 1):
        source = F.avg_pool2d(source, stride, stride, ceil_mode=True)
    return source[..., : out_size[0], : out_size[1]]


def _taps(kernel_size: Pair, stride: Pair, dilation: Pair, out_size: Pair):
    """(tap index, rows, columns): the slice of x~ that each tap multiplies, row-major as nn.Unfold."""
    for u in range(kernel_size[0]):
        rows = slice(u * dilation[0], u * dilation[0] + (out_size[0] - 1) * stride[0] + 1, stride[0])
        for v in range(kernel_size[1]):
            cols = slice(v * dilation[1], v * dilation[1] + (out_size[1] - 1) * stride[1] + 1, stride[1])
            yield u * kernel_size[1] + v, rows, cols


class _ShiftedProducts(torch.autograd.Function):
    """`bias + sum over taps of slice(x~) * kernel[tap]`, saving only x~ and the kernels (one dtype)."""

    @staticmethod
    def forward(
        ctx: Any,
        xp: torch.Tensor,
        kernel: torch.Tensor,
        bias: torch.Tensor | None,
        geometry: Geometry,
        channels_last: bool,
    ) -> torch.Tensor:
        kernel_size, _, _, (h, w) = geometry
        b, c = xp.shape[:2]
        g = kernel.shape[1] // (kernel_size[0] * kernel_size[1])
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((b, c, h, w), dtype=xp.dtype, device=xp.device, memory_format=memory_format)
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.view(1, c, 1, 1).expand_as(out))
        grouped, kernels = out.unflatten(1, (g, c // g)), kernel.unflatten(1, (g, -1))
        for tap, rows, cols in _taps(*geometry):
            grouped.addcmul_(xp[:, :, rows, cols].unflatten(1, (g, c // g)), kernels[:, :, tap, None])
        ctx.save_for_backward(xp, kernel)
        ctx.geometry, ctx.has_bias = geometry, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xp, kernel = ctx.saved_tensors
        c = xp.shape[1]
        g = kernel.shape[1] // (ctx.geometry[0][0] * ctx.geometry[0][1])
        grouped, kernels = grad.unflatten(1, (g, c // g)), kernel.unflatten(1, (g, -1))
        xp_grad = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        kernel_grads = []
        for tap, rows, cols in _taps(*ctx.geometry):
            if xp_grad is not None:
                xp_grad[:, :, rows, cols].unflatten(1, (g, c // g)).addcmul_(
                    grouped, kernels[:, :, tap, None]
                )
            if ctx.needs_input_grad[1]:
                kernel_grads.append((grouped * xp[:, :, rows, cols].unflatten(1, (g, c // g))).sum(2))
        kernel_grad = torch.stack(kernel_grads, 2).flatten(1, 2) if kernel_grads else None
        bias_grad = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return xp_grad, kernel_grad, bias_grad, None, None


def _aggregate(
    xp: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, geometry: Geometry, channels_last: bool
) -> torch.Tensor:
    """`_ShiftedProducts` computed in at least float32, returned in the promoted dtype of `xp` and `kernel`
    (under autocast: the kernel's, the dtype nn.Conv2d would return)."""
    out_dtype = torch.promote_types(xp.dtype, kernel.dtype)
    if torch.is_autocast_enabled(xp.device.type):
        out_dtype = kernel.dtype
    dtype = torch.promote_types(out_dtype, torch.float32)
    bias = None if bias is None else bias.to(dtype)
    y = _ShiftedProducts.apply(xp.to(dtype), kernel.to(dtype), bias, geometry, channels_last)
    return y.to(out_dtype)


def _prepare(
    x: torch.Tensor,
    kernel: torch.Tensor,
    options: tuple[Any, Any, Any, Any, str],
) -> tuple[torch.Tensor, Geometry, int]:
    """x~, the geometry (kernel_size, stride, dilation, output size) and G, the kernel checked."""
    kernel_size, stride, padding, dilation, padding_mode = options
    kernel_size, stride, dilation = (
        _pair(kernel_size, "kernel_size", 1),
        _pair(stride, "stride", 1),
        _pair(dilation, "dilation", 1),
    )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode = {padding_mode!r}: expected one of {', '.join(PADDING_MODES)}")
    xp = padded(x, pad_sizes(kernel_size, dilation, _padding(padding, stride)), padding_mode)
    out_size = output_size(tuple(xp.shape[-2:]), kernel_size, stride, dilation)
    taps = kernel_size[0] * kernel_size[1]
    groups = kernel.shape[1] // taps if kernel.dim() == 4 else 0
    expected = (x.shape[0], groups * taps, *out_size)
    if not groups or tuple(kernel.shape) != expected or x.shape[1] % groups:
        raise ValueError(
            f"kernel of shape {tuple(kernel.shape)} for input {tuple(x.shape)}: expected (B, G*{taps}, "
            f"{out_size[0]}, {out_size[1]}) with G dividing the {x.shape[1]} channels"
        )
    return xp, (kernel_size, stride, dilation, out_size), groups


def involution(
    x: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: int | Pair,
    stride: int | Pair = 1,
    padding: int | Pair | str = 0,
    dilation: int | Pair = 1,
    padding_mode: str = "zeros",
    bias: torch.Tensor | None = None,
    *,
    form: Form = "fast",
) -> torch.Tensor:
    """Aggregate `x` (B, C, H, W) with per-pixel `kernel` (B, G*kh*kw, H_out, W_out) by shifted products.

    Taps are row-major in the kernel's channels (group g, tap u*kw + v at channel g*kh*kw + u*kw + v),
    as the reference's view of its span output. Computes in at least float32; returns the promoted dtype
    of `x` and `kernel` (under autocast the kernel's) in `x`'s memory format. `form="unfold"` is the
    reference's formulation instead (`_involution_unfold`), for tests and benchmarks.
    """
    if form not in _FORMS:
        raise ValueError(f"form = {form!r}: expected one of {', '.join(_FORMS)}")
    xp, geometry, groups = _prepare(x, kernel, (kernel_size, stride, padding, dilation, padding_mode))
    if form == "unfold":
        return _involution_unfold(xp, kernel, bias, geometry, groups)
    return _aggregate(xp, kernel, bias, geometry, is_channels_last(x))


def _involution_unfold(
    xp: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, geometry: Geometry, groups: int
) -> torch.Tensor:
    """The reference's formulation of `involution`: unfold x~ into (B, G, C/G, kh*kw, H_out, W_out)
    patches, multiply by the kernels and sum over the taps (plus the bias). Autograd saves the unfolded
    input. In the operands' promoted dtype, contiguous."""
    kernel_size, stride, dilation, out_size = geometry
    b, c = xp.shape[:2]
    patches = F.unfold(xp, kernel_size, dilation=dilation, stride=stride)
    patches = patches.view(b, groups, c // groups, -1, *out_size)
    y = (kernel.unflatten(1, (groups, -1)).unsqueeze(2) * patches).sum(3).view(b, c, *out_size)
    return y if bias is None else y + bias[:, None, None]


# ---- the generated involution: a compiled operator, and its eager formulation ----

OP = "involution"  # its name in posconv.layers.acceleration
_SOURCE = Path(__file__).with_suffix(".cpp")
_BUILD_TIMEOUT_S = 300  # a first build takes ~30 s on 2 busy cores
_native: bool | None = None  # whether the operator runs here; None until the first layer asks


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, compute dtype): the output is what nn.Conv2d would return (under autocast the
    autocast dtype); the generator and the aggregation compute in at least float32."""
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if torch.is_autocast_enabled(x.device.type) and out_dtype != torch.float64:
        out_dtype = torch.get_autocast_dtype(x.device.type)
    return out_dtype, torch.promote_types(out_dtype, torch.float32)


def _operator_geometry(layer: Involution2d, sizes: tuple[int, int, int, int]) -> list[int]:
    """The operator's geometry: [kh, kw, sh, sw, dh, dw, G, top, bottom, left, right, padding mode]."""
    mode = PADDING_MODES.index(layer.padding_mode)
    return [*layer.kernel_size, *layer.stride, *layer.dilation, layer.groups, *sizes, mode]


def _geometry_of(flat: list[int], x: torch.Tensor) -> tuple[Geometry, tuple[int, int, int, int], str]:
    """The geometry (output size included), the padding sizes and mode that `flat` gives input `x`."""
    kernel_size, stride, dilation = (flat[0], flat[1]), (flat[2], flat[3]), (flat[4], flat[5])
    top, bottom, left, right = flat[7:11]
    size = output_size(
        (x.shape[-2] + top + bottom, x.shape[-1] + left + right), kernel_size, stride, dilation
    )
    return (kernel_size, stride, dilation, size), (top, bottom, left, right), PADDING_MODES[flat[11]]


def _generated_eager(
    x: torch.Tensor,
    project: torch.Tensor | None,
    wr: torch.Tensor,
    br: torch.Tensor,
    term: torch.Tensor | None,
    ws: torch.Tensor,
    bs: torch.Tensor,
    bias: torch.Tensor | None,
    flat: list[int],
    channels_last: bool,
) -> torch.Tensor:
    """The operator's function in PyTorch ops: the projection and the generator's `wr`, `ws` as 1x1
    convolutions, x~ by F.pad, kernels `ws @ relu(wr @ xbar + br + term) + bs`, aggregated by
    `_ShiftedProducts`. All in one dtype, differentiable twice."""
    x = x if project is None else F.conv2d(x, project[..., None, None])
    geometry, sizes, padding_mode = _geometry_of(flat, x)
    xp = padded(x, sizes, padding_mode)
    features = F.conv2d(generator_input(xp, *geometry), wr[..., None, None], br)
    features = features if term is None else features + term
    kernel = F.conv2d(torch.relu(features), ws[..., None, None], bs)
    return _ShiftedProducts.apply(xp, kernel, bias, geometry, channels_last)


def _build_command(target: Path) -> list[str]:
    """The compiler line for the operator library (`CXX`, else c++), torch's headers and libraries."""
    from torch.utils import cpp_extension

    libraries = cpp_extension.library_paths()
    return [
        os.environ.get("CXX", "c++"),
        *("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20"),
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        str(_SOURCE),
        "-o",
        str(target),
        *(f"-L{path}" for path in libraries),
        *(f"-Wl,-rpath,{path}" for path in libraries),
        *("-lc10", "-ltorch_cpu", "-ltorch"),
    ]


def _cpu() -> str:
    """The CPU's model and flags: a library built with -march=native is only reused where they match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _library() -> Path:
    """The operator library, built once per source, torch, compiler line and CPU, in torch's extension
    cache ($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions, as cpp_extension.load). The compiler
    writes a private file renamed into place: processes that build at once each get a whole library, and
    none waits on a lock that a killed build left behind (cpp_extension.load's FileBaton would)."""
    from torch.utils import cpp_extension

    key = "\n".join([_SOURCE.read_text(), torch.__version__, *_build_command(Path("out")), _cpu()])
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = Path(root) / "posconv_involution"
    library = folder / f"involution_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    try:
        _compile(_build_command(partial))
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library


def _compile(command: list[str]) -> None:
    """Run the compiler, or raise; past _BUILD_TIMEOUT_S its whole process group is killed (the driver's
    children too, which would otherwise hold its pipes open), so a stuck compiler cannot hang us."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            _, errors = process.communicate(timeout=_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command, stderr=errors)


def _why_not(error: Exception) -> str:
    """The reason in the fallback's warning line."""
    if isinstance(error, subprocess.CalledProcessError):
        lines = (error.stderr or "").strip().splitlines()
        first = next((line for line in lines if "error" in line), lines[-1] if lines else "")
        return f"its C++ operator did not build ({first or f'exit status {error.returncode}'})"
    if isinstance(error, subprocess.TimeoutExpired):
        return f"its C++ operator did not build within {_BUILD_TIMEOUT_S} s"
    if isinstance(error, FileNotFoundError) and error.filename == _build_command(Path())[0]:
        return f"no C++ compiler ({error.filename!r} not found; set CXX)"
    return f"its C++ operator is unavailable ({type(error).__name__}: {error})"


def native_ready() -> bool:
    """Whether the compiled operator runs in this process: built (or found built) and loaded at the first
    call, else the one warning line and the eager formulation from then on. Recorded in `acceleration`."""
    global _native
    if _native is None:
        if not acceleration.enabled():
            acceleration.fall_back(OP, f"{acceleration.SWITCH}=0")
            _native = False
            return _native
        try:
            torch.ops.load_library(str(_library()))
            _register_operator()
            _native = True
            acceleration.record(OP, "cpp")
        except Exception as error:  # any failure to build or load means: run eagerly
            acceleration.fall_back(OP, _why_not(error))
            _native = False
    return _native


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _register_operator() -> None:
    """Shapes for tracing (torch.compile, fake tensors) and the autograd formula of the loaded operator."""
    backward = torch.ops.posconv_involution.backward

    def forward_shape(x: torch.Tensor, project: torch.Tensor | None, *rest: Any) -> torch.Tensor:
        *_, flat, channels_last = rest
        channels = x.shape[1] if project is None else project.shape[0]
        size = _geometry_of(flat, x)[0][3]
        return x.new_empty((x.shape[0], channels, *size)).contiguous(memory_format=_layout(channels_last))

    def backward_shapes(grad: torch.Tensor, x: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, ...]:
        project, wr, br, term, ws, bs, has_bias, _, _, input_grad = rest
        empty = x.new_empty(0)
        like = [empty if t is None else torch.empty_like(t) for t in (project, wr, br, None, ws, bs)]
        like[3] = empty if term is None else x.new_empty((x.shape[0], *term.shape))
        x_grad = torch.empty_like(x) if input_grad or project is None else empty
        return x_grad, *like, x.new_empty(grad.shape[1]) if has_bias else empty

    def save(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        *tensors, ctx.flat, ctx.channels_last = inputs
        ctx.save_for_backward(*tensors)

    def gradients(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, project, wr, br, term, ws, bs, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable backward, through the eager form
            return _differentiable_gradients(ctx, grad)
        grad = grad.contiguous(memory_format=_layout(ctx.channels_last))
        input_grad = ctx.needs_input_grad[0]
        arguments = (x, project, wr, br, term, ws, bs, bias is not None, ctx.flat, ctx.channels_last)
        with torch.autocast(x.device.type, enabled=False):  # (a backward called under autocast)
            gx, gproject, gwr, gbr, gterm, gws, gbs, gbias = backward(grad, *arguments, input_grad)
        results = [gx if input_grad else None, gproject if project is not None else None, gwr, gbr]
        results += [None if term is None else gterm.sum(0), gws, gbs, None if bias is None else gbias]
        return (*results, None, None)

    torch.library.register_fake("posconv_involution::forward")(forward_shape)
    torch.library.register_fake("posconv_involution::backward")(backward_shapes)
    torch.library.register_autograd("posconv_involution::forward", gradients, setup_context=save)


def _differentiable_gradients(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The operator's gradients as a graph (double backward): the eager formulation recomputed."""
    inputs = ctx.saved_tensors
    wanted = [t is not None and needs for t, needs in zip(inputs, ctx.needs_input_grad, strict=False)]
    with torch.enable_grad(), torch.autocast(grad.device.type, enabled=False):
        y = _generated_eager(*inputs, ctx.flat, ctx.channels_last)
    found = iter(
        torch.autograd.grad(y, [t for t, w in zip(inputs, wanted, strict=True) if w], grad, create_graph=True)
    )
    return (*(next(found) if w else None for w in wanted), None, None)


def _generated(
    x: torch.Tensor,
    weights: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    term: torch.Tensor | None,
    bias: torch.Tensor | None,
    flat: list[int],
    channels_last: bool,
) -> torch.Tensor:
    """The generated involution of x (all in one dtype; weights: project or None, wr, br, ws, bs): the
    compiled operator on CPU where it runs, else the eager formulation."""
    project, wr, br, ws, bs = weights
    if x.device.type == "cpu" and (_native if torch.compiler.is_compiling() else native_ready()):
        x = x.contiguous(memory_format=_layout(channels_last))
        operator = torch.ops.posconv_involution.forward
        return operator(x, project, wr, br, term, ws, bs, bias, flat, channels_last)
    if x.device.type != "cpu" and not torch.compiler.is_compiling():
        acceleration.fall_back(OP, f"no compiled implementation on {x.device.type}")
    return _generated_eager(x, project, wr, br, term, ws, bs, bias, flat, channels_last)


# ---- the layers ----


class Involution2d(nn.Module):
    """Involution with nn.Conv2d's signature (see the module docstring for its semantics)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Pair,
        stride: int | Pair = 1,
        padding: int | Pair | str = 0,
        dilation: int | Pair = 1,
        groups: int | None = None,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        reduction: int = 4,
        group_channels: int = 16,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _padding(padding, self.stride)
        self.dilation = _pair(dilation, "dilation", 1)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode = {padding_mode!r}: expected one of {', '.join(PADDING_MODES)}")
        self.padding_mode = padding_mode
        self.reduction = _positive_int(reduction, "reduction")
        self.group_channels = _positive_int(group_channels, "group_channels")
        self.groups = kernel_groups(out_channels, groups, group_channels)
        self.reduced_channels = max(out_channels // reduction, 1)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.project = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False, **factory)
            if in_channels != out_channels
            else None
        )
        self.reduce = nn.Conv2d(out_channels, self.reduced_channels, 1, **factory)
        self.span = nn.Conv2d(self.reduced_channels, self.groups * taps, 1, **factory)
        if not isinstance(bias, bool):
            raise TypeError(f"bias = {bias!r}: expected a bool")
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        if self.reduce.weight.device.type == "cpu":
            native_ready()  # build the operator now, not while an outer torch.compile traces a forward

    def reset_parameters(self) -> None:
        """The 1x1 convolutions as nn.Conv2d initialises them; the output bias at zero."""
        for conv in (self.project, self.reduce, self.span):
            if conv is not None:
                conv.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def generator_term(self, x: torch.Tensor, out_size: Pair) -> torch.Tensor | None:
        """What the generator adds to `reduce(xbar)` before its ReLU, (R, H_out, W_out): nothing here."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = is_channels_last(x)
        out_dtype, dtype = _compute_dtype(x, self.reduce.weight)
        sizes = pad_sizes(self.kernel_size, self.dilation, self.padding)
        check_padding((x.shape[-2], x.shape[-1]), sizes, self.padding_mode)
        flat = _operator_geometry(self, sizes)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            out_size = _geometry_of(flat, x)[0][3]
            project, reduce, span = self.project, self.reduce, self.span
            weights = (reduce.weight.flatten(1), reduce.bias, span.weight.flatten(1), span.bias)
            project_weight = None if project is None else project.weight.flatten(1).to(dtype).contiguous()
            weights = (project_weight, *(w.to(dtype).contiguous() for w in weights))
            bias = None if self.bias is None else self.bias.to(dtype)
            y = _generated(x, weights, self.generator_term(x, out_size), bias, flat, channels_last)
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
            f", padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
            f", reduction={self.reduction}, bias={self.bias is not None}"
        )
        return text + ("" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode}")


class CoordInvolution2d(Involution2d):
    """Involution whose kernel generator also sees X, Y of the output pixels: `coord_weight` (R, 2)."""

    def __init__(self, *args: Any, coords: str = "centered", **kwargs: Any) -> None:
        """`args`, `kwargs`: Involution2d's; `coords` a `posconv.layers.coords` convention."""
        check_convention(coords)
        super().__init__(*args, **kwargs)
        self.coords = coords
        weight = self.reduce.weight
        self.coord_weight = nn.Parameter(weight.new_zeros(self.reduced_channels, 2))

    def reset_parameters(self) -> None:
        """Involution2d's initialisation, and `coord_weight` at zero: the plain layer's start."""
        super().reset_parameters()
        nn.init.zeros_(self.coord_weight)

    def generator_term(self, x: torch.Tensor, out_size: Pair) -> torch.Tensor:
        """`coord_weight @ (X, Y)` of the output pixels (kernel centres), (R, H_out, W_out), in x's dtype."""
        geometry = (self.kernel_size, self.stride, self.dilation, self.padding)
        grid = output_grid((x.shape[-2], x.shape[-1]), out_size, *geometry, self.coords, x.device, x.dtype)
        basis = positioned(grid.flatten(1), self.coords)
        return (self.coord_weight.to(x.dtype) @ basis).view(-1, *out_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coords={self.coords}"
