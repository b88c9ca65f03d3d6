"""Benchmarks that print ratios measured within one run: `python -m posconv.bench {layers,generate,train}`."""

from __future__ import annotations

import argparse

from posconv.cli import run

# ---- layers: owned by the layers work (issue 3) ----


def bench_layers(args: argparse.Namespace) -> None:
    raise NotImplementedError


# ---- generate: owned by the data work (issue 4) ----


def bench_generate(args: argparse.Namespace) -> None:
    raise NotImplementedError


# ---- train: owned by the training work (issue 5) ----


def bench_train(args: argparse.Namespace) -> None:
    raise NotImplementedError


BENCHMARKS = {"layers": bench_layers, "generate": bench_generate, "train": bench_train}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m posconv.bench", description=__doc__)
    parser.add_argument("which", choices=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args, _ = parser.parse_known_args(argv)
    BENCHMARKS[args.which](args)


if __name__ == "__main__":
    run(main)
