"""Reconciling one HPOStudy: the shared scheduler with trainer pods as the executor.

State lives in Optuna (trials, params, results) and in pod labels (which trial runs where); the
operator keeps only caches (one Optuna Study object per study: loading one re-reads every trial).
A restarted operator rebuilds everything from those two sources.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
import sqlalchemy.exc
from kubernetes.client.rest import ApiException
from pydantic import TypeAdapter, ValidationError
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState

from strata.executors import WorkerExit
from strata.health import DATABASE, KUBERNETES, REGISTRY, DependencyHealth, Outage
from strata.kube import builders
from strata.kube.api import KubeApi, SecretMissing
from strata.kube.trial_pods import ATTR_POD, TERMINAL, Happening, PodExecutor, _api_reason, _termination, owned_pods
from strata.kube.worker_pods import WorkerPodExecutor
from strata.objectstore import ObjectStoreError, open_object_store
from strata.registry import LayerRegistry
from strata.redaction import scrub, scrub_registered
from strata.retrying_storage import describe
from strata.runner import step
from strata.scheduler import Outcome, Plan, Progress, TrialScheduler
from strata.spec import (
    Image, NodeSelector, SecretKeyRef, SpecError, StudySpec, Toleration, format_validation_error, parse_spec,
    spec_to_json,
)
from strata.metrics import StrataMetrics, StudySnapshot, TimedStorage
from strata.study import (
    ATTR_FAIL_REASON, ATTR_REGISTRY_LOAD_FAILURES, ATTR_RETRY_OF, ATTR_REUSED_LAYERS, ATTR_TRAIN_SECONDS, StorageError,
    ATTR_DATA_CHECK, build_pruner, build_sampler, cached, create_or_load_study, data_check_key, open_storage, redact,
    PassSnapshot, one_pass,
)

log = logging.getLogger(__name__)
ATTR_EXECUTION_MODE = "strata.execution_mode"  # study attr: perTrial or warmWorkers, set once
USAGE_INTERVAL_SECONDS = 60.0  # listing a bucket is not free: registry size at most once a minute
PROBE_INTERVAL_SECONDS = 5.0  # how often a study's layer registry is checked for reachability
# What a database outage raises through Optuna (RDB storages wrap SQLAlchemy's errors; journals raise OSError).
STORAGE_ERRORS = (StorageError, StorageInternalError, sqlalchemy.exc.SQLAlchemyError, OSError)
DATA_CHECK_ATTEMPTS = 3  # data check pods that may end without a verdict before the study shows DataCheckFailed

# An event as it was posted: (type, reason, message).
Event = tuple[str, str, str]


class SettingsError(ValueError):
    """An operator setting (Helm value -> env) a pod could not have; the message names the variable."""


def settings_from_env(env: dict[str, str] | None = None) -> builders.OperatorSettings:
    """The operator's settings, each validated as the spec's own field of that kind (NodeSelector,
    Toleration, Image, SecretKeyRef): a bad Helm value stops the operator at start with one line
    naming it, instead of every trial pod being refused later."""
    env = dict(os.environ if env is None else env)

    def parsed(name: str, kind: Any, default: str) -> Any:
        raw = env.get(name) or default
        try:
            value = json.loads(raw) if default[:1] in "[{" else raw
            return TypeAdapter(kind).validate_python(value)
        except (ValueError, ValidationError) as error:
            detail = format_validation_error(error) if isinstance(error, ValidationError) else str(error)
            raise SettingsError(f"{name}: {detail}") from None

    def ref(name: str) -> SecretKeyRef | None:
        value = env.get(name)
        if not value:
            return None
        secret, _, key = value.partition("/")
        return _secret_ref(name, secret, key or "url")

    return builders.OperatorSettings(
        trainer_image=parsed("STRATA_TRAINER_IMAGE", Image, builders.OperatorSettings.trainer_image),
        gpu_node_selector=parsed("STRATA_GPU_NODE_SELECTOR", NodeSelector, "{}"),
        gpu_tolerations=tuple(parsed("STRATA_GPU_TOLERATIONS", list[Toleration], "[]")),
        cpu_node_selector=parsed("STRATA_CPU_NODE_SELECTOR", NodeSelector, "{}"),
        cpu_tolerations=tuple(parsed("STRATA_CPU_TOLERATIONS", list[Toleration], "[]")),
        feature_cache_volume=json.loads(env.get("STRATA_FEATURE_CACHE_VOLUME") or "{}"),
        feature_cache_bytes=int(env["STRATA_FEATURE_CACHE_BYTES"]) if env.get("STRATA_FEATURE_CACHE_BYTES") else None,
        database_secret=ref("STRATA_DATABASE_SECRET"),
        object_store_secret=env.get("STRATA_OBJECT_STORE_SECRET") or None,
        checkpoints=env.get("STRATA_CHECKPOINTS") or None,
        s3_endpoint=env.get("STRATA_S3_ENDPOINT") or None,
        check_data=(env.get("STRATA_DATA_CHECK") or "true").lower() not in ("0", "false", "no", "off"),
        trainer_module=parsed("STRATA_TRAINER_MODULE", builders.TrainerModule, builders.DEFAULT_TRAINER_MODULE),
        s3_sts_endpoint=env.get("STRATA_S3_STS_ENDPOINT") or None,
        s3_role_arn=env.get("STRATA_S3_ROLE_ARN") or None,
        s3_token_audience=env.get("STRATA_S3_TOKEN_AUDIENCE") or "sts.amazonaws.com",
        trainer_pod_security_context=_pod_security_context(
            parsed("STRATA_TRAINER_POD_SECURITY_CONTEXT", dict[str, Any],
                   json.dumps(builders.DEFAULT_POD_SECURITY_CONTEXT))),
    )


def _pod_security_context(value: dict[str, Any]) -> dict[str, Any]:
    """Trainer pods never run as root, whatever the Helm value says (runAsNonRoot is always set)."""
    for key in ("runAsUser", "runAsGroup"):
        if value.get(key) == 0:
            raise SettingsError(f"STRATA_TRAINER_POD_SECURITY_CONTEXT: {key} 0 is root; trainer pods never run as root")
    if value.get("runAsNonRoot") is False:
        raise SettingsError("STRATA_TRAINER_POD_SECURITY_CONTEXT: runAsNonRoot false is refused (trainer pods never "
                            "run as root)")
    return value


def _secret_ref(variable: str, name: str, key: str) -> SecretKeyRef:
    try:
        return SecretKeyRef(name=name, key=key)
    except ValidationError as error:
        raise SettingsError(f"{variable}: {format_validation_error(error)}") from None


@dataclass
class StudyRuntime:
    spec_json: str
    study: optuna.Study
    scheduler: TrialScheduler
    url: str  # the Optuna storage URL (shown only through redact)
    reported: set[int] = field(default_factory=set)  # worker trials whose end was seen (Events posted)
    log_store: LayerRegistry | None = None  # where removed trial pods' logs go, when reuse is off


@dataclass
class ReconcileResult:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    outcome: Outcome | None = None
    progress: Progress | None = None


class StudyService:
    """Domain logic for HPOStudy objects; Kopf handlers call it and apply what it returns."""

    def __init__(self, api: KubeApi, settings: builders.OperatorSettings,
                 database_url: Callable[[], str | None] = lambda: os.environ.get("STRATA_DATABASE_URL"),
                 metrics: StrataMetrics | None = None):
        self.api = api
        self.settings = settings
        self.metrics = metrics or StrataMetrics()
        self._usage_checked: dict[str, float] = {}
        self._database_url = database_url
        self._studies: dict[str, StudyRuntime] = {}
        self._storages: dict[str, optuna.storages.BaseStorage] = {}
        self._storage_lock = threading.Lock()  # (a new database's tables are created by the first open)
        self._locks: dict[str, threading.Lock] = {}  # the create handler and the timer may overlap
        self._health: dict[str, DependencyHealth] = {}  # per study: its database, registry, pod creation
        self._probed: dict[str, float] = {}  # per study: when its registry was last checked
        self._data_checks: dict[tuple[str, str], int] = {}  # (study, data key) -> data check pods that ended

    # --- spec and connections ------------------------------------------------------------------

    def _secret(self, namespace: str, name: str, key: str, named_by: str) -> str:
        """A Secret's value; a missing one names the field (or operator setting) that asked for it."""
        try:
            return self.api.read_secret_key(namespace, name, key)
        except SecretMissing as error:
            raise SecretMissing(f"{named_by}: {error}") from None

    @staticmethod
    def _database_secret_field(spec: StudySpec) -> str:
        return "spec.storage.databaseSecret" if spec.storage.database_secret else "operator's STRATA_DATABASE_SECRET"

    @staticmethod
    def _store_secret_field(spec: StudySpec) -> str:
        return "spec.storage.objectStoreSecret" if spec.storage.object_store_secret else "operator's STRATA_OBJECT_STORE_SECRET"

    def _database_url_for(self, namespace: str, spec: StudySpec) -> str:
        if spec.storage.database_secret:
            ref = spec.storage.database_secret
            return self._secret(namespace, ref.name, ref.key, self._database_secret_field(spec))
        if spec.storage.optuna_url:
            return spec.storage.optuna_url
        if self.settings.database_secret and not self._database_url():
            ref = self.settings.database_secret
            return self._secret(namespace, ref.name, ref.key, self._database_secret_field(spec))
        url = self._database_url()
        if not url:
            raise SecretMissing("no Optuna storage: set spec.storage.databaseSecret or the operator's database")
        return url

    def _check_pod_secrets(self, namespace: str, spec: StudySpec) -> None:
        """Trainer pods read Secrets in their own namespace: fail clearly here, not as stuck pods."""
        database = builders.trainer_database(spec, self.settings)
        if database is None:
            raise SecretMissing("spec.storage.databaseSecret: trainer pods need the Optuna URL from a Secret; "
                                "set it, or the operator's STRATA_DATABASE_SECRET")
        if isinstance(database, SecretKeyRef):
            self._secret(namespace, database.name, database.key, self._database_secret_field(spec))
        store = spec.storage.object_store_secret or self.settings.object_store_secret
        if store and (spec.storage.checkpoints or self.settings.checkpoints or "").startswith("s3://"):
            self._secret(namespace, store, "accessKey", self._store_secret_field(spec))
            self._secret(namespace, store, "secretKey", self._store_secret_field(spec))

    def _registry_for(self, namespace: str, spec: StudySpec) -> LayerRegistry | None:
        location = spec.storage.checkpoints or self.settings.checkpoints
        if not location:
            return None
        credentials = None
        secret = spec.storage.object_store_secret or self.settings.object_store_secret
        if secret and location.startswith("s3://"):
            try:
                credentials = (self._secret(namespace, secret, "accessKey", self._store_secret_field(spec)),
                               self._secret(namespace, secret, "secretKey", self._store_secret_field(spec)))
            except SecretMissing:
                if spec.storage.object_store_secret:
                    raise
        endpoint = spec.storage.s3_endpoint or self.settings.s3_endpoint
        try:
            store = open_object_store(location, endpoint, credentials=credentials)
        except ObjectStoreError as error:
            # Unreachable now: keep a client anyway (no network on open), so the probe sees it come back.
            log.warning("layer registry %s unreachable: scheduling without reuse until it is back (%s)", location, error)
            try:
                store = open_object_store(location, endpoint, create=False, credentials=credentials)
            except ObjectStoreError:
                return None  # misconfigured (no endpoint): nothing to come back
        return LayerRegistry(store)

    def _log_archive(self, namespace: str, runtime: StudyRuntime, spec: StudySpec) -> Callable[[int, str], str] | None:
        """Where a removed trial pod's log goes: the study's layer store, under logs/STUDY/ (None: no store)."""
        location = spec.storage.checkpoints or self.settings.checkpoints
        if not location:
            return None
        registry = runtime.scheduler.registry
        if registry is None:  # reuse is off: the same store still keeps the logs (opened once per study)
            if runtime.log_store is None:
                runtime.log_store = self._registry_for(namespace, spec)
            registry = runtime.log_store
        if registry is None:
            return None
        study = runtime.study.study_name

        def archive(number: int, text: str) -> str:
            registry.store.put_bytes(f"logs/{study}/trial-{number:05d}.log", scrub_registered(text).encode())
            return f"{location.rstrip('/')}/logs/{study}/"  # no secret it read ever reaches the store
        return archive

    def runtime(self, namespace: str, name: str, spec: StudySpec) -> StudyRuntime:
        key = builders.optuna_study_name(namespace, name)
        spec_json = json.dumps(spec_to_json(spec), sort_keys=True)
        known = self._studies.get(key)
        if known is not None and known.spec_json == spec_json:
            return known
        url = self._database_url_for(namespace, spec)
        with self._storage_lock:  # one storage per database, opened once: studies reconcile in parallel
            storage = self._storages.get(url)
            if storage is None:
                storage = PassSnapshot(TimedStorage(cached(open_storage(url)), self.metrics.storage_seconds))
                self._storages[url] = storage
        # The trainer pods read the spec from the study: pin where checkpoints live.
        checkpoints = spec.storage.checkpoints or self.settings.checkpoints
        endpoint = spec.storage.s3_endpoint or self.settings.s3_endpoint
        pinned = spec.model_copy(update={"storage": spec.storage.model_copy(
            update={"checkpoints": checkpoints, "s3_endpoint": endpoint})})
        study = known.study if known is not None else create_or_load_study(pinned, key, storage)
        if known is not None:
            create_or_load_study(pinned, key, storage)  # records the changed spec (live update)
            study.sampler, study.pruner = build_sampler(pinned), build_pruner(pinned)  # a changed sampler applies too
        registry = self._registry_for(namespace, spec) if spec.reuse.enabled else None
        scheduler = TrialScheduler(study, pinned, registry)
        runtime = StudyRuntime(spec_json, study, scheduler, url)
        self._studies[key] = runtime
        return runtime

    def forget(self, namespace: str, name: str) -> None:
        key = builders.optuna_study_name(namespace, name)
        self._studies.pop(key, None)
        self._health.pop(key, None)
        self._probed.pop(key, None)
        self.metrics.forget(namespace, name)

    # --- events --------------------------------------------------------------------------------

    def _poster(self, namespace: str, name: str, uid: str, posted: list[Event]) -> Callable[[Happening], None]:
        """Post each happening as an Event named by it: a repeat (a restart, a second handler) is a 409."""
        def post(happening: Happening) -> None:
            body = builders.build_event(name=name, namespace=namespace, uid=uid, type_=happening.type,
                                        reason=happening.reason, message=happening.message, key=happening.key)
            try:
                if self.api.create_event(body):
                    posted.append((happening.type, happening.reason, happening.message))
            except Exception as error:  # an Event is never worth failing a reconcile for
                log.warning("could not post event %s for %s/%s: %s", happening.reason, namespace, name, error)
        return post

    # --- reconcile -----------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str, uid: str, raw_spec: dict[str, Any], status: dict[str, Any],
                  generation: int | None) -> ReconcileResult:
        """One pass: validate, connect, step the scheduler, build the status. Never raises on user error
        or on a dependency that is down (that is a condition and an Event, and the next pass tries again)."""
        key = builders.optuna_study_name(namespace, name)
        lock = self._locks.setdefault(key, threading.Lock())
        with lock, self.metrics.reconcile(namespace, name), one_pass():
            posted: list[Event] = []
            post = self._poster(namespace, name, uid, posted)
            health = self._health.setdefault(key, DependencyHealth())
            result = self._reconcile(namespace, name, uid, raw_spec, status, generation, post, health)
            try:
                snapshot = self._snapshot(key, result)
            except STORAGE_ERRORS as error:  # the database went away after the step: metrics wait a pass
                log.warning("metrics of %s not updated: %s", key, error)
                snapshot = StudySnapshot(phase=result.status.get("phase", "Pending"))
            snapshot.dependencies_up, snapshot.dependency_failures = health.up(), dict(health.failures)
            self.metrics.update(namespace, name, snapshot)
            result.events = posted + result.events
            return result

    def _snapshot(self, key: str, result: ReconcileResult) -> StudySnapshot:
        """Metrics from Optuna (trainer user attrs) and, at most once a minute, the registry's size."""
        snapshot = StudySnapshot(phase=result.status.get("phase", "Pending"))
        runtime, progress = self._studies.get(key), result.progress
        if runtime is None or progress is None:
            return snapshot
        snapshot.complete, snapshot.pruned, snapshot.failed = progress.complete, progress.pruned, progress.failed
        snapshot.retried = progress.retried
        snapshot.running, snapshot.waiting = progress.running, progress.waiting
        snapshot.best_value = progress.best.value if progress.best else None
        snapshot.best_test_accuracy = progress.best.test_accuracy if progress.best else None
        snapshot.reused_trials, snapshot.reused_layers = progress.reused_trials, progress.reused_layers
        snapshot.max_trials = (result.status.get("trials") or {}).get("max")
        snapshot.seconds_saved = progress.seconds_saved
        for trial in runtime.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if ATTR_TRAIN_SECONDS in trial.user_attrs:
                snapshot.durations.append(float(trial.user_attrs[ATTR_TRAIN_SECONDS]))
            snapshot.registry_load_failures += int(trial.user_attrs.get(ATTR_REGISTRY_LOAD_FAILURES) or 0)
        registry = runtime.scheduler.registry
        if registry is not None and time.monotonic() - self._usage_checked.get(key, -1e9) > USAGE_INTERVAL_SECONDS:
            self._usage_checked[key] = time.monotonic()
            try:
                snapshot.registry_objects, snapshot.registry_bytes = registry.usage(study=runtime.study.study_name)
            except ObjectStoreError as error:
                log.warning("layer registry size unavailable: %s", error)
        return snapshot

    def _reconcile(self, namespace: str, name: str, uid: str, raw_spec: dict[str, Any], status: dict[str, Any],
                   generation: int | None, post: Callable[[Happening], None],
                   health: DependencyHealth) -> ReconcileResult:
        try:
            spec = parse_spec(raw_spec)
        except SpecError as error:
            return self._invalid(status, "InvalidSpec", str(error), generation, post)
        try:
            runtime = self.runtime(namespace, name, spec)
        except SpecError as error:  # valid, but not here (a sampler this process cannot run)
            return self._invalid(status, "InvalidSpec", str(error), generation, post)
        except SecretMissing as error:
            return self._invalid(status, "SecretNotFound", str(error), generation, post)
        except STORAGE_ERRORS as error:
            return self._storage_down(status, generation, str(error), post, health)
        try:
            self._check_pod_secrets(namespace, spec)
        except SecretMissing as error:
            return self._invalid(status, "SecretNotFound", str(error), generation, post)
        scheduler = runtime.scheduler
        try:
            gate = self._data_gate(namespace, name, uid, runtime, status, generation, post)
        except STORAGE_ERRORS as error:
            return self._storage_down(status, generation, _storage_message(runtime, error), post, health)
        if gate is not None:
            return gate
        try:
            mode = self._execution_mode(runtime, spec)
        except STORAGE_ERRORS as error:
            return self._storage_down(status, generation, _storage_message(runtime, error), post, health)
        if mode != spec.execution.mode:
            return self._invalid(status, "InvalidSpec", f"spec.execution.mode: the study runs its trials as {mode}; "
                                 f"it cannot change to {spec.execution.mode} (make a new study)", generation, post)
        try:
            if mode == "warmWorkers":
                executor = WorkerPodExecutor(self.api, namespace, name, uid, scheduler.spec, self.settings,
                                             runtime.study, post, runtime.reported)
            else:
                executor = PodExecutor(self.api, namespace, name, uid, scheduler.spec, self.settings, runtime.study,
                                       post)
            outcome, plan, exits = step(scheduler, executor, executor.capacity())
            for number, reason in executor.rejected.items():
                scheduler.fail_attempt(number, reason, kind="rejected")
                post(Happening("Warning", "TrialPodRejected", reason, f"trial-{number}-rejected"))
            self._track(health, KUBERNETES, executor.create_error, post)
            self._probe_registry(runtime, health, post)
            self._post_trial_events(runtime.study, exits, post)
            executor.mark_reported(exits)
            if isinstance(executor, PodExecutor):
                executor.remove_finished(self._log_archive(namespace, runtime, spec))
            if executor.rejected:
                outcome = scheduler.outcome(executor.active())
            if outcome.finished:
                executor.stop_all()
                if status.get("phase") != outcome.phase:
                    kind = "Warning" if outcome.phase == "Failed" else "Normal"
                    finished = scheduler.progress().finished
                    post(Happening(kind, "Study" + outcome.phase, outcome.message,
                                   f"study-{outcome.phase.lower()}-g{generation}-{finished}"))
            executor.fit(suspended=outcome.phase == "Suspended")
            executor.refresh()
            progress = scheduler.progress(executor.running())
        except STORAGE_ERRORS as error:
            return self._storage_down(status, generation, _storage_message(runtime, error), post, health)
        self._track(health, DATABASE, None, post)
        new_status = builders.build_status(status, progress, outcome, max_trials=spec.trials.max,
                                           optuna_name=runtime.study.study_name, generation=generation,
                                           outages=list(health.outages.values()))
        return ReconcileResult(new_status, [], outcome, progress)

    @staticmethod
    def _execution_mode(runtime: StudyRuntime, spec: StudySpec) -> str:
        """The mode the study's trials run in, fixed by its first reconcile: trial pods and worker pods
        do not see each other's trials, so switching mid-study could run a trial twice."""
        mode = runtime.study.user_attrs.get(ATTR_EXECUTION_MODE)
        if mode is None:
            mode = spec.execution.mode
            runtime.study.set_user_attr(ATTR_EXECUTION_MODE, mode)
        return str(mode)

    def _data_gate(self, namespace: str, name: str, uid: str, runtime: StudyRuntime, status: dict[str, Any],
                   generation: int | None, post: Callable[[Happening], None]) -> ReconcileResult | None:
        """None once the study's data passed its check; else what to report while it is checked or failed.

        The check runs once per study and data settings, in a trainer pod (where trials see the data),
        before any trial pod: a bad path or a subset larger than the dataset is one InvalidData
        condition and Warning instead of a failed trial per pod.
        """
        spec = runtime.scheduler.spec
        if not self.settings.check_data:
            return None
        key = data_check_key(spec)
        verdict = runtime.study.user_attrs.get(ATTR_DATA_CHECK)
        pod_name = builders.data_check_pod_name(name)
        if isinstance(verdict, dict) and verdict.get("key") == key:
            if verdict.get("ok"):
                return None
            return self._invalid(status, "InvalidData", f"spec.training: {verdict.get('message')}", generation, post)
        if verdict is None and any(t.state == TrialState.COMPLETE for t in runtime.study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE,))):
            return None  # a study from before data checks, whose trials already trained on this data
        pods = [p for p in self.api.list_pods(namespace, builders.study_selector(name))
                if builders.owned_by(p, name) and p["metadata"]["name"] == pod_name]
        pod = pods[0] if pods else None
        phase = ((pod or {}).get("status") or {}).get("phase")
        if pod is None:
            body = builders.build_data_check_pod(name=name, namespace=namespace, uid=uid, spec=spec,
                                                 settings=self.settings)
            try:
                self.api.create_pod(body)
            except ApiException as error:
                return self._invalid(status, "DataCheckFailed", f"data check pod {pod_name}: {_api_reason(error)}",
                                     generation, post)
        elif phase in TERMINAL and not pod["metadata"].get("deletionTimestamp"):
            # It ended without a verdict for these settings (a crash, an eviction, an older key): run it
            # again, a few times; then it waits for a spec change (or the pod's deletion) instead of looping.
            code, reason = _termination(pod)
            attempts = self._data_checks.get((runtime.study.study_name, key), 0) + 1
            if phase == "Failed" and attempts > DATA_CHECK_ATTEMPTS:
                return self._invalid(status, "DataCheckFailed", f"data check pod {pod_name} failed {attempts - 1} "
                                     f"times (last: {reason}, exit code {code}); see its log", generation, post)
            self._data_checks[(runtime.study.study_name, key)] = attempts
            self.api.delete_pod(namespace, pod_name, grace_seconds=0)
        outcome = Outcome(False, "Pending", "CheckingData",
                          f"checking the dataset in pod {pod_name} before the first trial")
        return ReconcileResult(builders.build_status(status, runtime.scheduler.progress(), outcome,
                                                     max_trials=spec.trials.max, optuna_name=runtime.study.study_name,
                                                     generation=generation), [], outcome)

    def _track(self, health: DependencyHealth, dependency: str, error: str | None,
               post: Callable[[Happening], None]) -> None:
        """One Warning when an outage starts, one Normal Event when it ends."""
        if error is not None:
            outage = health.failed(dependency, error)
            if outage is not None:
                log.warning("%s", outage.describe())
                post(Happening("Warning", outage.reason, outage.describe(), f"outage-{dependency}-{outage.since:.0f}"))
            return
        ended = health.recovered(dependency)
        if ended is not None:
            seconds = time.time() - ended.since
            log.info("%s reachable again after %.0f s", dependency, seconds)
            post(Happening("Normal", ended.reason.replace("Unreachable", "Reachable").replace("Failed", "Recovered"),
                           f"{dependency} reachable again after {seconds:.0f} s (down since {ended.since_text}, "
                           f"{ended.failures} failed call(s))", f"recovered-{dependency}-{ended.since:.0f}"))

    def _probe_registry(self, runtime: StudyRuntime, health: DependencyHealth, post: Callable[[Happening], None]) -> None:
        """Is the layer registry reachable? What planning saw, else a cheap check every few seconds."""
        registry = runtime.scheduler.registry
        if registry is None:
            return
        error = runtime.scheduler.registry_error
        key = runtime.study.study_name
        if error is None and (health.down(REGISTRY) or time.monotonic() - self._probed.get(key, -1e9) > PROBE_INTERVAL_SECONDS):
            self._probed[key] = time.monotonic()
            try:
                registry.store.ping()
            except ObjectStoreError as failure:
                error = str(failure)
        self._track(health, REGISTRY, error, post)

    def _storage_down(self, status: dict[str, Any], generation: int | None, message: str,
                      post: Callable[[Happening], None], health: DependencyHealth) -> ReconcileResult:
        """The database is down: say so (condition, one Warning), keep the phase, try again next pass."""
        self._track(health, DATABASE, message, post)
        outage = health.outages[DATABASE]
        return ReconcileResult(builders.unreachable_status(status, outage, generation))

    def _invalid(self, status: dict[str, Any], reason: str, message: str, generation: int | None,
                 post: Callable[[Happening], None]) -> ReconcileResult:
        if status.get("message") != message:  # one Warning per distinct problem, not one per timer tick
            post(Happening("Warning", reason, message, f"invalid-g{generation}-{reason}-{_digest(message)}"))
        return ReconcileResult(builders.invalid_status(status, reason, message, generation))

    @staticmethod
    def _post_trial_events(study: optuna.Study, exits: list[WorkerExit], post: Callable[[Happening], None]) -> None:
        trials = study.get_trials(deepcopy=False)
        for worker in exits:
            trial = trials[worker.number]
            key = f"trial-{trial.number}-ended"
            if trial.state == TrialState.COMPLETE:
                reused = trial.user_attrs.get(ATTR_REUSED_LAYERS) or 0
                post(Happening("Normal", "TrialFinished",
                               f"trial {trial.number} finished: value {trial.value:.4g}, reused {reused} layer(s)", key))
            elif trial.state == TrialState.PRUNED:
                post(Happening("Normal", "TrialPruned", f"trial {trial.number} pruned", key))
            elif trial.state == TrialState.FAIL:
                reason = trial.user_attrs.get(ATTR_FAIL_REASON, worker.reason)
                post(Happening("Warning", "TrialFailed", f"trial {trial.number} failed: {reason}"[:1000], key))


    def delete(self, namespace: str, name: str, raw_spec: dict[str, Any]) -> list[Event]:
        """Finalizer: remove the study's pods; keep the Optuna study and checkpoints unless told."""
        for pod in owned_pods(self.api, namespace, name):
            self.api.delete_pod(namespace, pod["metadata"]["name"], grace_seconds=0)
        try:
            spec = parse_spec(raw_spec)
        except SpecError:
            self.forget(namespace, name)
            return []
        if not spec.storage.keep_on_delete:
            study_name = builders.optuna_study_name(namespace, name)
            try:
                url = self._database_url_for(namespace, spec)
                optuna.delete_study(study_name=study_name, storage=open_storage(url))
            except (KeyError, SecretMissing, StorageError) as error:
                log.warning("could not delete Optuna study of %s/%s: %s", namespace, name, error)
            try:  # only this study's layers: other studies' donors stay
                registry = self._registry_for(namespace, spec)
                removed = registry.remove_study(study_name) if registry is not None else 0
                log.info("removed %d checkpoint(s) of %s", removed, study_name)
            except (SecretMissing, ObjectStoreError) as error:
                log.warning("could not delete the checkpoints of %s/%s: %s", namespace, name, error)
        self.forget(namespace, name)
        return []


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _storage_message(runtime: StudyRuntime, error: BaseException) -> str:
    """What the database's failure says, without the URL's password (a driver may echo parts of it)."""
    return scrub(f"Optuna storage {redact(runtime.url)}: {describe(error)}", runtime.url)
