"""params.yaml is checked in one place: every bad key, type or range is one line naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from posconv.config import load_params, parse_params
from posconv.errors import BadInput

ROOT = Path(__file__).resolve().parents[1]
GOOD = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value: object) -> dict:
    data = copy.deepcopy(GOOD)
    *parents, key = path.split(".")
    node = data
    for parent in parents:
        node = node[parent]
    if value is KeyError:
        del node[key]
    else:
        node[key] = value
    return data


def test_committed_params_load_typed() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.generate.size == GOOD["generate"]["size"]
    assert isinstance(params.train.lr, float) and params.train.lr == GOOD["train"]["lr"]
    assert sum(params.split_sizes().values()) == params.generate.images


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("generate.colour", 1, "generate.colour: unknown key (known: size, images)"),
        ("model.width", KeyError, "model.width: missing key"),
        ("generate.size", "128", "generate.size = '128': expected an integer"),
        ("generate.size", 12, "generate.size = 12: expected a value >= 16"),
        ("generate.size", 130, "generate.size = 130: expected a multiple of 4"),
        ("generate.images", -5, "generate.images = -5: expected a value >= 1"),
        (
            "generate.images",
            2**63,
            "generate.images = 9223372036854775808: expected a value <= 9223372036854775807",
        ),
        ("train.epochs", True, "train.epochs = True: expected an integer"),
        ("train.epochs", 3.0, "train.epochs = 3.0: expected an integer"),
        ("train.lr", 0, "train.lr = 0: expected a value > 0.0"),
        ("train.lr", float("nan"), "train.lr = nan: expected a finite number"),
        ("train.lr", float("inf"), "train.lr = inf: expected a finite number"),
        ("train.lr", "1e-3", "train.lr = '1e-3': expected a number"),
        ("train.seed", -1, "train.seed = -1: expected a value >= 0"),
        ("train.optimizer", "rmsprop", "train.optimizer = 'rmsprop': expected one of sgd, adam, adamw"),
        ("train.channels_last", "yes", "train.channels_last = 'yes': expected true or false"),
        ("layer", "vanilla", "layer = 'vanilla': expected one of coordbias, coordconv"),
        ("device", "gpu", "device = 'gpu': expected one of auto, cpu, cuda, cuda:N, mps"),
        ("split.val", 0.9, "split.val + split.test = 1.1: expected < 1"),
        ("split.val", float("nan"), "split.val = nan: expected a finite number"),
        ("generate.images", 2, "generate.images = 2: too few for split val"),
        ("check.min_miou", float("nan"), "check.min_miou = nan: expected a finite number"),
        ("check.min_miou", 1.5, "check.min_miou = 1.5: expected a value <= 1.0"),
        ("model", 3, "model: expected a mapping of keys, found 3"),
        ("model.coords_per_input", 1, "model.coords_per_input = 1: expected true or false"),
        ("families.placement", "deep", "families.placement = 'deep': expected one of encoder, all, first"),
        ("evaluate.sizes", 96, "evaluate.sizes = 96: expected a list"),
        ("evaluate.sizes", [96, 98], "evaluate.sizes.1 = 98: expected a multiple of 4"),
        ("evaluate.sizes", [96, 96], "evaluate.sizes = [96, 96]: expected each value once"),
        ("evaluate.shifts", [0], "evaluate.shifts.0 = 0: expected a value >= 1"),
        ("evaluate.shifts", [128], "evaluate.shifts: 128 px: expected < generate.size = 128"),
        ("evaluate.scales", [float("nan")], "evaluate.scales.0 = nan: expected a finite number"),
        ("evaluate.scales", [0.01], "evaluate.scales: 0.01: rescales generate.size = 128 below 8 px"),
        ("evaluate.equivariance_images", 0, "evaluate.equivariance_images = 0: expected a value >= 1"),
        (
            "check.min_transfer_position_recall",
            2,
            "check.min_transfer_position_recall = 2: expected a value <= 1.0",
        ),
    ],
)
def test_bad_params_name_the_key(path: str, value: object, message: str) -> None:
    with pytest.raises(BadInput) as error:
        parse_params(with_change(path, value))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_int_is_accepted_where_a_float_is_expected() -> None:
    assert parse_params(with_change("train.lr", 1)).train.lr == 1.0


def test_unreadable_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [unclosed\n")
    with pytest.raises(BadInput, match=r"params.yaml: not valid YAML") as error:
        load_params(bad)
    assert "\n" not in str(error.value)


def test_params_are_read_as_dvc_reads_them(tmp_path: Path) -> None:
    """YAML 1.2, as DVC's ruamel.yaml: `1e-3` is a float, an unquoted `yes` is a string."""
    text = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("lr: 0.002", "lr: 2e-3"))
    assert load_params(path).train.lr == 0.002
    path.write_text(text.replace("channels_last: true", "channels_last: yes"))
    with pytest.raises(BadInput, match=r"train\.channels_last = 'yes': expected true or false"):
        load_params(path)
