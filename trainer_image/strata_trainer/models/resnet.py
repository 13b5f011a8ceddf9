"""CIFAR ResNet as a StagedModel: conv-BN-ReLU stem, torchvision BasicBlocks, pooled linear head."""

from __future__ import annotations

from strata.families.base import Architecture
from strata_trainer.models.conv_units import build_stages, pooled_classifier
from strata_trainer.models.staged import StagedModel


def build(arch: Architecture, num_classes: int) -> StagedModel:
    stem, *stages = build_stages(arch)
    return StagedModel(stem[0], stages, pooled_classifier(arch.head["in_channels"], num_classes))
