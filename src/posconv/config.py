"""Typed params: `params.yaml` is read and checked here, and nowhere else.

Pydantic models declare every key with its type and range; unknown keys, wrong types (no silent
coercion: `"128"` is not 128, `true` is not 1), NaN and infinities are refused. The first problem
becomes one `BadInput` line: the key path, the value, what was expected. The file is read with
ruamel.yaml's YAML 1.2 loader, as DVC reads it, so what runs is what `dvc.lock` records.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from posconv.errors import BadInput
from posconv.registry import BASELINE, DEVICE_PATTERN, INT64_MAX, LAYERS

StudiedLayer = Literal[tuple(layer for layer in LAYERS if layer != BASELINE)]  # type: ignore[valid-type]

Count = Annotated[int, Field(ge=1, le=INT64_MAX)]
Seed = Annotated[int, Field(ge=0, le=INT64_MAX)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Threshold = Annotated[float, Field(ge=0.0, le=1.0)]
Placement = Literal["encoder", "all", "first"]  # where a network's position-aware layers go
ImageSide = Annotated[int, Field(ge=16, le=8192, multiple_of=4)]  # the noise cell is size/4


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class GenerateParams(_Group):
    size: ImageSide
    images: Count


class SplitParams(_Group):
    val: Fraction
    test: Fraction

    @model_validator(mode="after")
    def _train_keeps_some(self) -> SplitParams:
        if self.val + self.test >= 1:
            raise BadInput(
                f"split.val + split.test = {self.val + self.test:g}: expected < 1 (train takes the rest)"
            )
        return self


class ModelParams(_Group):
    width: Annotated[int, Field(ge=2, le=4096, multiple_of=2)]  # the decoder ends at width/2
    encoder_batchnorm: bool
    placement: Placement
    coords: Literal["centered", "seed", "constant", "shuffled"]
    with_r: bool
    coords_per_input: bool = False  # coordbias: the seed's first form, (C_out, C_in, 2) coordinate weights


class FamiliesParams(_Group):
    placement: Placement


class TrainParams(_Group):
    seed: Seed
    epochs: Count
    batch_size: Count
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: Annotated[float, Field(gt=0.0)]
    momentum: Annotated[float, Field(ge=0.0, le=1.0)]
    weight_decay: Annotated[float, Field(ge=0.0)]
    schedule: Literal["none", "cosine"]
    precision: Literal["auto", "fp32", "bf16"]
    channels_last: bool
    fused_conv: bool
    val_every: Count
    processes: Annotated[int, Field(ge=1, le=1024)] = 1  # DDP ranks on this machine (1: no DDP)

    @model_validator(mode="after")
    def _processes_share_each_batch(self) -> TrainParams:
        if self.batch_size % self.processes:
            raise BadInput(
                f"train.batch_size = {self.batch_size}: not divisible by train.processes = {self.processes} "
                "(each process takes an equal share of every batch)"
            )
        return self


class EvaluateParams(_Group):
    batch_size: Count
    position_bins: Annotated[int, Field(ge=2, le=10_000)]
    examples: Count
    sizes: list[ImageSide] = []  # other image sides the models are also scored at (transfer)
    shifts: list[Annotated[int, Field(ge=1, le=4096)]] = []  # translation steps, pixels (equivariance)
    scales: list[Annotated[float, Field(gt=0.0, le=8.0)]] = []  # rescaling factors (equivariance)
    equivariance_images: Count = 32  # test images the equivariance errors are measured on

    @model_validator(mode="after")
    def _each_once(self) -> EvaluateParams:
        for key in ("sizes", "shifts", "scales"):
            values = getattr(self, key)
            if len(set(values)) < len(values):
                raise BadInput(f"evaluate.{key} = {values}: expected each value once")
        return self


class CheckParams(_Group):
    min_miou: Threshold
    min_position_recall: Threshold
    min_transfer_position_recall: Threshold = 0.0  # at each of evaluate.sizes


class Params(_Group):
    seed: Seed
    device: Annotated[str, Field(pattern=f"^({DEVICE_PATTERN})$")]
    layer: StudiedLayer
    generate: GenerateParams
    split: SplitParams
    model: ModelParams
    train: TrainParams
    families: FamiliesParams
    evaluate: EvaluateParams
    check: CheckParams

    @model_validator(mode="after")
    def _every_split_has_images(self) -> Params:
        for name, count in self.split_sizes().items():
            if count < 1:
                raise BadInput(
                    f"generate.images = {self.generate.images}: too few for split {name} "
                    f"(split.val = {self.split.val:g}, split.test = {self.split.test:g} leave it no image)"
                )
        return self

    @model_validator(mode="after")
    def _transformations_fit_the_images(self) -> Params:
        size = self.generate.size
        for shift in self.evaluate.shifts:
            if shift >= size:
                raise BadInput(f"evaluate.shifts: {shift} px: expected < generate.size = {size}")
        for scale in self.evaluate.scales:
            if round(size * scale) < 8:
                raise BadInput(f"evaluate.scales: {scale:g}: rescales generate.size = {size} below 8 px")
        return self

    @model_validator(mode="after")
    def _evaluation_fits_the_test_split(self) -> Params:
        test = self.split_sizes()["test"]
        for key in ("equivariance_images", "examples"):
            if (value := getattr(self.evaluate, key)) > test:
                raise BadInput(f"evaluate.{key} = {value}: expected at most the test split's {test} images")
        return self

    def split_sizes(self) -> dict[str, int]:
        """Images per split: val and test rounded from their fractions, train takes the rest."""
        val = round(self.generate.images * self.split.val)
        test = round(self.generate.images * self.split.test)
        return {"train": self.generate.images - val - test, "val": val, "test": test}


_EXPECTED = {  # pydantic error type -> what was expected, from the error's context
    "greater_than": "a value > {gt}",
    "greater_than_equal": "a value >= {ge}",
    "less_than": "a value < {lt}",
    "less_than_equal": "a value <= {le}",
    "multiple_of": "a multiple of {multiple_of}",
    "literal_error": "one of {expected}",
    "string_pattern_mismatch": "one of auto, cpu, cuda, cuda:N, mps",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "finite_number": "a finite number",
}


def _group_at(loc: tuple[int | str, ...]) -> type[BaseModel]:
    group: type[BaseModel] = Params
    for name in loc:
        group = group.model_fields[str(name)].annotation  # type: ignore[assignment]
    return group


def _short(value: Any, limit: int = 60) -> str:
    """A value's repr, cut to `limit` characters (a deeply nested or huge value stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(error: ErrorDetails) -> str:
    """One line for pydantic's first error: the key path, the value, what was expected."""
    key = ".".join(map(str, error["loc"])) or "params.yaml"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (known: {', '.join(_group_at(error['loc'][:-1]).model_fields)})"
    if error["type"] == "missing":
        return f"{key}: missing key"
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: expected a mapping of keys, found {_short(error['input'])}"
    context = {name: value for name, value in (error.get("ctx") or {}).items()}
    if error["type"] == "literal_error":  # pydantic writes "'a', 'b' or 'c'"
        context["expected"] = re.sub(r"'(\w+)'", r"\1", context["expected"]).replace(" or ", ", ")
    expected = _EXPECTED.get(error["type"], error["msg"].lower()).format(**context)
    return f"{key} = {_short(error['input'])}: expected {expected}"


def parse_params(data: Any) -> Params:
    """Check a params mapping (as loaded from YAML) and return typed `Params`."""
    if not isinstance(data, dict):
        raise BadInput("params.yaml: expected a mapping at the top level")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise BadInput(_describe(error.errors()[0])) from None


def parse_yaml(text: str, where: str | Path) -> Any:
    """YAML text read as DVC reads it (ruamel.yaml, YAML 1.2), its problems as one `BadInput` line."""
    try:
        return YAML(typ="safe").load(text)
    except YAMLError as error:
        raise BadInput(f"{where}: not valid YAML ({' '.join(str(error).split())})") from None
    except RecursionError:
        raise BadInput(f"{where}: nested too deeply to read") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file read as DVC reads it, its problems as one `BadInput` line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: not readable ({error})") from None
    return parse_yaml(text, path)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check `params.yaml`."""
    return parse_params(read_yaml(path))
