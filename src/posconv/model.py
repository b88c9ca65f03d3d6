"""The seed study's fully convolutional network, with position-aware layers from one factory.

Encoder "VGG9" `[w, w, M, 2w, 2w, M, 4w, 4w, M]`; decoder of three stride-2 transposed convolutions
with additive skips from the 1/4 and 1/2 resolution encoder outputs and BatchNorm; 1x1 classifier.
The model picks a layer *name* per convolution and never looks at the layer's type.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posconv.errors import BadInput
from posconv.io import atomic_outputs
from posconv.layers import LAYER_OPTIONS, make_conv
from posconv.registry import BASELINE, N_CLASSES

IMAGE_CHANNELS = 3  # RGB
ENCODER_STAGES = ((1, 1), (2, 2), (4, 4))  # channel multiples of w; each stage ends in a 2x2 max pool
DOWNSAMPLING = 2 ** len(ENCODER_STAGES)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: saved beside its weights."""

    layer: str
    width: int
    encoder_batchnorm: bool = False
    placement: str = "encoder"  # encoder | all | first
    coords: str = "centered"
    with_r: bool = False
    coords_per_input: bool = False

    @classmethod
    def of(cls, layer: str, options: Mapping[str, Any]) -> ModelSpec:
        """The spec of `layer`'s network from model options, keeping only those it reads."""
        return cls(layer=layer, **{name: options[name] for name in spec_fields(layer)})


# the layer options a spec (params.yaml's model) sets; the others keep their defaults
_SPEC_OPTIONS = ("coords", "with_r", "coords_per_input")


def spec_fields(layer: str) -> tuple[str, ...]:
    """The model options `layer`'s network reads: a vanilla network has no position-aware layer to place
    or to give options. The train stages in dvc.yaml list exactly these, so a change re-trains only the
    networks it touches."""
    shared = ("width", "encoder_batchnorm")
    return shared if layer == BASELINE else (*shared, "placement", *_spec_options(layer))


def _spec_options(layer: str) -> tuple[str, ...]:
    """The options of `layer` that a spec sets (the others keep the layer's defaults)."""
    return tuple(option for option in LAYER_OPTIONS[layer] if option in _SPEC_OPTIONS)


class FCN(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        w = spec.width
        blocks, in_channels, index = [], IMAGE_CHANNELS, 0
        for multiples in ENCODER_STAGES:
            layers: list[nn.Module] = []
            for multiple in multiples:
                layers += self._encoder_conv(index, in_channels, multiple * w)
                in_channels, index = multiple * w, index + 1
            blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        self.encoder = nn.ModuleList(blocks)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)
            for c_in, c_out in ((4 * w, 2 * w), (2 * w, w), (w, w // 2))
        )
        self.norm = nn.ModuleList(nn.BatchNorm2d(c) for c in (2 * w, w, w // 2))
        self.classifier = self._conv("all", in_channels=w // 2, out_channels=N_CLASSES, kernel_size=1)

    def _conv(self, needs: str | tuple[str, ...], **shape: int) -> nn.Module:
        """A convolution that is position-aware when `spec.placement` is one of `needs`."""
        aware = self.spec.placement in ((needs,) if isinstance(needs, str) else needs)
        name = self.spec.layer if aware else BASELINE
        options = {option: getattr(self.spec, option) for option in _spec_options(name)}
        return make_conv(name, **shape, **options)

    def _encoder_conv(self, index: int, c_in: int, c_out: int) -> list[nn.Module]:
        needs = ("encoder", "all", "first") if index == 0 else ("encoder", "all")
        conv = self._conv(needs, in_channels=c_in, out_channels=c_out, kernel_size=3, padding=1)
        norm = [nn.BatchNorm2d(c_out)] if self.spec.encoder_batchnorm else []
        return [conv, *norm, nn.ReLU(inplace=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(N, 4, H, W)` for any H, W: padded at the bottom/right to a multiple of 8, then cropped."""
        height, width = x.shape[-2:]
        pad_height, pad_width = -height % DOWNSAMPLING, -width % DOWNSAMPLING
        if pad_height or pad_width:
            x = nn.functional.pad(x, (0, pad_width, 0, pad_height))
        return self._forward(x)[..., :height, :width]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.encoder[0](x)
        quarter = self.encoder[1](half)
        y = self.encoder[2](quarter)
        for up, norm, skip in zip(self.up, self.norm, (quarter, half, None), strict=True):
            y = torch.relu(up(y))
            y = norm(y if skip is None else y + skip)
        return self.classifier(y)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def materialize(model: FCN, image_size: int) -> FCN:
    """Give a model's lazy layers their parameters (`local`'s weights are laid out on the output grid of
    its first forward) before an optimizer, `count_parameters`, DDP or `.to(memory_format=...)` needs
    them: one forward of a blank (1, 3, size, size) batch in eval mode without gradients, so BatchNorm's
    statistics stay as they were, then the training mode restored. A model without lazy parameters is
    returned untouched: no forward, no random draw."""
    if not any(nn.parameter.is_lazy(p) for p in model.parameters()):
        return model
    known = next(p for p in model.parameters() if not nn.parameter.is_lazy(p))
    training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, IMAGE_CHANNELS, image_size, image_size, device=known.device, dtype=known.dtype))
    return model.train(training)


def model_bytes(model: FCN) -> bytes:
    """The state dict with the spec that built it, as a model file's bytes. Saved through a buffer, so
    the archive's inner folder is "archive" rather than a file's name: same weights, same bytes."""
    buffer = io.BytesIO()
    torch.save({"spec": asdict(model.spec), "state_dict": model.state_dict()}, buffer)
    return buffer.getvalue()


def save_model(model: FCN, path: str | Path) -> None:
    """Save `model` to `path`, atomically."""
    with atomic_outputs(path) as (temp,):
        temp.write_bytes(model_bytes(model))


def load_model(path: str | Path, device: torch.device | str = "cpu", layer: str | None = None) -> FCN:
    """Rebuild a saved model; `weights_only=True` so a model file cannot run code. With `layer`, a model
    of another layer is refused."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        model = FCN(ModelSpec(**saved["spec"]))
        model.load_state_dict(saved["state_dict"])
    except FileNotFoundError:
        raise BadInput(f"{path}: model file not found (run its train stage first)") from None
    except Exception as error:  # a corrupt or foreign file can fail in many ways inside torch
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise BadInput(f"{path}: not a posconv model file ({type(error).__name__}: {first_line})") from None
    if layer is not None and model.spec.layer != layer:
        raise BadInput(f"{path}: holds a {model.spec.layer!r} model, expected {layer!r}")
    return model.to(device)
