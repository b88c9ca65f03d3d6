"""Metrics against answers worked out by hand on two 4x4 scenes, not by re-running the library."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from posconv import metrics
from posconv.errors import BadInput
from posconv.metrics import (
    circle_accuracy,
    circle_votes,
    class_scores,
    colour_families,
    confusion_matrix,
    position_accuracy,
    position_error_rate,
    position_recall,
    score,
)

IMAGE_IDS = np.array([7, 3])  # row i of the arrays is global image IMAGE_IDS[i]
# Draw order of the circle on top at each pixel, "." for background. Circles need not be round here.
OWNERS = [
    ["..00", "..00", "1122", "11.2"],
    ["00..", "0011", "..11", "...."],
]
CIRCLES = pd.DataFrame(
    [
        (7, 0, "yellow", 3.0, 1.0, 1.0, 1, 4),  # right yellow
        (7, 1, "yellow", 1.0, 3.0, 1.0, 2, 4),  # left yellow
        (7, 2, "red", 3.0, 3.0, 1.0, 3, 3),  # bottom red
        (3, 0, "yellow", 1.0, 1.0, 1.0, 2, 4),  # left yellow
        (3, 1, "red", 3.0, 2.0, 1.0, 0, 4),  # top red (cy <= size/2): background class
        (3, 2, "red", 2.0, 3.0, 1.0, 3, 0),  # fully covered: no vote
        (5, 0, "yellow", 3.0, 1.0, 1.0, 1, 9),  # an image outside the evaluated subset: no vote
    ],
    columns=["image", "order", "colour", "cx", "cy", "radius", "label", "visible"],
)
# Counted by hand from OWNERS and CIRCLES: class 0 = 5 + 8 background + 4 top red, class 1 = 4,
# class 2 = 4 + 4, class 3 = 3. Circle pixels: 19 (yellow 12, red 7).
CLASS_PIXELS, PIXELS, CIRCLE_PIXELS = [17, 4, 8, 3], 32, 19
VOTERS = [(7, 0), (7, 1), (7, 2), (3, 0), (3, 1)]  # (image, order) of the circles with visible pixels


def _paint(owners: np.ndarray, column: str, background: object) -> np.ndarray:
    """Each pixel takes `column` of the circle on top, `background` where there is none."""
    value = {(image, order): v for image, order, v in CIRCLES[["image", "order", column]].itertuples(False)}
    return np.array(
        [
            [[value.get((IMAGE_IDS[i], o), background) for o in row] for row in image]
            for i, image in enumerate(owners)
        ]
    )


@pytest.fixture
def scene() -> dict:
    owners = np.array(
        [[[255 if c == "." else int(c) for c in row] for row in image] for image in OWNERS], np.uint8
    )
    images = np.random.default_rng(0).integers(0, 129, (*owners.shape, 3), dtype=np.uint8)
    colours = _paint(owners, "colour", "none")
    images[colours == "yellow"] = (255, 255, 0)
    images[colours == "red"] = (255, 0, 0)
    return {"labels": _paint(owners, "label", 0).astype(np.uint8), "images": images, "owners": owners}


def _score(scene: dict, preds: np.ndarray) -> dict:
    votes = circle_votes(preds, scene["owners"], CIRCLES, IMAGE_IDS)
    return score(scene["labels"], preds, scene["images"], votes, bins=2)


def _votes(scene: dict, preds: np.ndarray) -> pd.DataFrame:
    return circle_votes(preds, scene["owners"], CIRCLES, IMAGE_IDS)


def test_fixture_matches_hand_counts(scene: dict) -> None:
    assert np.bincount(scene["labels"].ravel()).tolist() == CLASS_PIXELS
    assert (colour_families(scene["images"]) != 0).sum() == CIRCLE_PIXELS


def test_always_background(scene: dict) -> None:
    result = _score(scene, np.zeros_like(scene["labels"]))
    assert result["confusion"] == [[17, 0, 0, 0], [4, 0, 0, 0], [8, 0, 0, 0], [3, 0, 0, 0]]
    assert result["recall"] == [1.0, 0.0, 0.0, 0.0]
    assert result["precision"] == [pytest.approx(17 / 32), None, None, None]
    assert result["iou"] == [pytest.approx(17 / 32), 0.0, 0.0, 0.0]
    assert result["miou"] == pytest.approx(17 / 32 / 4)
    assert result["pixel_accuracy"] == pytest.approx(17 / 32)
    assert result["position_error_rate"] == pytest.approx(3 / 19)  # only the bottom red pixels
    assert result["circle_accuracy"] == pytest.approx(1 / 5)  # only the top red circle


def test_perfect_model(scene: dict) -> None:
    result = _score(scene, scene["labels"].copy())
    assert result["recall"] == result["precision"] == result["iou"] == [1.0] * 4
    assert result["miou"] == result["pixel_accuracy"] == result["circle_accuracy"] == 1.0
    assert result["position_error_rate"] == 0.0


def test_model_that_swaps_left_and_right_yellow(scene: dict) -> None:
    preds = np.array([0, 2, 1, 3], np.uint8)[scene["labels"]]
    result = _score(scene, preds)
    assert result["confusion"] == [[17, 0, 0, 0], [0, 0, 4, 0], [0, 8, 0, 0], [0, 0, 0, 3]]
    assert result["recall"] == result["iou"] == [1.0, 0.0, 0.0, 1.0]
    assert result["miou"] == 0.5
    assert result["position_error_rate"] == pytest.approx(12 / 19)
    assert result["circle_accuracy"] == pytest.approx(2 / 5)  # the two red circles
    # bins of width 2: yellow centres x = 3 | 1, 1; red centres y = 3, 2 (2 falls in the upper bin)
    assert result["position_accuracy"] == {
        "x": [{"centre": 1.0, "accuracy": 0.0, "circles": 2}, {"centre": 3.0, "accuracy": 0.0, "circles": 1}],
        "y": [
            {"centre": 1.0, "accuracy": None, "circles": 0},
            {"centre": 3.0, "accuracy": 1.0, "circles": 2},
        ],
    }


def test_position_errors_ignore_colour_errors(scene: dict) -> None:
    families = colour_families(scene["images"])
    yellow_as_red = np.where(np.isin(scene["labels"], (1, 2)), 3, scene["labels"]).astype(np.uint8)
    assert position_error_rate(scene["labels"], yellow_as_red, families) == 0.0
    top_red_as_bottom = np.where((families == 2) & (scene["labels"] == 0), 3, scene["labels"]).astype(
        np.uint8
    )
    assert position_error_rate(scene["labels"], top_red_as_bottom, families) == pytest.approx(4 / 19)


def test_votes_cover_visible_circles_of_the_subset_only(scene: dict) -> None:
    votes = _votes(scene, scene["labels"])
    assert list(zip(votes["image"], votes["order"], strict=True)) == VOTERS
    assert votes["predicted"].tolist() == [1, 2, 3, 2, 0]
    assert votes["correct"].all()


def test_vote_ties_go_to_the_lowest_class() -> None:
    owners = np.zeros((3, 2, 2), np.uint8)  # one circle (order 0) covering each image
    preds = np.array([[[2, 2], [1, 1]], [[3, 0], [3, 0]], [[3, 3], [1, 2]]], np.uint8)
    circles = pd.DataFrame({"image": [0, 1, 2], "order": 0, "label": [1, 0, 3], "visible": 4})
    votes = circle_votes(preds, owners, circles, np.arange(3))
    assert votes["predicted"].tolist() == [1, 0, 3]
    assert votes["correct"].tolist() == [True, True, True]


def test_votes_refuse_a_circle_table_from_other_data(scene: dict) -> None:
    circles = CIRCLES.assign(visible=CIRCLES["visible"] + 1)
    with pytest.raises(BadInput, match="visible"):
        circle_votes(scene["labels"], scene["owners"], circles, IMAGE_IDS)


def test_absent_class_gives_none_not_nan() -> None:
    labels = np.zeros((1, 2, 2), np.uint8)
    preds = np.array([[[0, 0], [0, 3]]], np.uint8)
    scores = class_scores(confusion_matrix(labels, preds))
    assert scores["recall"] == [0.75, None, None, None]  # class 3 has no true pixel
    assert scores["precision"] == [1.0, None, None, 0.0]
    assert scores["iou"] == [0.75, None, None, 0.0]  # class 3 was predicted: union 1, IoU 0
    assert scores["miou"] == 0.375
    json.dumps(scores, allow_nan=False)


def test_no_pixels_at_all_gives_none() -> None:
    scores = class_scores(np.zeros((4, 4), np.int64))
    assert scores["miou"] is scores["pixel_accuracy"] is None
    no_circles = np.zeros((1, 2, 2), np.uint8)
    assert position_error_rate(no_circles, no_circles, no_circles) is None


def test_position_recall_averages_the_defined_position_classes() -> None:
    assert position_recall([1.0, 0.5, None, 0.25]) == 0.375
    assert position_recall([1.0, None, None, None]) is None


def test_colour_families_from_pixel_colours() -> None:
    pixels = [(255, 255, 0), (255, 0, 0), (128, 128, 128), (255, 128, 0), (255, 255, 255), (0, 255, 0)]
    images = np.array([[pixels]], np.uint8)
    assert colour_families(images).tolist() == [[[1, 2, 0, 0, 0, 0]]]
    assert colour_families(images).dtype == np.uint8
    with pytest.raises(BadInput, match="uint8"):
        colour_families(images / 255)


def test_binned_position_accuracy_on_a_hand_made_table() -> None:
    votes = pd.DataFrame(
        [  # label, cx, cy, correct
            (1, 1.0, 7.0, True),
            (2, 3.0, 7.0, False),
            (1, 5.0, 1.0, True),
            (1, 8.0, 1.0, True),  # on the far edge: last bin
            (3, 1.0, 6.0, False),  # red: binned by y, whatever x
            (0, 1.0, 7.5, True),
        ],
        columns=["label", "cx", "cy", "correct"],
    )
    assert circle_accuracy(votes) == pytest.approx(4 / 6)
    assert position_accuracy(votes, size=8, bins=2) == {
        "x": [{"centre": 2.0, "accuracy": 0.5, "circles": 2}, {"centre": 6.0, "accuracy": 1.0, "circles": 2}],
        "y": [
            {"centre": 2.0, "accuracy": None, "circles": 0},
            {"centre": 6.0, "accuracy": 0.5, "circles": 2},
        ],
    }
    assert circle_accuracy(votes.iloc[:0]) is None


def test_score_is_plain_json(scene: dict) -> None:
    with_circles = _score(scene, np.zeros_like(scene["labels"]))
    without = score(scene["labels"], scene["labels"], scene["images"])
    for result in (with_circles, without):
        assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert without["circle_accuracy"] is without["position_accuracy"] is None
    assert without["position_error_rate"] == 0.0


@pytest.mark.parametrize(
    ("labels", "preds", "message"),
    [
        (np.full((1, 2, 2), 4, np.uint8), np.zeros((1, 2, 2), np.uint8), "labels hold values 4..4"),
        (np.zeros((1, 2, 2), np.uint8), np.zeros((1, 2, 3), np.uint8), "shapes differ"),
    ],
)
def test_bad_arrays_are_refused(labels: np.ndarray, preds: np.ndarray, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        confusion_matrix(labels, preds)


def _naive_confusion(labels: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
    confusion = np.zeros((n, n), np.int64)
    for true, predicted in zip(labels.ravel().tolist(), preds.ravel().tolist(), strict=True):
        confusion[true, predicted] += 1
    return confusion


@given(
    pair=hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=6).flatmap(
        lambda shape: st.tuples(*[hnp.arrays(np.uint8, shape, elements=st.integers(0, 3))] * 2)
    ),
    chunk_pixels=st.integers(1, 64),
)
def test_confusion_matches_a_naive_loop_whatever_the_chunking(
    pair: tuple[np.ndarray, np.ndarray], chunk_pixels: int
) -> None:
    labels, preds = pair
    with mock.patch.object(metrics, "CHUNK_PIXELS", chunk_pixels):
        confusion = confusion_matrix(labels, preds)
    assert confusion.dtype == np.int64
    assert confusion.sum() == labels.size
    np.testing.assert_array_equal(confusion, _naive_confusion(labels, preds, 4))
