"""The user's own model: `spec.model.entryPoint` names package.module:function(params, input_shape,
num_classes) -> strata_trainer.models.StagedModel, installed in the trainer image.

Torch-free, the scheduler cannot know its structure: the architecture has no units here and the
trainer describes them from the built module (each unit's repr and tensor shapes, see
strata_trainer.models.staged). Layer reuse, freezing, the feature cache and the registry work as for
the built-in families; what a custom model does not get is reuse-aware ordering (donors scheduled
before the trials that need them), since that needs the structure before a trial runs.
"""

from __future__ import annotations

from typing import Any, Mapping

from strata.families.base import (Architecture, Family, dataset_signature, input_shape_for, num_classes_for,
                                  training_options)
from strata.spec import TRAINING_PARAMETERS, StudySpec


class Custom(Family):
    name = "custom"

    def architecture(self, spec: StudySpec, params: Mapping[str, Any]) -> Architecture:
        entry = spec.model.entry_point or ""
        config = {k: v for k, v in params.items() if k not in TRAINING_PARAMETERS}
        return Architecture(
            family=f"custom:{entry}", dataset=dataset_signature(spec), input_shape=input_shape_for(spec),
            num_classes=num_classes_for(spec), units=(), stage_sizes=(), head={}, training=training_options(spec, params),
            config=config, label=f"{entry}({', '.join(f'{k}={v}' for k, v in sorted(config.items()))})")

    def check_space(self, spec: StudySpec) -> None:
        return None  # only the user's function knows what it can build; a failure fails its trial

