"""Stage `check_params`: every param checked, and the machine's room for them, before any stage runs.

DVC removes a stage's outputs before running it, so a stage that finds a bad param itself has already
lost its previous outputs (`keep` puts them back, but only what DVC's cache or git holds). Every stage
depends on this one's output, so DVC runs it first and stops at a bad value or an impossible size:
nothing else runs, nothing is removed. The output's bytes never change (a checked params file says
so), so a valid change re-runs only the stages that read the changed params.
"""

from __future__ import annotations

import json

from posconv import registry, resources
from posconv.cli import parser
from posconv.config import load_params
from posconv.io import atomic_outputs
from posconv.stages import run_stage


def main(argv: list[str]) -> None:
    parser(__name__, __doc__).parse_args(argv)
    resources.check(load_params())
    with atomic_outputs(registry.PARAMS_CHECKED) as (temp,):
        temp.write_text(json.dumps({"params.yaml": "checked"}) + "\n")


if __name__ == "__main__":
    run_stage(main)
