"""The paper's CNN family as a torch module, with a conv prefix that can be loaded and frozen."""

from __future__ import annotations

import math

import torch
from torch import nn

from strata.architecture import CNNArchitecture


class CNN(nn.Module):
    """conv blocks (conv, ReLU, 2x2 max-pool) -> FC hidden layers (ReLU) -> classifier."""

    def __init__(self, arch: CNNArchitecture):
        super().__init__()
        self.arch = arch
        self.conv = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, padding=layer.padding),
                nn.ReLU(),
                nn.MaxPool2d(layer.pool),
            )
            for layer in arch.conv
        )
        width = math.prod(arch.feature_shape(arch.conv_layers))
        if width < 1:
            raise ValueError(f"{arch.describe()}: input {arch.input_shape} pools to nothing")
        head: list[nn.Module] = [nn.Flatten()]
        for units in arch.fc_units:
            head += [nn.Linear(width, units), nn.ReLU()]
            width = units
        head.append(nn.Linear(width, arch.num_classes))
        self.head = nn.Sequential(*head)
        self.frozen_layers = 0

    def features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for block in self.conv[start:stop]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """start > 0 means x already holds the output of the first `start` conv blocks (feature cache)."""
        return self.head(self.features(x, start))

    def prefix_state(self, k: int) -> dict[str, torch.Tensor]:
        """Weights of the first k conv blocks, keyed like `0.0.weight` (block.conv.param)."""
        return {name: tensor.detach().clone().cpu() for name, tensor in self.conv[:k].state_dict().items()}

    def load_prefix(self, state: dict[str, torch.Tensor], k: int) -> None:
        """Load donor weights into the first k blocks; shapes must match exactly."""
        target = self.conv[:k]
        expected = target.state_dict()
        if set(state) != set(expected):
            raise ValueError(f"prefix keys {sorted(state)} do not match {sorted(expected)}")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"prefix tensor {name}: shape {tuple(tensor.shape)} != {tuple(expected[name].shape)}")
        target.load_state_dict(state)

    def freeze_prefix(self, k: int) -> None:
        """No gradients for the first k blocks (so no optimizer state either); they stay in eval mode."""
        for block in self.conv[:k]:
            block.requires_grad_(False)
            block.eval()
        self.frozen_layers = k

    def train(self, mode: bool = True) -> "CNN":
        super().train(mode)
        for block in self.conv[: self.frozen_layers]:
            block.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
