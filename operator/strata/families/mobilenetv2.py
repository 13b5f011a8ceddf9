"""MobileNetV2 (Sandler et al.) for small inputs: torchvision's inverted-residual rows [t, c, n, s] with
the stem and the second row at stride 1 (32x32 inputs end at 4x4, not 1x1), widths scaled by
widthMultiplier and rounded to multiples of 8 as torchvision rounds them; the head is the 1x1 conv to
1280 channels, global average pooling, dropout 0.2 and a linear classifier.

Units: the stem, then each inverted-residual block; `stages` keeps the first rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from strata.families.base import (Architecture, ConfigurationError, Family, Unit, check_shapes, dataset_signature,
                                  group_units, input_shape_for, num_classes_for, training_options)
from strata.families.vgg import ConvBNLayer
from strata.spec import StudySpec

# t (expansion), c (channels), n (blocks), s (first block's stride): torchvision's, strides 1 for small inputs.
ROWS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS, LAST_CHANNELS = 32, 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision.models._utils._make_divisible: the nearest multiple, never more than 10% below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class InvertedResidualSpec(Unit):
    kind: ClassVar[str] = "inverted-residual"
    in_channels: int
    out_channels: int
    stride: int
    expand_ratio: int

    def out_shape(self, shape):
        _, h, w = shape
        return self.out_channels, (h - 1) // self.stride + 1, (w - 1) // self.stride + 1


class MobileNetV2(Family):
    name = "mobilenetv2"
    depth_parameter = "stages"
    defaults: ClassVar[dict[str, Any]] = {"widthMultiplier": 1.0, "stages": len(ROWS)}

    def architecture(self, spec: StudySpec, params: Mapping[str, Any]) -> Architecture:
        values = {**self.defaults, **params}
        multiplier, rows = float(values["widthMultiplier"]), int(values["stages"])
        if not 1 <= rows <= len(ROWS):
            raise ConfigurationError("stages", f"mobilenetv2 has 1-{len(ROWS)} stages, not {rows}")
        if multiplier <= 0:
            raise ConfigurationError("widthMultiplier", f"widthMultiplier must be positive, not {multiplier:g}")
        shape = input_shape_for(spec)
        stem = make_divisible(STEM_CHANNELS * multiplier)
        stages: list[list[Unit]] = [[ConvBNLayer(shape[0], stem, activation="relu6")]]
        channels = stem
        for t, c, n, s in ROWS[:rows]:
            out = make_divisible(c * multiplier)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidualSpec(channels, out, s if i == 0 else 1, t))
                channels = out
            stages.append(blocks)
        units, sizes = group_units(stages, spec.model.reuse_unit)
        last = make_divisible(LAST_CHANNELS * max(1.0, multiplier))
        arch = Architecture(
            family=self.name, dataset=dataset_signature(spec), input_shape=shape, num_classes=num_classes_for(spec),
            units=units, stage_sizes=sizes, head={"in_channels": channels, "last_channels": last, "dropout": 0.2},
            training=training_options(spec, params),
            config={"widthMultiplier": multiplier, "stages": rows},
            label=f"mobilenetv2 x{multiplier:g}" + (f" {rows} stages" if rows != len(ROWS) else ""))
        return check_shapes(arch, "stages")
