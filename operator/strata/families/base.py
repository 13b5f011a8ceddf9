"""What every model family shares, torch-free: an Architecture of reusable units and its prefixes.

A network is a stem, ordered stages of blocks, and a head. Its *units* are what layer reuse works
on: the stem (when the family has one) and then each block (reuseUnit blocks, the default) or each
whole stage (reuseUnit stages). A *prefix* is the first k units; its signature (family, dataset
signature, input shape, and the exact structure of those k units) decides whether trained weights
fit another network's first k units. The trainer builds torch modules from the same unit specs
(strata_trainer.models), so both sides agree on every signature.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Mapping, Sequence

from strata.spec import FAMILY_PARAMETERS, USER_DATASETS, FloatParam, IntParam, Parameter, SpecError, StudySpec

# Native shape (channels, height, width) and class count of each bundled dataset.
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion-mnist": (1, 28, 28),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}
DATASET_CLASSES: dict[str, int] = {"fashion-mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}
USER_DATASET_SIZE = 32  # imagefolder and npz images are resized to inputSize, by default this


class ConfigurationError(ValueError):
    """A configuration the family cannot build (e.g. pooling an input to nothing); `parameter` names the cause."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class Unit:
    """One reusable unit (a block, the stem, or a whole stage). Subclasses say how it maps a shape."""

    kind: ClassVar[str] = "unit"

    def out_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        raise NotImplementedError

    def canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class StageUnit(Unit):
    """reuseUnit stages: a whole stage of blocks is one unit."""

    kind: ClassVar[str] = "stage"
    blocks: tuple[Unit, ...] = ()

    def out_shape(self, shape):
        for block in self.blocks:
            shape = block.out_shape(shape)
        return shape

    def canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, "blocks": [block.canonical() for block in self.blocks]}


@dataclass(frozen=True)
class DescribedUnit(Unit):
    """A unit known only from its built module (family custom): its repr and its tensors' shapes."""

    kind: ClassVar[str] = "module"
    text: str = ""
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()
    shape: tuple[int, int, int] = (0, 0, 0)

    def out_shape(self, shape):
        return self.shape


@dataclass(frozen=True)
class TrainingOptions:
    """How a trial trains: the search space's values, else spec.training's."""

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 32
    momentum: float | None = None
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "none"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    initialization: str = "default"
    random_crop_padding: int = 0
    horizontal_flip: bool = False

    @property
    def augments(self) -> bool:
        return self.random_crop_padding > 0 or self.horizontal_flip

    def describe(self) -> str:
        extra = [f"lr={self.learning_rate:g}", f"bs={self.batch_size}", self.optimizer]
        if self.weight_decay:
            extra.append(f"wd={self.weight_decay:g}")
        if self.schedule != "none":
            extra.append(self.schedule)
        if self.augments:
            extra.append("aug")
        return " ".join(extra)


def training_options(spec: StudySpec, params: Mapping[str, Any]) -> TrainingOptions:
    t = spec.training
    schedule = str(params.get("lrSchedule", t.schedule.kind))
    return TrainingOptions(
        optimizer=str(params.get("optimizer", t.optimizer)),
        learning_rate=float(params.get("learningRate", t.learning_rate)),
        batch_size=int(params.get("batchSize", t.batch_size)),
        momentum=float(params["momentum"]) if "momentum" in params else t.momentum,
        nesterov=bool(params.get("nesterov", t.nesterov)),
        weight_decay=float(params.get("weightDecay", t.weight_decay)),
        schedule=schedule,
        milestones=tuple(t.schedule.milestones),
        gamma=t.schedule.gamma,
        initialization=str(params.get("initialization", t.initialization)),
        random_crop_padding=int(params.get("randomCropPadding", t.augmentation.random_crop_padding)),
        horizontal_flip=bool(params.get("horizontalFlip", t.augmentation.horizontal_flip)),
    )


@dataclass(frozen=True)
class Architecture:
    """A trial's network, torch-free: its units (stem first), the units per stage, the head, how it trains."""

    family: str
    dataset: str  # the dataset signature (strata.families.base.dataset_signature)
    input_shape: tuple[int, int, int]
    num_classes: int | None  # None: from the data (imagefolder, npz)
    units: tuple[Unit, ...]
    stage_sizes: tuple[int, ...]  # units per stage, in order (the stem is a stage of one)
    head: Mapping[str, Any]  # family-specific description of the head (the trainer's builder reads it)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    config: Mapping[str, Any] = field(default_factory=dict)  # the family's resolved parameters
    label: str = ""

    @property
    def depth(self) -> int:
        return len(self.units)

    def feature_shape(self, k: int) -> tuple[int, int, int]:
        """Shape of the output of the first k units."""
        shape = self.input_shape
        for unit in self.units[:k]:
            shape = unit.out_shape(shape)
        return shape

    def prefix_signature(self, k: int) -> "PrefixSignature":
        if not 1 <= k <= self.depth:
            raise ValueError(f"prefix length {k} outside 1..{self.depth}")
        return PrefixSignature(self.dataset, self.input_shape, self.units[:k], self.family)

    def common_prefix(self, other: "Architecture") -> int:
        """How many first units this and `other` share exactly (same family, data and input)."""
        if (self.family, self.dataset, self.input_shape) != (other.family, other.dataset, other.input_shape):
            return 0
        k = 0
        while k < min(self.depth, other.depth) and self.units[k] == other.units[k]:
            k += 1
        return k

    def with_units(self, units: Sequence[Unit], stage_sizes: Sequence[int]) -> "Architecture":
        return replace(self, units=tuple(units), stage_sizes=tuple(stage_sizes))

    def describe(self) -> str:
        return f"{self.label or self.family} {self.training.describe()}"


@dataclass(frozen=True)
class PrefixSignature:
    """What makes trained units interchangeable: family, dataset, input shape, and each unit exactly."""

    dataset: str
    input_shape: tuple[int, int, int]
    layers: tuple[Unit, ...]
    family: str = "paper-cnn"

    @property
    def depth(self) -> int:
        return len(self.layers)

    def canonical(self) -> dict[str, Any]:
        if self.family == "paper-cnn":
            # Unchanged since the first registry: its entries stay valid.
            return {"dataset": self.dataset, "input_shape": list(self.input_shape),
                    "layers": [asdict(layer) for layer in self.layers]}
        return {"family": self.family, "dataset": self.dataset, "input_shape": list(self.input_shape),
                "units": [layer.canonical() for layer in self.layers]}

    @property
    def key(self) -> str:
        """A stable, path-safe id: depth plus a hash of the canonical JSON."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), default=list).encode()
        return f"d{self.depth}-{hashlib.sha256(blob).hexdigest()[:24]}"


def dataset_signature(spec: StudySpec) -> str:
    """The bundled datasets by name (as ever); the user's own by kind and location."""
    dataset = spec.training.dataset
    if dataset.name in USER_DATASETS:
        return f"{dataset.name}:{dataset.path}"
    return dataset.name


def input_shape_for(spec: StudySpec) -> tuple[int, int, int]:
    dataset = spec.training.dataset
    if dataset.name in USER_DATASETS:
        size = spec.training.input_size or USER_DATASET_SIZE
        return dataset.channels or 3, size, size
    channels, height, width = DATASET_SHAPES[dataset.name]
    if spec.training.input_size:
        return channels, spec.training.input_size, spec.training.input_size
    return channels, height, width


def num_classes_for(spec: StudySpec) -> int | None:
    return DATASET_CLASSES.get(spec.training.dataset.name)


def group_units(blocks_per_stage: Sequence[Sequence[Unit]], reuse_unit: str) -> tuple[tuple[Unit, ...], tuple[int, ...]]:
    """Units and units per stage from the stages' blocks: each block a unit, or each stage one."""
    if reuse_unit == "stages":
        stages = [StageUnit(tuple(blocks)) if len(blocks) > 1 else blocks[0] for blocks in blocks_per_stage if blocks]
        return tuple(stages), tuple(1 for _ in stages)
    units = tuple(block for blocks in blocks_per_stage for block in blocks)
    return units, tuple(len(blocks) for blocks in blocks_per_stage if blocks)


def check_shapes(arch: Architecture, parameter: str) -> Architecture:
    """Every unit must leave at least a 1x1 map with at least one channel."""
    shape = arch.input_shape
    for i, unit in enumerate(arch.units):
        shape = unit.out_shape(shape)
        if min(shape) < 1:
            c, h, w = arch.input_shape
            raise ConfigurationError(parameter, f"{arch.label or arch.family}: unit {i + 1} of {arch.depth} leaves "
                                                f"{shape[0]}x{shape[1]}x{shape[2]} of a {c}x{h}x{w} input; lower "
                                                f"{parameter} or raise spec.training.inputSize")
    return arch


class Family:
    """A model family, scheduler side: what a trial's parameters build, and how a search space is checked."""

    name: ClassVar[str]
    depth_parameter: ClassVar[str | None] = None  # the parameter that grows the network (reuse-aware ordering)
    defaults: ClassVar[dict[str, Any]] = {}

    def architecture(self, spec: StudySpec, params: Mapping[str, Any]) -> Architecture:
        """Raises ConfigurationError when these parameters cannot build a network."""
        raise NotImplementedError

    def smaller(self, spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The next shallower configuration (the donor reuse-aware scheduling trains first), or None."""
        name = self.depth_parameter
        if name is None:
            return None
        values = self.depth_values(spec)
        current = params.get(name, self.defaults.get(name))
        lower = [v for v in values if current is not None and v < current]
        return {**params, name: max(lower)} if lower else None

    def depth_values(self, spec: StudySpec) -> list[Any]:
        param = spec.search_space.get(self.depth_parameter or "")
        if isinstance(param, IntParam):
            return param.values() if (param.high - param.low) // param.step < 10_000 else []
        return list(param.values()) if param is not None and not isinstance(param, FloatParam) else []

    def check_space(self, spec: StudySpec) -> None:
        """Refuse a search space whose extreme values cannot build (SpecError naming the parameter)."""
        for params in extreme_configurations(spec, self.structural_parameters()):
            try:
                self.architecture(spec, params)
            except ConfigurationError as error:
                raise SpecError(f"spec.searchSpace.{error.parameter}: {error}") from None

    def structural_parameters(self) -> tuple[str, ...]:
        return tuple(FAMILY_PARAMETERS[self.name])


def extreme_values(param: Parameter) -> list[Any]:
    if isinstance(param, IntParam):
        return param.representatives()
    if isinstance(param, FloatParam):
        return [param.low, param.high]
    return param.values()


def extreme_configurations(spec: StudySpec, names: Sequence[str], limit: int = 256) -> list[dict[str, Any]]:
    """Every combination of the named parameters' extreme values (bounded): where builds fail first."""
    import itertools

    present = [name for name in names if name in spec.search_space]
    choices = [extreme_values(spec.search_space[name]) for name in present]
    combos = itertools.islice(itertools.product(*choices), limit)
    return [dict(zip(present, combo)) for combo in combos]


