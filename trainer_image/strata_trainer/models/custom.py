"""The user's own model: `spec.model.entryPoint` = package.module:function.

The function is called as function(params, input_shape, num_classes) with the trial's model
parameters (its search-space values less the training ones such as learningRate), (channels,
height, width) and the class count, and returns a
StagedModel (stem, stages of blocks, head). Its units are described from the module itself (repr
and tensor shapes, strata_trainer.models.staged.describe_units), so two trials share a prefix only
when their first units are built exactly alike.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from strata.families.base import Architecture, ConfigurationError
from strata_trainer.models.staged import StagedModel


def load_entry_point(entry_point: str) -> Callable[..., Any]:
    module_name, _, function_name = entry_point.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError("entryPoint", f"cannot import {module_name} for spec.model.entryPoint "
                                               f"{entry_point!r} ({error}); is the package installed in the "
                                               "trainer image?") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigurationError("entryPoint", f"{module_name} has no function {function_name!r} "
                                               f"(spec.model.entryPoint {entry_point!r})")
    return function


def build(arch: Architecture, num_classes: int, entry_point: str, reuse_unit: str) -> StagedModel:
    function = load_entry_point(entry_point)
    try:
        model = function(dict(arch.config), tuple(arch.input_shape), num_classes)
    except (ValueError, TypeError, ArithmeticError, RuntimeError) as error:
        raise ConfigurationError("entryPoint", f"{entry_point} cannot build {dict(arch.config)}: "
                                               f"{type(error).__name__}: {error}") from None
    if not isinstance(model, StagedModel):
        raise ConfigurationError("entryPoint", f"{entry_point} returned a {type(model).__name__}, not a "
                                               "strata_trainer.models.StagedModel (stem, stages, head)")
    if reuse_unit == "stages" and any(size > 1 for size in model.stage_sizes):
        model = StagedModel(*_regroup(model), reuse_unit="stages")
    return model


def _regroup(model: StagedModel):
    """A blocks-granular model the user built, regrouped into one unit per stage."""
    units, stages, start = list(model.units), [], 0
    for size in model.stage_sizes:
        stages.append(units[start:start + size])
        start += size
    return None, stages, model.head
