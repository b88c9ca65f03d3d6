"""The benchmarks run end to end at toy sizes and print what they measure; --quick writes no results."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from posconv.config import load_params
from posconv.engine import LabelledImages
from posconv.model import ModelSpec
from posconv.scenes import draw_scenes, image_stream
from posconv.tools.bench import flops_per_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_layer_benchmark_prints_a_ratio_per_layer_and_keeps_committed_results(
    project: Path, sh: Callable
) -> None:
    committed = (project / "metrics/bench_layers.json").read_bytes()
    output = sh("python", "-m", "posconv.tools.bench", "layers", "--quick").stdout
    rows = [line for line in output.splitlines() if line.startswith("cpu ")]
    assert len(rows) == 2 * 7  # NCHW and NHWC: six encoder convolutions and the stack
    for row in rows:
        ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", row)]
        assert len(ratios) == 8 and all(0.1 < r < 100 for r in ratios), row  # plain and fused, 2 each
    assert (project / "metrics/bench_layers.json").read_bytes() == committed


@pytest.mark.slow
def test_generate_and_train_benchmarks_print_their_rates(sh: Callable) -> None:
    generate = sh("python", "-m", "posconv.tools.bench", "generate", "--quick").stdout
    assert float(re.search(r"(\d+) images/s", generate).group(1)) > 0
    train = sh("python", "-m", "posconv.tools.bench", "train", "--quick").stdout
    rates = re.search(r"\): ([\d.]+) img/s, bare loop ([\d.]+) img/s", train)
    stage, bare = (float(rate) for rate in rates.groups())
    assert stage > 0 and bare > 0
    for layer in ("vanilla", "coordbias", "coordconv"):  # each layer in both precisions, against the peak
        line = next(line for line in train.splitlines() if line.strip().startswith(layer))
        shares = [float(share) for share in re.findall(r"([\d.]+)% of peak", line)]
        assert len(shares) == 2 and all(0 < share < 100 for share in shares), line
        assert float(re.search(r"bf16/fp32 = ([\d.]+)x", line).group(1)) > 0


def test_flops_per_image_count_every_convolution_whatever_path_the_layers_take() -> None:
    """channels_last on CPU takes the fused oneDNN op, which FlopCounterMode does not see: the count must
    still include it (coordbias adds a few FLOPs to vanilla's, never removes the encoder's)."""
    committed = load_params(ROOT / "params.yaml")
    params = committed.train.model_copy(update={"channels_last": True, "fused_conv": True})
    model = committed.model.model_dump() | {"width": 4}
    scenes = draw_scenes(2, 32, image_stream(0, 0))
    data = LabelledImages.from_arrays(scenes.images, scenes.labels, torch.device("cpu"))
    vanilla, coordbias = (
        flops_per_image(ModelSpec.of(layer, model), params, data) for layer in ("vanilla", "coordbias")
    )
    assert vanilla < coordbias < 1.1 * vanilla


@pytest.mark.slow
def test_families_benchmark_times_each_layer_and_both_formulations(sh: Callable) -> None:
    output = sh("python", "-m", "posconv.tools.bench", "families", "--quick").stdout
    for memory_format in ("NCHW", "NHWC"):
        rows = {
            line[5:29].strip(): line[29:].split()
            for line in output.splitlines()
            if line.startswith(memory_format)
        }
        assert set(rows) >= {"vanilla", "involution", "coordinvolution", "deform", "coorddeform"}
        for op in ("involution op", "deform op"):
            assert rows[op][2].endswith("x") and float(rows[op][2][:-1]) > 0  # against its unfold form
            assert float(rows[f"{op}, unfold"][3]) > 0  # the unfold form saves memory for backward
        assert rows["vanilla"][1] == "1.00x"


@pytest.mark.slow
def test_involution_benchmark_times_both_layers_against_conv2d(sh: Callable) -> None:
    lines = sh("python", "-m", "posconv.tools.bench", "involution", "--quick").stdout.splitlines()
    assert lines[0].startswith("float32 channels_last") and "2 reps" in lines[0]
    assert lines[1].split() == ["case", "conv2d", "ms", "involution", "coordinvolution"]
    conv_ms, cells = lines[2][16:].split(maxsplit=1)
    assert lines[2][:16].strip() == "4->4 @16" and float(conv_ms) > 0
    ratios = re.findall(r"(\d+\.\d+) ms (\d+\.\d+)x \((\d+\.\d+)x\)", cells)  # ms, min, median
    assert len(ratios) == 2 and all(float(value) > 0 for found in ratios for value in found)
    assert lines[-1] == "target: involution / conv2d <= 1.0"
