"""The data set on disk: round trips, chunk independence, checked loads, and the stratified split."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from posconv.data import (
    CIRCLE_TABLE,
    IMAGES,
    LABELS,
    OWNERS,
    class_pixel_counts,
    draw_unseen,
    load_labelled_npz,
    load_labels,
    load_scenes,
    load_split,
    save_split,
    stratified_split,
    write_scenes,
)
from posconv.errors import BadInput
from posconv.scenes import draw_scenes, image_stream


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("data") / "scenes"
    write_scenes(directory, seed=4, size=32, count=20, chunk=8)
    return directory


def test_write_then_load_gives_the_drawn_scenes(scenes_dir: Path) -> None:
    loaded = load_scenes(scenes_dir)
    drawn = draw_scenes(20, 32, image_stream(4, 0))
    assert isinstance(loaded.images, np.memmap)
    for name in ("images", "labels", "owners"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(drawn, name))
    pd.testing.assert_frame_equal(loaded.circles, drawn.circles, check_exact=True)
    in_memory = load_scenes(scenes_dir, mmap=False)
    assert not isinstance(in_memory.images, np.memmap)
    np.testing.assert_array_equal(in_memory.labels, drawn.labels)


def test_files_do_not_depend_on_chunking(scenes_dir: Path, tmp_path: Path) -> None:
    write_scenes(tmp_path / "other", seed=4, size=32, count=20, chunk=3)
    for name in (IMAGES, LABELS, OWNERS, CIRCLE_TABLE):
        assert (tmp_path / "other" / name).read_bytes() == (scenes_dir / name).read_bytes(), name


def copy_scenes(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (IMAGES, None, "images.npy: file not found"),
        (LABELS, np.zeros((20, 32, 32), np.int64), "labels.npy: expected uint8 of shape (N=20, S=32, S=32)"),
        (OWNERS, np.zeros((19, 32, 32), np.uint8), "owners.npy: expected uint8 of shape (N=20, S=32, S=32)"),
        (
            IMAGES,
            np.zeros((20, 32, 31, 3), np.uint8),
            "images.npy: expected uint8 of shape (N=20, S=32, S=32, 3), found uint8 (20, 32, 31, 3)",
        ),
        (LABELS, b"not an array", "labels.npy: not a readable .npy array"),
        (CIRCLE_TABLE, b"image,order\n0,0\n", "circles.csv: expected columns image, order, colour"),
    ],
)
def test_load_rejects_missing_or_wrong_files(
    scenes_dir: Path, tmp_path: Path, name: str, content: np.ndarray | bytes | None, message: str
) -> None:
    broken = copy_scenes(scenes_dir, tmp_path / "scenes")
    if content is None:
        (broken / name).unlink()
    elif isinstance(content, bytes):
        (broken / name).write_bytes(content)
    else:
        np.save(broken / name, content)
    with pytest.raises(BadInput, match=re.escape(message)):
        load_scenes(broken)


def test_load_labels_reads_only_labels(scenes_dir: Path, tmp_path: Path) -> None:
    only = tmp_path / "only"
    only.mkdir()
    (only / LABELS).write_bytes((scenes_dir / LABELS).read_bytes())
    assert load_labels(only).shape == (20, 32, 32)


def test_class_pixel_counts_in_chunks() -> None:
    labels = np.random.default_rng(0).integers(0, 4, (11, 8, 8)).astype(np.uint8)
    want = np.stack([np.bincount(image.ravel(), minlength=4) for image in labels])
    np.testing.assert_array_equal(class_pixel_counts(labels, chunk=4), want)


def test_stratified_split_shares_every_stratum() -> None:
    strata = np.random.default_rng(0).choice(16, 1000, p=np.r_[[0.3, 0.2, 0.1], [0.4 / 13] * 13])
    sizes = {"train": 600, "val": 250, "test": 150}
    split = stratified_split(strata, sizes, np.random.default_rng(1))
    assert {name: len(indices) for name, indices in split.items()} == sizes
    together = np.concatenate(list(split.values()))
    np.testing.assert_array_equal(np.sort(together), np.arange(1000))
    for name, indices in split.items():
        assert indices.dtype == np.int64 and (np.diff(indices) > 0).all()
        for stratum in range(16):
            share = sizes[name] / 1000 * (strata == stratum).sum()
            assert abs((strata[indices] == stratum).sum() - share) <= 2, (name, stratum)
    again = stratified_split(strata, sizes, np.random.default_rng(1))
    other = stratified_split(strata, sizes, np.random.default_rng(2))
    assert all(np.array_equal(split[k], again[k]) for k in sizes)
    assert not np.array_equal(split["val"], other["val"])


def test_split_file_round_trip_is_byte_stable(tmp_path: Path) -> None:
    split = {"train": np.arange(5, dtype=np.int64), "val": np.array([5, 7]), "test": np.array([6])}
    save_split(tmp_path / "a.npz", split)
    save_split(tmp_path / "b.npz", split)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = load_split(tmp_path / "a.npz")
    assert all(np.array_equal(loaded[k], split[k]) for k in split)


@pytest.mark.parametrize("content", [b"garbage", None])
def test_load_split_rejects_bad_files(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "split.npz"
    if content is None:
        np.savez(path, train=np.arange(3), val=np.arange(2, dtype=np.int32), test=np.arange(1))
    else:
        path.write_bytes(content)
    with pytest.raises(BadInput, match=r"split\.npz"):
        load_split(path)
    with pytest.raises(BadInput, match="file not found"):
        load_split(tmp_path / "missing.npz")


def test_labelled_npz_is_checked(tmp_path: Path) -> None:
    images, labels = np.zeros((2, 8, 6, 3), np.uint8), np.ones((2, 8, 6), np.uint8)
    np.savez(tmp_path / "good.npz", images=images, labels=labels)
    loaded = load_labelled_npz(tmp_path / "good.npz")
    np.testing.assert_array_equal(loaded[1], labels)
    np.savez(tmp_path / "bad.npz", images=images, labels=labels[:, :4])
    with pytest.raises(BadInput, match=re.escape("bad.npz: labels: expected uint8 of shape (N=2, H=8, W=6)")):
        load_labelled_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "partial.npz", images=images)
    with pytest.raises(BadInput, match="expected arrays images, labels, found images"):
        load_labelled_npz(tmp_path / "partial.npz")


def test_unseen_scenes_are_the_same_scenes_at_every_size_and_not_in_the_data_set() -> None:
    """Transfer data: ids after the data set's, drawn by the same rules; circle places, sizes and classes
    scale with the image, so 96 and 192 px show one set of scenes at two resolutions."""
    small, small_ids = draw_unseen(seed=3, images=40, n=5, size=96)
    large, large_ids = draw_unseen(seed=3, images=40, n=5, size=192)
    assert small_ids.tolist() == large_ids.tolist() == [40, 41, 42, 43, 44]
    for column in ("cx", "cy", "radius"):
        np.testing.assert_allclose(small.circles[column] / 96, large.circles[column] / 192)
    assert small.circles["label"].tolist() == large.circles["label"].tolist()
    assert large.images.shape == (5, 192, 192, 3) and small.labels.shape == (5, 96, 96)
    data_set = draw_scenes(45, 96, image_stream(3, 0))
    np.testing.assert_array_equal(data_set.images[40:], small.images)  # the stream's next images
