"""The data set on disk: scenes as memory-mappable .npy arrays plus a circle table, and the splits.

Writers and loaders live together so the file format is defined in one place. Loaders check what
they read, so a missing or corrupt file is one clear `BadInput` line instead of a traceback later.
"""

from __future__ import annotations

import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
from tqdm import tqdm

from posconv.errors import BadInput
from posconv.registry import N_CLASSES
from posconv.scenes import CIRCLE_COLUMNS, CIRCLES, Scenes, draw_scenes, image_stream

IMAGES, LABELS, OWNERS, CIRCLE_TABLE = "images.npy", "labels.npy", "owners.npy", "circles.csv"
SPLITS = ("train", "val", "test")
CHUNK = 32  # images drawn at once: big enough for fast numpy, small enough to stay in cache (measured)


def _write_npy_header(file: BinaryIO, shape: tuple[int, ...]) -> None:
    """Start a uint8 .npy file of `shape`; its data is then appended in order.

    Appending with write() is about 10x faster than assigning into a fresh memmap (a page fault per
    page), and the file is the same memory-mappable .npy.
    """
    np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})


def write_scenes(
    directory: str | Path, seed: int, size: int, count: int, chunk: int = CHUNK, progress: bool = False
) -> None:
    """Draw `count` scenes into a new `directory`, `chunk` images at a time.

    Each chunk is appended to the files, so memory does not grow with `count`. The result does not
    depend on `chunk` (see `image_stream`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True)
    shapes = {IMAGES: (count, size, size, 3), LABELS: (count, size, size), OWNERS: (count, size, size)}
    with ExitStack() as stack:
        files = {name: stack.enter_context(open(directory / name, "wb")) for name in shapes}
        table = stack.enter_context(open(directory / CIRCLE_TABLE, "w", newline=""))
        bar = stack.enter_context(tqdm(total=count, unit="img", desc="generate", disable=not progress))
        for name, shape in shapes.items():
            _write_npy_header(files[name], shape)
        for first in range(0, count, chunk):
            n = min(chunk, count - first)
            scenes = draw_scenes(n, size, image_stream(seed, first), first_id=first)
            for file, part in zip(files.values(), (scenes.images, scenes.labels, scenes.owners), strict=True):
                file.write(part.data)
            scenes.circles.to_csv(table, header=first == 0, index=False)
            bar.update(n)


def _check_uint8(array: np.ndarray, where: str, spec: tuple[int | str, ...], dims: dict[str, int]) -> None:
    """Raise unless `array` is uint8 of shape `spec`; named dimensions agree with `dims` (filled as seen)."""
    ok = array.dtype == np.uint8 and array.ndim == len(spec)
    if ok:
        want = tuple(
            dims.setdefault(w, got) if isinstance(w, str) else w
            for w, got in zip(spec, array.shape, strict=True)
        )
        ok = want == array.shape
    if not ok:
        shape = ", ".join(f"{w}={dims[w]}" if w in dims else str(w) for w in spec)
        raise BadInput(f"{where}: expected uint8 of shape ({shape}), found {array.dtype} {array.shape}")


def _regular_file(path: Path, kind: str, missing_hint: str) -> None:
    """Refuse a missing path, or one that is not a regular file (a folder, a device, a pipe), by name."""
    if not path.exists():
        raise BadInput(f"{path}: file not found ({missing_hint})")
    if not path.is_file():
        raise BadInput(f"{path}: not a regular file (expected {kind})")


def _load_uint8(path: Path, spec: tuple[int | str, ...], dims: dict[str, int], mmap: bool) -> np.ndarray:
    """Load a uint8 .npy of shape `spec` (see `_check_uint8`), memory-mapped if `mmap`."""
    _regular_file(path, "a .npy array", "run the generate stage first")
    try:
        array = np.lib.format.open_memmap(path, mode="r")  # only a real .npy opens
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found (run the generate stage first)") from None
    except (OSError, ValueError) as error:
        raise BadInput(f"{path}: not a readable .npy array ({error})") from None
    _check_uint8(array, str(path), spec, dims)
    return array if mmap else np.array(array)


def _check_classes(labels: np.ndarray, where: str) -> np.ndarray:
    """Refuse a label outside the classes, which would otherwise fail deep inside a loss or a count."""
    if labels.size and (high := int(labels.max())) >= N_CLASSES:
        raise BadInput(f"{where}: labels hold {high}, expected classes 0..{N_CLASSES - 1}")
    return labels


def load_labels(directory: str | Path, mmap: bool = True) -> np.ndarray:
    """Only the label maps (N, S, S): what the split needs, without touching the images."""
    path = Path(directory) / LABELS
    return _check_classes(_load_uint8(path, ("N", "S", "S"), {}, mmap), str(path))


def _load_circles(path: Path, images: int) -> pd.DataFrame:
    try:
        circles = pd.read_csv(path)  # pandas >= 3 parses floats exactly: pixels follow them
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found (run the generate stage first)") from None
    except (OSError, ValueError) as error:
        raise BadInput(f"{path}: not a readable CSV table ({error})") from None
    if tuple(circles.columns) != CIRCLE_COLUMNS or len(circles) != CIRCLES * images:
        raise BadInput(
            f"{path}: expected columns {', '.join(CIRCLE_COLUMNS)} and {CIRCLES * images} rows, "
            f"found {', '.join(map(str, circles.columns))} and {len(circles)} rows"
        )
    return circles


def load_scenes(directory: str | Path, mmap: bool = True) -> Scenes:
    """Load what `write_scenes` wrote, arrays memory-mapped (read-only) unless `mmap` is False."""
    directory = Path(directory)
    dims: dict[str, int] = {}
    images = _load_uint8(directory / IMAGES, ("N", "S", "S", 3), dims, mmap)
    labels = _check_classes(
        _load_uint8(directory / LABELS, ("N", "S", "S"), dims, mmap), str(directory / LABELS)
    )
    owners = _load_uint8(directory / OWNERS, ("N", "S", "S"), dims, mmap)
    return Scenes(images, labels, owners, _load_circles(directory / CIRCLE_TABLE, len(images)))


def draw_unseen(seed: int, images: int, n: int, size: int) -> tuple[Scenes, np.ndarray]:
    """`n` scenes of `size` px that the data set of `images` images never holds: ids `images`,
    `images + 1`, ... of the same random stream, drawn by the same rules. Their draws do not depend on
    `size`, so every size shows the same scenes (the rules scale with the image); with their ids."""
    return draw_scenes(n, size, image_stream(seed, images), first_id=images), np.arange(images, images + n)


def class_pixel_counts(labels: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Pixels of each class in each image, int64 (N, classes); reads a memory-mapped set in chunks."""
    counts = np.empty((len(labels), N_CLASSES), np.int64)
    for first in range(0, len(labels), chunk):
        part = np.asarray(labels[first : first + chunk])
        for cls in range(N_CLASSES):
            counts[first : first + len(part), cls] = np.count_nonzero(part == cls, axis=(1, 2))
    return counts


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    """A mask of `k` positions spread evenly over `n` (exactly `k` True)."""
    return np.diff(np.arange(n + 1) * k // n) > 0


def stratified_split(
    strata: np.ndarray, sizes: dict[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Split image indices into `sizes` (summing to len(strata)), each stratum shared in proportion.

    Images are ordered by stratum, shuffled within it; each split in turn takes evenly spaced
    positions of what is left. So each split gets every stratum's share to within about one image,
    and the split sizes are exact.
    """
    remaining = np.lexsort((rng.permutation(len(strata)), strata))
    split = {}
    for name, size in sizes.items():
        take = _evenly_spaced(len(remaining), size)
        split[name] = np.sort(remaining[take]).astype(np.int64)
        remaining = remaining[~take]
    return split


def save_split(path: str | Path, split: dict[str, np.ndarray]) -> None:
    """Write `split` as .npz; unlike np.savez, with fixed zip timestamps: same split, same bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, indices in split.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy"), "w") as member:
                np.lib.format.write_array(member, indices, allow_pickle=False)


def _read_npz(path: str | Path, names: tuple[str, ...], missing_hint: str) -> dict[str, np.ndarray]:
    """The arrays `names` of an .npz file, read into memory."""
    _regular_file(Path(path), "an .npz archive", missing_hint)
    if not zipfile.is_zipfile(path):
        raise BadInput(f"{path}: not an .npz archive (a zip of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in names if name in archive}
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found ({missing_hint})") from None
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as error:  # TypeError: a plain .npy
        raise BadInput(f"{path}: not a readable .npz archive ({error})") from None
    if len(arrays) != len(names):
        raise BadInput(f"{path}: expected arrays {', '.join(names)}, found {', '.join(arrays) or 'none'}")
    return arrays


def load_split(path: str | Path, images: int | None = None) -> dict[str, np.ndarray]:
    """The index arrays `train`, `val`, `test` (sorted int64) that the split stage wrote; with
    `images`, every index must name one of them (a negative index would silently count from the end)."""
    split = _read_npz(path, SPLITS, "run the split stage first")
    if any(a.dtype != np.int64 or a.ndim != 1 for a in split.values()):
        raise BadInput(f"{path}: expected 1-D int64 arrays {', '.join(SPLITS)}")
    limit = np.iinfo(np.int64).max if images is None else images
    for name, indices in split.items():
        if (outside := indices[(indices < 0) | (indices >= limit)]).size:
            raise BadInput(
                f"{path}: {name} holds index {outside[0]}, expected 0..{limit - 1} (run split again)"
            )
    return split


def load_labelled_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """`images` uint8 (N, H, W, 3) and `labels` uint8 (N, H, W) from any .npz, e.g. to evaluate on."""
    arrays = _read_npz(path, ("images", "labels"), "expected an .npz of images and labels")
    dims: dict[str, int] = {}
    _check_uint8(arrays["images"], f"{path}: images", ("N", "H", "W", 3), dims)
    _check_uint8(arrays["labels"], f"{path}: labels", ("N", "H", "W"), dims)
    if not all(arrays["images"].shape):
        raise BadInput(
            f"{path}: images {arrays['images'].shape}: expected at least one image of at least 1 px"
        )
    return arrays["images"], _check_classes(arrays["labels"], str(path))
