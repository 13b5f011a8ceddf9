"""VGG as a StagedModel: every conv-BN-ReLU layer a unit (the group's pool in its last), pooled linear head."""

from __future__ import annotations

from strata.families.base import Architecture
from strata_trainer.models.conv_units import build_stages, pooled_classifier
from strata_trainer.models.staged import StagedModel


def build(arch: Architecture, num_classes: int) -> StagedModel:
    return StagedModel(None, build_stages(arch), pooled_classifier(arch.head["in_channels"], num_classes))
