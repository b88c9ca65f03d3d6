"""Stage `generate`: draw the data set into `data/scenes/` and a preview grid, all or nothing.

`python -m posconv.stages.generate` reads `seed` and `generate` from params.yaml.
"""

from __future__ import annotations

import logging
import time

from posconv import registry, resources
from posconv.cli import parser
from posconv.config import load_params
from posconv.data import load_scenes, write_scenes
from posconv.io import atomic_outputs
from posconv.plots import save_preview
from posconv.stages import run_stage

logger = logging.getLogger(__name__)
PREVIEW_IMAGES = 6


def main(argv: list[str]) -> None:
    parser(__name__, __doc__).parse_args(argv)
    params = load_params()
    resources.check_generate(params)
    size, count = params.generate.size, params.generate.images
    started = time.perf_counter()
    with atomic_outputs(registry.SCENES, registry.PREVIEW) as (scenes_dir, preview):
        write_scenes(scenes_dir, params.seed, size, count, progress=True)
        scenes = load_scenes(scenes_dir)
        save_preview(scenes.images[:PREVIEW_IMAGES], scenes.labels[:PREVIEW_IMAGES], preview)
    seconds = time.perf_counter() - started
    logger.info(
        "generate: %d images of %d px (seed %d) in %.1f s (%.0f images/s) -> %s, %s",
        count,
        size,
        params.seed,
        seconds,
        count / seconds,
        registry.SCENES,
        registry.PREVIEW,
    )


if __name__ == "__main__":
    run_stage(main)
