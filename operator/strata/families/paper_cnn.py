"""The paper's CNN (Castro et al.): per conv layer a same-padded conv, ReLU and 2x2 max-pool; FC layers; classifier.

Units: one per conv layer (no stem), so a deeper network takes a shallower one's layers as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from strata.families.base import (Architecture, ConfigurationError, Family, Unit, dataset_signature, input_shape_for,
                                  num_classes_for, training_options)
from strata.spec import SpecError, StudySpec, parse_fc_layout


@dataclass(frozen=True)
class ConvLayerSpec(Unit):
    kind: ClassVar[str] = "paper-conv"
    in_channels: int
    out_channels: int
    kernel: int
    padding: int
    pool: int = 2
    activation: str = "relu"

    def out_shape(self, shape):
        _, h, w = shape
        return self.out_channels, h // self.pool, w // self.pool


class PaperCNN(Family):
    name = "paper-cnn"
    depth_parameter = "convLayers"
    defaults: ClassVar[dict[str, Any]] = {"convLayers": 1, "filters": 18, "kernelSize": 3, "fcLayout": "250"}

    def architecture(self, spec: StudySpec, params: Mapping[str, Any]) -> Architecture:
        values = {**self.defaults, **params}
        if "fcLayers" in params or "fcUnits" in params:
            fc_units = tuple([int(params.get("fcUnits", 250))] * int(params.get("fcLayers", 1)))
        else:
            fc_units = parse_fc_layout(values["fcLayout"])
        layers, filters, kernel = int(values["convLayers"]), int(values["filters"]), int(values["kernelSize"])
        shape = input_shape_for(spec)
        units, channels = [], shape[0]
        for _ in range(layers):
            units.append(ConvLayerSpec(channels, filters, kernel, kernel // 2))
            channels = filters
        fc = "-".join(map(str, fc_units)) or "none"
        arch = Architecture(
            family=self.name, dataset=dataset_signature(spec), input_shape=shape, num_classes=num_classes_for(spec),
            units=tuple(units), stage_sizes=tuple(1 for _ in units), head={"fc_units": fc_units},
            training=training_options(spec, params),
            config={"convLayers": layers, "filters": filters, "kernelSize": kernel, "fcUnits": list(fc_units)},
            label=f"{layers}x{filters}f k{kernel} fc[{fc}]")
        _, h, w = arch.feature_shape(layers)
        if min(h, w) < 1:
            raise ConfigurationError("convLayers", f"{layers} conv layers pool a {shape[1]}x{shape[2]} input to "
                                                   "nothing; lower the maximum or raise spec.training.inputSize")
        return arch

    def check_space(self, spec: StudySpec) -> None:
        param = spec.search_space.get("convLayers")
        if param is not None and hasattr(param, "largest"):
            deepest = param.largest  # not max(values()): a range may be huge
        else:
            deepest = max(param.values()) if param is not None else self.defaults["convLayers"]
        _, height, width = input_shape_for(spec)
        if deepest > min(height, width).bit_length() - 1:  # each conv block halves the image
            raise SpecError(
                f"spec.searchSpace.convLayers: {deepest} conv layers pool a {height}x{width} input to nothing; "
                "lower the maximum or raise spec.training.inputSize"
            )

    def smaller(self, spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any] | None:
        # One layer less, in the space or not: its prefix may come from any deeper trial.
        n = int(params.get("convLayers", self.defaults["convLayers"]))
        return {**params, "convLayers": n - 1} if n > 1 else None
