"""One Optuna trial becomes a trained network: find a donor prefix, train the rest, publish, tell."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass

import optuna
import torch

from strata.families import Architecture, architecture_from_params
from strata.objectstore import ObjectNotFound, ObjectStoreError, open_object_store
from strata.registry import CorruptCheckpoint, DonorMeta, LayerRegistry
from strata.spec import StudySpec
from strata.study import (
    iso_now, ATTR_DONOR_STUDY, ATTR_DONOR_TRIAL, ATTR_EPOCHS_RUN, ATTR_FAIL_REASON, ATTR_FEATURE_CACHE,
    ATTR_REGISTRY_LOAD_FAILURES, ATTR_REUSED_LAYERS, ATTR_SECONDS_SAVED, ATTR_SHARED_FEATURES, ATTR_TRAIN_SECONDS,
    ATTR_REGISTRY_PUBLISH_FAILURES, ATTR_TRAINING_STARTED, ATTR_MODEL, ATTR_NUM_CLASSES, ATTR_TEST_ACCURACY, ATTR_TEST_LOSS,
    ATTR_TEST_SECONDS, load_study,
)
from strata.redaction import register_secret
from strata.retrying_storage import open_trial_storage
from strata_trainer.checkpoints import prefix_from_bytes, prefix_to_bytes
from strata_trainer.data import DatasetError, DatasetSplits, load_dataset
from strata_trainer.features import SharedFeatureStore
from strata_trainer.models import StagedModel, build_model, estimate_seconds_saved
from strata_trainer.resources import configure_threads, memory_limit, pick_device
from strata_trainer.training import EpochResult, evaluate_on_test, train

log = logging.getLogger("strata.trainer")

EXIT_COMPLETE, EXIT_FAILED, EXIT_USAGE, EXIT_PRUNED = 0, 1, 2, 3
STATE_EXIT = {
    optuna.trial.TrialState.COMPLETE: EXIT_COMPLETE,
    optuna.trial.TrialState.PRUNED: EXIT_PRUNED,
    optuna.trial.TrialState.FAIL: EXIT_FAILED,
}


class TrialContext:
    """What a trial opens before it trains. A trial process opens everything afresh (this class); a warm
    worker (strata_trainer.worker.WarmContext) keeps the storage and the datasets across its trials."""

    def storage(self, url: str) -> optuna.storages.BaseStorage:
        # A database restart mid-trial is waited out (strata.retrying_storage), not a failed trial.
        return open_trial_storage(url)

    def dataset(self, spec: StudySpec):
        return load_dataset(spec.training, spec.storage.s3_endpoint)


@dataclass
class ReusedPrefix:
    layers: int
    donor: DonorMeta
    state: dict[str, torch.Tensor]


def find_reusable_prefix(registry: LayerRegistry | None, model: StagedModel, min_epochs: int,
                         failures: list[str] | None = None) -> ReusedPrefix | None:
    """The longest prefix of at most depth-1 units with a donor, the donor with the best val loss.

    A corrupt entry is skipped for the next-best donor; an unreachable store means no reuse.
    Each refused or unreadable entry is appended to `failures` (the trial records the count).
    """
    failures = failures if failures is not None else []
    if registry is None:
        return None
    arch = model.arch
    for k in range(arch.depth - 1, 0, -1):
        signature = arch.prefix_signature(k)
        refused: set[str] = set()
        while True:
            try:
                donor = registry.best_donor(signature, min_epochs, exclude=refused)
            except ObjectStoreError as error:
                log.warning("layer registry unreachable (%s): training from scratch", error)
                failures.append(str(error))
                return None
            if donor is None:
                break
            try:
                state = prefix_from_bytes(registry.load_weights(donor))
                model.check_prefix(state, k)
                return ReusedPrefix(k, donor, state)
            except (CorruptCheckpoint, ObjectNotFound, ValueError, RuntimeError) as error:
                # torch refuses anything but tensors (weights_only) and we refuse a wrong sha256
                log.warning("layer registry: refusing %s (%s); trying another donor", donor.entry, error)
                refused.add(donor.entry)
                failures.append(donor.entry)
            except ObjectStoreError as error:
                log.warning("layer registry unreachable (%s): training from scratch", error)
                failures.append(str(error))
                return None
    return None


def open_registry(spec: StudySpec, checkpoints: str | None, failures: list[str] | None = None) -> LayerRegistry | None:
    """The layer registry, or None; an unreachable one is a load failure the trial records."""
    location = checkpoints or spec.storage.checkpoints
    if not location:
        return None
    try:
        return LayerRegistry(open_object_store(location, spec.storage.s3_endpoint))
    except ObjectStoreError as error:
        log.warning("layer registry unreachable (%s): training from scratch, nothing published", error)
        if failures is not None:
            failures.append(str(error))
        return None


def publish_prefixes(registry: LayerRegistry, arch: Architecture, state: dict[str, torch.Tensor],
                     from_layer: int, *, study: str, trial: int, val_loss: float, epochs: int,
                     failures: list[str] | None = None) -> int:
    """Publish prefixes longer than the reused one (shorter ones are the donor's, already there).
    A prefix the store refused is appended to `failures` (the trial records the count)."""
    published = 0
    for k in range(max(from_layer, 0) + 1, arch.depth + 1):
        keys = {name for name in state if int(name.split(".")[0]) < k}
        prefix = {name: state[name] for name in sorted(keys)}
        try:
            registry.publish(arch.prefix_signature(k), prefix_to_bytes(prefix), study=study, trial_number=trial,
                             val_loss=val_loss, epochs=epochs)
            published += 1
        except ObjectStoreError as error:
            log.warning("could not publish %d-unit prefix: %s", k, error)
            if failures is not None:
                failures.append(f"{k}-unit prefix: {error}")
            break
    return published


def run_trial(storage_url: str, study_name: str, trial_number: int, checkpoints: str | None = None,
              context: TrialContext | None = None) -> int:
    register_secret(storage_url)  # its password never reaches this trial's log, even through a driver's error
    context = context or TrialContext()
    study, spec = load_study(study_name, context.storage(storage_url))
    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
    frozen = storage.get_trial(trial_id)
    if frozen.state.is_finished():
        # Idempotent: a re-delivered pod or a resumed run never trains a finished trial twice.
        log.info("trial %d is already %s", trial_number, frozen.state.name)
        return STATE_EXIT[frozen.state]
    if frozen.state != optuna.trial.TrialState.RUNNING:
        log.error("trial %d is %s, not RUNNING: the scheduler must ask it first", trial_number, frozen.state.name)
        return EXIT_USAGE
    trial = optuna.trial.Trial(study, trial_id)
    try:
        return _train_and_tell(study, spec, trial, frozen.params, checkpoints, context)
    except Exception as error:  # a failed trial is recorded, never left RUNNING and never crashes the study
        state = storage.get_trial(trial_id).state
        if state.is_finished():  # a duplicate worker (a re-delivered pod) told it first: its result stands
            log.warning("trial %d was finished (%s) by another worker meanwhile: %s", trial_number, state.name, error)
            return STATE_EXIT[state]
        log.exception("trial %d failed", trial_number)
        reason = f"{type(error).__name__}: {error}"[:500]
        storage.set_trial_user_attr(trial_id, ATTR_FAIL_REASON, reason)
        study.tell(trial_number, state=optuna.trial.TrialState.FAIL)
        return EXIT_FAILED


def _train_and_tell(study: optuna.Study, spec: StudySpec, trial: optuna.trial.Trial, params: dict,
                    checkpoints: str | None, context: TrialContext) -> int:
    threads = configure_threads()
    device = pick_device(spec.training.device)
    arch = architecture_from_params(spec, params)
    data = context.dataset(spec)
    check_class_count(study, spec, data)
    torch.manual_seed(spec.training.seed)
    model = build_model(arch, data.num_classes, spec.model)
    arch = model.arch  # a custom model's units are known once it is built
    load_failures: list[str] = []
    registry = open_registry(spec, checkpoints, load_failures) if spec.reuse.enabled else None
    reused = find_reusable_prefix(registry, model, spec.reuse.min_donor_epochs, load_failures)

    frozen_layers = 0
    if reused is not None:
        model.load_prefix(reused.state, reused.layers)
        frozen_layers = reused.layers if spec.reuse.freeze else 0
    epochs = spec.training.epochs
    if reused is not None and spec.training.epochs_when_reusing:
        epochs = spec.training.epochs_when_reusing
    log.info("trial %d: %s, reusing %d of %d unit(s)%s, %d epochs, %d threads, %s", trial.number, arch.describe(),
             reused.layers if reused else 0, arch.depth,
             f" from {reused.donor.study}#{reused.donor.trial_number}" if reused else "", epochs, threads, device)

    metric_of = (lambda r: r.val_loss) if spec.objective.metric == "val_loss" else (lambda r: r.val_accuracy)

    def report(result: EpochResult) -> None:
        trial.report(metric_of(result), result.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {result.epoch}")

    attrs = {
        ATTR_MODEL: arch.label,
        ATTR_REUSED_LAYERS: reused.layers if reused else 0,
        ATTR_DONOR_TRIAL: reused.donor.trial_number if reused else None,
        ATTR_DONOR_STUDY: reused.donor.study if reused else None,
        ATTR_REGISTRY_LOAD_FAILURES: len(load_failures),
        ATTR_TRAINING_STARTED: iso_now(),
    }
    started = time.perf_counter()
    spill_dir = os.environ.get("STRATA_SPILL_DIR") or tempfile.gettempdir()
    cache_info: dict[str, str] = {}
    try:
        result = train(model, data, frozen_layers=frozen_layers, epochs=epochs,
                       patience=spec.training.early_stop_patience, seed=spec.training.seed, device=device,
                       cache_features=spec.reuse.cache_frozen_features, memory_limit=memory_limit(),
                       spill_dir=spill_dir, report=report, shared_features=SharedFeatureStore.from_env(),
                       cache_info=cache_info, keep_best=spec.training.evaluate_test)
    except optuna.TrialPruned:
        seconds, epochs_run = time.perf_counter() - started, len(study._storage.get_trial(trial._trial_id).intermediate_values)
        attrs.update({ATTR_TRAIN_SECONDS: round(seconds, 3), ATTR_EPOCHS_RUN: epochs_run,
                      ATTR_FEATURE_CACHE: cache_info.get("feature_cache"),
                      ATTR_SHARED_FEATURES: cache_info.get("shared_features") or None})
        if reused is not None:
            # Against a from-scratch trial pruned at the same epoch (not one trained to the end): only
            # what the frozen prefix saved in the epochs this trial ran.
            attrs[ATTR_SECONDS_SAVED] = round(estimate_seconds_saved(
                model.unit_flops(arch.input_shape), frozen_layers, cache_info.get("feature_cache") not in (None, "off"),
                epochs_run, epochs_run, seconds), 3)
        _set_attrs(trial, attrs)
        study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
        log.info("trial %d pruned", trial.number)
        return EXIT_PRUNED

    best = result.best
    if reused is not None:
        attrs[ATTR_SECONDS_SAVED] = round(estimate_seconds_saved(
            model.unit_flops(arch.input_shape), frozen_layers, result.feature_cache != "off", len(result.epochs),
            spec.training.epochs, result.train_seconds), 3)
    attrs.update({
        ATTR_TRAIN_SECONDS: round(result.train_seconds, 3), ATTR_EPOCHS_RUN: len(result.epochs),
        ATTR_FEATURE_CACHE: result.feature_cache, ATTR_SHARED_FEATURES: result.shared_features or None,
        "val_loss": best.val_loss, "val_accuracy": best.val_accuracy,
        "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
        "val_loss_per_epoch": [round(r.val_loss, 5) for r in result.epochs],
    })
    if result.best_model_state and data.test is not None and is_best_so_far(study, spec, metric_of(best)):
        test_started = time.perf_counter()
        test_loss, test_accuracy = evaluate_on_test(model, result, data.test, device)
        attrs.update({ATTR_TEST_ACCURACY: test_accuracy, ATTR_TEST_LOSS: test_loss,
                      ATTR_TEST_SECONDS: round(time.perf_counter() - test_started, 3)})
    if registry is not None:
        # Publish before telling: once the trial is COMPLETE, its layers are already visible.
        publish_failures: list[str] = []
        publish_prefixes(registry, arch, result.best_prefix_state, reused.layers if reused else 0,
                         study=study.study_name, trial=trial.number, val_loss=best.val_loss, epochs=len(result.epochs),
                         failures=publish_failures)
        attrs[ATTR_REGISTRY_PUBLISH_FAILURES] = len(publish_failures)
    elif spec.reuse.enabled and load_failures:
        attrs[ATTR_REGISTRY_PUBLISH_FAILURES] = 1  # the registry was unreachable: nothing could be published
    _set_attrs(trial, attrs)
    study.tell(trial.number, metric_of(best))
    log.info("trial %d complete: val_loss %.4f, accuracy %.4f, %.1f s", trial.number, best.val_loss,
             best.val_accuracy, result.train_seconds)
    return EXIT_COMPLETE


def is_best_so_far(study: optuna.Study, spec: StudySpec, value: float) -> bool:
    """Whether this trial's value beats every complete trial's: only such trials are scored on the test
    split, so the study's best trial always has a test accuracy and most trials cost no test pass."""
    try:
        best = study.best_value
    except ValueError:  # no complete trial yet
        return True
    return value <= best if spec.objective.resolved_direction == "minimize" else value >= best


def check_class_count(study: optuna.Study, spec: StudySpec, data: DatasetSplits) -> None:
    """Every trial of a study must see the same classes: the first records the count, the rest compare."""
    recorded = study.user_attrs.get(ATTR_NUM_CLASSES)
    if recorded is None:
        study.set_user_attr(ATTR_NUM_CLASSES, data.num_classes)
    elif int(recorded) != data.num_classes:
        raise DatasetError(f"{spec.training.dataset.path or spec.training.dataset.name}: {data.num_classes} classes, "
                           f"but this study's earlier trials had {recorded} (the data changed under the study)")


def _set_attrs(trial: optuna.trial.Trial, attrs: dict) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
