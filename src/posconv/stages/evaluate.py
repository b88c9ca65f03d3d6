"""Stage `evaluate`: score every trained model on the test split; or score one model on any data set.

Pipeline: `python -m posconv.stages.evaluate` writes `metrics/evaluate/<model>.json`, the headline
`metrics/summary.json` (params `layer` against vanilla) and `plots/evaluate/` (data and figures).

Standalone: `python -m posconv.stages.evaluate --model models/coordbias.pt --data other.npz` prints the
metrics as JSON for an `.npz` holding `images uint8 (N, H, W, 3)` and `labels uint8 (N, H, W)`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from posconv import figures, fused, registry
from posconv.cli import device_name, parser, positive_int, run
from posconv.compare import headline
from posconv.config import load_params
from posconv.data import load_labelled_npz, load_scenes, load_split
from posconv.engine import LabelledImages, place, predict, resolve_device
from posconv.io import atomic_outputs, read_json, write_json
from posconv.metrics import circle_votes, score
from posconv.model import load_model

logger = logging.getLogger(__name__)
SCORING_PRECISION = "fp32"  # whatever precision trained the model, its test scores are exact


def score_npz(model_path: str, data_path: str, device_name: str, batch_size: int) -> dict:
    images, labels = load_labelled_npz(data_path)
    device = resolve_device(device_name)
    model = load_model(model_path, device)
    data = LabelledImages.from_arrays(images, labels, device)
    predictions, images_per_s = predict(model, data.images, batch_size, SCORING_PRECISION, False)
    return score(labels, predictions, images) | {"inference_images_per_s": images_per_s}


def evaluate_pipeline() -> None:
    params = load_params()
    device = resolve_device(params.device)
    fused.enable(params.train.fused_conv)
    scenes = load_scenes(registry.SCENES)
    test_ids = load_split(registry.SPLIT, len(scenes.images))["test"]
    images, labels, owners = scenes.images[test_ids], scenes.labels[test_ids], scenes.owners[test_ids]
    test = LabelledImages.from_arrays(images, labels, device)
    results, votes, predictions = {}, {}, {}
    for layer in registry.LAYERS:
        model = place(load_model(registry.model_path(layer), layer=layer), device, params.train.channels_last)
        predicted, images_per_s = predict(
            model, test.images, params.evaluate.batch_size, SCORING_PRECISION, params.train.channels_last
        )
        results[layer] = score(
            labels, predicted, images, owners, scenes.circles, test_ids, params.evaluate.position_bins
        )
        results[layer]["inference_images_per_s"] = images_per_s
        votes[layer] = circle_votes(predicted, owners, scenes.circles, test_ids)
        predictions[layer] = predicted[: params.evaluate.examples]
    training = {layer: read_json(registry.train_metrics(layer)) for layer in registry.LAYERS}
    summary = headline(params.layer, results, training)
    outputs = registry.EVALUATE_METRICS, registry.SUMMARY, registry.EVALUATE_PLOTS
    with atomic_outputs(*outputs) as (
        metrics_dir,
        summary_path,
        plots_dir,
    ):
        metrics_dir.mkdir()
        for layer, result in results.items():
            write_json(metrics_dir / Path(registry.evaluate_metrics(layer)).name, result)
        write_json(summary_path, summary)
        plots_dir.mkdir()
        examples = slice(params.evaluate.examples)
        losses = {
            m: (Path(registry.loss_curve(m, "train")), Path(registry.loss_curve(m, "val"))) for m in results
        }
        figures.write_all(
            plots_dir, results, votes, (images[examples], labels[examples], predictions), losses
        )
    layer = params.layer
    logger.info(
        "test mIoU: vanilla %.3f, %s %.3f; position recall: vanilla %.3f, %s %.3f",
        summary["miou"][registry.BASELINE], layer, summary["miou"][layer],
        summary["position_recall"][registry.BASELINE], layer, summary["position_recall"][layer],
    )  # fmt: skip


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    arguments.add_argument("--model", help="a saved model (.pt); with --data, print its metrics as JSON")
    arguments.add_argument("--data", help="an .npz with images uint8 (N,H,W,3) and labels uint8 (N,H,W)")
    arguments.add_argument(
        "--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N | mps"
    )
    arguments.add_argument("--batch-size", type=positive_int, default=32)
    args = arguments.parse_args(argv)
    if (args.model is None) != (args.data is None):
        arguments.error("--model and --data go together")
    if args.model:
        print(json.dumps(score_npz(args.model, args.data, args.device, args.batch_size), indent=2))
    else:
        evaluate_pipeline()


if __name__ == "__main__":
    run(main)
