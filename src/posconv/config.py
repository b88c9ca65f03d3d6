"""Typed params: `params.yaml` is read and checked here, and nowhere else.

Every key must be known, of the right type and in range; the first problem is raised as
`BadInput` naming the key and what is allowed, before any stage writes anything.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from posconv.errors import BadInput

LayerName = Literal["vanilla", "coordbias", "coordconv"]
LAYERS: tuple[str, ...] = typing.get_args(LayerName)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _range(low: float | None = None, high: float | None = None, *, open_low: bool = False) -> Any:
    """A field whose value must lie in [low, high] (or (low, high] with `open_low`)."""
    return field(metadata={"low": low, "high": high, "open_low": open_low})


@dataclass(frozen=True)
class GenerateParams:
    size: int = _range(16)
    images: int = _range(1)

    def __post_init__(self) -> None:
        if self.size % 4:
            raise BadInput(f"generate.size = {self.size}: expected a multiple of 4 (noise cell is size/4)")


@dataclass(frozen=True)
class SplitParams:
    val: float = _range(0.0, 1.0, open_low=True)
    test: float = _range(0.0, 1.0, open_low=True)

    def __post_init__(self) -> None:
        if self.val + self.test >= 1:
            raise BadInput(
                f"split.val + split.test = {self.val + self.test:g}: expected < 1 (train takes the rest)"
            )


@dataclass(frozen=True)
class ModelParams:
    width: int = _range(2)
    encoder_batchnorm: bool
    placement: Literal["encoder", "all", "first"]
    coords: Literal["centered", "seed", "constant", "shuffled"]
    with_r: bool

    def __post_init__(self) -> None:
        if self.width % 2:
            raise BadInput(
                f"model.width = {self.width}: expected an even number (the decoder ends at width/2)"
            )


@dataclass(frozen=True)
class TrainParams:
    seed: int = _range(0)
    epochs: int = _range(1)
    batch_size: int = _range(1)
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float = _range(0.0, open_low=True)
    momentum: float = _range(0.0, 1.0)
    weight_decay: float = _range(0.0)
    schedule: Literal["none", "cosine"]
    precision: Literal["auto", "fp32", "bf16"]
    channels_last: bool
    val_every: int = _range(1)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _range(1)
    position_bins: int = _range(2)
    examples: int = _range(1)


@dataclass(frozen=True)
class CheckParams:
    min_miou: float = _range(0.0, 1.0)
    min_position_recall: float = _range(0.0, 1.0)


@dataclass(frozen=True)
class Params:
    seed: int = _range(0)
    device: str
    layer: Literal["coordbias", "coordconv"]
    generate: GenerateParams
    split: SplitParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    check: CheckParams

    def __post_init__(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise BadInput(f"device = {self.device!r}: expected auto, cpu, cuda, cuda:N or mps")
        for name, count in self.split_sizes().items():
            if count < 1:
                raise BadInput(
                    f"generate.images = {self.generate.images}: too few for split {name} "
                    f"(split.val = {self.split.val:g}, split.test = {self.split.test:g} leave it no image)"
                )

    def split_sizes(self) -> dict[str, int]:
        """Images per split: val and test rounded from their fractions, train takes the rest."""
        val = round(self.generate.images * self.split.val)
        test = round(self.generate.images * self.split.test)
        return {"train": self.generate.images - val - test, "val": val, "test": test}


def _check_value(key: str, value: Any, kind: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Return `value` if it fits the annotation `kind` and range in `meta`, else raise."""
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise BadInput(
                f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(kind))}"
            )
        return _build(kind, value, f"{key}.")
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed or isinstance(value, bool):
            raise BadInput(f"{key} = {value!r}: expected one of {', '.join(map(str, allowed))}")
        return value
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise BadInput(f"{key} = {value!r}: expected {kind.__name__}")
    low, high = meta.get("low"), meta.get("high")
    below = low is not None and (value <= low if meta.get("open_low") else value < low)
    if below or (high is not None and value > high):
        bracket = "(" if meta.get("open_low") else "["
        raise BadInput(
            f"{key} = {value!r}: expected a value in {bracket}{low}, {'inf' if high is None else high}]"
        )
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise BadInput(f"{prefix}{key}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, spec in fields.items():
        if name not in data:
            raise BadInput(f"{prefix}{name}: missing key")
        kind = hints[name]
        if isinstance(kind, types.UnionType):
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        values[name] = _check_value(f"{prefix}{name}", data[name], kind, spec.metadata)
    return cls(**values)


def parse_params(data: Any) -> Params:
    """Check a params mapping (as loaded from YAML) and return typed `Params`."""
    if not isinstance(data, dict):
        raise BadInput("params.yaml: expected a mapping at the top level")
    return _build(Params, data)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check `params.yaml`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except yaml.YAMLError as error:
        raise BadInput(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    return parse_params(data)
