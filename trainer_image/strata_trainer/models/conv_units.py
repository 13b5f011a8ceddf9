"""torch modules for the unit specs the built-in families share (torchvision's building blocks)."""

from __future__ import annotations

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.ops import Conv2dNormActivation

from strata.families.base import Architecture, StageUnit, Unit
from strata.families.mobilenetv2 import InvertedResidualSpec
from strata.families.resnet import BasicBlockSpec
from strata.families.vgg import ConvBNLayer

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def build_unit(unit: Unit) -> nn.Module:
    if isinstance(unit, ConvBNLayer):
        layer = Conv2dNormActivation(unit.in_channels, unit.out_channels, kernel_size=unit.kernel, stride=unit.stride,
                                     activation_layer=ACTIVATIONS[unit.activation])
        if unit.pool:
            layer.append(nn.MaxPool2d(2))
        return layer
    if isinstance(unit, BasicBlockSpec):
        downsample = None
        if unit.stride != 1 or unit.in_channels != unit.out_channels:  # projection shortcut (option B)
            downsample = nn.Sequential(conv1x1(unit.in_channels, unit.out_channels, unit.stride),
                                       nn.BatchNorm2d(unit.out_channels))
        return BasicBlock(unit.in_channels, unit.out_channels, unit.stride, downsample)
    if isinstance(unit, InvertedResidualSpec):
        return InvertedResidual(unit.in_channels, unit.out_channels, unit.stride, unit.expand_ratio)
    if isinstance(unit, StageUnit):
        return nn.Sequential(*(build_unit(block) for block in unit.blocks))
    raise TypeError(f"no module for unit {type(unit).__name__}")


def pooled_classifier(in_channels: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_channels, num_classes))
    return nn.Sequential(*layers)


def build_stages(arch: Architecture) -> list[list[nn.Module]]:
    """The architecture's units as modules, back in their stages (a stage-sized unit is one module)."""
    stages, start = [], 0
    for size in arch.stage_sizes:
        stages.append([build_unit(unit) for unit in arch.units[start:start + size]])
        start += size
    return stages
