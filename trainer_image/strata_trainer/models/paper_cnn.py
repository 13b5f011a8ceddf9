"""The paper's CNN as a StagedModel: each conv layer (conv, ReLU, 2x2 max-pool) one unit; FC head."""

from __future__ import annotations

import math

from torch import nn

from strata.families.base import Architecture
from strata_trainer.models.staged import StagedModel


def build(arch: Architecture, num_classes: int) -> StagedModel:
    blocks = [nn.Sequential(nn.Conv2d(u.in_channels, u.out_channels, u.kernel, padding=u.padding), nn.ReLU(),
                            nn.MaxPool2d(u.pool))
              for u in arch.units]
    width = math.prod(arch.feature_shape(arch.depth))
    head: list[nn.Module] = [nn.Flatten()]
    for units in arch.head["fc_units"]:
        head += [nn.Linear(width, units), nn.ReLU()]
        width = units
    head.append(nn.Linear(width, num_classes))
    return StagedModel(None, [[block] for block in blocks], nn.Sequential(*head))
