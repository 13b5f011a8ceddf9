"""What the fault campaign found in the operator's reconcile, each pinned against the emulator over HTTP.

- long study names gave two trials one pod name (a swallowed 409: a study stuck at 10/11 for ever);
- a pod the API refuses must fail its trial with the API's message, never silently;
- Events were lost or posted twice across restarts and overlapping handlers;
- a database or registry outage left Ready=True with no Event, and no reconcile ran for a minute.
"""

from __future__ import annotations

import re
import time

import pytest
from optuna.trial import TrialState

from strata.kube import builders, reconcile as reconcile_module
from strata.kube.api import KubeApi
from strata.kube.builders import OperatorSettings
from strata.kube.reconcile import StudyService
from tests.k8s.fixtures import k8s_api  # noqa: F401
from tests.services import pause_postgres, resume_postgres
from tests.test_reconcile import NAME, UID, Reconciler, reconciler, terminated  # noqa: F401

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def posted(k8s_api, reason: str | None = None, uid: str = UID) -> list[dict]:
    found = k8s_api.list("v1/events", "default", fields=f"involvedObject.uid={uid}")
    return [e for e in found if reason is None or e["reason"] == reason]


# --- names -------------------------------------------------------------------------------------


def study_names() -> list[str]:
    """Valid HPOStudy names (DNS subdomains up to 253) around every boundary that matters."""
    names = ["a", "fashion-quick", "my.study.v2"]
    for length in (52, 53, 54, 55, 56, 60, 62, 63, 64, 100, 200, 253):
        names.append(("s" * (length - 1)) + "x")
        names.append((("ab-" * 100)[:length - 1]) + "z")
        names.append((("a.b-" * 100)[:length - 1]) + "9")
    return names


@pytest.mark.parametrize("name", study_names(), ids=lambda n: f"{len(n)}")
def test_pod_names_and_label_values_are_valid_and_unique_for_every_valid_study_name(name):
    pods = [builders.trial_pod_name(name, n) for n in [*range(12), 99, 100, 1000, 10_000, 123_456]]

    assert len(set(pods)) == len(pods)
    assert all(len(p) <= 63 and DNS_LABEL.fullmatch(p) for p in pods), pods
    label = builders.study_label(name)
    assert len(label) <= 63 and LABEL_VALUE.fullmatch(label)
    assert builders.study_selector(name) == f"hpo.strata.dev/study={label}"


def test_two_long_names_that_share_their_first_60_characters_never_share_pods_or_labels():
    first, second = "x" * 60 + "-first-study", "x" * 60 + "-second-study"

    assert builders.study_label(first) != builders.study_label(second)
    assert {builders.trial_pod_name(first, n) for n in range(50)}.isdisjoint(
        {builders.trial_pod_name(second, n) for n in range(50)})
    assert builders.trial_pod_name("short", 3) == "short-trial-3"  # short names stay readable


@pytest.mark.parametrize("length", [54, 63, 120, 253])
def test_a_study_with_a_long_name_runs_every_trial_in_its_own_pod(reconciler, length):
    name = ("lengthy-name." * 30)[:length - 1] + "z"
    r = reconciler(name=name, trials={"max": 11, "parallel": 11, "maxFailed": 0, "retries": 0})

    r.reconcile()

    pods = r.pods()
    assert sorted(pods) == list(range(11))  # the old names collided: 10 pods, one 409 swallowed
    assert r.status["trials"]["running"] == 11 and r.status["trials"]["waiting"] == 0
    assert all(p["metadata"]["labels"]["hpo.strata.dev/study"] == builders.study_label(name) for p in pods.values())
    assert {t.user_attrs["strata.pod"] for t in r.study().trials} == {p["metadata"]["name"] for p in pods.values()}


def test_two_studies_whose_long_names_share_a_prefix_each_see_only_their_own_pods(reconciler):
    first = reconciler(name="x" * 60 + "-first", uid="11111111-0000-4000-8000-000000000001",
                       trials={"max": 2, "parallel": 2})
    second = reconciler(name="x" * 60 + "-second", uid="22222222-0000-4000-8000-000000000002",
                        trials={"max": 3, "parallel": 3})
    first.reconcile()
    second.reconcile()

    assert sorted(first.pods()) == [0, 1] and sorted(second.pods()) == [0, 1, 2]
    assert first.status["trials"]["running"] == 2 and second.status["trials"]["running"] == 3


# --- a create that fails is never silent --------------------------------------------------------


def test_a_pod_name_taken_by_a_pod_the_study_does_not_own_fails_that_trial_with_a_warning(reconciler, k8s_api):
    k8s_api.create("pods", {"metadata": {"name": f"{NAME}-trial-0"},
                            "spec": {"containers": [{"name": "app", "image": "someone/else"}]}})
    r = reconciler(trials={"max": 2, "parallel": 1, "maxFailed": 5, "retries": 1})

    r.reconcile()

    trial = r.study().trials[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["strata.failure_kind"] == "rejected"
    assert "is taken by a pod this study does not own" in trial.user_attrs["fail_reason"]
    assert len(r.reasons("TrialPodRejected")) == 1 and r.status["trials"]["failed"] == 1
    r.reconcile()
    assert not any(t.user_attrs.get("strata.retry_of") == 0 for t in r.study().trials)  # not retried: it cannot help
    assert 1 in r.pods()  # the study goes on with its next trial


def test_one_refused_pod_among_a_passs_launches_fails_only_its_trial(reconciler, k8s_api):
    # A pass that fills four slots creates their pods side by side (PodExecutor.start_many): the
    # refusal of one is that trial's alone, and each of the others gets its Event, its pod and its attr.
    k8s_api.create("pods", {"metadata": {"name": f"{NAME}-trial-2"},
                            "spec": {"containers": [{"name": "app", "image": "someone/else"}]}})
    r = reconciler(trials={"max": 6, "parallel": 4, "maxFailed": 5, "retries": 0})

    r.reconcile()

    trials = r.study().trials
    assert sorted(r.pods()) == [0, 1, 3]  # the pod named trial-2 is someone else's, not listed as ours
    assert trials[2].state == TrialState.FAIL and trials[2].user_attrs["strata.failure_kind"] == "rejected"
    assert {t.number: t.user_attrs.get("strata.pod") for t in trials if t.number != 2} == {
        0: f"{NAME}-trial-0", 1: f"{NAME}-trial-1", 3: f"{NAME}-trial-3"}
    assert sorted(r.reasons("TrialStarted")) == sorted(f"trial {n} started in pod {NAME}-trial-{n}"
                                                        for n in (0, 1, 2, 3))
    assert len(r.reasons("TrialPodRejected")) == 1 and r.status["trials"]["running"] == 3


def test_a_pod_the_api_refuses_as_invalid_fails_its_trial_once_with_the_apis_message(reconciler, k8s_api):
    k8s_api.refuse_creates("pods", 422, "Invalid",
                           'Pod "fates-trial-0" is invalid: spec.containers[0].resources.limits[memory]: '
                           'Invalid value: "lots": must be a quantity')
    r = reconciler(trials={"max": 2, "parallel": 1, "maxFailed": 5, "retries": 1})

    r.reconcile()
    r.reconcile()

    trial = r.study().trials[0]
    assert trial.state == TrialState.FAIL and 'Invalid value: "lots"' in trial.user_attrs["fail_reason"]
    assert r.reasons("TrialPodRejected") == [trial.user_attrs["fail_reason"]]
    assert len(posted(k8s_api, "TrialPodRejected")) == 1
    assert 1 in r.pods()


def test_a_quota_refusal_leaves_the_trial_waiting_shows_degraded_once_and_clears_when_pods_fit(reconciler, k8s_api):
    k8s_api.refuse_creates("pods", 403, "Forbidden",
                           'pods "fates-trial-0" is forbidden: exceeded quota: compute, requested: cpu=2', times=2)
    r = reconciler(trials={"max": 1, "parallel": 1})

    r.reconcile()
    degraded = condition(r.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PodCreateFailed")
    assert "exceeded quota" in degraded["message"] and "since" in degraded["message"]
    r.reconcile()
    assert r.pods() == {} and r.study().trials[0].state == TrialState.RUNNING  # waiting, not failed
    assert len(posted(k8s_api, "PodCreateFailed")) == 1  # one Warning for the outage, not one per pass

    r.reconcile()

    assert list(r.pods()) == [0]
    assert condition(r.status, "Degraded")["status"] == "False"
    assert len(posted(k8s_api, "PodCreateRecovered")) == 1
    assert r.status["trials"]["failed"] == 0


# --- every happening posted once ---------------------------------------------------------------


def test_events_are_posted_once_across_a_restart_and_overlapping_reconciles(k8s_api, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = Reconciler(k8s_api, url, trials={"max": 2, "parallel": 2, "maxFailed": 5, "retries": 0})
    first.reconcile()
    stale = dict(first.status)
    study = first.study()
    for number in (0, 1):
        study.tell(number, 0.3 + number)
        first.set_pod_status(number, terminated("Succeeded", 0, "Completed"))
    first.reconcile()  # reports both trials and ends the study
    # The annotation that marks a pod's end as reported was "never written" (the operator died first).
    for pod in first.pods().values():
        k8s_api.patch("pods", pod["metadata"]["name"], {"metadata": {"annotations": {"hpo.strata.dev/reported": None}}})

    # A restarted operator and a handler that still holds the old status reconcile it again.
    restarted = Reconciler(k8s_api, url, trials={"max": 2, "parallel": 2, "maxFailed": 5, "retries": 0})
    restarted.status = stale
    restarted.reconcile()
    restarted.status = stale
    restarted.reconcile()

    reasons = [e["reason"] for e in posted(k8s_api)]
    assert sorted(reasons) == sorted(["TrialStarted", "TrialStarted", "TrialFinished", "TrialFinished",
                                      "StudySucceeded"]), reasons
    assert all(e.get("count", 1) == 1 for e in posted(k8s_api))
    first.close()
    restarted.close()


def test_an_invalid_study_gets_one_warning_however_many_handlers_see_it(k8s_api, tmp_path):
    services = [StudyService(KubeApi(k8s_api.kubernetes_client()), OperatorSettings()) for _ in range(2)]
    spec = {"searchSpace": {"convLayers": {"type": "int", "low": 3, "high": 1}}, "trials": {"max": 2}}

    for service in services * 2:
        result = service.reconcile("default", NAME, UID, spec, {}, 4)  # a stale, empty status each time

    assert result.status["phase"] == "Invalid"
    assert len(posted(k8s_api, "InvalidSpec")) == 1


# --- dependencies down and back ----------------------------------------------------------------


def test_a_database_outage_is_a_condition_one_warning_and_a_metric_and_the_study_resumes(k8s_api, private_postgres):
    url = private_postgres.create_database("optuna")
    r = Reconciler(k8s_api, url, trials={"max": 2, "parallel": 1, "maxFailed": 5, "retries": 0})
    r.reconcile()
    assert list(r.pods()) == [0]
    phase = r.status["phase"]

    pause_postgres(private_postgres)
    started = time.monotonic()
    r.reconcile()
    r.reconcile()
    took = time.monotonic() - started

    assert took < 15, f"two reconciles with the database down took {took:.1f} s"
    ready, degraded = condition(r.status, "Ready"), condition(r.status, "Degraded")
    assert (ready["status"], ready["reason"]) == ("False", "StorageUnreachable")
    assert degraded["status"] == "True" and "database unreachable since" in degraded["message"]
    assert r.status["phase"] == phase  # not failed: the study waits for its database
    assert "Connection refused" in degraded["message"]  # the driver's own words
    assert len(posted(k8s_api, "StorageUnreachable")) == 1
    metrics = r.service.metrics.registry
    labels = {"namespace": "default", "study": NAME, "dependency": "database"}
    assert metrics.get_sample_value("strata_dependency_up", labels) == 0.0
    assert metrics.get_sample_value("strata_dependency_failures_total", labels) >= 2

    resume_postgres(private_postgres)
    study = r.study()
    study.tell(0, 0.4)
    r.set_pod_status(0, terminated("Succeeded", 0, "Completed"))
    r.reconcile()

    assert condition(r.status, "Ready")["status"] == "True" and condition(r.status, "Degraded")["status"] == "False"
    assert len(posted(k8s_api, "StorageReachable")) == 1
    assert r.status["trials"]["complete"] == 1 and 1 in r.pods()  # the study went on at once
    assert metrics.get_sample_value("strata_dependency_up", labels) == 1.0
    r.close()


def test_a_registry_outage_is_a_condition_one_warning_and_a_metric_until_it_is_back(k8s_api, tmp_path, private_s3,
                                                                                   monkeypatch):
    monkeypatch.setattr(reconcile_module, "PROBE_INTERVAL_SECONDS", 0.0)
    monkeypatch.setenv("STRATA_S3_ACCESS_KEY", private_s3.access_key)
    monkeypatch.setenv("STRATA_S3_SECRET_KEY", private_s3.secret_key)
    private_s3.client().make_bucket("layers")
    r = Reconciler(k8s_api, f"sqlite:///{tmp_path / 'optuna.db'}", trials={"max": 3, "parallel": 1},
                   storage={"optunaUrl": f"sqlite:///{tmp_path / 'optuna.db'}", "checkpoints": "s3://layers/x",
                            "s3Endpoint": private_s3.endpoint})
    r.reconcile()
    assert condition(r.status, "Degraded")["status"] == "False"

    private_s3.stop()
    r.reconcile()
    r.reconcile()

    degraded = condition(r.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RegistryUnreachable")
    assert condition(r.status, "Ready")["status"] == "True"  # trials still run, without reuse
    assert len(posted(k8s_api, "RegistryUnreachable")) == 1
    labels = {"namespace": "default", "study": NAME, "dependency": "registry"}
    assert r.service.metrics.registry.get_sample_value("strata_dependency_up", labels) == 0.0

    private_s3.start()
    r.reconcile()

    assert condition(r.status, "Degraded")["status"] == "False"
    assert len(posted(k8s_api, "RegistryReachable")) == 1
    assert r.service.metrics.registry.get_sample_value("strata_dependency_up", labels) == 1.0
    r.close()


# --- operator settings a pod could not have -----------------------------------------------------


@pytest.mark.parametrize("variable, value, words", [
    ("STRATA_GPU_NODE_SELECTOR", '{"gpu": "a b"}', "is not a label value"),
    ("STRATA_CPU_TOLERATIONS", '[{"key": "k", "operator": "In"}]', "operator"),
    ("STRATA_TRAINER_IMAGE", "my trainer", "is not a container image"),
    ("STRATA_DATABASE_SECRET", "Bad_Name/url", "is not a DNS subdomain"),
    ("STRATA_GPU_TOLERATIONS", "[not json", "Expecting value"),
])
def test_an_operator_setting_a_pod_could_not_have_is_refused_at_start_naming_the_variable(variable, value, words):
    from strata.kube.reconcile import SettingsError, settings_from_env

    with pytest.raises(SettingsError) as refused:
        settings_from_env({variable: value})

    assert str(refused.value).startswith(f"{variable}: ") and words in str(refused.value)
    assert "\n" not in str(refused.value)
