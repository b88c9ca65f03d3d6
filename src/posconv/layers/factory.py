"""The factory: every layer built by name with `nn.Conv2d`'s signature, so that a model never branches
on the layer type. Each family lives in a module of its own:

- `vanilla`: `nn.Conv2d`;
- `coordbias`, `coordconv` (seeds 000, 001): `position`, a fixed position term added to the output;
- `involution`, `coordinvolution` (seed 003): `involution`, a kernel generated per pixel from the input
  there (and, for coordinvolution, from its coordinates too), shared across a group's channels;
- `deform`, `coorddeform` (seed 004): `deform`, deformable convolution v2, learned per-pixel offsets and
  modulation (and, for coorddeform, the coordinate bias);
- `dss`, `dss_bilinear`, `dss_deform` (seed 004's proposal): `scale_space`, Deep Scale-Spaces: the input
  lifted to a stack of scales (discrete Gaussian blurs; bilinear shrink-and-stretch), one kernel dilated
  per scale (with learned offsets for dss_deform), max over scales;
- `local` (seed 003's spatial-specific filter): `local`, a locally connected layer, an nn.Conv2d kernel of
  its own at every output location (lazy: laid out at the first forward, resampled at other sizes).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from posconv.layers.deform import CoordDeformConv2d, DeformConv2d
from posconv.layers.involution import CoordInvolution2d, Involution2d
from posconv.layers.local import LocalConv2d
from posconv.layers.position import CoordBias2d, CoordConv2d
from posconv.layers.scale_space import BilinearScaleSpaceConv2d, DeformScaleSpaceConv2d, ScaleSpaceConv2d
from posconv.registry import (
    COORD_DEFORM,
    COORD_INVOLUTION,
    COORDBIAS,
    COORDCONV,
    DEFORM,
    DSS,
    DSS_BILINEAR,
    DSS_DEFORM,
    FACTORY_LAYERS,
    INVOLUTION,
    LOCAL,
    VANILLA,
)

LAYER_CLASSES: dict[str, type[nn.Module]] = {
    VANILLA: nn.Conv2d,
    COORDBIAS: CoordBias2d,
    COORDCONV: CoordConv2d,
    INVOLUTION: Involution2d,
    COORD_INVOLUTION: CoordInvolution2d,
    DEFORM: DeformConv2d,
    COORD_DEFORM: CoordDeformConv2d,
    DSS: ScaleSpaceConv2d,
    DSS_BILINEAR: BilinearScaleSpaceConv2d,
    DSS_DEFORM: DeformScaleSpaceConv2d,
    LOCAL: LocalConv2d,
}
LAYER_OPTIONS: dict[str, tuple[str, ...]] = {  # what each layer takes beyond nn.Conv2d's signature
    VANILLA: (),
    COORDBIAS: ("coords", "coords_per_input"),
    COORDCONV: ("coords", "with_r"),
    INVOLUTION: ("reduction", "group_channels"),
    COORD_INVOLUTION: ("coords", "reduction", "group_channels"),
    DEFORM: ("offset_groups",),
    COORD_DEFORM: ("coords", "offset_groups"),
    DSS: ("base", "zero_scale", "levels", "interaction"),
    DSS_BILINEAR: ("base", "levels", "interaction"),
    DSS_DEFORM: ("base", "zero_scale", "levels", "interaction", "offset_groups"),
    LOCAL: (),
}
_CONV_ARGUMENTS = ("stride", "padding", "dilation", "groups", "bias", "padding_mode", "device", "dtype")


def make_conv(name: str, in_channels: int, out_channels: int, kernel_size: Any, **options: Any) -> nn.Module:
    """Build layer `name` with `nn.Conv2d`'s signature plus the options that layer takes.

    An unknown name is a ValueError, an option the layer does not take a TypeError: nothing is dropped.
    """
    if name not in LAYER_CLASSES:
        raise ValueError(f"layer {name!r}: expected one of {', '.join(FACTORY_LAYERS)}")
    unknown = sorted(set(options) - set(LAYER_OPTIONS[name]) - set(_CONV_ARGUMENTS))
    if unknown:
        takes = ", ".join(LAYER_OPTIONS[name]) or "none"
        raise TypeError(f"layer {name!r} takes no option {', '.join(unknown)} (its own options: {takes})")
    return LAYER_CLASSES[name](in_channels, out_channels, kernel_size, **options)
