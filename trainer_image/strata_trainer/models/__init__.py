"""The trainer side of the model families: one module per family builds a StagedModel from the
torch-free Architecture (strata.families); `build_model` picks it, applies the initialisation and,
for a custom model, describes its units from the module."""

from __future__ import annotations

from typing import Callable

from torch import nn

from strata.families.base import Architecture, ConfigurationError
from strata.spec import Model
from strata_trainer.models import custom, mobilenetv2, paper_cnn, resnet, vgg
from strata_trainer.models.staged import StagedModel, estimate_seconds_saved

BUILDERS: dict[str, Callable[[Architecture, int], StagedModel]] = {
    "paper-cnn": paper_cnn.build,
    "vgg": vgg.build,
    "resnet": resnet.build,
    "mobilenetv2": mobilenetv2.build,
}


def build_model(arch: Architecture, num_classes: int, model: Model | None = None) -> StagedModel:
    """The trial's network (random weights from torch's current seed); ConfigurationError if it cannot be built."""
    model = model or Model()
    if model.family == "custom":
        network = custom.build(arch, num_classes, model.entry_point or "", model.reuse_unit)
        try:
            units = network.describe_units(arch.input_shape)
        except RuntimeError as error:  # the user's blocks do not chain on this input
            raise ConfigurationError("entryPoint", f"{model.entry_point}: the model does not run on a "
                                                   f"{'x'.join(map(str, arch.input_shape))} input ({error})") from None
        arch = arch.with_units(units, network.stage_sizes)
    else:
        network = BUILDERS[model.family](arch, num_classes)
    network.arch = arch
    initialize(network, arch.training.initialization)
    return network


def initialize(network: nn.Module, scheme: str) -> None:
    """he: Kaiming normal (fan-out, ReLU) conv weights, batch norm 1 and 0, linear N(0, 0.01), as torchvision's
    ResNet and MobileNetV2 do; default keeps PyTorch's initialisation."""
    if scheme != "he":
        return
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


__all__ = ["BUILDERS", "StagedModel", "build_model", "estimate_seconds_saved", "initialize"]
