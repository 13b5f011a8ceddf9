"""A user's model family: `build(params, input_shape, num_classes)` returns a strata_trainer StagedModel.

A stem, then `stages` stages of `blocksPerStage` depthwise-separable blocks each (the width doubling
and the resolution halving at every stage after the first), then a pooled linear head. Strata reuses,
freezes and caches its first blocks like a built-in family's: a network with more blocks per stage
starts from a shallower one's trained stem and first blocks.
"""

from __future__ import annotations

from torch import nn
from torchvision.ops import Conv2dNormActivation

from strata_trainer.models import StagedModel


def separable_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        Conv2dNormActivation(in_channels, in_channels, 3, stride=stride, groups=in_channels),  # depthwise
        Conv2dNormActivation(in_channels, out_channels, 1),  # pointwise
    )


def build(params: dict, input_shape: tuple[int, int, int], num_classes: int) -> StagedModel:
    width = int(params.get("width", 16))
    stages = int(params.get("stages", 2))
    blocks = int(params.get("blocksPerStage", 2))
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    channels = input_shape[0]
    stem = Conv2dNormActivation(channels, width, 3)
    channels, layout = width, []
    for s in range(stages):
        out = width * 2 ** s
        layout.append([separable_block(channels if b == 0 else out, out, 2 if s > 0 and b == 0 else 1)
                       for b in range(blocks)])
        channels = out
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return StagedModel(stem, layout, head)
