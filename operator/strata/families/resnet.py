"""CIFAR ResNet-(6n+2) (He et al. 2016, section 4.2): a 3x3 conv stem, three stages of n basic blocks
at widths 16, 32, 64 (times widthMultiplier), the second and third starting with stride 2, global
average pooling and a linear classifier. Blocks are torchvision's BasicBlock; a block that changes
width or stride has the 1x1 conv + BN projection shortcut (torchvision's option B).

Units: the stem, then each block. ResNet-32 (5 blocks per stage) and ResNet-20 (3) share the stem
and the first 3 blocks of stage 1, so a deeper network takes a shallower one's trained start; with
reuseUnit stages they would share only the stem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from strata.families.base import (Architecture, ConfigurationError, Family, Unit, check_shapes, dataset_signature,
                                  group_units, input_shape_for, num_classes_for, training_options)
from strata.families.vgg import ConvBNLayer
from strata.spec import StudySpec

STAGE_WIDTHS = (16, 32, 64)


@dataclass(frozen=True)
class BasicBlockSpec(Unit):
    kind: ClassVar[str] = "basic-block"
    in_channels: int
    out_channels: int
    stride: int = 1

    def out_shape(self, shape):
        _, h, w = shape
        return self.out_channels, (h - 1) // self.stride + 1, (w - 1) // self.stride + 1


def stage_widths(multiplier: float) -> tuple[int, ...]:
    return tuple(int(round(width * multiplier)) for width in STAGE_WIDTHS)


class ResNet(Family):
    name = "resnet"
    depth_parameter = "depth"
    defaults: ClassVar[dict[str, Any]] = {"depth": 20, "widthMultiplier": 1.0}

    def architecture(self, spec: StudySpec, params: Mapping[str, Any]) -> Architecture:
        values = {**self.defaults, **params}
        depth, multiplier = int(values["depth"]), float(values["widthMultiplier"])
        if depth < 8 or (depth - 2) % 6:
            raise ConfigurationError("depth", f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), not {depth}")
        widths = stage_widths(multiplier)
        if min(widths) < 1:
            raise ConfigurationError("widthMultiplier", f"widthMultiplier {multiplier:g} rounds stage width "
                                                        f"{STAGE_WIDTHS[0]} to zero channels")
        n = (depth - 2) // 6
        shape = input_shape_for(spec)
        stages: list[list[Unit]] = [[ConvBNLayer(shape[0], widths[0])]]
        channels = widths[0]
        for s, width in enumerate(widths):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlockSpec(channels, width, stride=2 if s > 0 and b == 0 else 1))
                channels = width
            stages.append(blocks)
        units, sizes = group_units(stages, spec.model.reuse_unit)
        arch = Architecture(
            family=self.name, dataset=dataset_signature(spec), input_shape=shape, num_classes=num_classes_for(spec),
            units=units, stage_sizes=sizes, head={"in_channels": channels}, training=training_options(spec, params),
            config={"depth": depth, "widthMultiplier": multiplier, "widths": list(widths)},
            label=f"resnet-{depth}" + (f" x{multiplier:g}" if multiplier != 1 else ""))
        return check_shapes(arch, "depth")
