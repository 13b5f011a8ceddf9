"""Optuna adapter: storage URLs, samplers, pruners, and the study that carries its own spec.

The spec travels inside the Optuna study (user attr `strata.spec`), so a trainer needs only the
storage URL, the study name and a trial number to run a trial.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import importlib.util
import json
import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from strata.spec import CategoricalParam, FloatParam, IntParam, SpecError, StudySpec, parse_spec, spec_to_json

log = logging.getLogger(__name__)
SPEC_ATTR = "strata.spec"
GRID_LIMIT = 100_000  # finite spaces up to this size get untried points drawn from them
GP_TRIAL_CAP = 300  # GPSampler's ask grows ~N^2.5 (2.6 s at 1,000 trials on 2 cores)

# Trial and study user attrs. One naming scheme: what a person reads in optuna-dashboard or a
# trials dataframe (results, costs, why a trial failed) is plain snake_case; Strata's own
# bookkeeping (retries, donors, workers, the spec) is `strata.` + snake_case. Durations are
# `*_seconds` numbers; timestamps are ISO 8601 strings in UTC (iso_now; attr_time reads them).
ATTR_TRAIN_SECONDS = "train_seconds"
ATTR_REUSED_LAYERS = "reused_layers"
ATTR_DONOR_TRIAL = "donor_trial"
ATTR_DONOR_STUDY = "donor_study"
ATTR_EPOCHS_RUN = "epochs_run"
ATTR_FEATURE_CACHE = "feature_cache"
ATTR_SHARED_FEATURES = "shared_features"  # hit: the frozen outputs came from an earlier trial on this machine
ATTR_SECONDS_SAVED = "seconds_saved_estimate"
ATTR_QUEUED_SECONDS = "queued_seconds"  # asked, then waited for a donor or a slot: not run time
ATTR_FAIL_REASON = "fail_reason"
ATTR_LOGS = "logs"  # study attr: where removed trial pods' logs went (s3://layers/logs/ns.study/, trial-00007.log)
ATTR_TEST_ACCURACY = "test_accuracy"  # the best epoch's weights on the test split (never used to choose trials)
ATTR_TEST_LOSS = "test_loss"
ATTR_TEST_SECONDS = "test_seconds"
ATTR_NUM_CLASSES = "strata.num_classes"  # study attr: the class count the first trial saw
ATTR_MODEL = "model"  # the trial's network, e.g. resnet-20 or 2x18f k3 fc[250]
ATTR_TRAINING_STARTED = "strata.training_started"  # when train() began (ISO 8601; attr_time reads it)
ATTR_REGISTRY_LOAD_FAILURES = "registry_load_failures"  # donors refused or unreadable, or the registry unreachable
ATTR_REGISTRY_PUBLISH_FAILURES = "registry_publish_failures"  # prefixes the registry did not take
ATTR_RETRY_OF = "strata.retry_of"
ATTR_DATA_CHECK = "strata.data_check"  # study attr: the verdict of strata_trainer.datacheck for data_check_key
ATTR_ATTEMPT = "strata.attempt"
ATTR_DONOR_FOR = "strata.donor_for"
# Worker pods (strata.kube.worker_pods hands out, strata_trainer.podworker claims and runs):
ATTR_ASSIGNED = "strata.assigned"  # the worker pod the operator gave the trial to ("": taken back)
ATTR_WORKER = "strata.worker"  # the pod that claimed it
ATTR_WORKER_STARTED = "strata.worker_started"  # claimed and begun (ISO 8601; attr_time reads it)
ATTR_WORKER_EXIT = "strata.worker_exit"  # {"code", "reason"}: its trainer ended without telling Optuna
ATTR_STOP = "strata.stop"  # the operator stopped it (timeout, goal, the end): its worker kills it
ATTR_REPORTED_BELOW = "strata.reported_below"  # study attr: every worker trial below it was seen to end


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened or reached."""


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """sqlite:///, postgresql+psycopg2://, mysql://... or journal:///path/to/file.

    A database server that does not answer fails within STRATA_DB_CONNECT_TIMEOUT seconds (default
    5; 0: the driver's own, none). Error messages never carry the URL's password.
    """
    import os

    from strata.redaction import redact as redact_url, scrub

    try:
        if url.startswith("journal://"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal://"):])
            if not path.parent.is_dir():
                raise StorageError(f"journal storage {redact_url(url)}: directory {path.parent} does not exist")
            return JournalStorage(JournalFileBackend(str(path)))
        engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
        raw_timeout = os.environ.get("STRATA_DB_CONNECT_TIMEOUT", "").strip() or "5"
        try:
            timeout = max(0, int(-(-float(raw_timeout) // 1)))  # whole seconds, rounded up (libpq's unit)
        except ValueError:
            raise StorageError(f"STRATA_DB_CONNECT_TIMEOUT: not a number of seconds: {raw_timeout!r}") from None
        try:
            from sqlalchemy.engine import make_url

            parsed = make_url(url)
            backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
        except Exception:
            parsed = None  # RDBStorage reports the bad URL below
        if parsed is not None and timeout:
            # Driver keyword for "give up connecting after N s"; a value in the URL's query wins.
            option = {("postgresql", "psycopg2"): "connect_timeout", ("postgresql", "psycopg"): "connect_timeout",
                      ("postgresql", "pg8000"): "timeout", ("mysql", "pymysql"): "connect_timeout",
                      ("mysql", "mysqldb"): "connect_timeout", ("mariadb", "pymysql"): "connect_timeout",
                      ("mariadb", "mysqldb"): "connect_timeout",
                      ("mysql", "mysqlconnector"): "connection_timeout"}.get((backend, driver))
            if option and option not in parsed.query:
                engine_kwargs["connect_args"] = {option: timeout}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=False)
        _count_statements(storage.engine)
        return storage
    except StorageError as error:
        if scrub(str(error), url) == str(error):
            raise
        raise StorageError(scrub(str(error), url)) from None
    except Exception as error:  # SQLAlchemy, driver and file errors all mean the same to the user
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        # The driver or SQLAlchemy may echo the URL or its parts: scrub them from the one line.
        raise StorageError(scrub(f"cannot open Optuna storage {redact_url(url)}: {first}", url)) from error


def iso_now() -> str:
    """Now as an attr timestamp: ISO 8601 in UTC (2026-12-04T02:31:05.123Z), as the dashboard shows it."""
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def attr_time(value: Any) -> float | None:
    """A timestamp as epoch seconds: an ISO 8601 string (what Strata writes in attrs, and Kubernetes'
    `...Z` stamps) or a number (what studies from before wrote)."""
    import datetime as dt

    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    stamp = dt.datetime.fromisoformat(str(value))
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)).timestamp()


def read_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """One trial by its number, read alone: `study.trials[number]` reads every trial of the study
    (after a write in a reconcile pass, again from the database)."""
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def parked(trial: optuna.trial.FrozenTrial) -> bool:
    """Asked, then parked by the scheduler until it starts: Optuna's WAITING state with its params
    set (a trial enqueued but not asked yet has none, only `fixed_params`). Optuna's clock of a
    trial restarts when it goes from WAITING to RUNNING, so its duration counts from its start,
    not from its ask: the wait for a donor or a slot is not run time."""
    return trial.state == optuna.trial.TrialState.WAITING and bool(trial.distributions)


def under_way(trial: optuna.trial.FrozenTrial) -> bool:
    """Asked and not finished: RUNNING, or parked until it starts."""
    return trial.state == optuna.trial.TrialState.RUNNING or parked(trial)


def restart_clock(storage: optuna.storages.BaseStorage, trial: optuna.trial.FrozenTrial,
                  least_seconds: float = 0.5) -> float:
    """Start a trial that waited since it was asked or handed over (parked, or RUNNING not yet
    started): Optuna counts its duration from datetime_start, which it sets when a trial goes from
    WAITING to RUNNING, so the trial goes WAITING (unless parked already) and RUNNING again, and the
    wait joins its `queued_seconds`. The state is written before the attr: a start cut between the
    writes loses the wait rather than counting it twice. A wait under `least_seconds` is left in
    Optuna's duration (a parked trial is still set RUNNING). Returns the seconds added."""
    running = optuna.trial.TrialState.RUNNING
    waited = 0.0
    if trial.datetime_start is not None:
        waited = (datetime.datetime.now() - trial.datetime_start).total_seconds()  # naive local, as Optuna's
    if waited < least_seconds:
        if parked(trial):
            storage.set_trial_state_values(trial._trial_id, running)
        return 0.0
    if trial.state == running:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.WAITING)
    storage.set_trial_state_values(trial._trial_id, running)
    earlier = float(trial.user_attrs.get(ATTR_QUEUED_SECONDS) or 0.0)
    storage.set_trial_user_attr(trial._trial_id, ATTR_QUEUED_SECONDS, round(earlier + waited, 3))
    return waited


class ParkingStudy(optuna.Study):
    """optuna.Study whose `ask` never pops a parked trial (a plain ask takes the oldest WAITING
    trial, meant for enqueued ones); the scheduler starts parked trials itself. Everything else is
    Optuna's: enqueue_trial + ask still take the enqueued trial."""

    @classmethod
    def of(cls, study: optuna.Study) -> "ParkingStudy":
        if isinstance(study, cls):
            return study
        return cls(study.study_name, study._storage, sampler=study.sampler, pruner=study.pruner)

    def _pop_waiting_trial_id(self) -> int | None:
        for trial in self._storage.get_all_trials(self._study_id, deepcopy=False,
                                                  states=(optuna.trial.TrialState.WAITING,)):
            if parked(trial):
                continue
            try:  # as Optuna's own: another process may have popped or finished it meanwhile
                if self._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.RUNNING):
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None


_statement_lock = threading.Lock()
_statement_total = 0


def _count_statements(engine: Any) -> None:
    import sqlalchemy

    def counted(*_: Any) -> None:
        global _statement_total
        with _statement_lock:
            _statement_total += 1

    sqlalchemy.event.listen(engine, "before_cursor_execute", counted)


def sql_statements() -> int:
    """SQL statements this process has sent to Optuna databases (storage calls that left the process)."""
    return _statement_total


def cached(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """Optuna's own read cache over an RDB storage, as `optuna.create_study(storage=RDBStorage(...))`
    adds it: finished trials are read once, and each later read fetches only the unfinished and the
    new trials. A wrapper (TimedStorage, RetryingStorage) hides the RDBStorage from Optuna, which then
    skips the cache and reads every trial on every call: cache first, then wrap. Safe because no one
    writes to a trial after it finished (trainers set their attrs before they tell)."""
    return optuna.storages.get_storage(storage)


_PASS = threading.local()  # the reads of the reconcile pass running in this thread (one_pass)


@contextlib.contextmanager
def one_pass() -> Iterator[None]:
    """A reconcile pass: while it runs in this thread, PassSnapshot storages read each study's trials
    once, then again only after this pass wrote to them. Nested: the outer pass goes on."""
    outer = getattr(_PASS, "reads", None)
    _PASS.reads = {} if outer is None else outer
    try:
        yield
    finally:
        _PASS.reads = outer


class PassSnapshot:
    """A storage wrapper: within one_pass() (one reconcile pass, in its own thread), every
    `get_all_trials` of a study after the first is served from what that first read returned, and
    the trials the pass itself creates are kept with it: their params and attrs as the pass writes
    them, so reading them back (`get_trial`, the next `get_all_trials`) needs no query. Any other
    write (a state, a value, an attr of a trial the pass did not create) drops what the pass holds
    and the next read goes to the storage again. Outside a pass it passes every call through.

    Why: one reconcile asks for the study's trials about twelve times (the scheduler's plan, each
    ask's samplers, the pod executor, the status); even with Optuna's cache each of those re-reads
    every RUNNING trial (seven SQL statements). And each trial it launches was read back three
    times (by Optuna's ask, the scheduler and the pod executor) with a query each: at 100 studies
    SQLAlchemy was 59% of the operator's CPU. Other processes' changes (a trainer telling its trial)
    are seen by the next pass, as if they had come a moment later; a trial the pass did not create
    (`get_trial`, what the scheduler reads when a trainer exits) always comes from the storage.
    A trial just created is the pass's alone until its pod or worker starts it."""

    _WRITES = frozenset({"create_new_trial", "set_trial_param", "set_trial_state_values",
                         "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr"})

    def __init__(self, storage: Any):
        self._storage = storage

    def _reads(self) -> tuple[dict[Any, Any], dict[int, Any], dict[tuple[int, int], int]] | None:
        """This pass's reads of this storage: everything, its own new trials by id, their ids by
        (study, number); None outside a pass."""
        reads = getattr(_PASS, "reads", None)
        if reads is None:
            return None
        return reads, reads.setdefault((id(self), "own"), {}), reads.setdefault((id(self), "ids"), {})

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._storage, name)
        if name not in self._WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:  # a write the pass does not keep: read again after it
            reads = getattr(_PASS, "reads", None)
            if reads:
                reads.clear()  # a pass reconciles one study: what it wrote is read again
            return attr(*args, **kwargs)
        return write

    def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
        trial_id = self._storage.create_new_trial(study_id, template_trial)
        pass_reads = self._reads()
        if pass_reads is not None:
            reads, own, ids = pass_reads
            frozen = own[trial_id] = self._storage.get_trial(trial_id)
            ids[(study_id, frozen.number)] = trial_id
            listed = reads.get((id(self), study_id))
            if listed is not None:
                listed.append(frozen)
        return trial_id

    def _kept(self, trial_id: int, write: Callable[[], Any], apply: Callable[[Any], None]) -> Any:
        """A write to a trial: applied to the pass's copy if the pass created it, else the pass
        reads again after it (and after any write that failed)."""
        pass_reads = self._reads()
        frozen = None if pass_reads is None else pass_reads[1].get(trial_id)
        if frozen is None:
            if pass_reads is not None:
                pass_reads[0].clear()
            return write()
        try:
            result = write()
        except BaseException:
            pass_reads[0].clear()
            raise
        apply(frozen)
        return result

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        def apply(frozen: Any) -> None:
            frozen._params[param_name] = distribution.to_external_repr(param_value_internal)
            frozen._distributions[param_name] = distribution
        self._kept(trial_id, lambda: self._storage.set_trial_param(trial_id, param_name, param_value_internal,
                                                                   distribution), apply)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._kept(trial_id, lambda: self._storage.set_trial_user_attr(trial_id, key, value),
                   lambda frozen: frozen._user_attrs.__setitem__(key, json.loads(json.dumps(value))))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._kept(trial_id, lambda: self._storage.set_trial_system_attr(trial_id, key, value),
                   lambda frozen: frozen._system_attrs.__setitem__(key, json.loads(json.dumps(value))))

    def get_trial(self, trial_id: int) -> Any:
        pass_reads = self._reads()
        frozen = None if pass_reads is None else pass_reads[1].get(trial_id)
        return self._storage.get_trial(trial_id) if frozen is None else copy.deepcopy(frozen)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        pass_reads = self._reads()
        trial_id = None if pass_reads is None else pass_reads[2].get((study_id, trial_number))
        if trial_id is None:
            return self._storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)
        return trial_id

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Any = None) -> list[Any]:
        pass_reads = self._reads()
        if pass_reads is None:
            return self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        reads, own, _ = pass_reads
        key = (id(self), study_id)
        trials = reads.get(key)
        if trials is None:
            trials = reads[key] = [own.get(t._trial_id, t)  # one object per own trial: writes show in both
                                   for t in self._storage.get_all_trials(study_id, deepcopy=False)]
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)


def optuna_cli_storage(url: str) -> str:
    """The storage as the optuna CLI and optuna-dashboard take it: a journal file's plain path (they do
    not know journal://), a database URL as is but with its password hidden (put it back yourself)."""
    from strata.redaction import redact as redact_url

    return url[len("journal://"):] if url.startswith("journal://") else redact_url(url)


def redact(url: str) -> str:
    """Hide a password in a database URL before it reaches a log, an Event or a status.

    An alias of strata.redaction.redact (SQLAlchemy's parsing; secret query parameters masked too).
    """
    from strata.redaction import redact as redact_url

    return redact_url(url)


def data_check_key(spec: StudySpec) -> str:
    """What the data check depends on: the dataset and how trials cut it (not the search space)."""
    t = spec.training
    settings = {"dataset": t.dataset.model_dump(mode="json"), "subsetSize": t.subset_size, "inputSize": t.input_size,
                "validationSplit": t.validation_split, "testSplit": t.test_split, "seed": t.seed,
                "s3Endpoint": spec.storage.s3_endpoint}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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
    """The spec's sampler, wrapped so restarts never replay it and proposals stay distinct (strata.sampling)."""
    from strata.sampling import DistinctSampler

    s = spec.sampler
    if s.name == "gp" and importlib.util.find_spec("torch") is None:
        raise SpecError("spec.sampler.name: gp needs PyTorch, which this process does not have (the operator "
                        "image has no torch); use tpe, cmaes, qmc or random")
    if s.name == "gp" and spec.trials.max > GP_TRIAL_CAP:
        log.warning("GP sampler with %d trials: each ask grows ~N^2.5; consider tpe beyond %d",
                    spec.trials.max, GP_TRIAL_CAP)
    try:
        grid = spec.grid() if spec.grid_size() <= GRID_LIMIT else None
    except SpecError:  # a float range without step: an infinite space
        grid = None
    # QMC's low-discrepancy sequence is fixed by one seed; its position is kept in the study itself.
    return DistinctSampler(lambda seed: _inner_sampler(spec, seed), distributions(spec), s.seed, grid,
                           reseed=s.name != "qmc")


def _inner_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.name == "tpe":
            kwargs: dict[str, Any] = {"seed": seed, "multivariate": True, "constant_liar": True}
            if s.startup_trials is not None:
                kwargs["n_startup_trials"] = s.startup_trials
            return optuna.samplers.TPESampler(**kwargs)
        if s.name == "random" or s.name == "grid":
            # Grid points are enqueued by the scheduler (smaller depths first); nothing is sampled.
            return optuna.samplers.RandomSampler(seed=seed)
        if s.name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if s.name == "gp":
            kwargs = {"seed": seed}
            if s.startup_trials is not None:
                kwargs["n_startup_trials"] = s.startup_trials
            return optuna.samplers.GPSampler(**kwargs)
        if s.name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
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
    # The spec as an object, not an escaped string: the optuna CLI and optuna-dashboard show it readably.
    stored = spec_to_json(spec)
    if study.user_attrs.get(SPEC_ATTR) != stored:
        study.set_user_attr(SPEC_ATTR, stored)
    if study.metric_names != [spec.objective.metric]:  # the dashboard and the plots name the objective
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.objective.metric])
    return ParkingStudy.of(study)


def stored_spec(name: str, storage: optuna.storages.BaseStorage) -> dict[str, Any] | None:
    """The spec a study was last run with (as the manifest spells it), or None if there is no such study."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return _decode_spec(storage.get_study_user_attrs(study_id).get(SPEC_ATTR))


def _decode_spec(raw: Any) -> dict[str, Any] | None:
    return json.loads(raw) if isinstance(raw, str) else raw  # a string: a study from before 0.x kept it so


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
    spec = parse_spec(_decode_spec(raw))
    study = optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(spec), pruner=build_pruner(spec))
    return study, spec
