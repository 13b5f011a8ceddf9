"""Optuna adapter: storage URLs, samplers, pruners, and the study that carries its own spec.

The spec travels inside the Optuna study (user attr `strata.spec`), so a trainer needs only the
storage URL, the study name and a trial number to run a trial.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from strata.spec import CategoricalParam, FloatParam, IntParam, StudySpec, parse_spec, spec_to_json

log = logging.getLogger(__name__)
SPEC_ATTR = "strata.spec"
GP_TRIAL_CAP = 300  # GPSampler's ask grows ~N^2.5 (2.6 s at 1,000 trials on 2 cores)

# Trial user attrs written by the trainer and read by the CLI, the operator and the metrics.
ATTR_TRAIN_SECONDS = "train_seconds"
ATTR_REUSED_LAYERS = "reused_layers"
ATTR_DONOR_TRIAL = "donor_trial"
ATTR_DONOR_STUDY = "donor_study"
ATTR_EPOCHS_RUN = "epochs_run"
ATTR_FEATURE_CACHE = "feature_cache"
ATTR_SHARED_FEATURES = "shared_features"  # hit: the frozen outputs came from an earlier trial on this machine
ATTR_SECONDS_SAVED = "seconds_saved_estimate"
ATTR_FAIL_REASON = "fail_reason"
ATTR_REGISTRY_LOAD_FAILURES = "registry_load_failures"
ATTR_RETRY_OF = "strata.retry_of"
ATTR_ATTEMPT = "strata.attempt"
ATTR_DONOR_FOR = "strata.donor_for"


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened or reached."""


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """sqlite:///, postgresql+psycopg2://, mysql://... or journal:///path/to/file."""
    try:
        if url.startswith("journal://"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal://"):])
            if not path.parent.is_dir():
                raise StorageError(f"journal storage {url}: directory {path.parent} does not exist")
            return JournalStorage(JournalFileBackend(str(path)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, skip_compatibility_check=False)
    except StorageError:
        raise
    except Exception as error:  # SQLAlchemy, driver and file errors all mean the same to the user
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StorageError(f"cannot open Optuna storage {redact(url)}: {first}") from error


def redact(url: str) -> str:
    """Hide a password in a database URL before it reaches a log, an Event or a status."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    result: dict[str, BaseDistribution] = {}
    for name, param in spec.search_space.items():
        if isinstance(param, IntParam):
            result[name] = IntDistribution(param.low, param.high, log=param.log, step=param.step)
        elif isinstance(param, FloatParam):
            result[name] = FloatDistribution(param.low, param.high, log=param.log, step=param.step)
        elif isinstance(param, CategoricalParam):
            result[name] = CategoricalDistribution(param.choices)
    return result


def build_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.name == "tpe":
            kwargs: dict[str, Any] = {"seed": s.seed, "multivariate": True, "constant_liar": True}
            if s.startup_trials is not None:
                kwargs["n_startup_trials"] = s.startup_trials
            return optuna.samplers.TPESampler(**kwargs)
        if s.name == "random" or s.name == "grid":
            # Grid points are enqueued by the scheduler (smaller depths first); nothing is sampled.
            return optuna.samplers.RandomSampler(seed=s.seed)
        if s.name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=s.seed, warn_independent_sampling=False)
        if s.name == "gp":
            if spec.trials.max > GP_TRIAL_CAP:
                log.warning("GP sampler with %d trials: each ask grows ~N^2.5; consider tpe beyond %d",
                            spec.trials.max, GP_TRIAL_CAP)
            kwargs = {"seed": s.seed}
            if s.startup_trials is not None:
                kwargs["n_startup_trials"] = s.startup_trials
            return optuna.samplers.GPSampler(**kwargs)
        if s.name == "qmc":
            return optuna.samplers.QMCSampler(seed=s.seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {s.name}")


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.name == "successiveHalving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=spec.training.epochs,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def create_or_load_study(spec: StudySpec, name: str, storage: optuna.storages.BaseStorage | str) -> optuna.Study:
    """Create the study, or load it and record the (possibly changed) spec: spec changes apply live."""
    if isinstance(storage, str):
        storage = open_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=build_sampler(spec), pruner=build_pruner(spec),
        direction=spec.objective.resolved_direction, load_if_exists=True,
    )
    if study.direction.name.lower() != spec.objective.resolved_direction:
        raise StorageError(f"study {name} exists with direction {study.direction.name.lower()}; "
                           f"the spec asks for {spec.objective.resolved_direction}")
    encoded = json.dumps(spec_to_json(spec), sort_keys=True)
    if study.user_attrs.get(SPEC_ATTR) != encoded:
        study.set_user_attr(SPEC_ATTR, encoded)
    return study


def load_study(name: str, storage: optuna.storages.BaseStorage | str) -> tuple[optuna.Study, StudySpec]:
    """Load a study made by Strata with the spec it carries (the trainer's view)."""
    if isinstance(storage, str):
        storage = open_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        probe = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StorageError(f"no study named {name!r} in the storage") from None
    raw = probe.user_attrs.get(SPEC_ATTR)
    if raw is None:
        raise StorageError(f"study {name!r} was not created by strata (no {SPEC_ATTR} attribute)")
    spec = parse_spec(json.loads(raw))
    study = optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(spec), pruner=build_pruner(spec))
    return study, spec
