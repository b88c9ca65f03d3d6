"""Stage `evaluate`: score every trained model on the test split; or score one model on any data set.

Pipeline: `python -m posconv.stages.evaluate` writes `metrics/evaluate/<model>.json` (test split,
transfer to `evaluate.sizes`, equivariance errors), the headline `metrics/summary.json` (params `layer`
against vanilla) and `plots/evaluate/` (data and figures). With `--families` (families/dvc.yaml) it
scores the content-adaptive families into `metrics/families/<model>.json`.

Standalone: `python -m posconv.stages.evaluate --model models/coordbias.pt --data other.npz` prints the
metrics as JSON for an `.npz` holding `images uint8 (N, H, W, 3)` and `labels uint8 (N, H, W)`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pandas import DataFrame
from torch import nn

from posconv import figures, registry, resources
from posconv.cli import device_name, parser, positive_int
from posconv.compare import headline
from posconv.config import Params, load_params
from posconv.data import draw_unseen, load_labelled_npz, load_scenes, load_split
from posconv.engine import place, predict, resolve_device, to_input
from posconv.equivariance import scale_error, translation_error
from posconv.io import atomic_outputs, read_json, write_json
from posconv.layers import fused
from posconv.metrics import circle_votes, score
from posconv.model import load_model
from posconv.registry import scale_key
from posconv.scenes import Scenes
from posconv.stages import run_stage

logger = logging.getLogger(__name__)
SCORING_PRECISION = "fp32"  # whatever precision trained the model, its test scores are exact


def _tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).to(device)


def score_npz(model_path: str, data_path: str, device_name: str, batch_size: int) -> dict:
    images, labels = load_labelled_npz(data_path)
    device = resolve_device(device_name)
    model = load_model(model_path, device)
    predictions, images_per_s = predict(model, _tensor(images, device), batch_size, SCORING_PRECISION, False)
    return score(labels, predictions, images) | {"inference_images_per_s": images_per_s}


def _score(
    model: nn.Module, scenes: Scenes, ids: np.ndarray, params: Params
) -> tuple[dict, np.ndarray, DataFrame]:
    """Every metric of `model` on `scenes` (global image ids `ids`), its predictions and circle votes."""
    images = _tensor(scenes.images, next(model.parameters()).device)
    predicted, images_per_s = predict(
        model, images, params.evaluate.batch_size, SCORING_PRECISION, params.train.channels_last
    )
    votes = circle_votes(predicted, scenes.owners, scenes.circles, ids)
    result = score(scenes.labels, predicted, scenes.images, votes, params.evaluate.position_bins)
    return result | {"inference_images_per_s": images_per_s}, predicted, votes


def _equivariance(model: nn.Module, images: np.ndarray, params: Params) -> dict:
    """Equivariance errors of the logits under each translation step and rescaling (DESIGN.md §5)."""
    x = to_input(_tensor(images, next(model.parameters()).device), params.train.channels_last)
    model.eval()

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return model(batch).float()

    batch = params.evaluate.batch_size
    return {
        "translation": {str(s): translation_error(logits, x, s, batch) for s in params.evaluate.shifts},
        "scale": {scale_key(f): scale_error(logits, x, f, batch) for f in params.evaluate.scales},
    }


class Scored(NamedTuple):
    """Each layer's metrics, and on the test split its circle votes and predictions, with the split."""

    results: dict[str, dict]
    votes: dict[str, DataFrame]
    predictions: dict[str, np.ndarray]
    test: Scenes


def score_layers(layers: tuple[str, ...], params: Params) -> Scored:
    """Each layer's model scored on the test split, on unseen scenes at `evaluate.sizes` (`transfer`)
    and for equivariance."""
    device = resolve_device(params.device)
    scenes = load_scenes(registry.SCENES)
    test_ids = load_split(registry.SPLIT, len(scenes.images))["test"]
    test = Scenes(scenes.images[test_ids], scenes.labels[test_ids], scenes.owners[test_ids], scenes.circles)
    unseen = {
        size: draw_unseen(params.seed, params.generate.images, len(test_ids), size)
        for size in params.evaluate.sizes
    }
    scored = Scored({}, {}, {}, test)
    for layer in layers:
        model = place(load_model(registry.model_path(layer), layer=layer), device, params.train.channels_last)
        result, scored.predictions[layer], scored.votes[layer] = _score(model, test, test_ids, params)
        result["transfer"] = {
            str(size): _score(model, other, ids, params)[0] for size, (other, ids) in unseen.items()
        }
        result["equivariance"] = _equivariance(
            model, test.images[: params.evaluate.equivariance_images], params
        )
        scored.results[layer] = result
    return scored


def write_scores(directory: Path, results: dict[str, dict]) -> None:
    directory.mkdir()
    for layer, result in results.items():
        write_json(directory / f"{layer}.json", result)


def evaluate_pipeline() -> None:
    params = load_params()
    resources.check_evaluate(params)
    fused.enable(params.train.fused_conv)
    scored = score_layers(registry.LAYERS, params)
    training = {layer: read_json(registry.train_metrics(layer)) for layer in registry.LAYERS}
    summary = headline(params.layer, scored.results, training)
    outputs = registry.EVALUATE_METRICS, registry.SUMMARY, registry.EVALUATE_PLOTS
    with atomic_outputs(*outputs) as (metrics_dir, summary_path, plots_dir):
        write_scores(metrics_dir, scored.results)
        write_json(summary_path, summary)
        plots_dir.mkdir()
        examples = slice(params.evaluate.examples)
        losses = {
            m: (Path(registry.loss_curve(m, "train")), Path(registry.loss_curve(m, "val")))
            for m in scored.results
        }
        shown = (
            scored.test.images[examples],
            scored.test.labels[examples],
            {m: p[examples] for m, p in scored.predictions.items()},
        )
        figures.write_all(plots_dir, scored.results, scored.votes, shown, losses)
    layer = params.layer
    logger.info(
        "test mIoU: vanilla %.3f, %s %.3f; position recall: vanilla %.3f, %s %.3f",
        summary["miou"][registry.BASELINE], layer, summary["miou"][layer],
        summary["position_recall"][registry.BASELINE], layer, summary["position_recall"][layer],
    )  # fmt: skip


def evaluate_families() -> None:
    """The content-adaptive families (families/dvc.yaml): their scores only."""
    params = load_params()
    resources.check_evaluate(params)
    fused.enable(params.train.fused_conv)
    results = score_layers(registry.FAMILIES, params).results
    with atomic_outputs(registry.FAMILIES_METRICS) as (metrics_dir,):
        write_scores(metrics_dir, results)


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    arguments.add_argument("--model", help="a saved model (.pt); with --data, print its metrics as JSON")
    arguments.add_argument("--data", help="an .npz with images uint8 (N,H,W,3) and labels uint8 (N,H,W)")
    arguments.add_argument(
        "--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N | mps"
    )
    arguments.add_argument("--batch-size", type=positive_int, default=32)
    arguments.add_argument(
        "--families", action="store_true", help="score the content-adaptive families (families/dvc.yaml)"
    )
    args = arguments.parse_args(argv)
    if (args.model is None) != (args.data is None):
        arguments.error("--model and --data go together")
    if args.model and args.families:
        arguments.error("--families scores the pipeline's models, not --model")
    if args.model:
        print(json.dumps(score_npz(args.model, args.data, args.device, args.batch_size), indent=2))
    else:
        evaluate_families() if args.families else evaluate_pipeline()


if __name__ == "__main__":
    run_stage(main)
