"""`python -m posconv.evaluate --model M --data D.npz`: score a saved model on any labelled images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from warm import run_module

from posconv.model import FCN, ModelSpec, save_model
from posconv.scenes import draw_scenes


def evaluate(*args: str) -> subprocess.CompletedProcess:
    """`python -m posconv.stages.evaluate args`, a process of its own (`warm`)."""
    return run_module(Path.cwd(), "posconv.stages.evaluate", *args)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "coordbias.pt"
    save_model(FCN(ModelSpec(layer="coordbias", width=4)), path)
    return path


def test_scores_any_image_size_and_prints_json(tmp_path: Path, model_file: Path) -> None:
    scenes = draw_scenes(3, 20, np.random.default_rng(0))  # 20 px: not a multiple of the network's 8
    data = tmp_path / "other.npz"
    np.savez(data, images=scenes.images, labels=scenes.labels)
    result = evaluate("--model", str(model_file), "--data", str(data), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert len(metrics["recall"]) == 4
    assert sum(map(sum, metrics["confusion"])) == 3 * 20 * 20
    assert sum(row[c] for c, row in enumerate(metrics["confusion"])) / (3 * 20 * 20) == pytest.approx(
        metrics["pixel_accuracy"]
    )
    assert metrics["circle_accuracy"] is None  # no circle table in an .npz


def bad_npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


IMAGES = np.zeros((2, 16, 16, 3), np.uint8)
LABELS = np.zeros((2, 16, 16), np.uint8)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": IMAGES}, "labels"),
        ({"images": IMAGES.astype(np.float32), "labels": LABELS}, "images"),
        ({"images": IMAGES, "labels": LABELS[:, :8]}, "labels"),
        ({"images": IMAGES[..., :1], "labels": LABELS}, "images"),
        ({"images": IMAGES, "labels": LABELS + 4}, "labels hold 4, expected classes 0..3"),
    ],
)
def test_bad_data_files_exit_2_with_one_line(
    tmp_path: Path, model_file: Path, arrays: dict, message: str
) -> None:
    result = evaluate("--model", str(model_file), "--data", str(bad_npz(tmp_path, **arrays)))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_unreadable_data_and_model_files_exit_2(tmp_path: Path, model_file: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    good = bad_npz(tmp_path, images=IMAGES, labels=LABELS)
    for model, data, name in (
        (model_file, junk, "junk.npz"),
        (junk, good, "junk.npz"),
        (tmp_path / "no.pt", good, "no.pt"),
    ):
        result = evaluate("--model", str(model), "--data", str(data))
        assert result.returncode == 2 and name in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
