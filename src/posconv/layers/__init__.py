"""Convolutions that know where they are, and the content-adaptive families, behind one factory.

`make_conv(name, c_in, c_out, k, **options)` builds any of them (`factory`); one module per family:
`position` (coordbias, coordconv), `involution`, `deform`, `scale_space` (dss, dss_bilinear, dss_deform:
Deep Scale-Spaces), `local` (a locally connected layer); shared machinery in `coords` (coordinate
maps), `position_term` (the term and its gradient) and `fused` (the opt-in oneDNN backend).
"""

from posconv.layers.factory import LAYER_CLASSES, LAYER_OPTIONS, make_conv
from posconv.layers.position import CoordBias2d, CoordConv2d

__all__ = ["LAYER_CLASSES", "LAYER_OPTIONS", "CoordBias2d", "CoordConv2d", "make_conv"]
