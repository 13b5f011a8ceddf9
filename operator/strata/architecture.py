"""A trial's parameters become a CNN architecture and its reusable conv prefixes (no torch here).

The paper's family: per conv layer a same-padded conv, ReLU and 2x2 max-pool; then FC hidden
layers with ReLU; then the classifier. A *prefix* is the first k conv layers; its signature is
everything that decides whether trained weights fit another network's first k layers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from strata.spec import IntParam, StudySpec, parse_fc_layout

# Native shape (channels, height, width) and class count of each dataset.
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion-mnist": (1, 28, 28),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
DATASET_CLASSES: dict[str, int] = {"fashion-mnist": 10, "mnist": 10, "cifar10": 10}

DEFAULTS: dict[str, Any] = {
    "convLayers": 1,
    "filters": 18,
    "kernelSize": 3,
    "fcLayout": "250",
    "learningRate": 1e-3,
    "batchSize": 32,
    "optimizer": "adam",
}


@dataclass(frozen=True)
class ConvLayerSpec:
    in_channels: int
    out_channels: int
    kernel: int
    padding: int
    pool: int = 2
    activation: str = "relu"


@dataclass(frozen=True)
class CNNArchitecture:
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    conv_layers: int
    filters: int
    kernel_size: int
    fc_units: tuple[int, ...]
    learning_rate: float
    batch_size: int
    optimizer: str
    conv: tuple[ConvLayerSpec, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.conv:
            layers, channels = [], self.input_shape[0]
            for _ in range(self.conv_layers):
                layers.append(ConvLayerSpec(channels, self.filters, self.kernel_size, self.kernel_size // 2))
                channels = self.filters
            object.__setattr__(self, "conv", tuple(layers))

    def feature_shape(self, k: int) -> tuple[int, int, int]:
        """Shape of the output of the first k conv blocks."""
        c, h, w = self.input_shape
        for layer in self.conv[:k]:
            c, h, w = layer.out_channels, h // layer.pool, w // layer.pool
        return c, h, w

    def prefix_signature(self, k: int) -> "PrefixSignature":
        if not 1 <= k <= self.conv_layers:
            raise ValueError(f"prefix length {k} outside 1..{self.conv_layers}")
        return PrefixSignature(self.dataset, self.input_shape, self.conv[:k])

    def describe(self) -> str:
        fc = "-".join(map(str, self.fc_units)) or "none"
        return f"{self.conv_layers}x{self.filters}f k{self.kernel_size} fc[{fc}] lr={self.learning_rate:g} bs={self.batch_size} {self.optimizer}"


@dataclass(frozen=True)
class PrefixSignature:
    """What makes trained conv weights interchangeable: dataset, input shape, and each layer."""

    dataset: str
    input_shape: tuple[int, int, int]
    layers: tuple[ConvLayerSpec, ...]

    @property
    def depth(self) -> int:
        return len(self.layers)

    def canonical(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "layers": [asdict(layer) for layer in self.layers],
        }

    @property
    def key(self) -> str:
        """A stable, path-safe id: depth plus a hash of the canonical JSON."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()
        return f"d{self.depth}-{hashlib.sha256(blob).hexdigest()[:24]}"


def input_shape_for(spec: StudySpec) -> tuple[int, int, int]:
    channels, height, width = DATASET_SHAPES[spec.training.dataset.name]
    if spec.training.input_size:
        return channels, spec.training.input_size, spec.training.input_size
    return channels, height, width


def architecture_from_params(spec: StudySpec, params: Mapping[str, Any]) -> CNNArchitecture:
    """The trial's params, with the family's defaults for anything the search space leaves out."""
    values = {**DEFAULTS, **params}
    if "fcLayers" in params or "fcUnits" in params:
        layers = int(params.get("fcLayers", 1))
        units = int(params.get("fcUnits", 250))
        fc_units = tuple([units] * layers)
    else:
        fc_units = parse_fc_layout(values["fcLayout"])
    dataset = spec.training.dataset.name
    return CNNArchitecture(
        dataset=dataset,
        input_shape=input_shape_for(spec),
        num_classes=DATASET_CLASSES[dataset],
        conv_layers=int(values["convLayers"]),
        filters=int(values["filters"]),
        kernel_size=int(values["kernelSize"]),
        fc_units=fc_units,
        learning_rate=float(values["learningRate"]),
        batch_size=int(values["batchSize"]),
        optimizer=str(values["optimizer"]),
    )


def check_space_fits_input(spec: StudySpec) -> None:
    """Fail early when the deepest network would pool the image away to nothing."""
    from strata.spec import SpecError

    param = spec.search_space.get("convLayers")
    if isinstance(param, IntParam):
        deepest = param.largest  # not max(values()): a range may be huge
    else:
        deepest = max(param.values()) if param is not None and hasattr(param, "values") else DEFAULTS["convLayers"]
    _, height, width = input_shape_for(spec)
    if deepest > min(height, width).bit_length() - 1:  # each conv block halves the image
        raise SpecError(
            f"spec.searchSpace.convLayers: {deepest} conv layers pool a {height}x{width} input to nothing; "
            "lower the maximum or raise spec.training.inputSize"
        )


def layer_flops(arch: CNNArchitecture) -> list[float]:
    """Forward multiply-adds per image of each conv block, then of the whole head (last entry)."""
    flops = []
    c, h, w = arch.input_shape
    for layer in arch.conv:
        flops.append(2.0 * layer.in_channels * layer.out_channels * layer.kernel ** 2 * h * w)
        c, h, w = layer.out_channels, h // layer.pool, w // layer.pool
    width, head = c * h * w, 0.0
    for units in (*arch.fc_units, arch.num_classes):
        head += 2.0 * width * units
        width = units
    return flops + [head]


def estimate_seconds_saved(arch: CNNArchitecture, frozen: int, cached: bool, epochs_run: int,
                           scratch_epochs: int, train_seconds: float) -> float:
    """Seconds a from-scratch training of the same network would have taken, minus what this took.

    A cost model, not a measurement: a trainable layer costs ~3 forward passes per epoch (forward,
    input and weight gradients), a frozen one 1 per epoch, or 1 in total when its output is cached.
    Scaled by the measured time of this training.
    """
    flops = layer_flops(arch)
    conv, head = flops[:-1], flops[-1]
    scratch = scratch_epochs * 3 * (sum(conv) + head)
    frozen_cost = sum(conv[:frozen]) * (1 if cached else epochs_run)
    actual = frozen_cost + epochs_run * 3 * (sum(conv[frozen:]) + head)
    if actual <= 0 or train_seconds <= 0:
        return 0.0
    return max(0.0, train_seconds * scratch / actual - train_seconds)
