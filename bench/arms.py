"""The three ways the benchmark trains one configuration, all through the product's training code.

- baseline: from scratch, every epoch, no early stop (the paper's baseline);
- paper: the first n-1 conv layers of the baseline run of the same configuration with n-1 layers,
  frozen, every epoch, no feature cache, no early stop (the paper's method);
- strata: what a Strata trial does (strata_trainer.trial._train_and_tell without the Optuna and
  process plumbing): best registry donor, frozen prefix, feature cache, fewer epochs when reusing,
  early stop, publish the new prefixes.

Each arm's time is the wall time from building the model to the end of training (for strata: from
the registry lookup to the end of publishing), so donor loading and the feature cache are included
and dataset loading is not.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from strata.families import Architecture
from strata.registry import LayerRegistry
from strata.spec import StudySpec
from strata_trainer.checkpoints import prefix_from_bytes, prefix_to_bytes
from strata_trainer.data import DatasetSplits
from strata_trainer.features import SharedFeatureStore
from strata_trainer.models import StagedModel, build_model
from strata_trainer.training import TrainResult, train
from strata_trainer.trial import find_reusable_prefix, publish_prefixes

BASELINE, PAPER, STRATA = "baseline", "paper", "strata"
ARMS = (BASELINE, PAPER, STRATA)


@dataclass(frozen=True)
class TrainingSetup:
    """What every training of one benchmark run shares."""

    data: DatasetSplits
    device: torch.device
    seed: int  # model init (torch.manual_seed) and minibatch order, identical for every arm
    memory_limit: int | None
    spill_dir: str
    shared_features: SharedFeatureStore | None = None  # the strata arm's machine-wide frozen outputs


@dataclass
class ArmRun:
    arm: str
    config: dict[str, Any]
    label: str
    depth: int
    seconds: float
    val_loss: float | None  # best epoch's, as a trial reports it; None when training failed
    val_accuracy: float | None
    best_epoch: int
    epochs_run: int
    val_loss_per_epoch: list[float]
    reused_layers: int = 0
    donor: str | None = None
    feature_cache: str = "off"
    shared_features: str = ""  # strata: hit when another configuration's run computed the same frozen outputs
    donor_seconds: float = 0.0  # registry lookup + weights load (strata); checkpoint load (paper)
    cache_seconds: float = 0.0  # computing the frozen prefix's outputs once
    epoch_seconds: float = 0.0  # the epochs: training steps and validation
    publish_seconds: float = 0.0
    stopped_early: bool = False
    failed: str | None = None
    trial_number: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fill(run: ArmRun, result: TrainResult) -> None:
    best = result.best
    run.val_loss, run.val_accuracy, run.best_epoch = best.val_loss, best.val_accuracy, result.best_epoch
    run.epochs_run = len(result.epochs)
    run.val_loss_per_epoch = [round(r.val_loss, 5) for r in result.epochs]
    run.feature_cache, run.stopped_early = result.feature_cache, result.stopped_early
    run.shared_features = result.shared_features
    run.epoch_seconds = sum(r.seconds for r in result.epochs)
    # train_seconds runs from before the cache to the last epoch: what is not epochs is the cache.
    run.cache_seconds = max(0.0, result.train_seconds - run.epoch_seconds)


def _new_run(arm: str, arch: Architecture, config: dict[str, Any]) -> ArmRun:
    return ArmRun(arm=arm, config=dict(config), label=arch.describe(), depth=arch.depth, seconds=0.0,
                  val_loss=None, val_accuracy=None, best_epoch=0, epochs_run=0, val_loss_per_epoch=[])


def _train(run: ArmRun, model: StagedModel, setup: TrainingSetup, *, frozen: int, epochs: int, patience: int,
           cache: bool) -> TrainResult | None:
    try:
        result = train(model, setup.data, frozen_layers=frozen, epochs=epochs, patience=patience, seed=setup.seed,
                       device=setup.device, cache_features=cache, memory_limit=setup.memory_limit,
                       spill_dir=setup.spill_dir, shared_features=setup.shared_features if cache else None)
    except FloatingPointError as error:  # a diverging configuration fails, as its trial would
        run.failed = str(error)
        return None
    _fill(run, result)
    return result


def train_baseline(arch: Architecture, config: dict[str, Any], setup: TrainingSetup,
                   epochs: int) -> tuple[ArmRun, bytes]:
    """From scratch; also returns the trained conv layers, the paper arm's donor for depth n+1."""
    run = _new_run(BASELINE, arch, config)
    started = time.perf_counter()
    torch.manual_seed(setup.seed)
    model = build_model(arch, setup.data.num_classes)
    _train(run, model, setup, frozen=0, epochs=epochs, patience=0, cache=False)
    run.seconds = time.perf_counter() - started
    # The trained network as it ends (the paper takes the weights of the finished baseline training).
    return run, prefix_to_bytes(model.prefix_state(arch.depth))


def train_paper(arch: Architecture, config: dict[str, Any], setup: TrainingSetup, epochs: int,
                donor_weights: bytes, donor_label: str) -> ArmRun:
    """The first n-1 layers of the baseline run with n-1 layers, frozen; the rest trained every epoch."""
    run = _new_run(PAPER, arch, config)
    k = arch.depth - 1
    started = time.perf_counter()
    state = prefix_from_bytes(donor_weights)
    prefix = {name: tensor for name, tensor in state.items() if int(name.split(".")[0]) < k}
    torch.manual_seed(setup.seed)
    model = build_model(arch, setup.data.num_classes)
    model.load_prefix(prefix, k)
    run.donor_seconds = time.perf_counter() - started
    run.reused_layers, run.donor = k, f"baseline {donor_label}"
    _train(run, model, setup, frozen=k, epochs=epochs, patience=0, cache=False)
    run.seconds = time.perf_counter() - started
    return run


def train_strata(arch: Architecture, config: dict[str, Any], setup: TrainingSetup, spec: StudySpec,
                 registry: LayerRegistry | None, *, study: str, trial_number: int) -> ArmRun:
    """One Strata trial in this process: the steps of strata_trainer.trial._train_and_tell.

    With registry None (reuse disabled) it is the product's from-scratch trial: full epochs, early stop.
    """
    run = _new_run(STRATA, arch, config)
    run.trial_number = trial_number
    started = time.perf_counter()
    torch.manual_seed(setup.seed)
    model = build_model(arch, setup.data.num_classes)
    reused = find_reusable_prefix(registry, model, spec.reuse.min_donor_epochs) if registry is not None else None
    frozen = 0
    if reused is not None:
        model.load_prefix(reused.state, reused.layers)
        frozen = reused.layers if spec.reuse.freeze else 0
        run.reused_layers = reused.layers
        run.donor = f"{reused.donor.study}#{reused.donor.trial_number} (val {reused.donor.val_loss:.4f})"
    run.donor_seconds = time.perf_counter() - started
    epochs = spec.training.epochs
    if reused is not None and spec.training.epochs_when_reusing:
        epochs = spec.training.epochs_when_reusing
    result = _train(run, model, setup, frozen=frozen, epochs=epochs, patience=spec.training.early_stop_patience,
                    cache=spec.reuse.cache_frozen_features)
    if registry is not None and result is not None:
        # As the product does: the best epoch's layers, published before the trial is told.
        publish_started = time.perf_counter()
        publish_prefixes(registry, arch, result.best_prefix_state, reused.layers if reused else 0, study=study,
                         trial=trial_number, val_loss=result.best.val_loss, epochs=len(result.epochs))
        run.publish_seconds = time.perf_counter() - publish_started
    run.seconds = time.perf_counter() - started
    return run
