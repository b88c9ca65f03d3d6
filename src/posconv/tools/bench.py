"""Benchmarks that print ratios measured within one run.

`python -m posconv.tools.bench {layers,generate,train,families,involution}`; `layers` is the `bench_layers`
stage of `study/dvc.yaml` and writes `metrics/bench_layers.json`, which the report reads.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from posconv import distributed
from posconv.cli import parser
from posconv.config import TrainParams, load_params
from posconv.data import write_scenes
from posconv.distributed import World
from posconv.engine import (
    LabelledImages,
    NoLog,
    autocast,
    make_optimizer,
    place,
    resolve_device,
    resolve_precision,
    synchronize,
    to_input,
    train,
    train_step,
)
from posconv.errors import BadInput
from posconv.io import write_json
from posconv.layers import fused, make_conv
from posconv.layers.deform import deform_conv2d
from posconv.layers.involution import involution
from posconv.model import FCN, ModelSpec
from posconv.plots import save_preview
from posconv.registry import (
    BASELINE,
    BENCH_LAYERS,
    CONTENT_ADAPTIVE,
    COORD_INVOLUTION,
    DEFORM,
    FAMILIES,
    INVOLUTION,
    LAYERS,
    N_CLASSES,
    VANILLA,
)
from posconv.scenes import draw_scenes, image_stream
from posconv.stages import run_stage
from posconv.stages.train import LiveLog, live_log

# ---- layers ----


_LAYER_TARGETS = {"cpu": 1.10, "cuda": 1.05}  # max fwd+bwd time of a position-aware layer / nn.Conv2d's
_LAYER_SETTINGS = {  # device: (dtype, memory format) pairs benchmarked there (the model: channels_last)
    "cpu": ((torch.float32, torch.contiguous_format), (torch.float32, torch.channels_last)),
    "cuda": ((torch.bfloat16, torch.channels_last),),
}
_FORMAT_NAMES = {torch.contiguous_format: "NCHW", torch.channels_last: "NHWC"}
_LAYER_COLUMNS = (
    "{device:<5}{dtype:<9}{format:<6}{width:>3}  {layer:<15}{reps:>5}{vanilla_ms:>11}"
    " {coordbias:>19} {coordconv:>19} {coordbias_fused:>19} {coordconv_fused:>19}"
)
_AWARE = LAYERS[1:]  # timed against the baseline, plain and (on CPU) with the fused backend


def _variants(device: str) -> dict[str, tuple[str, bool]]:
    """Row name -> (layer, fused backend on): the plain layers, and the fused ones where they can run."""
    variants = {name: (name, False) for name in LAYERS}
    if device == "cpu" and fused.available():
        variants |= {f"{name}_fused": (name, True) for name in _AWARE}
    return variants


def _encoder_shapes(width: int, size: int) -> list[tuple[int, int, int]]:
    """(C_in, C_out, H) of the model's six encoder convolutions (a 2x2 max pool after each pair)."""
    w = width
    pairs = ((3, w), (w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w))
    return [(c_in, c_out, size >> (index // 2)) for index, (c_in, c_out) in enumerate(pairs)]


def _encoder_stack(name: str, width: int) -> nn.Sequential:
    """The six encoder convolutions with their ReLUs and max pools, as in the model."""
    modules: list[nn.Module] = []
    for index, (c_in, c_out, _) in enumerate(_encoder_shapes(width, 1)):
        modules += [make_conv(name, c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
        modules += [nn.MaxPool2d(2)] if index % 2 else []
    return nn.Sequential(*modules)


def _layer_cases(
    width: int, size: int, batch: int
) -> Iterator[tuple[str, Callable[[str], nn.Module], tuple, bool]]:
    """(label, build from a layer name, input shape, input needs grad): each layer alone, then the stack."""
    for index, (c_in, c_out, h) in enumerate(_encoder_shapes(width, size)):
        build = partial(make_conv, in_channels=c_in, out_channels=c_out, kernel_size=3, padding=1)
        yield f"{c_in}->{c_out} @{h}", build, (batch, c_in, h, h), index > 0  # the image needs no grad
    yield "encoder stack", partial(_encoder_stack, width=width), (batch, 3, size, size), False


def _time_step(module: nn.Module, fused_on: bool, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward and backward, synchronised on CUDA."""
    synchronize = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    with fused.switched(fused_on):
        module(x).backward(grad)
    synchronize()
    return time.perf_counter() - start


def _time_layers(
    modules: dict[str, tuple[nn.Module, bool]], x: torch.Tensor, budget_s: float
) -> dict[str, list[float]]:
    """Interleaved repetitions (the order rotates) so that a load change on the machine hits every layer."""
    grad = torch.randn_like(modules[BASELINE][0](x))
    warm_up = sum(_time_step(*module, x, grad) for module in modules.values())
    reps = min(40, max(8, int(budget_s / warm_up)))
    names, times = list(modules), {name: [] for name in modules}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            times[name].append(_time_step(*modules[name], x, grad))
    return times


def _bench_layer_case(
    build: Callable[[str], nn.Module], x: torch.Tensor, memory_format: torch.memory_format, budget_s: float
) -> dict[str, Any]:
    """Median times; ratios to the baseline: the median of those within one repetition (the headline),
    and that of the fastest repetitions (other processes on the machine only ever add time)."""
    to = {"device": x.device, "dtype": x.dtype, "memory_format": memory_format}
    variants = _variants(x.device.type)
    modules = {name: (build(layer).to(**to), on) for name, (layer, on) in variants.items()}
    times = _time_layers(modules, x, budget_s)
    row: dict[str, Any] = {"reps": len(times[BASELINE])}
    for name, seconds in times.items():
        row[f"{name}_ms"] = round(1e3 * statistics.median(seconds), 3)
        if name != BASELINE:
            ratios = [t / t0 for t, t0 in zip(seconds, times[BASELINE], strict=True)]
            row[f"{name}_ratio"] = round(statistics.median(ratios), 3)
            row[f"{name}_ratio_fastest"] = round(min(seconds) / min(times[BASELINE]), 3)
    return row


def _layer_line(row: dict[str, Any]) -> str:
    ratios = {
        name: f"{row[f'{name}_ratio']:.3f}x ({row[f'{name}_ratio_fastest']:.3f}x)"
        if f"{name}_ratio" in row
        else "-"
        for name in (*_AWARE, *(f"{name}_fused" for name in _AWARE))
    }
    return _LAYER_COLUMNS.format(**row, **ratios)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bench_layers(args: argparse.Namespace) -> None:
    """Forward+backward time of coordbias and coordconv over nn.Conv2d's at the encoder's shapes."""
    widths, size, batch, budget_s = ((4,), 16, 2, 0.1) if args.quick else ((32, 64), 128, 16, 2.0)
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    header = dict(device="dev", dtype="dtype", format="mem", width="w", layer="layer", reps="reps")
    header |= dict(vanilla_ms="conv2d ms")
    names = {name: f"{name} (fastest)" for name in _AWARE} | {f"{n}_fused": f"{n}+fused" for n in _AWARE}
    print(_LAYER_COLUMNS.format(**header, **names))
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    rows = []
    settings = [(device, *setting) for device in devices for setting in _LAYER_SETTINGS[device]]
    for (device, dtype, memory_format), width in itertools.product(settings, widths):
        for layer, build, shape, needs_grad in _layer_cases(width, size, batch):
            x = torch.rand(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
            x.requires_grad_(needs_grad)
            row = {"device": device, "dtype": str(dtype).removeprefix("torch.")}
            row |= {"format": _FORMAT_NAMES[memory_format], "width": width, "layer": layer}
            row |= _bench_layer_case(build, x, memory_format, budget_s)
            worst = max(row[f"{name}_ratio"] for name in _AWARE)  # the default (plain) path
            rows.append(row | {"meets_target": worst <= _LAYER_TARGETS[device]})
            print(_layer_line(row), flush=True)
    families, new_layers = _family_ratios(args.quick), _family_layer_rows(args.quick, budget_s)
    names = {"cpu": _cpu_name()}
    names |= {"cuda": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}
    summary = {"torch": torch.__version__, "threads": torch.get_num_threads(), "devices": names}
    summary |= {"load_average_1min": {"start": load_before, "end": os.getloadavg()[0]}}
    summary |= {"batch": batch, "quick": args.quick, "targets": _LAYER_TARGETS, "results": rows}
    summary |= {"families": families, "family_layers": new_layers}
    if not args.quick:  # a smoke test's toy sizes must not replace the committed measurement
        write_json(Path(BENCH_LAYERS), summary)
    print(f"{sum(row['meets_target'] for row in rows)}/{len(rows)} cases within target {_LAYER_TARGETS}")


_FAMILY_TARGETS = {INVOLUTION: 1.0, DEFORM: 4.0}  # fwd+bwd / nn.Conv2d's at 64->64, 64 px, batch 8, fp32


def _family_ratios(quick: bool) -> list[dict[str, Any]]:
    """The content-adaptive layers against nn.Conv2d at 64->64 channels, 64x64, batch 8, float32, in both
    memory formats: the fastest of 10 interleaved repetitions each (other jobs only ever add time)."""
    channels, size, batch, reps = (4, 8, 2, 2) if quick else (64, 64, 8, 10)
    rows = []
    for memory_format, name in _FORMAT_NAMES.items():
        steps = _family_steps(channels, size, batch, memory_format)
        times = _time_interleaved({layer: steps[layer] for layer in _FAMILY_LAYERS}, reps)
        fastest = {layer: min(seconds) for layer, seconds in times.items()}
        for layer in CONTENT_ADAPTIVE:
            ratio, target = fastest[layer] / fastest[VANILLA], _FAMILY_TARGETS.get(layer)
            rows.append({
                "format": name, "layer": layer, "ms": round(1e3 * fastest[layer], 3),
                "vanilla_ms": round(1e3 * fastest[VANILLA], 3), "ratio": round(ratio, 3), "target": target,
                "meets_target": None if target is None else ratio <= target,
            })  # fmt: skip
            print(f"{name} {layer:<16} {ratio:6.2f}x nn.Conv2d (64->64, 64 px, batch 8)", flush=True)
    return rows


def _built(build: Callable[[str], nn.Module], layer: str, x: torch.Tensor) -> nn.Module:
    """The layer, its lazy parameters laid out for `x` (the spatial-specific filter's depend on the size)."""
    module = build(layer)
    with torch.no_grad():
        module(x.detach())
    return module.to(memory_format=torch.channels_last)


def _family_layer_rows(quick: bool, budget_s: float) -> list[dict[str, Any]]:
    """Every layer of families/dvc.yaml against nn.Conv2d at the model's encoder shapes (width 16, 128 px,
    batch 8, channels_last float32): the median of per-repetition ratios, interleaved."""
    width, size, batch = (4, 16, 2) if quick else (16, 128, 8)
    rows = []
    for case, build, shape, needs_grad in _layer_cases(width, size, batch):
        x = torch.rand(shape).contiguous(memory_format=torch.channels_last).requires_grad_(needs_grad)
        modules = {layer: (_built(build, layer, x), False) for layer in (VANILLA, *FAMILIES)}
        times = _time_layers(modules, x, budget_s)
        row: dict[str, Any] = {"layer": case, "reps": len(times[VANILLA])}
        row["vanilla_ms"] = round(1e3 * statistics.median(times[VANILLA]), 3)
        for layer in FAMILIES:
            ratios = [t / t0 for t, t0 in zip(times[layer], times[VANILLA], strict=True)]
            row[f"{layer}_ratio"] = round(statistics.median(ratios), 3)
        rows.append(row)
        ratios = " ".join(f"{layer} {row[f'{layer}_ratio']:.2f}x" for layer in FAMILIES)
        print(f"{case:<15}{ratios}", flush=True)
    return rows


# ---- generate ----


SEED_GENERATOR_IMAGES_PER_S = 230  # the seed study's Python-loop generator, 128 px, 2 cores (DESIGN.md §2)


def bench_generate(args: argparse.Namespace) -> None:
    """Images/s of the generate stage's work at 128 px: scenes, circle table and .npy writes to disk.

    The median of a few runs, each into a fresh folder deleted after it; the preview figure (a fixed
    cost per run, not per image) is timed apart.
    """
    count, runs = (500, 1) if args.quick else (5000, 3)
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_index in range(runs):
            folder = Path(tmp) / str(run_index)
            started = time.perf_counter()
            write_scenes(folder, seed=run_index, size=128, count=count)
            seconds.append(time.perf_counter() - started)
            shutil.rmtree(folder)
        sample = draw_scenes(6, 128, image_stream(0, 0))
        started = time.perf_counter()
        save_preview(sample.images, sample.labels, Path(tmp) / "preview.png")
        preview_s = time.perf_counter() - started
    rate = count / statistics.median(seconds)
    print(
        f"generate: {count} images of 128 px: {rate:.0f} images/s (median of {runs}), "
        f"{rate / SEED_GENERATOR_IMAGES_PER_S:.1f}x the seed generator's ~{SEED_GENERATOR_IMAGES_PER_S}; "
        f"preview figure {preview_s:.2f} s once per run"
    )


# ---- train ----


def _bare_loop(model: nn.Module, params: TrainParams, data: LabelledImages, steps: int) -> float:
    """Images/s of the plainest training loop over random tensors of the stage's shapes."""
    optimizer = make_optimizer(model, params)
    shape = (params.batch_size, *data.images.shape[1:])
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=data.images.device)
    x = to_input(images, params.channels_last)  # the stage's layout, as the stage makes it
    y = torch.randint(0, N_CLASSES, (params.batch_size, *data.images.shape[1:3]), device=x.device)
    started = time.perf_counter()
    for _ in range(steps):
        with autocast(x.device, params.precision):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()
    return steps * params.batch_size / (time.perf_counter() - started)


def _stage_loop(model: nn.Module, params: TrainParams, data: LabelledImages, live_dir: Path) -> float:
    """Images/s of the train stage's own loop: uint8 data on the device, indexing, DVCLive logging."""
    few = LabelledImages(data.images[:2], data.labels[:2])  # validation is timed apart by train()
    with live_log(live_dir) as live:
        return train(
            model, data, few, params, LiveLog(live), val_every=10**9, val_batch_size=2
        ).images_per_second


def _rank_loop(
    spec: ModelSpec, params: TrainParams, images: Any, labels: Any, device_name: str, fused_on: bool
) -> float:
    """Images/s of `train` in this process, alone or as a DDP rank (run by `distributed.launch`; the
    ranks' figures are the same global batches' rate). The process group, the threads per rank and
    the wrapping are the train stage's; the log is nothing, validation only after the last step."""
    world = World.from_env() or World()
    device = distributed.rank_device(torch.device(device_name), world)
    fused.enable(fused_on)
    with distributed.process_group(world, device):
        data = LabelledImages.from_arrays(images, labels, device)
        few = LabelledImages(data.images[:2], data.labels[:2])  # validation is timed apart by train()
        torch.manual_seed(params.seed)
        model = distributed.wrap(place(FCN(spec), device, params.channels_last), world, device)
        result = train(model, data, few, params, NoLog(), val_every=10**9, val_batch_size=2)
        return result.images_per_second


def _processes_rates(
    spec: ModelSpec, params: TrainParams, scenes: Any, device: torch.device, processes: int
) -> dict[str, float] | str:
    """The stage loop's images/s as 1 process with all its threads ("1"), as 1 process with a rank's
    threads ("1 narrow": what the ranks gain from fewer threads alone) and as `processes` DDP ranks
    (launched; `distributed.threads_per_rank` threads each), or why the ranks cannot run here."""
    try:
        distributed.check(processes, device)
        if params.batch_size % processes:
            raise BadInput(f"train.batch_size = {params.batch_size} is not divisible by {processes}")
    except BadInput as reason:
        return str(reason)
    args = (spec, params, scenes.images, scenes.labels, str(device), fused.enabled())
    rates = {"1": _rank_loop(*args)}
    threads = torch.get_num_threads()
    torch.set_num_threads(distributed.threads_per_rank(World(local_size=processes)))
    try:
        rates["1 narrow"] = _rank_loop(*args)
    finally:
        torch.set_num_threads(threads)
    rates[str(processes)] = distributed.launch(_rank_loop, args, processes)[0]
    return rates


def flops_per_image(spec: ModelSpec, params: TrainParams, data: LabelledImages) -> float:
    """Forward and backward FLOPs of one training image, counted by PyTorch.

    Counted in NCHW: the count does not depend on the layout, and FlopCounterMode does not know the
    fused oneDNN convolution the layers take in channels_last on CPU.
    """
    nchw = params.model_copy(update={"channels_last": False})
    model = place(FCN(spec), data.images.device, channels_last=False)
    with FlopCounterMode(display=False) as counter:
        train_step(model, make_optimizer(model, nchw), data, torch.arange(1, device=data.images.device), nchw)
    return counter.get_total_flops()


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_flops(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """The machine's own peak in `dtype`: FLOP/s of the faster of a large square matmul and a large
    channels_last 3x3 convolution, the best of a few after a warm-up. Both, because a CPU without
    native bf16 runs bf16 matmul on a slow reference path while oneDNN still converts convolutions."""
    n, channels = (512, 64) if quick else (2048, 128)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    images = torch.randn(8, channels, 64, 64, device=device).to(dtype, memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3, device=device).to(dtype)
    probes = {
        2 * n**3: lambda: a @ b,
        2 * images.numel() * channels * 9: lambda: torch.nn.functional.conv2d(images, weight, padding=1),
    }
    return max(flops / _best_time(probe, device, 3 if quick else 8) for flops, probe in probes.items())


def _best_time(probe: Callable[[], object], device: torch.device, repeats: int) -> float:
    probe()  # warm-up: oneDNN builds its kernel on the first call
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        probe()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


_PROCESSES = 2  # DDP ranks timed against one process


def bench_train(args: argparse.Namespace) -> None:
    """Training throughput per layer in fp32 and bf16 against the machine's peak, the stage's own
    loop against a bare loop, and the stage loop as 1 process against 2 DDP ranks, all interleaved in
    one run on params.yaml's model and train settings."""
    params = load_params()
    device = resolve_device(params.device)
    fused.enable(params.train.fused_conv)
    images = 32 if args.quick else 25 * params.train.batch_size
    scenes = draw_scenes(images, params.generate.size, image_stream(params.seed, 0))
    data = LabelledImages.from_arrays(scenes.images, scenes.labels, device)
    one_epoch = params.train.model_copy(update={"epochs": 1})
    steps = len(data) // params.train.batch_size
    specs = {layer: ModelSpec.of(layer, params.model.model_dump()) for layer in LAYERS}
    runs = [(layer, precision) for layer in LAYERS for precision in _PRECISIONS]
    rates: dict[tuple[str, str], list[float]] = {run: [] for run in runs} | {("stage", ""): []}
    by_processes: dict[str, list[float]] = {}
    no_ranks = ""  # why the ranks cannot run here, if they cannot
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(1 if args.quick else 3):
            for layer, precision in runs:  # a fresh model each time: every run starts from the same state
                model = place(FCN(specs[layer]), device, params.train.channels_last)
                settings = one_epoch.model_copy(update={"precision": precision})
                rates[layer, precision].append(_bare_loop(model, settings, data, steps))
            model = place(FCN(specs[params.layer]), device, params.train.channels_last)
            rates["stage", ""].append(_stage_loop(model, one_epoch, data, Path(tmp) / str(repeat)))
            measured = _processes_rates(specs[params.layer], one_epoch, scenes, device, _PROCESSES)
            if isinstance(measured, str):
                no_ranks = measured
            else:
                for name, value in measured.items():
                    by_processes.setdefault(name, []).append(value)
    rate = {run: statistics.median(values) for run, values in rates.items()}
    peaks = {precision: peak_flops(device, dtype, args.quick) for precision, dtype in _PRECISIONS.items()}
    print(
        f"train, width {params.model.width}, {params.generate.size} px, batch {params.train.batch_size}, "
        f"{device} ({_cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}); "
        f"peak (matmul or conv): fp32 {peaks['fp32'] / 1e12:.3f}, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s"
    )
    for layer in LAYERS:
        flops = flops_per_image(specs[layer], one_epoch, data)
        cells = [
            f"{precision} {rate[layer, precision]:.1f} img/s, "
            f"{100 * rate[layer, precision] * flops / peaks[precision]:.1f}% of peak"
            for precision in _PRECISIONS
        ]
        ratio = rate[layer, "bf16"] / rate[layer, "fp32"]
        print(f"  {layer:<10} {flops / 1e9:.2f} GFLOP/image; {'; '.join(cells)}; bf16/fp32 = {ratio:.2f}x")
    default = resolve_precision(params.train.precision, device)
    stage, bare = rate["stage", ""], rate[params.layer, default]
    print(
        f"  stage loop ({params.layer}, {default}): {stage:.1f} img/s, bare loop {bare:.1f} img/s, "
        f"stage/bare = {stage / bare:.3f} (target >= 0.90)"
    )
    head = f"  processes ({params.layer}, {default}, stage loop): "
    if no_ranks:
        print(f"{head}{_PROCESSES} not run: {no_ranks}")
        return
    median = {name: statistics.median(values) for name, values in by_processes.items()}
    alone, narrow, ranks = median["1"], median["1 narrow"], median[str(_PROCESSES)]
    per_rank = distributed.threads_per_rank(World(local_size=_PROCESSES))
    print(
        f"{head}1 x {torch.get_num_threads()} threads {alone:.1f} img/s, "
        f"{_PROCESSES} DDP x {per_rank} thread(s) {ranks:.1f} img/s, {_PROCESSES}/1 = {ranks / alone:.2f}x; "
        f"1 x {per_rank} thread(s) {narrow:.1f} img/s, {_PROCESSES} DDP/that = {ranks / narrow:.2f}x"
    )


# ---- families ----

_FAMILY_LAYERS = (VANILLA, *CONTENT_ADAPTIVE)
_STATISTICS = {"median": statistics.median, "min": min}  # min: the least disturbed by other jobs


def _saved_mib(step: Callable[[], torch.Tensor]) -> float:
    """MiB that autograd keeps for the backward of `step()`, each storage once: what a formulation costs
    in memory beyond its inputs and output during training, the same on every run and device."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        step()
    return sum(storages.values()) / 2**20


def _time_interleaved(steps: dict[str, Callable[[], torch.Tensor]], reps: int) -> dict[str, list[float]]:
    """Forward+backward seconds of each step, the order rotating every repetition."""
    names, times = list(steps), {name: [] for name in steps}
    for rep in range(reps + 1):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            steps[name]().sum().backward()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return times


def _family_steps(channels: int, size: int, batch: int, memory_format: torch.memory_format) -> dict:
    """Forward+backward closures: nn.Conv2d, each content-adaptive layer, and its two formulations on
    the same operands (the fast one and the textbook unfold one)."""
    torch.manual_seed(0)
    shape = dict(in_channels=channels, out_channels=channels, kernel_size=3, padding=1)
    layers = {name: make_conv(name, **shape).to(memory_format=memory_format) for name in _FAMILY_LAYERS}
    with torch.no_grad():  # offsets and masks away from their zero start, as after some training
        for parameter in layers[DEFORM].offset_conv.parameters():
            parameter.uniform_(-0.05, 0.05)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    involution_layer, deform_layer = layers[INVOLUTION], layers[DEFORM]
    kernel = involution_layer.span(torch.relu(involution_layer.reduce(x))).detach().requires_grad_(True)
    geometry = dict(kernel_size=3, padding=1)
    raw = deform_layer.offset_conv(x).detach()
    taps = 9
    offset, mask = raw[:, : 2 * taps].requires_grad_(True), (2 * torch.sigmoid(raw[:, 2 * taps :])).detach()
    mask.requires_grad_(True)
    weight = deform_layer.weight.detach().requires_grad_(True)
    operands = dict(weight=weight, bias=None, padding=1, mask=mask)
    steps = {name: partial(layer, x) for name, layer in layers.items()}
    steps |= {
        "involution op": lambda: involution(x, kernel, **geometry),
        "involution op, unfold": lambda: involution(x, kernel, **geometry, form="unfold"),
        "deform op": lambda: deform_conv2d(x, offset, **operands),
        "deform op, unfold": lambda: deform_conv2d(x, offset, **operands, form="unfold"),
    }
    return steps


def bench_families(args: argparse.Namespace) -> None:
    """Involution and deformable convolution: forward+backward time and saved memory against nn.Conv2d,
    and their fast formulations against the textbook unfold ones, measured in one run."""
    channels, size, batch, reps = (4, 8, 2, 2) if args.quick else (args.channels, 64, 8, args.reps)
    statistic = _STATISTICS[args.statistic]
    print(
        f"{channels}->{channels} channels, {size}x{size}, batch {batch}, 3x3, float32, "
        f"{torch.get_num_threads()} threads, {reps} reps ({args.statistic})"
    )
    print(f"{'mem':<5}{'case':<24}{'ms':>9}{'x conv2d':>10}{'x unfold':>10}{'saved MiB':>10}")
    for memory_format in (torch.contiguous_format, torch.channels_last):
        steps = _family_steps(channels, size, batch, memory_format)
        times = {name: statistic(seconds) for name, seconds in _time_interleaved(steps, reps).items()}
        for name, seconds in times.items():
            unfold = times.get(f"{name}, unfold")
            print(
                f"{_FORMAT_NAMES[memory_format]:<5}{name:<24}{1e3 * seconds:>9.2f}"
                f"{seconds / times[VANILLA]:>9.2f}x{(f'{seconds / unfold:.2f}x' if unfold else '-'):>10}"
                f"{_saved_mib(steps[name]):>10.2f}"
            )


# ---- involution ----

_INVOLUTION_TARGET = 1.0  # fwd+bwd time of the involution layer (generator included) / nn.Conv2d's
_INVOLUTION_LAYERS = (VANILLA, INVOLUTION, COORD_INVOLUTION)


def _involution_cases(quick: bool) -> list[tuple[str, Callable[[str], nn.Module], tuple, bool]]:
    """The square case (64 -> 64 channels, 64 px), then the model's encoder (width 16, 128 px), batch 8."""
    if quick:
        return list(_layer_cases(4, 16, 2))[1:2]
    square = partial(make_conv, in_channels=64, out_channels=64, kernel_size=3, padding=1)
    return [("64->64 @64", square, (8, 64, 64, 64), True), *_layer_cases(16, 128, 8)]


def bench_involution(args: argparse.Namespace) -> None:
    """Forward+backward of involution and coordinvolution (the kernel generator included) over
    nn.Conv2d's, float32 channels_last (the model's layout), interleaved in one run: the ratio of the
    fastest repetitions (other processes only ever add time) and the median of the per-repetition ratios."""
    reps = 2 if args.quick else args.reps
    if reps < 1:
        raise BadInput(f"--reps {reps}: expected at least 1 repetition")
    print(f"float32 channels_last, {torch.get_num_threads()} threads, {reps} reps; ratio: min (median)")
    print(f"{'case':<16}{'conv2d ms':>10}" + "".join(f"{name:>22}" for name in _INVOLUTION_LAYERS[1:]))
    for label, build, shape, needs_grad in _involution_cases(args.quick):
        torch.manual_seed(0)
        layers = {name: build(name).to(memory_format=torch.channels_last) for name in _INVOLUTION_LAYERS}
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(needs_grad)
        times = _time_interleaved({name: partial(layer, x) for name, layer in layers.items()}, reps)
        base = times[VANILLA]
        cells = []
        for name in _INVOLUTION_LAYERS[1:]:
            fastest = min(times[name]) / min(base)
            median = statistics.median(t / t0 for t, t0 in zip(times[name], base, strict=True))
            cells.append(f"{1e3 * min(times[name]):>8.2f} ms {fastest:.2f}x ({median:.2f}x)")
        print(f"{label:<16}{1e3 * min(base):>10.2f}" + "".join(f"{cell:>22}" for cell in cells), flush=True)
    print(f"target: involution / conv2d <= {_INVOLUTION_TARGET}")


BENCHMARKS = {
    "layers": bench_layers,
    "generate": bench_generate,
    "train": bench_train,
    "families": bench_families,
    "involution": bench_involution,
}


def main(argv: list[str]) -> None:
    arguments = parser(__name__, __doc__)
    arguments.add_argument("which", choices=BENCHMARKS)
    arguments.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    arguments.add_argument("--reps", type=int, default=20, help="timed repetitions (families, involution)")
    families = arguments.add_argument_group("families")
    families.add_argument("--channels", type=int, default=16, help="in and out channels (the model's: 16)")
    families.add_argument("--statistic", choices=tuple(_STATISTICS), default="median")
    args = arguments.parse_args(argv)
    BENCHMARKS[args.which](args)


if __name__ == "__main__":
    run_stage(main)  # under DVC, a failed or stopped run puts back the outputs DVC removed
