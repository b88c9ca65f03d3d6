"""CoordConv's coordinate-transform benchmark (posconv.coordinates, coordinates/dvc.yaml): the data against
the published generator's rules, drawn independently; the metrics on hand-made predictions; every
network's parameters against its formula; the one function class of coordconv and coordbias at a 1x1
slot; the verdicts and the report's words; the stages' bad input; and the pipeline under real DVC."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from test_pipeline import covers, listed_sources, sources

from posconv import coordinates as cc
from posconv import reporting
from posconv.layers import involution
from posconv.registry import COORD_SPLITS, COORD_TASKS

# ---- the data ----


def test_the_sweep_is_the_generators_double_loop() -> None:
    expected = [(x, y) for x in range(4, 64 - 4) for y in range(4, 64 - 4)]  # objectsweep_generator
    assert cc.sweep_centres().tolist() == [list(c) for c in expected] and len(expected) == 3136


PICKED = [0, 1, 55, 56, 1000, 1567, 3079, 3135]  # corners of the sweep and some inside


def test_onehots_and_renderings_against_an_explicit_drawing() -> None:
    sweep = cc.Sweep.generate()
    for i in PICKED:
        x, y = sweep.centres[i]
        onehot = [[0] * 64 for _ in range(64)]
        onehot[y][x] = 1  # field[center[1], center[0]]
        square = [
            [128 if x - 4 <= col <= x + 4 and y - 4 <= row <= y + 4 else 0 for col in range(64)]
            for row in range(64)
        ]
        assert sweep.onehots[i].tolist() == onehot, i
        assert sweep.renderings[i].tolist() == square, i
    assert (np.count_nonzero(sweep.renderings, axis=(1, 2)) == 81).all()
    assert (sweep.onehots.sum((1, 2)) == 1).all()


def test_splits_follow_the_generators_rules_and_draws() -> None:
    """uniform: np.random.seed(20202), then one np.random.random() < 0.25 per example in sweep order;
    quadrant: x/64 > 0.5 and y/64 > 0.5; each side then permuted after np.random.seed(10101)."""
    sweep, saved = cc.Sweep.generate(), np.random.get_state()
    try:
        np.random.seed(20202)
        uniform = [np.random.random() < 0.25 for _ in sweep.centres]
        quadrant = [x / 64.0 > 0.5 and y / 64.0 > 0.5 for x, y in sweep.centres.tolist()]
        for split, in_test in (("uniform", uniform), ("quadrant", quadrant)):
            ids = {
                "train": [i for i, t in enumerate(in_test) if not t],
                "test": [i for i, t in enumerate(in_test) if t],
            }
            for side, members in ids.items():
                np.random.seed(10101)
                order = np.random.permutation(len(members))
                assert sweep.splits[split][side].tolist() == [members[k] for k in order], (split, side)
    finally:
        np.random.set_state(saved)
    # train.py's comments give the uniform file's shapes: (2368, 2) train, (768, 2) test
    assert sweep.counts() == {
        "uniform": {"train": 2368, "test": 768},
        "quadrant": {"train": 2407, "test": 729},
    }
    test = sweep.centres[sweep.splits["quadrant"]["test"]]
    assert test.min() == 33 and len(test) == 27**2  # x, y in 33..59: the bottom-right quadrant
    for split in COORD_SPLITS:
        both = np.concatenate(list(sweep.splits[split].values()))
        assert sorted(both.tolist()) == list(range(3136))


def test_the_data_bytes_are_fixed(tmp_path: Path) -> None:
    """Integer arithmetic and exact comparisons only: the same bytes on any CPU (this digest was taken on
    an AMD EPYC); np.save's files are a header and the raw arrays."""
    cc.Sweep.generate().save(tmp_path / "data")
    digest = hashlib.sha256()
    for path in sorted((tmp_path / "data").iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    assert digest.hexdigest() == "8f258559d4736babe2519616c4bb151b71e2b5338a01e7cd89a66df6328d21fa"
    loaded = cc.Sweep.load(tmp_path / "data")
    assert all(
        np.array_equal(a, b)
        for a, b in zip(loaded.arrays().values(), cc.Sweep.generate().arrays().values(), strict=True)
    )


def test_examples_carry_each_tasks_inputs_and_targets() -> None:
    sweep = cc.Sweep.generate()
    ids = np.array([0, 3135])  # centres (4, 4) and (59, 59)
    classification = cc.examples("classification", sweep, ids)
    assert classification.targets.tolist() == [4 * 64 + 4, 59 * 64 + 59]
    assert torch.equal(
        classification.inputs, torch.tensor([[-55 / 64, -55 / 64], [55 / 64, 55 / 64]])
    )  # 2(i+.5)/64-1
    regression = cc.examples("regression", sweep, ids)
    assert regression.inputs.shape == (2, 1, 64, 64) and regression.inputs[1, 0, 59, 59] == 1
    assert torch.equal(regression.targets, torch.tensor([[4 / 64, 4 / 64], [59 / 64, 59 / 64]]))
    rendering = cc.examples("rendering", sweep, ids)
    assert rendering.targets.sum(1).tolist() == [81, 81] and rendering.targets[0, 0 * 64 + 0] == 1


# ---- the metrics, on predictions with known answers ----


def test_accuracy_is_the_share_of_argmaxes_on_the_centre() -> None:
    logits = torch.zeros(4, 4096)
    for row, pixel in enumerate([10, 20, 30, 41]):
        logits[row, pixel] = 1.0
    assert cc.accuracy(logits, torch.tensor([10, 20, 30, 40])) == 0.75


def test_pixel_error_is_the_mean_euclidean_distance_in_pixels() -> None:
    target = torch.tensor([[10 / 64, 20 / 64], [30 / 64, 30 / 64]])
    predicted = torch.tensor([[13 / 64, 24 / 64], [30 / 64, 30 / 64]])  # off by (3, 4) px, then exact
    assert cc.pixel_error(predicted, target) == pytest.approx(2.5, abs=1e-12)


def test_iou_thresholds_the_sigmoid_at_one_half() -> None:
    square = torch.zeros(64, 64)
    square[10:19, 10:19] = 1
    painted = torch.full((64, 64), -1.0)
    painted[10:19, 11:20] = 1.0  # shifted one column: 72 shared pixels of 90
    on_the_fence = torch.zeros(64, 64)  # sigmoid exactly 0.5: tf.round(0.5) = 0, nothing painted
    logits = torch.stack([painted, square * 2 - 1, on_the_fence]).flatten(1)
    assert cc.iou(logits, square.flatten()[None].expand(3, -1)) == pytest.approx((0.8 + 1.0 + 0.0) / 3)


# ---- the networks ----

W, M, C, K = 3, 2, 4, 3  # CoordConv width, rendering width, baseline width, family kernel
SIZES = cc.Sizes(
    width=W, baseline_width=C, baseline_kernel=3, render_width=M, render_kernel=3, family_kernel=K
)


def conv_parameters(c_in: int, c_out: int, k: int = 1) -> int:
    return c_in * c_out * k * k + c_out


def slot_parameters(arm: str, c_in: int, c_out: int) -> int:
    """The slot's parameters by each layer's formula (DESIGN.md §6; seed 000's first form)."""
    extra = {
        "vanilla": 0,
        "coordbias": 2 * c_out,
        "coordconv": 2 * c_out,
        "coordbias_per_input": 2 * c_in * c_out,
    }
    if arm in extra:
        return conv_parameters(c_in, c_out) + extra[arm]
    if arm in ("involution", "coordinvolution"):
        return involution.parameter_count(c_in, c_out, K, coords=arm == "coordinvolution")
    offsets = conv_parameters(c_in, 3 * K * K, K)  # deform: offsets and masks from a k x k convolution
    return conv_parameters(c_in, c_out, K) + offsets + (2 * c_out if arm == "coorddeform" else 0)


def classifier_parameters(arm: str) -> int:
    rest = (
        conv_parameters(W, W)
        + conv_parameters(W, 2 * W)
        + conv_parameters(2 * W, 2 * W)
        + conv_parameters(2 * W, 1)
    )
    return slot_parameters(arm, 2, W) + rest


def expected_parameters(task: str, arm: str) -> int:
    if arm == "paper_conv" and task == "regression":  # big_conv: four 3x3, dense 64 on 8x8, dense 2
        convs = conv_parameters(1, C, 3) + 3 * conv_parameters(C, C, 3)
        return convs + (C * 64 * 64 + 64) + (64 * 2 + 2)
    if arm == "paper_conv":  # six transposed convolutions, BatchNorm (2 per channel) after all but the last
        channels = [2, C, C, C, C // 2, C // 2, 1]
        layers = list(itertools.pairwise(channels))
        return sum(conv_parameters(i, o, 3) for i, o in layers) + sum(2 * o for _, o in layers[:-1])
    if task == "classification":
        return classifier_parameters(arm)
    if task == "rendering":
        widths = [(1, M), (M, M), (M, 2 * M), (2 * M, 2 * M), (2 * M, 1)]
        return classifier_parameters(arm) + sum(conv_parameters(i, o, 3) for i, o in widths)
    rest = 2 * conv_parameters(W, W) + conv_parameters(W, W, 3) + conv_parameters(W, 2, 3)
    return slot_parameters(arm, 1, W) + rest


ARMS = [*cc.ARM_LAYERS, "paper_conv"]


@pytest.mark.parametrize("task", COORD_TASKS)
@pytest.mark.parametrize("arm", ARMS)
def test_every_network_has_its_formulas_parameters_and_shapes(task: str, arm: str) -> None:
    network = cc.build_network(task, arm, SIZES)
    assert cc.count_parameters(network) == expected_parameters(task, arm)
    inputs = cc.examples(task, cc.Sweep.generate(), np.arange(3)).inputs
    assert network(inputs).shape == ((3, 2) if task == "regression" else (3, 4096))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_the_deconv_baseline_paints_64_px_from_1_for_every_published_kernel(k: int) -> None:
    network = cc.build_network(
        "classification", "paper_conv", cc.Sizes(width=2, baseline_width=4, baseline_kernel=k)
    )
    assert network(torch.zeros(2, 2)).shape == (2, 4096)


def test_the_published_initialisation_he_normal_kernels_zero_biases() -> None:
    torch.manual_seed(0)
    network = cc.build_network("classification", "coordconv", cc.Sizes(width=64, baseline_width=4))
    wide = network.rest[-3]  # the 128 -> 128 1x1 convolution
    assert wide.weight.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.02)
    assert all(layer.bias.abs().max() == 0 for layer in (network.slot, *network.rest[1::2]))
    fan_in = 2 + 2  # the slot: (x, y) and the coordinates X, Y, as AddCoords feeds Conv2D
    slot = torch.cat([network.slot.weight.flatten(), network.slot.coord_weight.flatten()])
    assert slot.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15)


def pooled_near_the_one_hot(arm: str, seed: int) -> bool:
    """Whether the regressor's max pool picks, on both output channels, a pixel within the 5x5
    neighbourhood of each one-hot (where its response lies) at initialisation."""
    maps = cc.examples("regression", cc.Sweep.generate(), np.arange(0, 3136, 97)).inputs
    hot = maps.flatten(1).argmax(1)[:, None]
    torch.manual_seed(seed)
    with torch.no_grad():
        pooled_at = cc.build_network("regression", arm, SIZES).net(maps).flatten(2).argmax(2)
    return bool(
        ((pooled_at // 64 - hot // 64).abs() <= 2).all() and ((pooled_at % 64 - hot % 64).abs() <= 2).all()
    )


def test_the_regressors_max_pool_starts_on_the_one_hot_for_coordbias_not_coordconv() -> None:
    """Zero biases and a zero coordinate term: nothing but the one-hot's response lifts the map, in every
    draw. coordconv's random weights on X, Y add a ramp whose top the pool picks instead."""
    assert all(pooled_near_the_one_hot("coordbias", seed) for seed in range(8))
    assert not any(pooled_near_the_one_hot("coordconv", seed) for seed in range(8))


@pytest.mark.parametrize("task", COORD_TASKS)
def test_every_paper_layer_starts_with_zero_biases(task: str) -> None:
    for arm in ("coordconv", "paper_conv"):
        biases = [
            m.bias
            for m in cc.build_network(task, arm, SIZES).modules()
            if type(m) is not torch.nn.BatchNorm2d and getattr(m, "bias", None) is not None
        ]
        assert biases and all(b.abs().max() == 0 for b in biases), arm


# ---- one function class at a 1x1 slot ----


def coordinate_parameter(network: torch.nn.Module) -> torch.nn.Parameter:
    """The slot's coordinate parameter: coordconv's coord_weight or coordbias's coord_bias."""
    return next(p for name, p in network.named_parameters() if "coord_" in name)


def twin(task: str, source: torch.nn.Module, arm: str, mapping: Callable) -> torch.nn.Module:
    """`arm`'s network with `source`'s weights, its coordinate parameter mapped from `source`'s."""
    target = cc.build_network(task, arm, SIZES).double()
    target.load_state_dict({k: v for k, v in source.state_dict().items() if "coord_" not in k}, strict=False)
    with torch.no_grad():
        coordinate_parameter(target).copy_(mapping(coordinate_parameter(source)))
    return target


def _randomised(task: str, arm: str) -> torch.nn.Module:
    torch.manual_seed(1)
    network = cc.build_network(task, arm, SIZES).double()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.uniform_(-1, 1)  # coordbias starts at zero: give every parameter a value
    return network


@pytest.mark.parametrize("task", COORD_TASKS)
def test_coordconv_and_both_coordbias_forms_are_one_function_class_at_a_1x1_slot(task: str) -> None:
    """Each maps onto the others exactly: coordconv's (C, 2, 1, 1) weights on X, Y are coordbias's (C, 2)
    a, b; the per-input form (C, C_in, 2) sums to them, and a reduced a, b is the per-input form with
    one input carrying it."""
    inputs = cc.examples(task, cc.Sweep.generate(), np.arange(0, 3136, 311)).inputs.double()

    def on_one_input(reduced: torch.Tensor) -> torch.Tensor:
        per_input = torch.zeros(reduced.shape[0], 1 if task == "regression" else 2, 2, dtype=reduced.dtype)
        per_input[:, 0] = reduced
        return per_input

    mappings = [
        ("coordconv", "coordbias", lambda w: w[:, :, 0, 0]),
        ("coordbias", "coordconv", lambda a: a[:, :, None, None]),
        ("coordbias_per_input", "coordbias", lambda a: a.sum(1)),
        ("coordbias", "coordbias_per_input", on_one_input),
    ]
    for source_arm, target_arm, mapping in mappings:
        source = _randomised(task, source_arm)
        target = twin(task, source, target_arm, mapping)
        assert torch.allclose(source(inputs), target(inputs), rtol=1e-10, atol=1e-10), (
            source_arm,
            target_arm,
        )
    different = _randomised(task, "coordconv")
    assert not torch.allclose(different(inputs), _randomised(task, "vanilla")(inputs))  # the test can fail


# ---- training ----


def test_batches_visit_every_example_once_an_epoch() -> None:
    batches = cc.batches(10, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(batches) for _ in range(3)])  # 9 of 10: the partial batch is dropped
    assert len(set(epoch.tolist())) == 9
    with pytest.raises(cc.BadInput, match="batch_size 11: more than the 10 training examples"):
        next(cc.batches(10, 11, torch.Generator()))


def test_a_run_records_when_it_first_reached_each_threshold() -> None:
    run = cc.Run(0.0, 1, 30, 0.0)
    run.steps_to, run.seconds_to = {"1": None, "0.8": None}, {"1": None, "0.8": None}
    for step, value, seconds in ((10, 0.5, 1.0), (20, 0.85, 2.0), (30, 1.0, 3.0)):
        run.train_seconds = seconds
        cc._record(run, step, value, "rendering")
    assert run.steps_to == {"1": 30, "0.8": 20} and run.seconds_to == {"1": 3.0, "0.8": 2.0}
    assert cc.reached("regression", 0.4, 0.5) and not cc.reached("regression", 0.6, 0.5)  # error: lower


def test_coordconv_learns_classification_and_a_seed_repeats_itself() -> None:
    sweep = cc.Sweep.generate()
    train, test = (
        cc.examples("classification", sweep, sweep.splits["uniform"][s][:200]) for s in ("train", "test")
    )
    schedule = cc.Schedule(steps=40, batch_size=16, lr=0.02, eval_every=20)
    sizes = cc.Sizes(width=8, baseline_width=4)
    first, again = (
        cc.train_run("classification", "coordconv", sizes, train, test, schedule, 0) for _ in range(2)
    )
    assert first.metric == again.metric and [s for s, _ in first.curve] == [20, 40]
    assert first.metric > 0.2  # from 1/4096 by chance: the coordinates are learned


# ---- the verdicts ----


def runs_file(task: str, values: dict[str, list[float]], reached: dict[str, list[int | None]]) -> dict:
    metric = cc.TASKS[task].metric
    thresholds = [cc.threshold_key(t) for t in cc.TASKS[task].thresholds]
    arms = {
        arm: {
            "parameters": 10,
            "runs": [
                {"seed": s, "metric": v, "steps": 100, "train_seconds": 5.0,
                 "steps_to": {t: reached[arm][s] for t in thresholds},
                 "seconds_to": {t: reached[arm][s] and reached[arm][s] / 20 for t in thresholds}}
                for s, v in enumerate(vs)
            ],
        }
        for arm, vs in values.items()
    }  # fmt: skip
    return {"task": task, "split": "uniform", "metric": metric, "schedule": {"eval_every": 10}, "arms": arms}


def test_comparisons_use_the_studys_paired_rule_and_censor_unreached_thresholds() -> None:
    file = runs_file(
        "classification",
        {
            "coordbias": [1.0, 1.0, 1.0],
            "coordconv": [1.0, 1.0, 1.0],
            "vanilla": [0.0, 0.0, 0.001],
            "paper_conv": [0.5],
        },
        {"coordbias": [20, 30, 40], "coordconv": [50, 60, 70], "vanilla": [None] * 3, "paper_conv": [None]},
    )
    summary = cc.summarize([file])
    rows = {(r["a"], r["b"], r["quantity"]): r for r in summary["comparisons"]}
    assert rows["coordbias", "vanilla", "accuracy"]["verdict"] == "A higher"
    assert rows["coordbias", "coordconv", "accuracy"]["verdict"] == "no real difference"
    assert rows["coordbias", "coordconv", "steps_to_1"]["difference"] == -30  # margin 10 steps: A lower
    assert rows["coordbias", "coordconv", "steps_to_1"]["verdict"] == "A lower"
    assert rows["coordbias", "vanilla", "steps_to_1"]["difference"] == pytest.approx(
        -70
    )  # vanilla: 100 (censored)
    assert not any(r["b"] == "paper_conv" for r in summary["comparisons"])  # one seed: not judged
    cell = summary["cells"]["classification"]["uniform"]["vanilla"]
    assert cell["reached"] == {"1": 0} and cell["steps_to"] == {"1": None}
    assert summary["cells"]["classification"]["uniform"]["coordbias"]["steps_to"]["1"]["mean"] == 30


# ---- the report: the paper's figures beside the runs, words chosen by the numbers ----


def test_the_report_sets_the_runs_beside_the_paper_in_words_the_numbers_choose(monkeypatch) -> None:
    file = runs_file(
        "classification",
        {"coordbias": [1.0, 1.0], "coordconv": [1.0, 0.9], "paper_conv": [0.5, 0.84]},
        {"coordbias": [20, 30], "coordconv": [40, None], "paper_conv": [None, None]},
    )
    summary = cc.summarize([file])
    counts = {
        "examples": 3136,
        "canvas": 64,
        "square": 9,
        "splits": {"uniform": {"train": 2368, "test": 768}},
    }
    text = reporting.render_coordinates(summary, counts)
    row = "| uniform | `coordbias` | 2 | test accuracy 1.0000 [1.0000, 1.0000] | 10 | 2/2: 25.0"
    assert row in text
    assert "at most 0.8400 test accuracy" in text and "about 0.8600 after over 1 h: **agrees**" in text
    assert (
        "1/2 seeds reached 100% test accuracy" in text and "**disagrees**" in text
    )  # coordconv, one seed short
    assert "coordbias vs coordconv: classification/uniform 0.0500" in text
    monkeypatch.setitem(
        reporting.COORDCONV_PAPER, "conv_accuracy_uniform", reporting.PaperFigure(0.8, "§4.1")
    )
    assert "about 0.8000 after over 1 h: **disagrees**" in reporting.render_coordinates(summary, counts)


# ---- the stages: bad input is one line, exit 2, nothing written ----


def set_coordinates(project: Path, change: Callable[[dict], None]) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    change(params["coordinates"])
    path.write_text(yaml.safe_dump(params, sort_keys=False))


BAD = [
    (["train", "translation", "uniform"], None, "argument task: invalid choice: 'translation'"),
    (["train", "regression", "diagonal"], None, "argument split: invalid choice: 'diagonal'"),
    (["paint"], None, "invalid choice: 'paint'"),
    (
        ["data"],
        lambda c: c["layers"].update(coordsum=2),
        "coordinates.layers.coordsum.[key] = 'coordsum': expected one of",
    ),
    (
        ["data"],
        lambda c: c["regression"].update(steps="10"),
        "coordinates.regression.steps = '10': expected an integer",
    ),
    (["data"], lambda c: c.update(family_kernel=4), "coordinates.family_kernel = 4: expected an odd kernel"),
    (
        ["data"],
        lambda c: c["layers"].update(coordconv=0),
        "coordinates.layers.coordconv = 0: expected a value >= 1",
    ),
    (["data"], lambda c: c.update(layers={}), "coordinates.layers = {}: expected at least one arm"),
]


@pytest.mark.parametrize(("argv", "change", "message"), BAD)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(
    project: Path, sh: Callable, argv, change, message
) -> None:
    if change:
        set_coordinates(project, change)
    result = sh("python", "-m", "posconv.stages.coordinates", *argv, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert (
        len(result.stderr.splitlines()) == 1
        and result.stderr.startswith("error: ")
        and message in result.stderr
    )
    assert not (project / "metrics/coordinates").exists() and not (project / "data/coordinates").exists()


def test_a_stage_without_its_data_says_so_in_one_line(project: Path, sh: Callable) -> None:
    result = sh("python", "-m", "posconv.stages.coordinates", "train", "regression", "uniform", check=False)
    assert result.returncode == 2 and "data/coordinates: not the coordinates data" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (project / "metrics/coordinates").exists()


# ---- the pipeline file ----

PIPELINE = yaml.safe_load((ROOT / "coordinates/dvc.yaml").read_text())["stages"]


def test_each_stage_lists_exactly_the_sources_it_imports() -> None:
    assert list(PIPELINE) == ["data", "train", "compare", "report"]
    read = sources("posconv.stages.coordinates")
    for name in ("data", "compare"):
        assert covers(listed_sources(PIPELINE[name]), read), name
    assert covers(listed_sources(PIPELINE["train"]["do"]), read)
    assert covers(listed_sources(PIPELINE["report"]), sources("posconv.stages.report"))


def test_no_param_reaches_a_command_and_each_task_reads_only_its_own_group() -> None:
    commands = [PIPELINE[name]["cmd"] for name in ("data", "compare", "report")]
    assert all("${" not in c for c in commands)
    assert re.findall(r"\$\{([\w.]+)\}", PIPELINE["train"]["do"]["cmd"]) == ["item.task", "item.split"]
    items = PIPELINE["train"]["foreach"]
    assert [(i["task"], i["split"]) for i in items] == [(t, s) for t in COORD_TASKS for s in COORD_SPLITS]
    assert "coordinates.${item.task}" in PIPELINE["train"]["do"]["params"]
    assert "coordinates" not in PIPELINE["train"]["do"]["params"]


def test_the_gate_judges_the_coordinates_pipeline() -> None:
    from posconv.tools.check import JUDGED

    assert "coordinates/dvc.yaml" in JUDGED


# ---- end to end, under real DVC ----

TRAINS = {f"train@{i}" for i in range(6)}  # foreach over the six literal items, in their order


def read(project: Path, path: str) -> dict:
    return json.loads((project / path).read_text())


@pytest.mark.slow
def test_repro_then_an_experiment_reruns_only_its_task(project: Path, sh: Callable) -> None:
    ran = sh("dvc", "repro", "coordinates/dvc.yaml").stdout
    assert "Running stage 'check_params'" in ran  # first, from the root dvc.yaml; the card's others not
    assert set(re.findall(r"Running stage '([\w/.:@]+)'", ran)) == {
        "check_params",
        *(f"coordinates/dvc.yaml:{name}" for name in ("data", *TRAINS, "compare", "report")),
    }
    tiny = yaml.safe_load((project / "params.yaml").read_text())["coordinates"]
    counts = read(project, "metrics/coordinates/data.json")
    assert counts["splits"] == {
        "uniform": {"train": 2368, "test": 768},
        "quadrant": {"train": 2407, "test": 729},
    }
    for task in COORD_TASKS:
        for split in COORD_SPLITS:
            file = read(project, f"metrics/coordinates/{task}_{split}.json")
            assert file["examples"] == counts["splits"][split]
            assert {arm: len(a["runs"]) for arm, a in file["arms"].items()} == tiny["layers"]
            assert all(
                run["steps"] == tiny[task]["steps"] for a in file["arms"].values() for run in a["runs"]
            )
            sizes = {
                **cc.Sizes(**{k: file["sizes"][k] for k in ("width", "baseline_width")}).__dict__,
                **file["sizes"],
            }
            for arm, a in file["arms"].items():
                assert a["parameters"] == cc.count_parameters(cc.build_network(task, arm, cc.Sizes(**sizes)))
    summary = read(project, "metrics/coordinates/summary.json")
    assert set(summary["cells"]) == set(COORD_TASKS) and summary["comparisons"]
    page = (project / "plots/coordinates.md").read_text()
    assert "dvc repro coordinates/dvc.yaml" in page and "| classification | uniform | `coordbias` |" in page
    assert "up to date" in sh("dvc", "status", "coordinates/dvc.yaml").stdout

    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "tiny coordinates results")
    steps = tiny["regression"]["steps"] + 2
    exp = sh(
        "dvc", "exp", "run", "coordinates/dvc.yaml", "-S", f"coordinates.regression.steps={steps}"
    ).stdout
    assert set(re.findall(r"Running stage 'coordinates/dvc.yaml:([\w@]+)'", exp)) == {
        "train@2",
        "train@3",
        "compare",
        "report",
    }
    assert (
        read(project, "metrics/coordinates/regression_quadrant.json")["arms"]["coordbias"]["runs"][0]["steps"]
        == steps
    )
    # back to the committed params: DVC's run-cache serves every stage, nothing is trained again;
    # check_params (which reads the whole params.yaml) checks them again, and the page (a plain output,
    # as the other reports) is rendered again
    sh("git", "checkout", "--", "params.yaml")
    back = sh("dvc", "repro", "coordinates/dvc.yaml").stdout
    assert re.findall(r"Running stage '([\w/.:@]+)'", back) == ["check_params", "coordinates/dvc.yaml:report"]
    assert back.count("skipping run") == 3  # train@2, train@3, compare
    assert (
        read(project, "metrics/coordinates/regression_quadrant.json")["arms"]["coordbias"]["runs"][0]["steps"]
        == steps - 2
    )


@pytest.mark.slow
def test_a_bad_coordinates_param_stops_dvc_repro_at_check_params(project: Path, sh: Callable) -> None:
    set_coordinates(project, lambda c: c.update(family_kernel=4))
    result = sh("dvc", "repro", "coordinates/dvc.yaml", check=False)
    assert result.returncode != 0
    assert "coordinates.family_kernel = 4: expected an odd kernel" in result.stdout + result.stderr
    assert "Running stage 'coordinates/dvc.yaml" not in result.stdout
    assert not (project / "data/coordinates").exists()
