"""Whether the params fit the machine: bytes a stage needs against the free disk and memory, up front.

A data set or an evaluation too big for the machine should be refused in one line before it starts,
not found out minutes later by a full disk or a memory error. The figures are lower bounds (the
arrays the stage must hold at once; the network's activations counted at one float32 map per channel),
so a refusal is certain and a pass is not a promise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from posconv.config import Params
from posconv.errors import BadInput

SCENE_BYTES_PER_PIXEL = 3 + 1 + 1  # images (RGB), labels, owners: uint8 each
FLOAT = 4


def _human(count: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    raise AssertionError


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing folder)."""
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def available_memory() -> int:
    """Bytes the kernel says a new process can use without swapping (MemAvailable), or all RAM."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require(needed: int, available: int, what: str, where: str) -> None:
    """Refuse `what` in one line when it needs more than is `available` (`where`: disk or memory)."""
    if needed > available:
        raise BadInput(f"{what}: needs at least {_human(needed)} of {where}, {_human(available)} available")


def generate_disk(params: Params) -> int:
    """The data set on disk: three uint8 arrays per image, and its circle table (~40 bytes a row)."""
    pixels = params.generate.size**2
    return params.generate.images * (pixels * SCENE_BYTES_PER_PIXEL + 3 * 40)


def train_memory(params: Params) -> int:
    """Training holds the train and validation images and labels (a copy from the memory-mapped set
    and the tensors made from it), and one batch's saved activations (a few maps per channel)."""
    sizes, side = params.split_sizes(), params.generate.size
    data = 2 * (sizes["train"] + sizes["val"]) * side**2 * (3 + 1)
    activations = params.train.batch_size * side**2 * FLOAT * 8 * params.model.width
    return data + activations


def evaluate_memory(params: Params) -> int:
    """Scoring holds the test scenes and, at each transfer size, as many unseen scenes (scenes, their
    copies and predictions), and one batch's logits and activations."""
    test = params.split_sizes()["test"]
    sides = [params.generate.size, *params.evaluate.sizes]
    scenes = sum(3 * test * side**2 * SCENE_BYTES_PER_PIXEL for side in sides)
    activations = params.evaluate.batch_size * max(sides) ** 2 * FLOAT * 4 * params.model.width
    return scenes + activations


def check_generate(params: Params, root: str | Path = ".") -> None:
    g = params.generate
    needed, free = generate_disk(params), free_disk(Path(root) / "data")
    require(needed, free, f"generate.images = {g.images} at generate.size = {g.size}", "disk")


def check_train(params: Params) -> None:
    g = params.generate
    require(
        train_memory(params), available_memory(), f"training on {g.images} images of {g.size} px", "memory"
    )


def check_evaluate(params: Params) -> None:
    e = params.evaluate
    where = f"evaluating at evaluate.sizes = {e.sizes}, evaluate.batch_size = {e.batch_size}"
    require(evaluate_memory(params), available_memory(), where, "memory")


def check(params: Params, root: str | Path = ".") -> None:
    """Every stage's needs against this machine; the first that does not fit is one BadInput line."""
    check_generate(params, root)
    check_train(params)
    check_evaluate(params)
