"""The stand-in trainer: `python -m strata_trainer.standin`, the trainer's command line without torch.

Load tests of the scheduler and the operator need hundreds of trials at once; real trainers spend
seconds importing torch and minutes training, which measures the trainer, not the hand-off. The
stand-in takes the same arguments as `python -m strata_trainer` (--storage or $STRATA_STORAGE_URL,
--study, then --trial N | --worker | --serve POD --slots K | --check-data; --checkpoints is accepted
and ignored) and treats Optuna as a trial does (strata_trainer.trial.run_trial): a finished trial is
not run again (its state's exit code), a trial not RUNNING is refused (2); otherwise each epoch
reports an intermediate value and honours the pruner (told PRUNED, 3), then the trainer's user attrs
are set (0 reused layers, no registry) and a value is told (0). The value depends on the params
alone, a smooth bowl over the search space (objective_loss), so a sampler has an optimum to find
and two runs of a configuration agree. `--worker` answers strata_trainer.worker's protocol, and
`--serve` is strata_trainer.podworker's worker pod with stand-in workers. `--check-data` records
an ok verdict for the study's data settings without reading any data.

Set in the environment (StandinConfig.from_env):
  STRATA_STANDIN_EPOCH_SECONDS  seconds slept per epoch, default 0.1
  STRATA_STANDIN_FAIL_RATE      0..1, default 0: share of trials that fail at a drawn epoch
                                (fail_reason set, told FAIL, exit 1)
  STRATA_STANDIN_CRASH_RATE     0..1, default 0: share that exit 137 at a drawn epoch without telling,
                                as an OOM kill does (a worker process dies with its trial)
  STRATA_STANDIN_SEED           default 0: a trial's fate is drawn from (seed, trial number), so a
                                run is reproducible and a retry (a new number) draws again

run_standin_trial runs one trial in this process on an opened storage (run_loaded_trial on a study
already loaded): a benchmark runs many in threads of one process instead of as processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Mapping

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from strata.families import DATASET_CLASSES, architecture_from_params
from strata.spec import SpecError, StudySpec
from strata.study import (
    iso_now, ATTR_DATA_CHECK, ATTR_DONOR_STUDY, ATTR_DONOR_TRIAL, ATTR_EPOCHS_RUN, ATTR_FAIL_REASON, ATTR_FEATURE_CACHE,
    ATTR_MODEL, ATTR_NUM_CLASSES, ATTR_REGISTRY_LOAD_FAILURES, ATTR_REUSED_LAYERS, ATTR_SHARED_FEATURES,
    ATTR_TEST_ACCURACY, ATTR_TEST_LOSS, ATTR_TEST_SECONDS, ATTR_TRAIN_SECONDS, ATTR_TRAINING_STARTED, StorageError,
    data_check_key, distributions, load_study, read_trial,
)
from strata_trainer.worker_io import LOG_FORMAT, TrialLog, send

log = logging.getLogger("strata.standin")
MODULE = "strata_trainer.standin"
# strata_trainer.trial's exit codes (that module imports torch); EXIT_CRASHED is what a pod shows for an OOM kill.
EXIT_COMPLETE, EXIT_FAILED, EXIT_USAGE, EXIT_PRUNED, EXIT_CRASHED = 0, 1, 2, 3, 137
STATE_EXIT = {TrialState.COMPLETE: EXIT_COMPLETE, TrialState.PRUNED: EXIT_PRUNED, TrialState.FAIL: EXIT_FAILED}
CHANCE_LOSS = math.log(10)  # a first epoch's loss: guessing among 10 classes


@dataclass(frozen=True)
class StandinConfig:
    epoch_seconds: float = 0.1
    fail_rate: float = 0.0
    crash_rate: float = 0.0
    seed: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "StandinConfig":
        """The STRATA_STANDIN_* variables; a bad one is a ValueError naming it (the process exits 2)."""
        env = os.environ if env is None else env

        def number(name: str, default: float, kind: type = float, low: float = 0.0, high: float | None = None):
            raw = env.get(name, "").strip()
            try:
                value = kind(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}: not a number: {raw!r}") from None
            if value < low or (high is not None and value > high) or (kind is float and not math.isfinite(value)):
                raise ValueError(f"{name}: {value} is outside {low}..{high if high is not None else ''}")
            return value

        return cls(epoch_seconds=number("STRATA_STANDIN_EPOCH_SECONDS", cls.epoch_seconds),
                   fail_rate=number("STRATA_STANDIN_FAIL_RATE", cls.fail_rate, high=1.0),
                   crash_rate=number("STRATA_STANDIN_CRASH_RATE", cls.crash_rate, high=1.0),
                   seed=number("STRATA_STANDIN_SEED", cls.seed, int, low=-math.inf))

    def fate(self, number: int, epochs: int) -> tuple[str | None, int]:
        """("crash" | "fail" | None, the epoch it happens): one draw per trial, crashes first."""
        rng = random.Random(f"strata-standin:{self.seed}:{number}")  # a str seed: the same in every process
        draw, epoch = rng.random(), rng.randint(1, max(1, epochs))
        if draw < self.crash_rate:
            return "crash", epoch
        if draw < self.crash_rate + self.fail_rate:
            return "fail", epoch
        return None, epoch


class StandinFailure(RuntimeError):
    """The failure STRATA_STANDIN_FAIL_RATE asked for."""


# --- the objective ---------------------------------------------------------------------------


def _position(distribution: BaseDistribution, value: Any) -> float:
    """Where a value lies in its range, 0..1 (log ranges on the log scale, choices by their index)."""
    if isinstance(distribution, CategoricalDistribution):
        count = len(distribution.choices)
        return distribution.to_internal_repr(value) / (count - 1) if count > 1 else 0.5
    low, high, value = distribution.low, distribution.high, float(value)
    if distribution.log:
        low, high, value = math.log(low), math.log(high), math.log(value)
    return (value - low) / (high - low) if high > low else 0.5


def objective_loss(spec: StudySpec, params: Mapping[str, Any]) -> float:
    """The final val loss: 0.2 at the optimum, growing quadratically away from it.

    Each parameter's best position is spread over 0.2..0.8 of its range by its rank among the names
    (golden-ratio steps, no hash: the same in every process), so no optimum sits on a bound."""
    space = distributions(spec)
    terms = []
    for rank, name in enumerate(sorted(space)):
        if name in params:
            target = 0.2 + 0.6 * ((rank * 0.6180339887) % 1.0)
            terms.append((_position(space[name], params[name]) - target) ** 2)
    return 0.2 + 2.0 * (sum(terms) / len(terms) if terms else 0.0)


def epoch_loss(final: float, epoch: int, epochs: int) -> float:
    """From chance towards the final loss, reached at the last epoch: worse trials stay worse at every
    epoch, so a median pruner prunes them."""
    return final + (max(CHANCE_LOSS, final) - final) * (1.0 - epoch / epochs) ** 2


def accuracy_of(loss: float) -> float:
    return math.exp(-loss)


# --- one trial -------------------------------------------------------------------------------


def run_standin_trial(storage: optuna.storages.BaseStorage, study_name: str, number: int,
                      config: StandinConfig | None = None) -> int:
    """One asked trial, told as the trainer would; the exit code a trainer process would have.

    Never raises for the trial: a missing study or trial is EXIT_USAGE, a crash is EXIT_CRASHED with
    the trial left RUNNING (the caller's process exits with it)."""
    try:
        study, spec = load_study(study_name, storage)
    except (StorageError, SpecError) as error:
        log.error("trial %d: %s", number, error)
        return EXIT_USAGE
    return run_loaded_trial(study, spec, number, config)


def run_loaded_trial(study: optuna.Study, spec: StudySpec, number: int, config: StandinConfig | None = None) -> int:
    """run_standin_trial on a study already loaded (a benchmark's threads load each study once)."""
    config = config or StandinConfig.from_env()
    storage = study._storage
    try:
        frozen = read_trial(study, number)
    except KeyError:
        log.error("study %s has no trial %d", study.study_name, number)
        return EXIT_USAGE
    trial_id = frozen._trial_id
    if frozen.state.is_finished():  # a re-delivered pod or a resumed run never runs a finished trial twice
        log.info("trial %d is already %s", number, frozen.state.name)
        return STATE_EXIT[frozen.state]
    if frozen.state != TrialState.RUNNING:
        log.error("trial %d is %s, not RUNNING: the scheduler must ask it first", number, frozen.state.name)
        return EXIT_USAGE
    trial = optuna.trial.Trial(study, trial_id)
    try:
        return _train_and_tell(study, spec, trial, frozen.params, config)
    except Exception as error:  # recorded as run_trial records it: never left RUNNING
        state = storage.get_trial(trial_id).state
        if state.is_finished():
            log.warning("trial %d was finished (%s) by another worker meanwhile: %s", number, state.name, error)
            return STATE_EXIT[state]
        log.error("trial %d failed: %s: %s", number, type(error).__name__, error)
        storage.set_trial_user_attr(trial_id, ATTR_FAIL_REASON, f"{type(error).__name__}: {error}"[:500])
        study.tell(number, state=TrialState.FAIL)
        return EXIT_FAILED


def _train_and_tell(study: optuna.Study, spec: StudySpec, trial: optuna.trial.Trial, params: dict,
                    config: StandinConfig) -> int:
    arch = architecture_from_params(spec, params)  # a configuration the family refuses fails, as in training
    _record_class_count(study, spec)
    epochs = spec.training.epochs
    fate, fate_epoch = config.fate(trial.number, epochs)
    final = objective_loss(spec, params)
    by_loss = spec.objective.metric == "val_loss"
    attrs: dict[str, Any] = {
        ATTR_MODEL: arch.label, ATTR_REUSED_LAYERS: 0, ATTR_DONOR_TRIAL: None, ATTR_DONOR_STUDY: None,
        ATTR_REGISTRY_LOAD_FAILURES: 0, ATTR_TRAINING_STARTED: iso_now(),
    }
    log.info("trial %d: %s, stand-in, %d epochs of %.3f s", trial.number, arch.label, epochs, config.epoch_seconds)
    started = time.perf_counter()
    losses: list[float] = []
    for epoch in range(1, epochs + 1):
        if config.epoch_seconds:
            time.sleep(config.epoch_seconds)
        losses.append(epoch_loss(final, epoch, epochs))
        trial.report(losses[-1] if by_loss else accuracy_of(losses[-1]), epoch)
        if fate == "crash" and epoch == fate_epoch:
            log.error("trial %d: stand-in crash at epoch %d (STRATA_STANDIN_CRASH_RATE)", trial.number, epoch)
            return EXIT_CRASHED
        if fate == "fail" and epoch == fate_epoch:
            raise StandinFailure(f"stand-in failure at epoch {epoch} (STRATA_STANDIN_FAIL_RATE={config.fail_rate})")
        if trial.should_prune():
            attrs.update({ATTR_TRAIN_SECONDS: round(time.perf_counter() - started, 3), ATTR_EPOCHS_RUN: epoch,
                          ATTR_FEATURE_CACHE: "off", ATTR_SHARED_FEATURES: None})
            _set_attrs(trial, attrs)
            study.tell(trial.number, state=TrialState.PRUNED)
            log.info("trial %d pruned at epoch %d", trial.number, epoch)
            return EXIT_PRUNED
    loss, accuracy = losses[-1], accuracy_of(losses[-1])
    value = loss if by_loss else accuracy
    attrs.update({
        ATTR_TRAIN_SECONDS: round(time.perf_counter() - started, 3), ATTR_EPOCHS_RUN: epochs,
        ATTR_FEATURE_CACHE: "off", ATTR_SHARED_FEATURES: None, "val_loss": loss, "val_accuracy": accuracy,
        "best_epoch": epochs, "stopped_early": False, "val_loss_per_epoch": [round(x, 5) for x in losses],
    })
    if spec.training.evaluate_test and _best_so_far(study, spec, value):  # as the trainer scores the best
        attrs.update({ATTR_TEST_ACCURACY: accuracy_of(loss * 1.05), ATTR_TEST_LOSS: loss * 1.05,
                      ATTR_TEST_SECONDS: 0.0})
    _set_attrs(trial, attrs)
    study.tell(trial.number, value)
    log.info("trial %d complete: val_loss %.4f, accuracy %.4f", trial.number, loss, accuracy)
    return EXIT_COMPLETE


def _best_so_far(study: optuna.Study, spec: StudySpec, value: float) -> bool:
    try:
        best = study.best_value
    except ValueError:
        return True
    return value <= best if spec.objective.resolved_direction == "minimize" else value >= best


def _record_class_count(study: optuna.Study, spec: StudySpec) -> None:
    """The trainer's study read (and first trial's write) of the class count, for the same storage traffic."""
    if ATTR_NUM_CLASSES not in study.user_attrs:
        study.set_user_attr(ATTR_NUM_CLASSES, DATASET_CLASSES.get(spec.training.dataset.name, 10))


def _set_attrs(trial: optuna.trial.Trial, attrs: dict) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def verdict(spec: StudySpec) -> dict[str, Any]:
    """strata_trainer.datacheck's ok verdict for these data settings, nothing loaded."""
    total = spec.training.subset_size or 1000
    validation = max(1, round(total * spec.training.validation_split))
    test = round(total * spec.training.test_split) if spec.training.test_split else 0
    classes = DATASET_CLASSES.get(spec.training.dataset.name, 10)
    return {"key": data_check_key(spec), "ok": True, "train": total - validation, "validation": validation,
            "test": test, "classes": classes,
            "message": f"stand-in trainer: no data read ({total - validation} training and {validation} validation "
                       f"images assumed, {classes} classes)"}


# --- the worker protocol ---------------------------------------------------------------------


def serve_worker(storage_url: str, requests: IO[str], answers: IO[str], config: StandinConfig) -> int:
    """strata_trainer.worker's protocol: {"ready": pid}, then one answer per request; one storage kept."""
    from strata.retrying_storage import open_trial_storage
    from strata.spec import parse_spec

    storage = None
    send(answers, {"ready": os.getpid()})
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        if "check" in request:
            try:
                answer = verdict(parse_spec(request["check"]))
            except Exception as error:  # the check must answer, whatever the spec holds
                answer = {"ok": False, "message": f"{type(error).__name__}: {error}"}
            send(answers, {"check": answer})
            continue
        number = int(request["trial"])
        started = time.perf_counter()
        with TrialLog(request.get("log")):
            try:
                storage = storage or open_trial_storage(storage_url)
                code = run_standin_trial(storage, request["study"], number, config)
            except StorageError as error:
                log.error("trial %d: %s", number, error)
                code = EXIT_USAGE
            except Exception:
                log.exception("trial %d: unexpected error in the stand-in worker", number)
                code = EXIT_FAILED
        if code == EXIT_CRASHED:  # the worker dies with its trial, as an OOM-killed one does
            os._exit(EXIT_CRASHED)
        send(answers, {"trial": number, "exit": code, "seconds": round(time.perf_counter() - started, 4)})
    return 0


# --- the command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("STRATA_STORAGE_URL"),
                        help="Optuna storage URL (default: $STRATA_STORAGE_URL)")
    parser.add_argument("--study", help="Optuna study name")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--trial", type=int, help="trial number, already asked by the scheduler")
    what.add_argument("--worker", action="store_true", help="a warm worker: trials assigned on stdin")
    what.add_argument("--serve", metavar="POD", help="a worker pod: the study's trials assigned to POD")
    what.add_argument("--check-data", action="store_true", help="record an ok data verdict, reading no data")
    parser.add_argument("--slots", type=int, default=1, help="with --serve: trials at once")
    parser.add_argument("--checkpoints", default=None, help="accepted and ignored (no layer registry)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    if not args.storage:
        print(f"{MODULE}: --storage or STRATA_STORAGE_URL is required", file=sys.stderr)
        return EXIT_USAGE
    if not args.worker and not args.study:
        print(f"{MODULE}: --study is required with --trial, --check-data and --serve", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = StandinConfig.from_env()
    except ValueError as error:
        print(f"{MODULE}: {error}", file=sys.stderr)
        return EXIT_USAGE
    from strata.redaction import register_secret
    from strata.retrying_storage import open_trial_storage

    register_secret(args.storage)
    if args.worker:
        answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print() must not corrupt the answers
        return serve_worker(args.storage, sys.stdin, answers, config)
    if args.serve:
        from strata.executors import TRAINER_MODULE_ENV
        from strata_trainer.podworker import serve_pod

        os.environ[TRAINER_MODULE_ENV] = MODULE  # the pod's workers are stand-ins too, whatever it was given
        return serve_pod(args.storage, args.study, args.serve, args.slots)
    try:
        storage = open_trial_storage(args.storage)
        if args.check_data:
            study, spec = load_study(args.study, storage)
            study.set_user_attr(ATTR_DATA_CHECK, verdict(spec))
            return EXIT_COMPLETE
    except (StorageError, SpecError) as error:
        print(f"{MODULE}: {error}", file=sys.stderr)
        return EXIT_USAGE
    code = run_standin_trial(storage, args.study, args.trial, config)
    if code == EXIT_CRASHED:
        logging.shutdown()
        os._exit(EXIT_CRASHED)  # no clean-up, no flush of Optuna's state: a kill
    return code


if __name__ == "__main__":
    sys.exit(main())
