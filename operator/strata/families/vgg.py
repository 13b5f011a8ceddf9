"""VGG for 32x32 inputs (VGG-11/16-BN sized): groups of equal-width conv-BN-ReLU layers, a 2x2 max-pool
ending each group, global average pooling and a linear classifier.

Units: one per conv layer (blocks), the pool belonging to the last layer of its group; a network with
fewer groups or fewer layers in its last group shares every layer up to the first difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from strata.families.base import (Architecture, ConfigurationError, Family, Unit, check_shapes, dataset_signature,
                                  group_units, input_shape_for, num_classes_for, training_options)
from strata.spec import StudySpec, parse_group_layout

MAX_GROUPS = 5
MAX_WIDTH_FACTOR = 8  # 64 -> 128 -> 256 -> 512 -> 512, as VGG
NAMED = {"1-1-2-2-2": "vgg-11-bn", "2-2-2-2-2": "vgg-13-bn", "2-2-3-3-3": "vgg-16-bn", "2-2-4-4-4": "vgg-19-bn"}


@dataclass(frozen=True)
class ConvBNLayer(Unit):
    """conv (no bias) -> batch norm -> ReLU(6) (torchvision's Conv2dNormActivation), optionally a 2x2 max-pool."""

    kind: ClassVar[str] = "conv-bn"
    in_channels: int
    out_channels: int
    kernel: int = 3
    stride: int = 1
    pool: bool = False
    activation: str = "relu"

    def out_shape(self, shape):
        _, h, w = shape
        h, w = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1  # same padding
        if self.pool:
            h, w = h // 2, w // 2
        return self.out_channels, h, w


class VGG(Family):
    name = "vgg"
    depth_parameter = "groups"
    defaults: ClassVar[dict[str, Any]] = {"groups": 5, "layersPerGroup": "2-2-3-3-3", "width": 64}

    def architecture(self, spec: StudySpec, params: Mapping[str, Any]) -> Architecture:
        values = {**self.defaults, **params}
        groups, width = int(values["groups"]), int(values["width"])
        if not 1 <= groups <= MAX_GROUPS:
            raise ConfigurationError("groups", f"vgg takes 1-{MAX_GROUPS} groups, not {groups}")
        counts = parse_group_layout(values["layersPerGroup"])
        if len(counts) == 1:
            counts = counts * groups
        if len(counts) < groups:
            raise ConfigurationError("layersPerGroup", f"layersPerGroup {values['layersPerGroup']!r} gives "
                                                       f"{len(counts)} counts for {groups} groups")
        counts = counts[:groups]
        shape = input_shape_for(spec)
        stages, channels = [], shape[0]
        for g, count in enumerate(counts):
            out = width * min(2 ** g, MAX_WIDTH_FACTOR)
            layers = []
            for i in range(count):
                layers.append(ConvBNLayer(channels, out, pool=i == count - 1))
                channels = out
            stages.append(layers)
        units, sizes = group_units(stages, spec.model.reuse_unit)
        layout = "-".join(map(str, counts))
        name = NAMED.get(layout, f"vgg [{layout}]")
        arch = Architecture(
            family=self.name, dataset=dataset_signature(spec), input_shape=shape, num_classes=num_classes_for(spec),
            units=units, stage_sizes=sizes, head={"in_channels": channels}, training=training_options(spec, params),
            config={"groups": groups, "layersPerGroup": list(counts), "width": width},
            label=f"{name}" + (f" x{width}" if width != 64 else ""))
        return check_shapes(arch, "groups")
