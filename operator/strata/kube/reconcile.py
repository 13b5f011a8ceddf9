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
from optuna.trial import TrialState

from strata.executors import WorkerExit
from strata.kube import builders
from strata.kube.api import KubeApi, SecretMissing
from strata.objectstore import ObjectStoreError, open_object_store
from strata.registry import LayerRegistry
from strata.runner import step
from strata.scheduler import Outcome, Plan, Progress, TrialScheduler
from strata.spec import SecretKeyRef, SpecError, StudySpec, Toleration, parse_spec, spec_to_json
from strata.metrics import StrataMetrics, StudySnapshot, TimedStorage
from strata.study import (
    ATTR_FAIL_REASON, ATTR_REGISTRY_LOAD_FAILURES, ATTR_RETRY_OF, ATTR_REUSED_LAYERS, ATTR_TRAIN_SECONDS, StorageError,
    create_or_load_study, open_storage,
)

log = logging.getLogger(__name__)
ATTR_POD = "strata.pod"  # set when a pod is created: a RUNNING trial with it but no pod was lost
TERMINAL = ("Succeeded", "Failed")
USAGE_INTERVAL_SECONDS = 60.0  # listing a bucket is not free: registry size at most once a minute

# An event to post: (type, reason, message).
Event = tuple[str, str, str]


def settings_from_env(env: dict[str, str] | None = None) -> builders.OperatorSettings:
    env = dict(os.environ if env is None else env)

    def ref(value: str | None) -> SecretKeyRef | None:
        if not value:
            return None
        name, _, key = value.partition("/")
        return SecretKeyRef(name=name, key=key or "url")

    def tolerations(name: str) -> tuple[Toleration, ...]:
        return tuple(Toleration.model_validate(t) for t in json.loads(env.get(name) or "[]"))

    return builders.OperatorSettings(
        trainer_image=env.get("STRATA_TRAINER_IMAGE", builders.OperatorSettings.trainer_image),
        gpu_node_selector=json.loads(env.get("STRATA_GPU_NODE_SELECTOR") or "{}"),
        gpu_tolerations=tolerations("STRATA_GPU_TOLERATIONS"),
        cpu_node_selector=json.loads(env.get("STRATA_CPU_NODE_SELECTOR") or "{}"),
        cpu_tolerations=tolerations("STRATA_CPU_TOLERATIONS"),
        feature_cache_volume=json.loads(env.get("STRATA_FEATURE_CACHE_VOLUME") or "{}"),
        feature_cache_bytes=int(env["STRATA_FEATURE_CACHE_BYTES"]) if env.get("STRATA_FEATURE_CACHE_BYTES") else None,
        database_secret=ref(env.get("STRATA_DATABASE_SECRET")),
        object_store_secret=env.get("STRATA_OBJECT_STORE_SECRET") or None,
        checkpoints=env.get("STRATA_CHECKPOINTS") or None,
        s3_endpoint=env.get("STRATA_S3_ENDPOINT") or None,
    )


class PodExecutor:
    """The Executor protocol over one study's trainer pods (refreshed once per reconcile)."""

    def __init__(self, api: KubeApi, namespace: str, name: str, uid: str, spec: StudySpec,
                 settings: builders.OperatorSettings, study: optuna.Study, events: list[Event]):
        self.api, self.namespace, self.name, self.uid = api, namespace, name, uid
        self.spec, self.settings, self.study, self.events = spec, settings, study, events
        self.pods: dict[int, dict[str, Any]] = {}
        self.refresh()

    def refresh(self) -> None:
        self.pods = {}
        for pod in self.api.list_pods(self.namespace, builders.study_selector(self.name)):
            labels = pod["metadata"].get("labels", {})
            if labels.get(builders.LABEL_STUDY) == self.name and builders.LABEL_TRIAL in labels:
                self.pods[int(labels[builders.LABEL_TRIAL])] = pod

    @staticmethod
    def _phase(pod: dict[str, Any]) -> str:
        return (pod.get("status") or {}).get("phase") or "Pending"

    def active(self) -> set[int]:
        return {n for n, pod in self.pods.items()
                if self._phase(pod) not in TERMINAL and not pod["metadata"].get("deletionTimestamp")}

    def started_at(self, number: int) -> float:
        stamp = (self.pods[number].get("status") or {}).get("startTime") or self.pods[number]["metadata"].get("creationTimestamp")
        if not stamp:
            return time.time()
        import datetime as dt

        return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()

    def poll(self) -> list[WorkerExit]:
        exits = []
        for number, pod in self.pods.items():
            annotations = pod["metadata"].get("annotations") or {}
            if self._phase(pod) in TERMINAL and annotations.get(builders.ANNOTATION_REPORTED) != "true":
                code, reason = _termination(pod)
                exits.append(WorkerExit(number, code, reason, 0.0))
        # Lost: a trial we gave a pod is still RUNNING in Optuna, but its pod is gone.
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if ATTR_POD in trial.user_attrs and trial.number not in self.pods:
                exits.append(WorkerExit(trial.number, -1, "Lost", 0.0))
        return exits

    def start(self, number: int) -> None:
        trial = self.study.get_trials(deepcopy=False)[number]
        body = builders.build_trial_pod(name=self.name, namespace=self.namespace, uid=self.uid, number=number,
                                        params=trial.params, spec=self.spec, settings=self.settings)
        if not self.api.create_pod(body):
            old = self.pods.get(number)
            if old is not None and self._phase(old) in TERMINAL:
                # A finished pod of a trial that is RUNNING again: replace it on the next reconcile.
                self.api.delete_pod(self.namespace, old["metadata"]["name"], grace_seconds=0)
            return
        self.study._storage.set_trial_user_attr(trial._trial_id, ATTR_POD, body["metadata"]["name"])
        self.pods[number] = body
        gpu = " on a GPU node" if self.spec.trainer.gpu.wants(trial.params) else ""
        retry = trial.user_attrs.get(ATTR_RETRY_OF)
        if retry is not None:
            self.events.append(("Normal", "TrialRetried", f"trial {number} retries trial {retry} (pod {body['metadata']['name']}){gpu}"))
        else:
            self.events.append(("Normal", "TrialStarted", f"trial {number} started in pod {body['metadata']['name']}{gpu}"))

    def stop(self, number: int) -> None:
        pod = self.pods.pop(number, None)
        if pod is not None:
            self.api.delete_pod(self.namespace, pod["metadata"]["name"])

    def stop_all(self) -> None:
        for number in list(self.active()):
            self.stop(number)

    def mark_reported(self, exits: list[WorkerExit]) -> None:
        for worker in exits:
            pod = self.pods.get(worker.number)
            if pod is not None:
                self.api.annotate_pod(self.namespace, pod["metadata"]["name"], {builders.ANNOTATION_REPORTED: "true"})


def _termination(pod: dict[str, Any]) -> tuple[int, str]:
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return -1, "Evicted"
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return int(terminated.get("exitCode", -1)), terminated.get("reason") or "Error"
    return (0, "Completed") if status.get("phase") == "Succeeded" else (-1, status.get("reason") or "Error")


@dataclass
class StudyRuntime:
    spec_json: str
    study: optuna.Study
    scheduler: TrialScheduler


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
        self._locks: dict[str, threading.Lock] = {}  # the create handler and the timer may overlap

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
        try:
            store = open_object_store(location, spec.storage.s3_endpoint or self.settings.s3_endpoint,
                                      credentials=credentials)
        except ObjectStoreError as error:
            log.warning("layer registry %s unreachable: scheduling without reuse (%s)", location, error)
            return None
        return LayerRegistry(store)

    def runtime(self, namespace: str, name: str, spec: StudySpec) -> StudyRuntime:
        key = builders.optuna_study_name(namespace, name)
        spec_json = json.dumps(spec_to_json(spec), sort_keys=True)
        cached = self._studies.get(key)
        if cached is not None and cached.spec_json == spec_json:
            return cached
        url = self._database_url_for(namespace, spec)
        storage = self._storages.get(url) or TimedStorage(open_storage(url), self.metrics.storage_seconds)
        self._storages[url] = storage
        # The trainer pods read the spec from the study: pin where checkpoints live.
        checkpoints = spec.storage.checkpoints or self.settings.checkpoints
        endpoint = spec.storage.s3_endpoint or self.settings.s3_endpoint
        pinned = spec.model_copy(update={"storage": spec.storage.model_copy(
            update={"checkpoints": checkpoints, "s3_endpoint": endpoint})})
        study = cached.study if cached is not None else create_or_load_study(pinned, key, storage)
        if cached is not None:
            create_or_load_study(pinned, key, storage)  # records the changed spec (live update)
        registry = self._registry_for(namespace, spec) if spec.reuse.enabled else None
        scheduler = TrialScheduler(study, pinned, registry)
        runtime = StudyRuntime(spec_json, study, scheduler)
        self._studies[key] = runtime
        return runtime

    def forget(self, namespace: str, name: str) -> None:
        self._studies.pop(builders.optuna_study_name(namespace, name), None)
        self.metrics.forget(namespace, name)

    # --- reconcile -----------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str, uid: str, raw_spec: dict[str, Any], status: dict[str, Any],
                  generation: int | None) -> ReconcileResult:
        """One pass: validate, connect, step the scheduler, build the status. Never raises on user error."""
        key = builders.optuna_study_name(namespace, name)
        lock = self._locks.setdefault(key, threading.Lock())
        with lock, self.metrics.reconcile(namespace, name):
            result = self._reconcile(namespace, name, uid, raw_spec, status, generation)
            self.metrics.update(namespace, name, self._snapshot(key, result))
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
                   generation: int | None) -> ReconcileResult:
        try:
            spec = parse_spec(raw_spec)
        except SpecError as error:
            return self._invalid(status, "InvalidSpec", str(error), generation)
        try:
            runtime = self.runtime(namespace, name, spec)
        except SecretMissing as error:
            return self._invalid(status, "SecretNotFound", str(error), generation)
        except StorageError as error:
            return self._invalid(status, "StorageUnreachable", str(error), generation)
        try:
            self._check_pod_secrets(namespace, spec)
        except SecretMissing as error:
            return self._invalid(status, "SecretNotFound", str(error), generation)
        events: list[Event] = []
        scheduler = runtime.scheduler
        executor = PodExecutor(self.api, namespace, name, uid, scheduler.spec, self.settings, runtime.study, events)
        outcome, plan, exits = step(scheduler, executor, spec.trials.parallel)
        events += self._trial_events(runtime.study, exits)
        executor.mark_reported(exits)
        if outcome.finished:
            executor.stop_all()
            if status.get("phase") != outcome.phase:
                kind = "Warning" if outcome.phase == "Failed" else "Normal"
                events.append((kind, "Study" + outcome.phase, outcome.message))
        executor.refresh()
        progress = scheduler.progress(executor.active())
        new_status = builders.build_status(status, progress, outcome, max_trials=spec.trials.max,
                                           optuna_name=runtime.study.study_name, generation=generation)
        return ReconcileResult(new_status, events, outcome, progress)

    def _invalid(self, status: dict[str, Any], reason: str, message: str, generation: int | None) -> ReconcileResult:
        events: list[Event] = []
        if status.get("message") != message:  # one Warning per distinct problem, not one per timer tick
            events.append(("Warning", reason, message))
        return ReconcileResult(builders.invalid_status(status, reason, message, generation), events)

    @staticmethod
    def _trial_events(study: optuna.Study, exits: list[WorkerExit]) -> list[Event]:
        events: list[Event] = []
        trials = study.get_trials(deepcopy=False)
        for worker in exits:
            trial = trials[worker.number]
            if trial.state == TrialState.COMPLETE:
                reused = trial.user_attrs.get(ATTR_REUSED_LAYERS) or 0
                events.append(("Normal", "TrialFinished",
                               f"trial {trial.number} finished: value {trial.value:.4g}, reused {reused} layer(s)"))
            elif trial.state == TrialState.PRUNED:
                events.append(("Normal", "TrialPruned", f"trial {trial.number} pruned"))
            elif trial.state == TrialState.FAIL:
                reason = trial.user_attrs.get(ATTR_FAIL_REASON, worker.reason)
                events.append(("Warning", "TrialFailed", f"trial {trial.number} failed: {reason}"[:1000]))
        return events

    def delete(self, namespace: str, name: str, raw_spec: dict[str, Any]) -> list[Event]:
        """Finalizer: remove the study's pods; keep the Optuna study and checkpoints unless told."""
        for pod in self.api.list_pods(namespace, builders.study_selector(name)):
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
