"""What a stage leaves when it fails or is stopped under DVC: the outputs its lock file records.

DVC removes a stage's outputs before it runs the stage's command, so the stage's own
write-to-temporary-then-rename cannot protect them: a mistyped param or a Ctrl-C would lose them. The
last good outputs are still known: the lock file records each one's hash, and their bytes are in DVC's
cache (data and models always; metrics and plots too, which DVC's run-cache commits there) or, for a
fresh clone's committed results, in git. So a stage that fails puts every recorded output back: from
the cache, or from git's HEAD where HEAD's lock records the same hash. `dvc status` then says honestly
that the stage is out of date, and nothing is lost. (`persist: true` would keep the outputs too, but
DVC never serves a stage with persistent outputs from its run-cache, which the study relies on.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from posconv.config import parse_yaml, read_yaml
from posconv.errors import BadInput

DVC_ROOT, DVC_STAGE = "DVC_ROOT", "DVC_STAGE"  # what DVC tells every command it runs


def _lock_entry(root: Path, stage: str, revision: str | None = None) -> dict:
    """The lock's entry of `stage` ("name", or "pipeline/dvc.yaml:name"), from the workspace or a git
    revision; empty where there is none."""
    pipeline, _, name = stage.rpartition(":")
    lock = Path(pipeline or "dvc.yaml").with_suffix(".lock")
    if revision is None:
        data = read_yaml(root / lock) if (root / lock).is_file() else None
    else:
        command = ["git", "show", f"{revision}:{lock}"]
        shown = subprocess.run(command, cwd=root, capture_output=True, text=True)
        data = parse_yaml(shown.stdout, f"{revision}:{lock}") if shown.returncode == 0 else None
    return ((data or {}).get("stages") or {}).get(name) or {}


def _from_cache(path: Path, md5: str, cache: Path) -> bool:
    """Copy output `path` (a file, or a folder when `md5` names a .dir listing) out of DVC's cache."""
    objects = {path: md5}
    if md5.endswith(".dir"):
        listing = cache / md5[:2] / md5[2:]
        if not listing.is_file():
            return False
        objects = {path / entry["relpath"]: entry["md5"] for entry in json.loads(listing.read_text())}
    if not all((cache / h[:2] / h[2:]).is_file() for h in objects.values()):
        return False
    for target, h in objects.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache / h[:2] / h[2:], target)  # the cache's files are read-only: copy the bytes
    return True


def _cache_folder(root: Path) -> Path:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return Path(repo.cache.local.path)


def restore_recorded_outputs() -> None:
    """Under DVC, put back each output of this stage that the lock records and the workspace lacks."""
    if DVC_STAGE not in os.environ or DVC_ROOT not in os.environ or "RANK" in os.environ:
        return  # run by hand, the atomic writes kept the old outputs; or a DDP rank, its launcher restores
    root, stage = Path(os.environ[DVC_ROOT]), os.environ[DVC_STAGE]
    try:
        recorded = _lock_entry(root, stage).get("outs") or []
        committed = {out["path"]: out["md5"] for out in _lock_entry(root, stage, "HEAD").get("outs") or []}
        cache = _cache_folder(root) if recorded else root
        lost = []
        for out in recorded:
            path = Path(out["path"])  # relative to the stage's folder, where it runs
            if path.exists() or _from_cache(path, out["md5"], cache):
                continue
            if committed.get(out["path"]) == out["md5"]:
                restored = subprocess.run(["git", "checkout", "HEAD", "--", str(path)], capture_output=True)
                if restored.returncode == 0:
                    continue
            lost.append(str(path))
    except (OSError, BadInput, KeyError, TypeError, ValueError) as error:
        print(f"note: could not put back {stage}'s previous outputs ({error})", file=sys.stderr)
        return
    if lost:  # silent when everything is back: the stage's own error is the one line to read
        print(
            f"note: {', '.join(lost)}: no earlier version in DVC's cache or git to put back", file=sys.stderr
        )
