"""Prometheus metrics of the operator, all derived from Optuna and the registry (no Pushgateway).

Trainer pods are short-lived, so trial metrics come from what trainers wrote to Optuna (user
attrs); each reconcile stores a snapshot per study and a collector turns snapshots into samples.
Label values are bounded: namespace and study, never a trial number.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed", "Invalid", "Error")
DURATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, float("inf"))


@dataclass
class StudySnapshot:
    phase: str = "Pending"
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    retried: int = 0
    running: int = 0
    waiting: int = 0
    best_value: float | None = None
    best_test_accuracy: float | None = None
    reused_trials: int = 0
    reused_layers: int = 0
    seconds_saved: float = 0.0
    registry_load_failures: int = 0
    durations: list[float] = field(default_factory=list)  # train seconds of finished trials
    max_trials: int | None = None
    registry_objects: int | None = None
    registry_bytes: int | None = None
    dependencies_up: dict[str, bool] = field(default_factory=dict)  # database, registry, kubernetes
    dependency_failures: dict[str, int] = field(default_factory=dict)  # failed calls or probes, ever


class StrataMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._lock = threading.Lock()
        self._studies: dict[tuple[str, str], StudySnapshot] = {}
        self.reconcile_seconds = Histogram("strata_reconcile_duration_seconds", "Time of one study reconcile.",
                                           registry=self.registry)
        self.reconcile_errors = Counter("strata_reconcile_errors", "Reconciles that raised an error.",
                                        ["namespace", "study"], registry=self.registry)
        self.storage_seconds = Histogram("strata_optuna_storage_call_duration_seconds",
                                         "Latency of Optuna storage calls made by the operator.", ["method"],
                                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                         registry=self.registry)
        self.registry.register(_SnapshotCollector(self))
        if registry is None:  # the operator's own registry: its process too (CPU, memory, open fds)
            from prometheus_client import ProcessCollector

            ProcessCollector(registry=self.registry)

    def update(self, namespace: str, study: str, snapshot: StudySnapshot) -> None:
        with self._lock:
            previous = self._studies.get((namespace, study))
            if snapshot.registry_objects is None and previous is not None:
                snapshot.registry_objects, snapshot.registry_bytes = previous.registry_objects, previous.registry_bytes
            self._studies[(namespace, study)] = snapshot

    def forget(self, namespace: str, study: str) -> None:
        with self._lock:
            self._studies.pop((namespace, study), None)
        try:
            self.reconcile_errors.remove(namespace, study)
        except KeyError:
            pass

    def snapshots(self) -> dict[tuple[str, str], StudySnapshot]:
        with self._lock:
            return dict(self._studies)

    @contextmanager
    def reconcile(self, namespace: str, study: str) -> Iterator[None]:
        started = time.perf_counter()
        errors = self.reconcile_errors.labels(namespace, study)  # exported as 0 before any error
        try:
            yield
        except Exception:
            errors.inc()
            raise
        finally:
            self.reconcile_seconds.observe(time.perf_counter() - started)

    def watch_operator(self, api: Any, wakeups: Any) -> None:
        """Export what the operator itself sends and receives: Kubernetes API requests, SQL statements
        to Optuna's database, and the pod events that woke a study."""
        self.registry.register(_OperatorCollector(api, wakeups))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


class _SnapshotCollector:
    def __init__(self, metrics: StrataMetrics):
        self.metrics = metrics

    def collect(self):
        snapshots = self.metrics.snapshots()
        labels = ["namespace", "study"]
        by_phase = GaugeMetricFamily("strata_studies", "Studies by phase.", labels=["phase"])
        phase = GaugeMetricFamily("strata_study_phase", "1 for the study's current phase.", labels=labels + ["phase"])
        trials = CounterMetricFamily("strata_trials", "Finished trials by final state.", labels=labels + ["state"])
        retries = CounterMetricFamily("strata_trial_retries", "Attempts that re-ran a failed trial.", labels=labels)
        current = GaugeMetricFamily("strata_trials_current", "Trials now running or waiting.", labels=labels + ["state"])
        best = GaugeMetricFamily("strata_best_objective_value", "Best objective value of the study.", labels=labels)
        best_test = GaugeMetricFamily("strata_best_test_accuracy", "Test-split accuracy of the study's best trial "
                                      "(chosen on validation).", labels=labels)
        max_trials = GaugeMetricFamily("strata_trials_max", "Trials the study runs (spec.trials.max).", labels=labels)
        reused_trials = CounterMetricFamily("strata_reused_trials", "Finished trials that reused layers.", labels=labels)
        reused_layers = CounterMetricFamily("strata_reused_layers", "Conv layers reused by finished trials.", labels=labels)
        saved = CounterMetricFamily("strata_training_seconds_saved", "Estimated training seconds saved by reuse.", labels=labels)
        load_failures = CounterMetricFamily("strata_registry_load_failures",
                                            "Donor checkpoints that trainers refused or could not load.", labels=labels)
        objects = GaugeMetricFamily("strata_registry_objects", "Checkpoints this study published to the layer registry.", labels=labels)
        size = GaugeMetricFamily("strata_registry_bytes", "Bytes of the checkpoints this study published to the layer registry.", labels=labels)
        up = GaugeMetricFamily("strata_dependency_up", "1 while the study's dependency answers (database, registry, "
                               "kubernetes), 0 during an outage.", labels=labels + ["dependency"])
        down_calls = CounterMetricFamily("strata_dependency_failures", "Calls or probes of a dependency that failed.",
                                         labels=labels + ["dependency"])
        duration = HistogramMetricFamily("strata_trial_duration_seconds", "Training seconds of finished trials.",
                                         labels=labels)
        counts = {p: 0 for p in PHASES}
        for (namespace, study), s in sorted(snapshots.items()):
            key = [namespace, study]
            counts[s.phase] = counts.get(s.phase, 0) + 1
            for p in PHASES:
                phase.add_metric(key + [p], 1.0 if s.phase == p else 0.0)
            for state, value in (("complete", s.complete), ("pruned", s.pruned), ("failed", s.failed)):
                trials.add_metric(key + [state], value)
            retries.add_metric(key, s.retried)
            current.add_metric(key + ["running"], s.running)
            current.add_metric(key + ["waiting"], s.waiting)
            if s.best_value is not None:
                best.add_metric(key, s.best_value)
            if s.best_test_accuracy is not None:
                best_test.add_metric(key, s.best_test_accuracy)
            if s.max_trials is not None:
                max_trials.add_metric(key, s.max_trials)
            reused_trials.add_metric(key, s.reused_trials)
            reused_layers.add_metric(key, s.reused_layers)
            saved.add_metric(key, s.seconds_saved)
            load_failures.add_metric(key, s.registry_load_failures)
            if s.registry_objects is not None:
                objects.add_metric(key, s.registry_objects)
                size.add_metric(key, s.registry_bytes or 0)
            duration.add_metric(key, _buckets(s.durations), sum_value=sum(s.durations))
            for dependency, answers in s.dependencies_up.items():
                up.add_metric(key + [dependency], 1.0 if answers else 0.0)
                down_calls.add_metric(key + [dependency], s.dependency_failures.get(dependency, 0))
        for p, n in counts.items():
            by_phase.add_metric([p], n)
        yield from (by_phase, phase, trials, retries, current, best, best_test, max_trials, reused_trials, reused_layers, saved, load_failures,
                    objects, size, duration, up, down_calls)


class _OperatorCollector:
    def __init__(self, api: Any, wakeups: Any):
        self.api, self.wakeups = api, wakeups

    def collect(self):
        from strata.study import sql_statements

        requests = CounterMetricFamily("strata_kube_api_requests", "Kubernetes API requests the operator's "
                                       "reconciles sent (Kopf's own watches and patches not included).",
                                       labels=["resource", "verb"])
        for (resource, verb), n in sorted(dict(self.api.calls).items()):
            requests.add_metric([resource, verb], n)
        statements = CounterMetricFamily("strata_optuna_sql_statements", "SQL statements the operator sent to "
                                         "Optuna's database.")
        statements.add_metric([], sql_statements())
        wakeups = CounterMetricFamily("strata_reconcile_wakeups", "Pod events and spec changes that woke a study's "
                                      "reconcile before its timer.")
        wakeups.add_metric([], self.wakeups.woken)
        yield from (requests, statements, wakeups)


def _buckets(values: list[float]) -> list[tuple[str, float]]:
    result = []
    for bound in DURATION_BUCKETS:
        result.append(("+Inf" if bound == float("inf") else str(bound), sum(1 for v in values if v <= bound)))
    return result


class TimedStorage:
    """Wraps an Optuna storage and times every method call into the latency histogram."""

    def __init__(self, storage: Any, histogram: Histogram):
        self._storage, self._histogram = storage, histogram

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._storage, name)
        if not callable(attr) or name.startswith("_"):
            return attr
        histogram = self._histogram

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                histogram.labels(name).observe(time.perf_counter() - started)

        return timed
