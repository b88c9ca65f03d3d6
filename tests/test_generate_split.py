"""The real `generate` and `split` stages, run as subprocesses in temporary project folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from posconv.data import load_scenes, load_split

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
LABEL_RGB = [(0x1A, 0x1A, 0x1A), (0xFF, 0x9F, 0x1C), (0x2E, 0xC4, 0xB6), (0xE7, 0x1D, 0x36)]  # LABEL_COLOURS
OUTPUTS = ("data/scenes", "plots/data/preview.png", "data/split.npz", "metrics/data.json")


def make_project(directory: Path, **changes: Any) -> Path:
    """A folder holding the repo's params.yaml with `changes` ({"generate.size": 32, ...}) applied."""
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params.update(seed=0, generate={"size": 32, "images": 40}, split={"val": 0.25, "test": 0.2})
    params["evaluate"].update(equivariance_images=4, examples=4)  # within the 8 test images
    for key, value in changes.items():
        *groups, last = key.split(".")
        node = params
        for group in groups:
            node = node[group]
        node[last] = value
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.yaml").write_text(yaml.safe_dump(params))
    return directory


def stage(directory: Path, name: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"posconv.stages.{name}"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def run_pipeline(directory: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Run generate then split; the SHA-256 of every output file, by path."""
    for name in ("generate", "split"):
        result = stage(directory, name, env)
        assert result.returncode == 0, result.stderr
    files = [p for out in OUTPUTS for p in sorted((directory / out).rglob("*")) or [directory / out]]
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    directory = make_project(tmp_path_factory.mktemp("project"))
    return directory, run_pipeline(directory)


def test_stages_write_the_data_set_split_and_metrics(project: tuple[Path, dict[str, str]]) -> None:
    directory, hashes = project
    assert {Path(p).name for p in hashes} >= {"images.npy", "labels.npy", "owners.npy", "circles.csv"}
    scenes = load_scenes(directory / "data/scenes")
    assert scenes.images.shape == (40, 32, 32, 3)
    split = load_split(directory / "data/split.npz")
    assert {k: len(v) for k, v in split.items()} == {"train": 22, "val": 10, "test": 8}
    metrics = json.loads((directory / "metrics/data.json").read_text())
    assert {name: m["images"] for name, m in metrics.items()} == {"train": 22, "val": 10, "test": 8}
    for name in split:
        fractions = metrics[name]["pixel_fraction"]
        assert sum(fractions.values()) == pytest.approx(1, abs=1e-5)
        want = np.bincount(scenes.labels[split[name]].ravel(), minlength=4) / (len(split[name]) * 32 * 32)
        np.testing.assert_allclose(list(fractions.values()), want, atol=1e-6)
        assert min(fractions.values()) > 0, name  # every split holds every class
    with Image.open(directory / "plots/data/preview.png") as preview:  # decoded by an independent reader
        pixels = np.asarray(preview.convert("RGB"))
    gap = 4  # the first tile, then its label map, after a gap
    np.testing.assert_array_equal(pixels[gap : gap + 32, gap : gap + 32], scenes.images[0])
    label_tile = pixels[gap : gap + 32, 2 * gap + 32 : 2 * gap + 64]
    np.testing.assert_array_equal(np.array(LABEL_RGB)[scenes.labels[0]], label_tile)


def test_same_params_same_bytes_other_seed_other_data(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    _, hashes = project
    assert run_pipeline(make_project(tmp_path / "again")) == hashes
    other = run_pipeline(make_project(tmp_path / "other", seed=1))
    for path in ("data/scenes/images.npy", "data/scenes/circles.csv", "data/split.npz"):
        assert other[path] != hashes[path], path


# What differs between the CPUs this project meets: OpenBLAS picks its kernels by CPU, numpy its SIMD
# code (X86_V4: AVX-512; X86_V3: AVX2 and FMA), and both their threads. Before the generator avoided
# BLAS and library cos/sin, these gave three different images.npy from one seed.
MACHINES = {
    "OpenBLAS Prescott (generic), 1 thread": {
        "OPENBLAS_CORETYPE": "Prescott", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
    },
    "OpenBLAS Haswell": {"OPENBLAS_CORETYPE": "Haswell"},
    "OpenBLAS SkylakeX, 2 threads": {"OPENBLAS_CORETYPE": "SkylakeX", "OPENBLAS_NUM_THREADS": "2"},
    "OpenBLAS Zen": {"OPENBLAS_CORETYPE": "Zen"},
    "numpy without AVX-512": {"NPY_DISABLE_CPU_FEATURES": "X86_V4,AVX512_ICL,AVX512_SPR"},
    "numpy without AVX2": {"NPY_DISABLE_CPU_FEATURES": "X86_V3,X86_V4,AVX512_ICL,AVX512_SPR"},
}  # fmt: skip


def test_the_data_bytes_do_not_depend_on_the_machine(tmp_path: Path) -> None:
    """generate and split give the same bytes under every BLAS kernel, numpy SIMD level and thread count."""
    hashes = {
        machine: run_pipeline(make_project(tmp_path / str(index), **{"generate.size": 64}), env)
        for index, (machine, env) in enumerate(MACHINES.items())
    }
    first = next(iter(hashes.values()))
    assert {machine: h == first for machine, h in hashes.items()} == dict.fromkeys(MACHINES, True)


# The data set's fingerprint at seed 0, 64 px, 40 images (val 0.25, test 0.2): a change of these bytes is a
# new data set, and every committed result downstream of it is stale.
PINNED = {
    "data/scenes/images.npy": "38409f6409306f47",
    "data/scenes/labels.npy": "e5fced841c9759d0",
    "data/scenes/owners.npy": "8b28d9441695749a",
    "data/scenes/circles.csv": "2e0a115fb25fc7f4",
    "plots/data/preview.png": "fc5282a9e3fad7ad",
    "data/split.npz": "25c2af5f2bdff7ac",
    "metrics/data.json": "d48d76a2950bb343",
}


def test_the_data_set_is_pinned(tmp_path: Path) -> None:
    hashes = run_pipeline(make_project(tmp_path, **{"generate.size": 64}))
    assert {path: hashes[path][:16] for path in PINNED} == PINNED


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        ("generate", "generate.size", 30, "generate.size = 30"),
        ("generate", "generate.size", 12, "generate.size = 12"),
        ("generate", "generate.images", -5, "generate.images = -5"),
        ("generate", "generate.images", 2, "generate.images = 2: too few for split"),
        ("generate", "seed", -1, "seed = -1"),
        ("split", "split.val", 0.9, "split.val + split.test"),
        ("split", "split.test", 0, "split.test = 0"),
    ],
)
def test_bad_params_exit_2_with_one_line_and_write_nothing(
    tmp_path: Path, name: str, key: str, value: Any, message: str
) -> None:
    directory = make_project(tmp_path, **{key: value})
    result = stage(directory, name)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert [p.name for p in directory.iterdir()] == ["params.yaml"]


def test_split_rejects_data_of_another_size(project: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    source, _ = project
    directory = make_project(tmp_path, **{"generate.images": 50})
    (directory / "data/scenes").mkdir(parents=True)
    labels = "data/scenes/labels.npy"
    (directory / labels).write_bytes((source / labels).read_bytes())
    result = stage(directory, "split")
    assert result.returncode == 2
    assert f"{labels}: holds 40 images, expected generate.images = 50" in result.stderr
    assert not (directory / "data/split.npz").exists() and not (directory / "metrics").exists()
