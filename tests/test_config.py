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
        ("generate.size", "128", "generate.size = '128': expected int"),
        ("generate.size", 12, "generate.size = 12: expected a value in [16, inf]"),
        ("generate.size", 130, "generate.size = 130: expected a multiple of 4"),
        ("generate.images", -5, "generate.images = -5: expected a value in [1, inf]"),
        ("train.epochs", True, "train.epochs = True: expected int"),
        ("train.lr", 0, "train.lr = 0.0: expected a value in (0.0, inf]"),
        ("train.optimizer", "rmsprop", "train.optimizer = 'rmsprop': expected one of sgd, adam, adamw"),
        ("layer", "vanilla", "layer = 'vanilla': expected one of coordbias, coordconv"),
        ("device", "gpu", "device = 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
        ("split.val", 0.9, "split.val + split.test = 1.1: expected < 1"),
        ("generate.images", 2, "generate.images = 2: too few for split val"),
        ("model", 3, "model: expected a mapping of width, "),
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
