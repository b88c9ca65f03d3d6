"""Precision: `auto` takes bfloat16 autocast only where the hardware computes it natively, and scores
made in bfloat16 agree with float32's within a stated tolerance."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from posconv import engine
from posconv.config import load_params
from posconv.engine import LabelledImages, autocast, native_bf16, place, resolve_precision, train, validate
from posconv.model import FCN, ModelSpec
from posconv.scenes import draw_scenes, image_stream

CPU = torch.device("cpu")
SCORE_TOLERANCE = 0.03  # |bf16 - fp32| of validation mIoU and position recall, on the same model (0.025 seen)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (frozenset(), "fp32"),  # no native bf16: nothing changes
        (frozenset({"avx512f", "avx512bw", "avx512vl"}), "fp32"),  # AVX-512 alone emulates bf16
        (frozenset({"avx512f", "avx512_bf16"}), "bf16"),
        (frozenset({"amx_tile", "amx_bf16"}), "bf16"),
    ],
)
def test_auto_takes_bf16_only_on_a_cpu_with_native_bf16(
    flags: frozenset[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "cpu_flags", lambda: flags)
    assert native_bf16(CPU) == (expected == "bf16")
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast(CPU, "auto"):
        dtype = conv(torch.rand(1, 3, 8, 8)).dtype
    assert dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def test_cpu_flags_are_read_from_this_machine() -> None:
    """On Linux the flags hold at least the instruction sets every x86-64 or arm64 CPU reports."""
    flags = engine.cpu_flags()
    assert not flags or {"sse2", "fp", "asimd"} & flags


def test_bf16_validation_scores_agree_with_fp32_within_the_stated_tolerance() -> None:
    """A briefly trained network scored on held-out scenes in both precisions."""
    scenes = draw_scenes(128, 32, image_stream(0, 0))
    data = LabelledImages.from_arrays(scenes.images, scenes.labels, CPU)
    train_part = LabelledImages(data.images[:96], data.labels[:96])
    held_out = LabelledImages(data.images[96:], data.labels[96:])
    settings = load_params(ROOT / "params.yaml").train.model_copy(update={"epochs": 20, "precision": "bf16"})
    torch.manual_seed(0)
    model = place(FCN(ModelSpec("coordbias", 8)), CPU, settings.channels_last)

    class Quiet:
        def train_loss(self, step: int, loss: float) -> None: ...
        def validation(self, step: int, scores: dict) -> None: ...

    train(model, train_part, held_out, settings, Quiet(), val_every=10**6, val_batch_size=8)
    scores = {p: validate(model, held_out, 8, p, settings.channels_last) for p in ("fp32", "bf16")}
    assert scores["fp32"]["miou"] > 0.5  # a model that has learned something, so the check can fail
    for key in ("miou", "position_recall"):
        assert abs(scores["bf16"][key] - scores["fp32"][key]) <= SCORE_TOLERANCE, key
