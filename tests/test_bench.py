"""The benchmarks run end to end at toy sizes and print what they measure; --quick writes no results."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path


def test_layer_benchmark_prints_a_ratio_per_layer_and_keeps_committed_results(
    project: Path, sh: Callable
) -> None:
    committed = (project / "metrics/bench_layers.json").read_bytes()
    output = sh("python", "-m", "posconv.bench", "layers", "--quick").stdout
    rows = [line for line in output.splitlines() if line.startswith("cpu ")]
    assert len(rows) == 2 * 7  # NCHW and NHWC: six encoder convolutions and the stack
    for row in rows:
        ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", row)]
        assert len(ratios) == 4 and all(0.1 < r < 100 for r in ratios), row
    assert (project / "metrics/bench_layers.json").read_bytes() == committed


def test_generate_and_train_benchmarks_print_their_rates(sh: Callable) -> None:
    generate = sh("python", "-m", "posconv.bench", "generate", "--quick").stdout
    assert float(re.search(r"(\d+) images/s", generate).group(1)) > 0
    train = sh("python", "-m", "posconv.bench", "train", "--quick").stdout
    rates = re.search(r"stage ([\d.]+) img/s, bare loop ([\d.]+) img/s", train)
    stage, bare = (float(rate) for rate in rates.groups())
    assert stage > 0 and bare > 0 and "TFLOP/s achieved" in train
