"""The pipeline as users drive it: real DVC, real training, tiny params, in a temporary git repo; and the
layout that keeps it readable: a library that knows nothing of DVC under thin stages and tools."""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, runner

from posconv.engine import resolve_precision
from posconv.model import spec_fields
from posconv.registry import FAMILIES, LAYERS

STAGES = ["generate", "split", "train_vanilla", "train_coordbias", "train_coordconv", "evaluate", "report"]
MODELS = list(LAYERS)
SRC = ROOT / "src"


def is_module(name: str) -> bool:
    path = SRC / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def module_file(name: str) -> Path:
    path = SRC / f"{name.replace('.', '/')}.py"
    return path if path.exists() else SRC / name.replace(".", "/") / "__init__.py"


def imported_modules(module: str) -> set[str]:
    """`module` and every posconv module it imports, transitively, read from the source."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if parent != "posconv" and "import" in module_file(parent).read_text():
            todo.append(parent)  # importing a submodule runs its package's __init__ first
        tree = ast.parse(module_file(name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "posconv":
                todo += [f"posconv.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("posconv."):
                named = (f"{node.module}.{alias.name}" for alias in node.names)
                todo += [node.module, *filter(is_module, named)]  # from posconv.layers import fused
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("posconv.")]
    return seen


def sources(*modules: str) -> set[str]:
    return {str(module_file(m).relative_to(ROOT)) for module in modules for m in imported_modules(module)}


def listed_sources(stage: dict) -> set[str]:
    return {dep for dep in stage["deps"] if dep.startswith("src/")}


def covers(listed: set[str], read: set[str]) -> bool:
    """Whether the listed sources are exactly the files read, a listed folder (a package) standing for
    whatever the stage reads of it: a package's files are one dependency, whichever of them it imports."""
    folders = {dep for dep in listed if (ROOT / dep).is_dir()}
    inside = {path for path in read if any(path.startswith(folder + "/") for folder in folders)}
    return listed - folders == read - inside and all(
        any(p.startswith(f + "/") for p in inside) for f in folders
    )


def test_dvc_yaml_has_the_stages_and_lists_exactly_the_sources_each_reads() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["check_params", *STAGES]
    families = yaml.safe_load((ROOT / "families/dvc.yaml").read_text())["stages"]
    families["train"] = families["train"]["do"]
    assert list(families) == ["train", "evaluate"]
    for name, stage in [*stages.items(), *families.items()]:
        module = re.match(r"python -m (posconv\.stages\.\w+)", stage["cmd"]).group(1)
        assert covers(listed_sources(stage), sources(module)), name


def test_every_stage_runs_after_the_params_are_checked() -> None:
    """check_params first: every other stage of every pipeline depends on its output."""
    for path in ("dvc.yaml", "families/dvc.yaml", "study/dvc.yaml", "coordinates/dvc.yaml"):
        for name, stage in yaml.safe_load((ROOT / path).read_text())["stages"].items():
            stage = stage.get("do", stage)
            assert name == "check_params" or "metrics/params_checked.json" in stage["deps"], (path, name)


def test_study_and_benchmark_stages_list_the_sources_their_results_depend_on() -> None:
    """The benchmark times the layers through its own module; the study's experiments run the train and
    evaluate stages, so their sources are the study's too."""
    stages = yaml.safe_load((ROOT / "study/dvc.yaml").read_text())["stages"]
    assert covers(listed_sources(stages["bench_layers"]), sources("posconv.tools.bench"))
    study = sources("posconv.tools.study", "posconv.stages.train", "posconv.stages.evaluate")
    assert covers(listed_sources(stages["study"]), study)
    assert covers(listed_sources(stages["report"]), sources("posconv.stages.report"))


def library_modules() -> list[str]:
    """Every module of the library: all of posconv outside its stages and tools packages."""
    files = [*(SRC / "posconv").glob("*.py"), *(SRC / "posconv/layers").glob("*.py")]
    names = (".".join(path.relative_to(SRC).with_suffix("").parts) for path in files)
    return sorted(name.removesuffix(".__init__") for name in names if name != "posconv.__init__")


def dvc_imported_by(modules: list[str]) -> list[str]:
    """The dvc and dvclive modules loaded by importing `modules` in a fresh interpreter."""
    loaded = "sorted(m for m in sys.modules if m.split('.')[0] in ('dvc', 'dvclive'))"
    probe = f"import sys, {', '.join(modules)}; print({loaded})"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return ast.literal_eval(result.stdout)


def test_the_library_knows_nothing_of_dvc_nor_of_stages() -> None:
    """Imported in a fresh interpreter, the library's modules pull in neither dvc nor dvclive (all at once:
    one that did would show, and is then found alone), and no module they import (transitively) is a
    stage or a tool."""
    modules = library_modules()
    assert dvc_imported_by(modules) == [], [m for m in modules if dvc_imported_by([m])]
    for module in modules:
        reached = imported_modules(module)
        assert not [m for m in reached if m.startswith(("posconv.stages", "posconv.tools"))], module


def test_the_layers_and_the_model_need_only_the_core_dependencies() -> None:
    """`pip install posconv` (torch and numpy) is enough for the layers and the model: with every
    package of the `pipeline` extra made unimportable, they still import and run."""
    extra = ("dvc", "dvclive", "matplotlib", "pandas", "pydantic", "ruamel", "tqdm")
    probe = (
        f"import sys; sys.modules.update(dict.fromkeys({extra!r}))\n"
        "import torch; from posconv.layers import make_conv; from posconv.model import FCN, ModelSpec\n"
        "assert FCN(ModelSpec('coordconv', 4))(torch.rand(1, 3, 16, 16)).shape == (1, 4, 16, 16)\n"
        "assert make_conv('coordbias', 3, 4, 3)(torch.rand(1, 3, 8, 8)).shape == (1, 4, 6, 6)"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_each_train_stage_lists_exactly_the_model_params_its_network_reads() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    model_fields = set(yaml.safe_load((ROOT / "params.yaml").read_text())["model"])
    for layer in LAYERS:
        fields = spec_fields(layer)
        listed = stages[f"train_{layer}"]["params"]
        named = {p.removeprefix("model.") for p in listed if p.startswith("model.")}
        read = model_fields if "model" in listed else named
        assert read == set(fields), layer
        assert {"device", "train"} <= set(listed), layer


def set_param(project: Path, group: str, key: str, value: object) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[group][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stages_changed_by(project: Path, sh: Callable, group: str, key: str, value: object) -> set[str]:
    """Stages `dvc status` says are out of date after changing one param (then changed back), besides
    check_params (it reads the whole params.yaml; its output does not change, so nothing follows from it)."""
    path = project / "params.yaml"
    original = path.read_text()
    set_param(project, group, key, value)
    try:
        changed = set(json.loads(sh("dvc", "status", "--json").stdout))
        assert "check_params" in changed
        return changed - {"check_params"}
    finally:
        path.write_text(original)


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def read(project: Path, path: str) -> dict:
    return json.loads((project / path).read_text())


def in_unit_interval(value: float | None) -> bool:
    return value is not None and 0.0 <= value <= 1.0


FAMILY_TRAINS = {f"train@{family}" for family in FAMILIES}


def check_scores(result: dict, images: int, size: int) -> None:
    """One model's evaluation: the test split, transfer to the other sizes, equivariance errors."""
    assert sum(map(sum, result["confusion"])) == images * size * size
    assert len(result["recall"]) == 4 and all(r is None or 0 <= r <= 1 for r in result["recall"])
    assert in_unit_interval(result["miou"]) and in_unit_interval(result["pixel_accuracy"])
    assert set(result["transfer"]) == {"24", "40"}  # tests/conftest.py's evaluate.sizes
    for side, scores in result["transfer"].items():
        assert sum(map(sum, scores["confusion"])) == images * int(side) ** 2
    errors = result["equivariance"]
    assert set(errors["translation"]) == {"8"} and set(errors["scale"]) == {"0.75", "1.5"}
    assert all(math.isfinite(e) and e >= 0 for kind in errors.values() for e in kind.values())


def check_family_outputs(project: Path) -> None:
    test_images = read(project, "metrics/data.json")["test"]["images"]
    for family in FAMILIES:
        check_scores(read(project, f"metrics/families/{family}.json"), test_images, 32)
        spec = torch.load(project / f"models/{family}.pt", weights_only=True)["spec"]
        assert spec["layer"] == family and spec["placement"] == "first"  # families.placement
        backends = read(project, f"metrics/train/{family}/metrics.json")["backends"]  # what ran each op
        assert set(backends.values()) <= {"cpp", "eager"}
        assert {op for op in ("involution", "deform") if op in family} == set(backends)


def check_outputs(project: Path, layer: str) -> None:
    data = read(project, "metrics/data.json")
    test_images = data["test"]["images"]
    for model in MODELS:
        train = read(project, f"metrics/train/{model}/metrics.json")
        steps = math.ceil(data["train"]["images"] / 8)
        assert train["steps"] == steps and train["parameters"] > 0
        asked = yaml.safe_load((project / "params.yaml").read_text())["train"]["precision"]
        assert train["precision"] == resolve_precision(asked, torch.device("cpu"))  # what ran
        loss_rows = (project / f"metrics/train/{model}/plots/metrics/train/loss.tsv").read_text().splitlines()
        assert len(loss_rows) == steps + 1  # header + one row per step
        result = read(project, f"metrics/evaluate/{model}.json")
        check_scores(result, test_images, 32)
        assert result["inference_images_per_s"] > 0
    summary = read(project, "metrics/summary.json")
    assert summary["layer"] == layer
    assert set(summary["miou"]) == {"vanilla", layer, "difference"}
    assert summary["parameters"][layer] > summary["parameters"]["vanilla"]
    assert set(summary["position_recall_at_40"]) == {"vanilla", layer, "difference"}
    report = (project / "plots/report.md").read_text()
    assert f"`{layer}` against `vanilla`" in report


@pytest.mark.slow
def test_dvc_repro_runs_the_card_and_nothing_else(reproduced_template: Path) -> None:
    """The shared tiny project (tests/conftest.py) was made by `dvc repro` from scratch: what it ran."""
    ran = ran_stages((reproduced_template.parent / "repro.out").read_text())
    assert ran == {"check_params", *STAGES}  # the card: neither families/ nor coordinates/
    check_outputs(reproduced_template, "coordbias")


@pytest.mark.slow
def test_families_then_each_param_invalidates_exactly_the_stages_that_read_it(reproduced: Path) -> None:
    project, sh = reproduced, runner(reproduced)
    sh("git", "rm", "-rq", "coordinates")  # tests/test_coordinates.py runs it
    families = sh("dvc", "repro", "families/dvc.yaml").stdout  # its data stages are the card's, done
    assert set(re.findall(r"Running stage 'families/dvc.yaml:([\w@]+)'", families)) == {
        *FAMILY_TRAINS,
        "evaluate",
    }
    check_family_outputs(project)
    assert "up to date" in sh("dvc", "status").stdout

    # Each param invalidates exactly the stages that read it; the rest follows from the DAG.
    # (report reads every group: it prints the params it ran with.)
    family = {f"families/dvc.yaml:{stage}" for stage in FAMILY_TRAINS}
    evaluates = {"evaluate", "families/dvc.yaml:evaluate"}
    assert stages_changed_by(project, sh, "generate", "images", 60) == {
        "generate",
        "split",
        "report",
        *evaluates,
    }
    assert stages_changed_by(project, sh, "train", "epochs", 2) == {*STAGES[2:5], "report", *family}
    assert stages_changed_by(project, sh, "evaluate", "examples", 1) == {"report", *evaluates}
    assert stages_changed_by(project, sh, "model", "with_r", True) == {"train_coordconv", "report"}
    assert stages_changed_by(project, sh, "model", "coords_per_input", True) == {"train_coordbias", "report"}
    assert stages_changed_by(project, sh, "families", "placement", "all") == family


@pytest.mark.slow
def test_an_experiment_then_show_plots_remote_and_the_gate(reproduced: Path) -> None:
    project, sh = reproduced, runner(reproduced)
    sh("git", "rm", "-rq", "families", "coordinates")  # the card's pipeline alone (their locks too)
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "tiny results")
    ran = ran_stages(sh("dvc", "exp", "run", "-S", "layer=coordconv").stdout)
    assert ran == {"check_params", "evaluate", "report"}
    check_outputs(project, "coordconv")

    shown = json.loads(sh("dvc", "exp", "show", "--json").stdout)
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    layers = {
        run["data"]["params"]["params.yaml"]["data"]["layer"]: run["data"]["metrics"]["metrics/summary.json"][
            "data"
        ]
        for exp in experiments
        for run in exp["revs"]
    }
    assert layers["coordconv"]["layer"] == "coordconv"
    assert in_unit_interval(layers["coordconv"]["miou"]["coordconv"])

    plots = json.loads(sh("dvc", "plots", "diff", "--json").stdout)["data"]
    loss = plots["Training loss"][0]
    rows = loss["content"]["data"]["values"]
    assert set(loss["revisions"]) == {"workspace", "HEAD"}
    assert {row["filename"].split("/")[0] for row in rows} == set(MODELS)  # three curves on one plot
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    recall = plots["Test recall per class"][0]["content"]["data"]["values"]
    assert all(0 <= float(row["recall"]) <= 1 for row in recall if row["recall"])
    assert {row["class"] for row in recall} == {"background", "yellow_right", "yellow_left", "red_bottom"}
    for model in MODELS:
        circles = plots[f"plots/evaluate/circles_{model}.csv"][0]["content"]["data"]["values"]
        assert circles and {"actual", "predicted"} <= set(circles[0])
    for image in ("plots/data/preview.png", "plots/evaluate/predictions.png", "plots/evaluate/losses.png"):
        assert {entry["type"] for entry in plots[image]} == {"image"}
        assert all(Path(entry["url"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for entry in plots[image])

    # The models are DVC artifacts: pushed to a remote and registered as a version (a GTO git tag, as
    # DVC's model registry expects), one is fetched by name from the repository.
    remote = project.parent / "remote"
    sh("dvc", "remote", "add", "-d", "local", str(remote))
    sh("git", "commit", "-qam", "a DVC remote")
    sh("dvc", "push", "-q")
    sh("git", "tag", "-a", "coordbias-fcn@v0.1.0", "-m", "coordbias-fcn v0.1.0")
    fetched = project.parent / "fetched.pt"
    sh("dvc", "artifacts", "get", str(project), "coordbias-fcn", "-o", str(fetched))
    assert fetched.read_bytes() == (project / "models/coordbias.pt").read_bytes()

    # The CI gate passes on consistent results even without data, models and cache (a fresh clone),
    for cached in ("data", "models", ".dvc/cache"):
        shutil.rmtree(project / cached)
    assert "metrics gate passed" in sh("python", "-m", "posconv.tools.check").stdout
    # and fails below its thresholds, and when code changed after the results were made.
    set_param(project, "check", "min_miou", 1.0)
    low = sh("python", "-m", "posconv.tools.check", check=False)
    assert low.returncode == 1 and "FAIL miou of coordconv" in low.stdout
    with (project / "src/posconv/reporting.py").open("a") as source:
        source.write("# edited after the results were made\n")
    stale = sh("python", "-m", "posconv.tools.check", check=False)
    assert (
        stale.returncode == 1
        and "FAIL report: changed deps src/posconv/reporting.py modified" in stale.stdout
    )
