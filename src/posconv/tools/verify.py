"""Does a reproduction agree with the committed results? `python -m posconv.tools.verify` (`make verify`).

After `make repro` on any machine: the data set must be the committed one byte for byte (its hashes in
the workspace's `dvc.lock` against the committed one; generation is the same on every CPU), and each
model's test metrics must lie within the tolerance of the committed ones. Trained weights differ across
CPUs in the last bits, and training amplifies that as a different seed would, so a tolerance is the
study's seed-to-seed spread (`metrics/tolerances.json`, written by the study: z(0.995)·√2·sd, the 99%
range of the difference between two runs that differ only by chance). Prints a table (quantity,
committed, reproduced, tolerance, agrees) and exits 0 when everything agrees, 1 when something does
not (each such row is named), 2 when there is nothing to compare or an input is malformed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from posconv.cli import parser, run
from posconv.config import parse_yaml, read_yaml
from posconv.errors import BadInput
from posconv.grid import quantities, tolerance_key
from posconv.io import read_json
from posconv.registry import SPLIT, TOLERANCES, model_metrics

DATA_OUTPUTS = ("data/scenes", SPLIT)  # what must be byte-identical on any CPU


def committed_text(revision: str, path: str) -> str:
    shown = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True)
    if shown.returncode:
        raise BadInput(f"{revision}:{path}: no committed file to compare with ({shown.stderr.strip()})")
    return shown.stdout


def committed_json(revision: str, path: str) -> dict:
    try:
        data = json.loads(committed_text(revision, path))
    except ValueError as error:
        raise BadInput(f"{revision}:{path}: not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{revision}:{path}: expected a JSON object")
    return data


def read_tolerances(path: str) -> dict[str, dict[str, float]]:
    """model -> tolerance key -> a finite, non-negative tolerance; anything else is one line."""
    found = read_json(path)
    table = found.get("tolerances") if isinstance(found, dict) else None
    if not isinstance(table, dict) or not table:
        raise BadInput(f"{path}: expected {{'tolerances': {{model: {{quantity: number}}}}}}")
    for model, entry in table.items():
        for key, value in (entry or {}).items() if isinstance(entry, dict) else [(None, entry)]:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0:
                raise BadInput(f"{path}: {model}.{key} = {value!r}: expected a finite number >= 0")
    return table


def data_hashes(lock: Any) -> dict[str, str]:
    """The md5 each data output has in a dvc.lock (generate's and split's outputs)."""
    stages = (lock or {}).get("stages") or {}
    outs = [out for stage in stages.values() for out in stage.get("outs") or []]
    return {out["path"]: out.get("md5") for out in outs if out.get("path") in DATA_OUTPUTS}


def censored(value: Any, training: dict) -> Any:
    """Steps to a target never reached count as the run's steps, as in the study (a lower bound)."""
    return training.get("steps") if value is None else value


def rows_of(model: str, committed: tuple[dict, dict], reproduced: tuple[dict, dict], tolerance: dict) -> list:
    """(quantity, committed, reproduced, tolerance, agrees) for every judged quantity of one model."""
    evaluation = committed[0]
    equivariance = evaluation.get("equivariance") or {}
    readers = quantities(
        list(evaluation.get("transfer") or {}),
        list(equivariance.get("translation") or {}),
        [float(f) for f in equivariance.get("scale") or {}],
    )
    rows = []
    for quantity, q in readers.items():
        key = tolerance_key(quantity)
        if key not in tolerance:
            continue
        try:
            was, now = (censored(q.read(*files), files[1]) for files in (committed, reproduced))
        except (KeyError, IndexError, TypeError) as error:
            raise BadInput(f"{model}: its metrics lack {quantity} ({error!r})") from None
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in (was, now)):
            raise BadInput(f"{model}: {quantity} = {was!r} committed, {now!r} reproduced: expected numbers")
        rows.append((f"{model} {quantity}", was, now, tolerance[key], abs(now - was) <= tolerance[key]))
    return rows


def verify(revision: str, tolerance_path: str) -> list[tuple]:
    table = read_tolerances(tolerance_path)
    models = [m for m in table if Path(model_metrics(m)[0]).is_file()]
    if not models:
        raise BadInput("nothing to compare: no results in the workspace (run make repro first)")
    rows = []
    committed_lock = parse_yaml(committed_text(revision, "dvc.lock"), f"{revision}:dvc.lock")
    now = data_hashes(read_yaml("dvc.lock"))
    for path, md5 in data_hashes(committed_lock).items():
        rows.append((f"{path} (md5)", md5, now.get(path), 0, now.get(path) == md5))
    for model in models:
        paths = model_metrics(model)
        committed = tuple(committed_json(revision, path) for path in paths)
        reproduced = tuple(read_json(path) for path in paths)
        rows += rows_of(model, committed, reproduced, table[model])  # type: ignore[arg-type]
    return rows


def cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    arguments.add_argument(
        "--against", default="HEAD", help="the git revision whose results are the reference"
    )
    arguments.add_argument(
        "--tolerances", default=TOLERANCES, help="the tolerance file (the study writes it)"
    )
    args = arguments.parse_args(argv)
    rows = verify(args.against, args.tolerances)
    print("| quantity | committed | reproduced | tolerance | agrees |\n|---|---|---|---|---|")
    for name, was, now, tolerance, agrees in rows:
        print(f"| {name} | {cell(was)} | {cell(now)} | {cell(tolerance)} | {'yes' if agrees else '**NO**'} |")
    disagree = [row[0] for row in rows if not row[4]]
    if disagree:
        print(f"DISAGREES: {', '.join(disagree)}")
        sys.exit(1)
    print(f"reproduction agrees with {args.against}: {len(rows)} quantities within their tolerances")


if __name__ == "__main__":
    run(main)
