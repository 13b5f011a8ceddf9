"""Prometheus metrics: names, bounded labels, and values derived from Optuna snapshots."""

from __future__ import annotations

import optuna
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from strata.metrics import StrataMetrics, StudySnapshot, TimedStorage

ALLOWED_LABELS = {"namespace", "study", "phase", "state", "method", "le"}


def samples(metrics: StrataMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    result = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def snapshot(**overrides) -> StudySnapshot:
    base = dict(phase="Running", complete=5, pruned=2, failed=1, retried=1, running=2, waiting=1, best_value=0.41,
                reused_trials=4, reused_layers=6, seconds_saved=12.5, registry_load_failures=1,
                durations=[3.0, 8.0, 45.0], registry_objects=9, registry_bytes=4096, max_trials=20)
    base.update(overrides)
    return StudySnapshot(**base)


def test_a_study_snapshot_becomes_counters_gauges_and_a_histogram():
    metrics = StrataMetrics()
    metrics.update("team-a", "fashion", snapshot())
    s = samples(metrics)

    def at(name: str, **labels: str) -> float:
        return s[(name, tuple(sorted({"namespace": "team-a", "study": "fashion", **labels}.items())))]

    assert at("strata_trials_total", state="complete") == 5
    assert at("strata_trials_total", state="failed") == 1
    assert at("strata_trial_retries_total") == 1
    assert at("strata_trials_current", state="running") == 2
    assert at("strata_best_objective_value") == 0.41
    assert at("strata_trials_max") == 20
    assert at("strata_reused_trials_total") == 4
    assert at("strata_training_seconds_saved_total") == 12.5
    assert at("strata_registry_bytes") == 4096
    assert at("strata_registry_load_failures_total") == 1
    assert at("strata_trial_duration_seconds_count") == 3
    assert at("strata_trial_duration_seconds_bucket", le="10.0") == 2
    assert at("strata_study_phase", phase="Running") == 1
    assert s[("strata_studies", (("phase", "Running"),))] == 1

def test_labels_are_bounded_never_a_trial_number():
    metrics = StrataMetrics()
    for i in range(3):
        metrics.update("ns", f"study-{i}", snapshot())
    with metrics.reconcile("ns", "study-0"):
        pass
    labels = {name for (_, pairs) in samples(metrics) for name, _ in pairs}
    assert labels <= ALLOWED_LABELS, labels - ALLOWED_LABELS


def test_a_registry_size_not_measured_this_time_keeps_the_last_measurement():
    metrics = StrataMetrics()
    metrics.update("ns", "s", snapshot(registry_objects=7, registry_bytes=700))
    metrics.update("ns", "s", snapshot(registry_objects=None, registry_bytes=None))
    assert samples(metrics)[("strata_registry_objects", (("namespace", "ns"), ("study", "s")))] == 7


def test_reconcile_errors_are_counted_and_exported_as_zero_before_the_first():
    metrics = StrataMetrics()
    key = ("strata_reconcile_errors_total", (("namespace", "ns"), ("study", "s")))
    with metrics.reconcile("ns", "s"):
        pass
    assert samples(metrics)[key] == 0
    with pytest.raises(RuntimeError):
        with metrics.reconcile("ns", "s"):
            raise RuntimeError("API down")
    assert samples(metrics)[key] == 1
    assert samples(metrics)[("strata_reconcile_duration_seconds_count", ())] == 2


def test_a_forgotten_study_disappears_from_the_metrics():
    metrics = StrataMetrics()
    metrics.update("ns", "gone", snapshot())
    with metrics.reconcile("ns", "gone"):
        pass
    metrics.forget("ns", "gone")
    assert not [k for k in samples(metrics) if ("study", "gone") in k[1]]


def test_optuna_storage_calls_are_timed_by_method(tmp_path):
    metrics = StrataMetrics()
    storage = TimedStorage(optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db"), metrics.storage_seconds)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name="timed")
    trial = study.ask()
    study.tell(trial, 1.0)
    s = samples(metrics)
    assert s[("strata_optuna_storage_call_duration_seconds_count", (("method", "create_new_trial"),))] == 1
    assert s[("strata_optuna_storage_call_duration_seconds_count", (("method", "set_trial_state_values"),))] == 1
    assert study.best_value == 1.0  # the wrapper changes nothing Optuna sees
