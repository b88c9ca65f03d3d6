"""Stage `evaluate`: score every trained model on the test split; or score one model on any data set.

Pipeline: `python -m posconv.evaluate` writes `metrics/evaluate/<model>.json`, the headline
`metrics/summary.json` (params `layer` against vanilla) and `plots/evaluate/` (data and figures).

Standalone: `python -m posconv.evaluate --model models/coordbias.pt --data other.npz` prints the
metrics as JSON for an `.npz` holding `images uint8 (N, H, W, 3)` and `labels uint8 (N, H, W)`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from posconv import figures
from posconv.cli import run
from posconv.compare import headline
from posconv.config import LAYERS, load_params
from posconv.data import load_labelled_npz, load_scenes, load_split
from posconv.engine import LabelledImages, place, predict, resolve_device
from posconv.io import atomic_outputs, read_json, write_json
from posconv.metrics import circle_votes, score
from posconv.model import load_model

logger = logging.getLogger(__name__)


def score_npz(model_path: str, data_path: str, device_name: str, batch_size: int) -> dict:
    images, labels = load_labelled_npz(data_path)
    device = resolve_device(device_name)
    model = load_model(model_path, device)
    data = LabelledImages.from_arrays(images, labels, device)
    predictions, images_per_s = predict(model, data.images, batch_size, "auto", False)
    return score(labels, predictions, images) | {"inference_images_per_s": images_per_s}


def evaluate_pipeline() -> None:
    params = load_params()
    device = resolve_device(params.device)
    scenes, test_ids = load_scenes("data/scenes"), load_split("data/split.npz")["test"]
    images, labels, owners = scenes.images[test_ids], scenes.labels[test_ids], scenes.owners[test_ids]
    test = LabelledImages.from_arrays(images, labels, device)
    results, votes, predictions = {}, {}, {}
    for layer in LAYERS:
        model = place(load_model(Path("models") / f"{layer}.pt"), device, params.train.channels_last)
        predicted, images_per_s = predict(
            model, test.images, params.evaluate.batch_size, params.train.precision, params.train.channels_last
        )
        results[layer] = score(
            labels, predicted, images, owners, scenes.circles, test_ids, params.evaluate.position_bins
        )
        results[layer]["inference_images_per_s"] = images_per_s
        votes[layer] = circle_votes(predicted, owners, scenes.circles, test_ids)
        predictions[layer] = predicted[: params.evaluate.examples]
    training = {layer: read_json(f"metrics/train/{layer}/metrics.json") for layer in LAYERS}
    summary = headline(params.layer, results, training)
    with atomic_outputs("metrics/evaluate", "metrics/summary.json", "plots/evaluate") as (
        metrics_dir,
        summary_path,
        plots_dir,
    ):
        metrics_dir.mkdir()
        for layer, result in results.items():
            write_json(metrics_dir / f"{layer}.json", result)
        write_json(summary_path, summary)
        plots_dir.mkdir()
        examples = slice(params.evaluate.examples)
        figures.write_all(plots_dir, results, votes, (images[examples], labels[examples], predictions))
    layer = params.layer
    logger.info(
        "test mIoU: vanilla %.3f, %s %.3f; position recall: vanilla %.3f, %s %.3f",
        summary["miou"]["vanilla"], layer, summary["miou"][layer],
        summary["position_recall"]["vanilla"], layer, summary["position_recall"][layer],
    )  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m posconv.evaluate", description=__doc__)
    parser.add_argument("--model", help="a saved model (.pt); with --data, print its metrics as JSON")
    parser.add_argument("--data", help="an .npz with images uint8 (N,H,W,3) and labels uint8 (N,H,W)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together")
    if args.model:
        print(json.dumps(score_npz(args.model, args.data, args.device, args.batch_size), indent=2))
    else:
        evaluate_pipeline()


if __name__ == "__main__":
    run(main)
