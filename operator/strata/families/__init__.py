"""Model families, torch-free: one module per family turns a trial's parameters into an Architecture.

The scheduler, the CLI's validation and the trainer all go through `family_for(spec)`; the trainer
builds the torch modules from the same architecture (strata_trainer.models, one module per family).
A new family is one module here, one there, and one entry in each registry.
"""

from __future__ import annotations

from typing import Any, Mapping

from strata.families.base import (DATASET_CLASSES, DATASET_SHAPES, Architecture, ConfigurationError, Family,
                                  PrefixSignature, TrainingOptions, Unit, dataset_signature, input_shape_for)
from strata.families.custom import Custom
from strata.families.mobilenetv2 import MobileNetV2
from strata.families.paper_cnn import ConvLayerSpec, PaperCNN
from strata.families.resnet import ResNet
from strata.families.vgg import VGG
from strata.spec import StudySpec

FAMILIES: dict[str, Family] = {family.name: family for family in (PaperCNN(), VGG(), ResNet(), MobileNetV2(), Custom())}


def family_for(spec: StudySpec) -> Family:
    return FAMILIES[spec.model.family]


def architecture_from_params(spec: StudySpec, params: Mapping[str, Any]) -> Architecture:
    """The trial's network, with the family's defaults for anything the search space leaves out."""
    return family_for(spec).architecture(spec, params)


def check_space_fits_input(spec: StudySpec) -> None:
    """Refuse what the spec alone shows cannot build (SpecError naming the parameter)."""
    family_for(spec).check_space(spec)


__all__ = ["Architecture", "ConfigurationError", "ConvLayerSpec", "DATASET_CLASSES", "DATASET_SHAPES", "FAMILIES",
           "Family", "PrefixSignature", "TrainingOptions", "Unit", "architecture_from_params",
           "check_space_fits_input", "dataset_signature", "family_for", "input_shape_for"]
