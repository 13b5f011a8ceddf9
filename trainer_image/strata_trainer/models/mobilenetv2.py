"""MobileNetV2 for small inputs as a StagedModel: stem, torchvision InvertedResiduals, the 1x1 conv head."""

from __future__ import annotations

from torch import nn
from torchvision.ops import Conv2dNormActivation

from strata.families.base import Architecture
from strata_trainer.models.conv_units import build_stages, pooled_classifier
from strata_trainer.models.staged import StagedModel


def build(arch: Architecture, num_classes: int) -> StagedModel:
    stem, *stages = build_stages(arch)
    head = arch.head
    last = Conv2dNormActivation(head["in_channels"], head["last_channels"], kernel_size=1, activation_layer=nn.ReLU6)
    return StagedModel(stem[0], stages, nn.Sequential(last, *pooled_classifier(head["last_channels"], num_classes,
                                                                             head["dropout"])))
