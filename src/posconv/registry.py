"""Names and paths that the library, the stages and the tools share, each defined once here.

Paths are relative to the project root and are what `dvc.yaml` declares; only stages and tools use
them, and they hand the library the paths it needs. Nothing here imports torch or DVC.
"""

from __future__ import annotations

INT64_MAX = 2**63 - 1  # the largest count or seed a param or flag may hold
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"  # the device names params and flags accept

# ---- classes ----

CLASS_NAMES = ("background", "yellow_right", "yellow_left", "red_bottom")
N_CLASSES = len(CLASS_NAMES)
BACKGROUND, RIGHT_YELLOW, LEFT_YELLOW, BOTTOM_RED = range(N_CLASSES)
POSITION_CLASSES = (RIGHT_YELLOW, LEFT_YELLOW, BOTTOM_RED)  # the classes that depend on where a circle is

# ---- layers: the names the factory builds; the pipeline trains LAYERS and compares with BASELINE ----

VANILLA, COORDBIAS, COORDCONV = "vanilla", "coordbias", "coordconv"
LAYERS = (VANILLA, COORDBIAS, COORDCONV)  # trained by the pipeline's train stages
BASELINE = VANILLA
# content-adaptive layers (seeds 003, 004), alone and given coordinates
INVOLUTION, COORD_INVOLUTION, DEFORM, COORD_DEFORM = "involution", "coordinvolution", "deform", "coorddeform"
CONTENT_ADAPTIVE = (INVOLUTION, COORD_INVOLUTION, DEFORM, COORD_DEFORM)
# Deep Scale-Spaces (seed 004's own proposal): Gaussian lifting, bilinear lifting (DSS v2), deformable
DSS, DSS_BILINEAR, DSS_DEFORM = "dss", "dss_bilinear", "dss_deform"
SCALE_SPACE = (DSS, DSS_BILINEAR, DSS_DEFORM)
LOCAL = "local"  # a kernel of its own at every output location (seed 003's spatial-specific filter)
LOCALLY_CONNECTED = (LOCAL,)
FAMILIES = CONTENT_ADAPTIVE + SCALE_SPACE + LOCALLY_CONNECTED  # trained and scored by families/dvc.yaml
FACTORY_LAYERS = LAYERS + FAMILIES

# ---- pipeline outputs ----

PARAMS_CHECKED = "metrics/params_checked.json"  # check_params: the same bytes whenever params are valid
SCENES = "data/scenes"
SPLIT = "data/split.npz"
DATA_METRICS = "metrics/data.json"
PREVIEW = "plots/data/preview.png"
EVALUATE_METRICS = "metrics/evaluate"
SUMMARY = "metrics/summary.json"
EVALUATE_PLOTS = "plots/evaluate"
REPORT = "plots/report.md"
STUDY_REPORT = "plots/study.md"  # study/dvc.yaml: the study, the benchmarks, the other pipelines
FAMILIES_METRICS = "metrics/families"  # families/dvc.yaml: the other families' scores
STUDY = "metrics/study.json"
TOLERANCES = "metrics/tolerances.json"  # the study's seed-to-seed spread: what a reproduction may differ by
BENCH_LAYERS = "metrics/bench_layers.json"


def model_path(layer: str) -> str:
    return f"models/{layer}.pt"


def train_dir(layer: str) -> str:
    """The train stage's DVCLive folder for `layer`."""
    return f"metrics/train/{layer}"


def train_metrics(layer: str) -> str:
    return f"{train_dir(layer)}/metrics.json"


def loss_curve(layer: str, split: str) -> str:
    """DVCLive's per-step loss of `split` ("train" or "val"), where `log_metric(f"{split}/loss")` puts it."""
    return f"{train_dir(layer)}/plots/metrics/{split}/loss.tsv"


def evaluate_metrics(layer: str) -> str:
    return f"{EVALUATE_METRICS}/{layer}.json"


def model_metrics(model: str) -> tuple[str, str]:
    """A trained model's (evaluation, training) metrics files, whichever pipeline trains it."""
    return family_metrics(model) if model in FAMILIES else evaluate_metrics(model), train_metrics(model)


def family_metrics(layer: str) -> str:
    """A content-adaptive layer's scores, written by families/dvc.yaml's evaluate stage."""
    return f"{FAMILIES_METRICS}/{layer}.json"


def scale_key(factor: float) -> str:
    """A rescaling's key in the metrics: the float's shortest exact repr, so that two factors never
    share a key however close they are (1.5 and 1.50001 are "1.5" and "1.50001")."""
    return repr(float(factor))
