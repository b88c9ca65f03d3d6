"""Which implementation each accelerated op runs, and the one switch that turns acceleration off.

Some ops (involution's aggregation, deformable convolution's sampling) have a compiled implementation
(Inductor through `torch.compile`, or a C++ operator built at first use with the machine's compiler)
beside an eager PyTorch one that computes the same function. The compiled one runs where it can be
built; where it cannot (no compiler, a failed build), the op says so in one warning line, once, and
runs the eager one: never a crash, never a hang. What ran is recorded here per op, so that a stage can
report it (the train stage puts `backends()` in its metrics).

`POSCONV_ACCELERATE=0` in the environment runs every op eagerly (for a comparison, or a machine whose
compiler misbehaves).
"""

from __future__ import annotations

import os
import warnings

SWITCH = "POSCONV_ACCELERATE"
EAGER = "eager"
_chosen: dict[str, str] = {}


def enabled() -> bool:
    """Whether compiled implementations may be used (`POSCONV_ACCELERATE` is not "0")."""
    return os.environ.get(SWITCH, "1") != "0"


def record(op: str, backend: str) -> None:
    """Note that `op` runs on `backend` (e.g. "inductor", "cpp", "eager")."""
    _chosen[op] = backend


def fall_back(op: str, reason: str) -> None:
    """`op` runs eagerly because `reason`: one warning line the first time, and the choice recorded."""
    if _chosen.get(op) != EAGER:
        warnings.warn(f"posconv: {op}: {reason}; running its eager implementation", stacklevel=2)
    record(op, EAGER)


def backends() -> dict[str, str]:
    """op -> the backend it ran on, for every accelerated op used in this process."""
    return dict(_chosen)
