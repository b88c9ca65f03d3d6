"""CoordConv's coordinate-transform benchmark (Liu et al., NeurIPS 2018, §4), with the factory's layers.

**The data** is the published Not-so-Clevr square sweep (uber-research/CoordConv,
`data/not_so_clevr_generator.py`): a 9x9 square (centre ± 4 px) at every centre (x, y) in 4..59 of a
64x64 canvas, x the outer loop, 3,136 examples; each has its centre, its one-hot map (`map[y, x] = 1`)
and its rendering (the generator's gray, 128, on black). Two splits, as the generator makes them:
*uniform*, numpy's legacy `np.random.seed(20202)` then one `np.random.random() < 0.25` per example in
sweep order (test when true); *quadrant*, test = every centre with x/64 > 0.5 and y/64 > 0.5. The writer
then orders each side by `np.random.seed(10101); np.random.permutation(n)`, reproduced here too. Every
byte written comes from integer arithmetic and exact comparisons (Mersenne Twister doubles are exact
binary fractions), so it does not depend on the CPU.

**The tasks.** Classification: (x, y) tiled over the canvas -> a softmax over the 4,096 pixels, scored by
test accuracy (the argmax is the centre pixel). Regression: the one-hot map -> (x/64, y/64), scored by
the mean Euclidean error in pixels. Rendering: (x, y) -> the square, scored by the mean IoU of the
pixels whose sigmoid exceeds 0.5 (the published `tf.round`) with the square. The (x, y) inputs are
pixel-centre coordinates in [-1, 1] (`coords.pixel_coords`), not the published raw indices: an affine
map of the input, which the first layer's weights and bias absorb. The rendering target is the square's
mask: the published code trains on the gray image / 255 (0.502 inside) and multiplies it into its IoU's
intersection, which caps that IoU at 0.502, whereas the paper reports IoUs up to 1.0.

**The networks** are the published ones (`model_builders.py`), sizes from params:
- CoordConv networks, with the layer under test in their *slot*, the convolution that sees the
  coordinates (the paper's AddCoords + Conv2D): classification, the slot then 1x1 convolutions
  (w, w, 2w, 2w, 1; paper w = 32) with ReLUs; regression, the slot then 1x1, 1x1, 3x3, 3x3 convolutions
  (w, w, w, w, 2; paper w = 8), no activation, a global max pool; rendering, the classification network,
  a softmax over the pixels, then k x k convolutions (m, m, 2m, 2m, 1; paper 8·mul) with ReLUs.
- Convolutional baselines (`paper_conv`): for classification and rendering, six stride-2 transposed
  convolutions from 1x1 to 64x64 (c, c, c, c/2, c/2, 1; paper c = 64·mul) with BatchNorm and ReLU; for
  regression, four 3x3 convolutions (c; paper 16·mul) with ReLUs and three 2x2 max pools, then dense
  64 and 2 (the published `big_conv`; its code switches to a strided variant on the quadrant split, here
  the one network serves both).
The slot is a 1x1 convolution in all three networks. There `coordconv` (weights on X, Y) and `coordbias`
(a_c X + b_c Y, in either form) add the same per-channel term: one function class, three
parametrisations (`tests/test_coordinates.py` maps each onto the others exactly). At 1x1 the
content-adaptive families are degenerate (an involution kernel of one tap is a per-pixel gate of the
pixel's own features; a one-tap deformable convolution moves its tap by an offset computed from that
pixel), so they take the slot as a `family_kernel` x `family_kernel` convolution instead. `vanilla` in
the slot is the same network without coordinates: for classification and rendering its tiled input is
the same at every pixel, so are its 1x1 outputs, and it can only fail (a control, not the paper's
baseline, which is `paper_conv`).

**Initialisation** is the published one, he_normal kernels and zero biases (`he_init`), for every layer
the paper has; the factory's own extra parameters keep their start (coordbias's zero). With PyTorch's
default biases the regressor's max pool started on the one-hot in 2 of 20 draws (`Regressor`).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from posconv.errors import BadInput
from posconv.grid import paired_interval, spread, verdict
from posconv.layers import CoordConv2d, make_conv
from posconv.layers.coords import pixel_coords
from posconv.registry import (
    CONTENT_ADAPTIVE,
    COORD_ARMS,
    COORD_DEFORM,
    COORD_INVOLUTION,
    COORD_SPLITS,
    COORD_TASKS,
    COORDBIAS,
    COORDCONV,
    DEFORM,
    INVOLUTION,
    PAPER_CONV,
    PER_INPUT,
    VANILLA,
)

# ---- the data, as the published generator makes it ----

CANVAS = 64  # img_size
HALF = 4  # obj_size: the square spans centre ± 4 px, 9x9
GRAY = 128  # the generator's 'gr' colour; its gray image is the mean of three equal channels
UNIFORM_SEED = 20202  # MAGIC_SEED_OF_WONDER: seeded before the split draws
ORDER_SEED = 10101  # MAGIC_SEED_OF_GREATNESS: seeded before each side's permutation
UNIFORM_TEST_FRACTION = 0.25  # random_split's pct
FILES = (
    "centres",
    "onehots",
    "renderings",
    *(f"{s}_{side}" for s in COORD_SPLITS for side in ("train", "test")),
)


def sweep_centres() -> np.ndarray:
    """(3136, 2) int64 centres (x, y) in the generator's order: x outer, y inner, both in 4..59."""
    span = np.arange(HALF, CANVAS - HALF)
    x, y = np.meshgrid(span, span, indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=1)


def onehot_maps(centres: np.ndarray) -> np.ndarray:
    """(N, 64, 64) uint8: 1 at row y, column x (the generator's `field[center[1], center[0]]`)."""
    maps = np.zeros((len(centres), CANVAS, CANVAS), np.uint8)
    maps[np.arange(len(centres)), centres[:, 1], centres[:, 0]] = 1
    return maps


def render_squares(centres: np.ndarray) -> np.ndarray:
    """(N, 64, 64) uint8: GRAY where |column - x| <= 4 and |row - y| <= 4 (cv2.rectangle filled from
    (x-4, y-4) to (x+4, y+4), both corners included), 0 elsewhere."""
    pixels = np.arange(CANVAS)
    near_x = np.abs(pixels[None, :] - centres[:, :1]) <= HALF  # (N, columns)
    near_y = np.abs(pixels[None, :] - centres[:, 1:]) <= HALF  # (N, rows)
    return (near_y[:, :, None] & near_x[:, None, :]).astype(np.uint8) * GRAY


def in_test(split: str, centres: np.ndarray) -> np.ndarray:
    """Which examples the generator puts in its test ("val") side."""
    if split == "uniform":  # random_split: one legacy np.random.random() per example, in sweep order
        return np.random.RandomState(UNIFORM_SEED).random_sample(len(centres)) < UNIFORM_TEST_FRACTION
    if split == "quadrant":  # quadrant_split: x/64 > 0.5 and y/64 > 0.5, i.e. 2x > 64 and 2y > 64
        return (2 * centres[:, 0] > CANVAS) & (2 * centres[:, 1] > CANVAS)
    raise BadInput(f"split {split!r}: expected one of {', '.join(COORD_SPLITS)}")


def split_ids(split: str, centres: np.ndarray) -> dict[str, np.ndarray]:
    """Train and test example ids, each side in the order the writer stores it (its to_numpy shuffle)."""
    test = in_test(split, centres)
    sides = {"train": np.flatnonzero(~test), "test": np.flatnonzero(test)}
    return {side: ids[np.random.RandomState(ORDER_SEED).permutation(len(ids))] for side, ids in sides.items()}


@dataclass(frozen=True)
class Sweep:
    """The whole benchmark's data: every example, and each split's ids."""

    centres: np.ndarray  # (N, 2) int64, (x, y)
    onehots: np.ndarray  # (N, 64, 64) uint8
    renderings: np.ndarray  # (N, 64, 64) uint8
    splits: dict[str, dict[str, np.ndarray]]  # split -> side -> int64 ids

    @classmethod
    def generate(cls) -> Sweep:
        centres = sweep_centres()
        splits = {split: split_ids(split, centres) for split in COORD_SPLITS}
        return cls(centres, onehot_maps(centres), render_squares(centres), splits)

    def arrays(self) -> dict[str, np.ndarray]:
        sides = {f"{s}_{side}": ids for s, by_side in self.splits.items() for side, ids in by_side.items()}
        return {"centres": self.centres, "onehots": self.onehots, "renderings": self.renderings, **sides}

    def save(self, directory: Path) -> None:
        """One .npy per array (np.save's bytes are its header and the raw array: reproducible)."""
        directory.mkdir(parents=True)
        for name, array in self.arrays().items():
            np.save(directory / f"{name}.npy", array, allow_pickle=False)

    @classmethod
    def load(cls, directory: str | Path) -> Sweep:
        """The data stage's arrays, refused in one line if any is missing or not of its shape."""
        directory = Path(directory)
        try:
            arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in FILES}
        except (OSError, ValueError) as error:
            raise BadInput(f"{directory}: not the coordinates data ({error}; run its data stage)") from None
        n = len(arrays["centres"])
        shapes = {"centres": (n, 2), "onehots": (n, CANVAS, CANVAS), "renderings": (n, CANVAS, CANVAS)}
        for name, shape in shapes.items():
            if arrays[name].shape != shape:
                raise BadInput(f"{directory}/{name}.npy: shape {arrays[name].shape}, expected {shape}")
        splits = {s: {side: arrays[f"{s}_{side}"] for side in ("train", "test")} for s in COORD_SPLITS}
        return cls(arrays["centres"], arrays["onehots"], arrays["renderings"], splits)

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {side: len(ids) for side, ids in by_side.items()} for s, by_side in self.splits.items()}


# ---- the tasks and their metrics ----


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Share of rows whose argmax (over the 4,096 pixels) is the target pixel index."""
    return (logits.argmax(1) == target).sum().item() / len(target)


def pixel_error(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Mean Euclidean distance in pixels between predicted and true (x/64, y/64) (the published metric)."""
    return (CANVAS * (predicted.double() - target.double())).norm(dim=1).mean().item()


def iou(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over rows of |painted ∩ square| / |painted ∪ square|, painted = sigmoid(logit) > 0.5."""
    painted, square = logits > 0, mask > 0
    union = (painted | square).sum(1)
    return ((painted & square).sum(1).double() / union.clamp(min=1)).mean().item()


@dataclass(frozen=True)
class Task:
    metric: str
    score: Callable[[torch.Tensor, torch.Tensor], float]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool
    thresholds: tuple[float, ...]  # the paper's: perfect accuracy; IoU 1.0 and 0.8


TASKS = {
    "classification": Task("accuracy", accuracy, F.cross_entropy, True, (1.0,)),
    "regression": Task("pixel_error", pixel_error, F.mse_loss, False, ()),
    "rendering": Task("iou", iou, F.binary_cross_entropy_with_logits, True, (1.0, 0.8)),
}
assert tuple(TASKS) == COORD_TASKS


def reached(task: str, value: float, threshold: float) -> bool:
    return value >= threshold if TASKS[task].higher_is_better else value <= threshold


@dataclass(frozen=True)
class Examples:
    inputs: torch.Tensor  # coordinates in [-1, 1] (B, 2), or one-hot maps (B, 1, 64, 64)
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, ids: torch.Tensor) -> Examples:
        return Examples(self.inputs[ids], self.targets[ids])


def examples(task: str, sweep: Sweep, ids: np.ndarray) -> Examples:
    """The task's inputs and targets for examples `ids`, as float32 / int64 tensors."""
    centres = torch.from_numpy(sweep.centres[ids])
    if task == "regression":
        maps = torch.from_numpy(sweep.onehots[ids]).float()[:, None]
        return Examples(maps.contiguous(memory_format=torch.channels_last), centres.float() / CANVAS)
    inputs = pixel_coords(CANVAS, "centered")[centres]  # (B, 2): the pixel centres' coordinates
    if task == "classification":
        return Examples(inputs, centres[:, 1] * CANVAS + centres[:, 0])
    return Examples(inputs, torch.from_numpy(sweep.renderings[ids] > 0).flatten(1).float())


# ---- the networks ----


@dataclass(frozen=True)
class Sizes:
    """Network sizes (the paper's in comments; params.yaml may shrink them for a CPU)."""

    width: int  # CoordConv network: classification/rendering 32, regression 8
    baseline_width: int  # paper_conv: 64·mul (transposed convolutions), 16·mul (regressor)
    baseline_kernel: int = 3  # fs of the transposed convolutions (2, 3 or 4)
    render_width: int = 8  # rendering's k x k convolutions: 8·mul
    render_kernel: int = 3  # fs
    family_kernel: int = 3  # the slot's kernel for the content-adaptive layers


ARM_LAYERS = {arm: (arm, {}) for arm in COORD_ARMS if arm not in (PER_INPUT, PAPER_CONV)}
ARM_LAYERS[PER_INPUT] = (COORDBIAS, {"coords_per_input": True})  # the seed's first form


def he_init(layer: nn.Module) -> nn.Module:
    """The published initialisation (he_normal kernels, zero biases) of a convolution or dense layer; a
    coordconv layer's coordinate weights are kernel inputs (AddCoords then Conv2D). The factory's other
    parameters keep their own start (coordbias's zero, a deformable layer's zero offsets)."""
    kernels = [layer.weight, *([layer.coord_weight] if isinstance(layer, CoordConv2d) else [])]
    fan_in = sum(kernel[0].numel() for kernel in kernels)  # inputs (coordinates included) x taps
    for kernel in kernels:
        nn.init.normal_(kernel, 0.0, math.sqrt(2 / fan_in))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def slot(arm: str, in_channels: int, out_channels: int, family_kernel: int) -> nn.Module:
    """The convolution that sees the coordinates, built by the factory as `arm`'s layer."""
    if arm not in ARM_LAYERS:
        raise BadInput(f"arm {arm!r}: expected one of {', '.join(ARM_LAYERS)} in a CoordConv network")
    layer, options = ARM_LAYERS[arm]
    k = family_kernel if layer in CONTENT_ADAPTIVE else 1
    built = make_conv(layer, in_channels, out_channels, k, padding=k // 2, **options)
    return he_init(built) if isinstance(built, nn.Conv2d) else built  # involution: its generator's own


def conv(in_channels: int, out_channels: int, k: int = 1) -> nn.Module:
    return he_init(make_conv("vanilla", in_channels, out_channels, k, padding=k // 2))


def relu_between(layers: list[nn.Module]) -> list[nn.Module]:
    """`layers` with a ReLU after each but the last."""
    return [m for layer in layers[:-1] for m in (layer, nn.ReLU())] + layers[-1:]


class Classifier(nn.Module):
    """(B, 2) coordinates -> (B, 4096) pixel logits: the slot, then 1x1 convolutions (published
    CoordConvPainter: 32, 32, 64, 64, 1 after AddCoords)."""

    def __init__(self, arm: str, sizes: Sizes) -> None:
        super().__init__()
        w = sizes.width
        self.slot = slot(arm, 2, w, sizes.family_kernel)
        self.rest = nn.Sequential(
            nn.ReLU(), *relu_between([conv(w, w), conv(w, 2 * w), conv(2 * w, 2 * w), conv(2 * w, 1)])
        )

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        tiled = coords[:, :, None, None].expand(-1, -1, CANVAS, CANVAS)
        return self.rest(self.slot(tiled.contiguous(memory_format=torch.channels_last))).flatten(1)


class Renderer(nn.Module):
    """(B, 2) coordinates -> (B, 4096) square logits: the classifier, a softmax over its pixels, then
    k x k convolutions (published CoordConvImagePainter, 'working' version with its softmax)."""

    def __init__(self, arm: str, sizes: Sizes) -> None:
        super().__init__()
        m, k = sizes.render_width, sizes.render_kernel
        self.centre = Classifier(arm, sizes)
        self.paint = nn.Sequential(
            *relu_between(
                [conv(1, m, k), conv(m, m, k), conv(m, 2 * m, k), conv(2 * m, 2 * m, k), conv(2 * m, 1, k)]
            )
        )

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        centre = self.centre(coords).softmax(1).view(-1, 1, CANVAS, CANVAS)
        return self.paint(centre.contiguous(memory_format=torch.channels_last)).flatten(1)


class Regressor(nn.Module):
    """(B, 1, 64, 64) one-hot maps -> (B, 2) (x/64, y/64): the slot, 1x1, 1x1, 3x3, 3x3 convolutions
    without activations, a global max pool (published ConvRegressor 'coordconv').

    The max pool has to start on the one-hot's response: a background pixel's 5x5 receptive field never
    meets a centre (4 px from the border), so there no gradient carries the position. Under the published
    initialisation (zero biases) the map away from the one-hot is the coordinate term alone, zero for a
    zero-started coordbias, so the pool starts on the one-hot in every draw (tests/test_coordinates.py);
    coordconv's random coordinate weights add a ramp that the pool picks instead in every draw measured
    (20 of 20), which it has to learn its way off. (Under PyTorch's default biases the zero-padded 3x3
    layers lift the border, and only 2 of 20 coordbias draws started on the one-hot.)
    """

    def __init__(self, arm: str, sizes: Sizes) -> None:
        super().__init__()
        w = sizes.width
        self.net = nn.Sequential(
            slot(arm, 1, w, sizes.family_kernel), conv(w, w), conv(w, w), conv(w, w, 3), conv(w, 2, 3)
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps).amax((2, 3))


def transposed(in_channels: int, out_channels: int, k: int) -> nn.ConvTranspose2d:
    """Stride 2, output twice the input, as TF's Conv2DTranspose with padding 'same'."""
    return he_init(
        nn.ConvTranspose2d(in_channels, out_channels, k, stride=2, padding=(k - 1) // 2, output_padding=k % 2)
    )


class DeconvPainter(nn.Module):
    """(B, 2) coordinates -> (B, 4096) logits by six stride-2 transposed convolutions from 1x1, with
    BatchNorm and ReLU (published DeconvPainter: 64m, 64m, 64m, 32m, 32m, 1)."""

    def __init__(self, sizes: Sizes) -> None:
        super().__init__()
        c, k = sizes.baseline_width, sizes.baseline_kernel
        hidden = itertools.pairwise((2, c, c, c, c // 2, c // 2))
        layers = [
            m
            for c_in, c_out in hidden
            for m in (transposed(c_in, c_out, k), nn.BatchNorm2d(c_out), nn.ReLU())
        ]
        self.net = nn.Sequential(*layers, transposed(c // 2, 1, k))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.net(coords[:, :, None, None]).flatten(1)


class ConvRegressor(nn.Module):
    """(B, 1, 64, 64) -> (B, 2): four 3x3 convolutions with ReLU and three 2x2 max pools, dense 64, dense
    2 (published ConvRegressor 'conv_uniform', big_conv)."""

    def __init__(self, sizes: Sizes) -> None:
        super().__init__()
        c = sizes.baseline_width
        pooled = [m for c_in in (1, c, c) for m in (conv(c_in, c, 3), nn.ReLU(), nn.MaxPool2d(2))]
        self.net = nn.Sequential(
            *pooled,
            conv(c, c, 3),
            nn.ReLU(),
            nn.Flatten(),
            he_init(nn.Linear(c * (CANVAS // 8) ** 2, 64)),
            nn.ReLU(),
            he_init(nn.Linear(64, 2)),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps)


NETWORKS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {  # task -> (CoordConv network, baseline)
    "classification": (Classifier, DeconvPainter),
    "regression": (Regressor, ConvRegressor),
    "rendering": (Renderer, DeconvPainter),
}


def build_network(task: str, arm: str, sizes: Sizes) -> nn.Module:
    """`task`'s network for `arm`: the paper's convolutional baseline, or its CoordConv network with the
    arm's layer in the slot."""
    if task not in NETWORKS:
        raise BadInput(f"task {task!r}: expected one of {', '.join(COORD_TASKS)}")
    coordconv_network, baseline = NETWORKS[task]
    network = baseline(sizes) if arm == PAPER_CONV else coordconv_network(arm, sizes)
    return network.to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- training ----


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    lr: float
    eval_every: int  # steps between test evaluations (when a threshold was first reached)
    eval_batch: int = 32  # 2-5x faster a pass than 256 on a 2-core CPU (measured: cache-resident)


@dataclass
class Run:
    """One training run: its final test metric, when it first reached each threshold, and its curve."""

    metric: float
    parameters: int
    steps: int
    train_seconds: float  # training steps only, evaluations excluded
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, test metric)
    steps_to: dict[str, int | None] = field(default_factory=dict)  # threshold -> first evaluated step
    seconds_to: dict[str, float | None] = field(default_factory=dict)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of example ids: a fresh permutation per epoch, its last partial batch dropped."""
    if batch_size > n:
        raise BadInput(f"batch_size {batch_size}: more than the {n} training examples")
    while True:
        order = torch.randperm(n, generator=generator)
        yield from order[: n - n % batch_size].split(batch_size)


def evaluate(model: nn.Module, task: str, data: Examples, batch: int) -> float:
    """The task's metric on `data`, in eval mode without autograd."""
    model.eval()
    with torch.inference_mode():
        outputs = torch.cat([model(data.inputs[i : i + batch]) for i in range(0, len(data), batch)])
    model.train()
    return TASKS[task].score(outputs, data.targets)


def threshold_key(threshold: float) -> str:
    return f"{threshold:g}"


def train_run(
    task: str, arm: str, sizes: Sizes, train: Examples, test: Examples, schedule: Schedule, seed: int
) -> Run:
    """Train `arm`'s network on `train` with Adam from seed `seed` (initial draws and batch order), scoring
    it on `test` at the end, and every `eval_every` steps while a threshold of the paper's is unreached
    (evaluating costs ~15 training steps here: the curve stops where it has nothing left to time)."""
    torch.manual_seed(seed)
    model = build_network(task, arm, sizes)
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr)
    order = batches(len(train), schedule.batch_size, torch.Generator().manual_seed(seed))
    loss_of = TASKS[task].loss
    run = Run(math.nan, count_parameters(model), schedule.steps, 0.0)
    run.steps_to = {threshold_key(t): None for t in TASKS[task].thresholds}
    run.seconds_to = dict(run.steps_to)
    model.train()
    for step in range(1, schedule.steps + 1):
        started = time.perf_counter()
        batch = train.take(next(order))
        loss = loss_of(model(batch.inputs), batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.train_seconds += time.perf_counter() - started
        if not math.isfinite(loss.item()):
            raise BadInput(f"{task} {arm} seed {seed}: loss {loss.item()} at step {step} (lower the lr)")
        pending = None in run.steps_to.values()  # a threshold still to reach: keep watching
        if step == schedule.steps or (pending and step % schedule.eval_every == 0):
            _record(run, step, evaluate(model, task, test, schedule.eval_batch), task)
    run.metric = run.curve[-1][1]
    return run


def _record(run: Run, step: int, value: float, task: str) -> None:
    run.curve.append((step, value))
    for threshold in TASKS[task].thresholds:
        key = threshold_key(threshold)
        if run.steps_to[key] is None and reached(task, value, threshold):
            run.steps_to[key], run.seconds_to[key] = step, run.train_seconds


def run_record(seed: int, run: Run) -> dict:
    """One run as the train stage writes it."""
    return {
        "seed": seed,
        "metric": run.metric,
        "steps": run.steps,
        "train_seconds": run.train_seconds,
        "steps_to": run.steps_to,
        "seconds_to": run.seconds_to,
        "curve": [list(point) for point in run.curve],
    }


# ---- the comparisons: the study's paired verdict rule (posconv.grid) on every task and split ----

COMPARISONS = (  # (question, arm A, arm B): judged wherever both arms ran on at least two common seeds
    ("coordbias vs vanilla (what the coordinate bias gives the same network)", COORDBIAS, VANILLA),
    ("coordbias vs coordconv (as well as CoordConv?)", COORDBIAS, COORDCONV),
    ("coordbias: the seed's first form vs the reduced one", PER_INPUT, COORDBIAS),
    ("coordconv vs the paper's convolutional baseline", COORDCONV, PAPER_CONV),
    ("coordbias vs the paper's convolutional baseline", COORDBIAS, PAPER_CONV),
    ("coordinvolution vs involution", COORD_INVOLUTION, INVOLUTION),
    ("coorddeform vs deform", COORD_DEFORM, DEFORM),
)
METRIC_MARGINS = {"accuracy": 0.05, "iou": 0.05, "pixel_error": 0.5}  # fixed before any run; pixels for error


def _reached_spread(runs: list[dict], key: str, threshold: str) -> dict | None:
    """grid.spread of `key` ("steps_to" or "seconds_to") over the runs that reached `threshold`."""
    values = [run[key][threshold] for run in runs if run[key][threshold] is not None]
    return spread(values) if values else None


def cell(runs_file: dict, arm: str) -> dict:
    """One arm on one task and split: its metric over the seeds, its parameters, and, of the runs that
    reached each of the paper's thresholds, how many and after how many steps and training seconds."""
    runs = runs_file["arms"][arm]["runs"]
    thresholds = list(runs[0]["steps_to"])
    return {
        "seeds": len(runs),
        "parameters": runs_file["arms"][arm]["parameters"],
        "steps": runs[0]["steps"],
        "metric": spread([run["metric"] for run in runs]),
        "train_seconds": spread([run["train_seconds"] for run in runs]),
        "reached": {t: sum(run["steps_to"][t] is not None for run in runs) for t in thresholds},
        "steps_to": {t: _reached_spread(runs, "steps_to", t) for t in thresholds},
        "seconds_to": {t: _reached_spread(runs, "seconds_to", t) for t in thresholds},
    }


def first_step(run: dict, threshold: str) -> int:
    """Steps to `threshold`, or the run's whole training where it never got there (a lower bound)."""
    step = run["steps_to"][threshold]
    return run["steps"] if step is None else step


def _judge(a: list[float], b: list[float], margin: float) -> dict:
    mean, low, high = paired_interval([x - y for x, y in zip(a, b, strict=True)])
    return {"difference": mean, "low": low, "high": high, "verdict": verdict(low, high, mean, margin)}


def judged(runs_file: dict, question: str, arm_a: str, arm_b: str) -> list[dict]:
    """A against B on the task's metric and on the steps to each threshold, over their common seeds."""
    arms = runs_file["arms"]
    seeds = min(len(arms[arm_a]["runs"]), len(arms[arm_b]["runs"]))
    if seeds < 2:
        return []
    a, b = (arms[arm]["runs"][:seeds] for arm in (arm_a, arm_b))
    metric, every = runs_file["metric"], runs_file["schedule"]["eval_every"]
    readers = {metric: (lambda run: run["metric"], METRIC_MARGINS[metric])}
    for threshold in a[0]["steps_to"]:
        readers[f"steps_to_{threshold}"] = (functools.partial(first_step, threshold=threshold), every)
    head = {
        "task": runs_file["task"],
        "split": runs_file["split"],
        "question": question,
        "a": arm_a,
        "b": arm_b,
    }
    return [
        {
            **head,
            "quantity": name,
            "margin": margin,
            "seeds": seeds,
            **_judge(list(map(read, a)), list(map(read, b)), margin),
        }
        for name, (read, margin) in readers.items()
    ]


def summarize(runs_files: list[dict]) -> dict:
    """Every task, split and arm in one table (`cells[task][split][arm]`), and every comparison."""
    cells: dict = {}
    comparisons = []
    for runs_file in runs_files:
        task, split = runs_file["task"], runs_file["split"]
        cells.setdefault(task, {})[split] = {arm: cell(runs_file, arm) for arm in runs_file["arms"]}
        for question, arm_a, arm_b in COMPARISONS:
            if {arm_a, arm_b} <= runs_file["arms"].keys():
                comparisons += judged(runs_file, question, arm_a, arm_b)
    metrics = {runs_file["task"]: runs_file["metric"] for runs_file in runs_files}
    return {"metrics": metrics, "margins": METRIC_MARGINS, "cells": cells, "comparisons": comparisons}
