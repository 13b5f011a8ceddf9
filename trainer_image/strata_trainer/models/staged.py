"""StagedModel: stem, ordered stages of blocks, head; the unit that reuse, freezing and the feature cache use.

Its `units` are the stem (when there is one) and then each block (reuseUnit blocks) or each whole
stage (reuseUnit stages), in order. A prefix is the first k units: `prefix_state(k)` holds their
tensors keyed `i.<name>` (i the unit's index), `load_prefix` takes a donor's, `freeze_prefix` stops
their gradients and keeps them in eval mode, so batch norm in a frozen prefix uses its running
statistics (and never updates them). `forward(x, start)` takes the output of the first `start` units
(the frozen-feature cache) and runs the rest and the head.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from strata.families.base import Architecture, DescribedUnit


class StagedModel(nn.Module):
    def __init__(self, stem: nn.Module | None, stages: Sequence[Sequence[nn.Module]], head: nn.Module,
                 reuse_unit: str = "blocks"):
        super().__init__()
        units: list[nn.Module] = [stem] if stem is not None else []
        sizes: list[int] = [1] if stem is not None else []
        for blocks in stages:
            if not blocks:
                continue
            if reuse_unit == "stages":
                units.append(blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks))
                sizes.append(1)
            else:
                units.extend(blocks)
                sizes.append(len(blocks))
        if not units:
            raise ValueError("a StagedModel needs at least one block")
        self.units = nn.ModuleList(units)
        self.head = head
        self.stage_sizes = tuple(sizes)
        self.frozen_units = 0
        self.arch: Architecture | None = None  # set by strata_trainer.models.build_model
        self._flops: list[float] | None = None

    @property
    def depth(self) -> int:
        return len(self.units)

    def features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for unit in self.units[start:stop]:
            x = unit(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """start > 0 means x already holds the output of the first `start` units (feature cache)."""
        return self.head(self.features(x, start))

    def prefix_state(self, k: int) -> dict[str, torch.Tensor]:
        """Tensors (weights and batch-norm statistics) of the first k units, keyed `i.<name>`."""
        return {name: tensor.detach().clone().cpu() for name, tensor in self.units[:k].state_dict().items()}

    def check_prefix(self, state: dict[str, torch.Tensor], k: int) -> None:
        """A donor must fit exactly: the same tensor names and shapes as this model's first k units."""
        expected = {name: tuple(t.shape) for name, t in self.units[:k].state_dict().items()}
        actual = {name: tuple(t.shape) for name, t in state.items()}
        if set(actual) != set(expected):
            raise ValueError(f"prefix keys {sorted(actual)[:6]} do not match {sorted(expected)[:6]} "
                             f"(the first {k} units do not fit)")
        for name in sorted(expected):
            if actual[name] != expected[name]:
                raise ValueError(f"prefix tensor {name}: shape {actual[name]} != {expected[name]} "
                                 f"(the first {k} units do not fit)")

    def load_prefix(self, state: dict[str, torch.Tensor], k: int) -> None:
        self.check_prefix(state, k)
        self.units[:k].load_state_dict(state)

    def freeze_prefix(self, k: int) -> None:
        """No gradients for the first k units (so no optimizer state either); they stay in eval mode."""
        for unit in self.units[:k]:
            unit.requires_grad_(False)
            unit.eval()
        self.frozen_units = k

    def train(self, mode: bool = True) -> "StagedModel":
        super().train(mode)
        for unit in self.units[: self.frozen_units]:
            unit.eval()  # batch norm keeps its running statistics
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def unit_flops(self, input_shape: tuple[int, int, int]) -> list[float]:
        """Forward FLOPs per image of each unit, then of the head (last entry), counted by torch."""
        if self._flops is None:
            flops, x = [], torch.zeros(1, *input_shape, device=next(self.parameters()).device)
            with self._probing():
                for module in (*self.units, self.head):
                    counter = FlopCounterMode(display=False)
                    with counter:
                        x = module(x)
                    flops.append(float(counter.get_total_flops()))
            self._flops = flops
        return self._flops

    def describe_units(self, input_shape: tuple[int, int, int]) -> list[DescribedUnit]:
        """Units as the signature sees them when no torch-free description exists (family custom)."""
        described, x = [], torch.zeros(1, *input_shape)
        with self._probing():
            for unit in self.units:
                x = unit(x)
                tensors = tuple((name, tuple(t.shape)) for name, t in unit.state_dict().items())
                described.append(DescribedUnit(text=repr(unit), tensors=tensors, shape=tuple(x.shape[1:])))
        return described

    @contextmanager
    def _probing(self) -> Iterator[None]:
        """One image through the network without changing it: eval mode (batch norm statistics stay),
        no gradients, and every module's train/eval flag restored after."""
        was_training = [m.training for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, training in zip(self.modules(), was_training):
                module.training = training


def estimate_seconds_saved(flops: list[float], frozen: int, cached: bool, epochs_run: int, scratch_epochs: int,
                           train_seconds: float) -> float:
    """Seconds a from-scratch training of the same network would have taken, minus what this took.

    A cost model, not a measurement: a trainable unit costs ~3 forward passes per epoch (forward,
    input and weight gradients), a frozen one 1 per epoch, or 1 in total when its output is cached.
    Scaled by the measured time of this training. `flops`: per unit, then the head.
    """
    units, head = flops[:-1], flops[-1]
    scratch = scratch_epochs * 3 * (sum(units) + head)
    frozen_cost = sum(units[:frozen]) * (1 if cached else epochs_run)
    actual = frozen_cost + epochs_run * 3 * (sum(units[frozen:]) + head)
    if actual <= 0 or train_seconds <= 0:
        return 0.0
    return max(0.0, train_seconds * scratch / actual - train_seconds)
