"""Trainer pods that die: a crashed attempt is retried; too many failures end the study as Failed."""

from __future__ import annotations

import re
import time

import pytest

from strata.kube.builders import trial_pod_name
from tests.e2e.studies import (
    TERMINAL_POD_PHASES, apply, assert_exactly, condition, configurations, events, optuna_trials, study_manifest,
    trial_pods, wait_for_phase,
)
from tests.k8s.kubelet import LocalKubelet
from tests.services import wait_for

pytestmark = pytest.mark.e2e

ONE_LAYER_SPACE = {
    "convLayers": {"type": "int", "low": 1, "high": 1},
    "filters": {"type": "categorical", "choices": [8]},
    "fcLayout": {"type": "categorical", "choices": ["32", "64"]},
}


def test_a_trainer_killed_for_memory_is_retried_and_the_study_still_completes(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env) as kubelet:
        kubelet.simulate_oom(trial_pod_name("crashy", 0), after=1.0)  # only the first attempt of trial 0
        apply(kubectl, study_manifest("crashy", s3_bucket, max_trials=2, parallel=2, searchSpace=ONE_LAYER_SPACE,
                                      trials={"max": 2, "parallel": 2, "maxFailed": 2, "retries": 1}))
        status = wait_for_phase(k8s_api, operator, "crashy", "Succeeded")

    assert status["trials"]["failed"] >= 1
    assert status["trials"]["finished"] == 2 and status["trials"]["complete"] == 2 and status["completed"] == "2/2"
    [failed] = events(k8s_api, "crashy", "TrialFailed")
    assert failed["type"] == "Warning" and "trial 0 failed" in failed["message"] and "OOMKilled" in failed["message"]
    [retried] = events(k8s_api, "crashy", "TrialRetried")
    assert retried["type"] == "Normal" and "retries trial 0" in retried["message"]
    assert condition(status, "Complete")["status"] == "True"
    assert condition(status, "Failed")["status"] == "False"

    trials = optuna_trials(postgres_url, "crashy")
    assert_exactly(trials, 2)
    [retry] = [t for t in trials if "strata.retry_of" in t.user_attrs]
    assert retry.user_attrs["strata.retry_of"] == 0 and retry.state.name == "COMPLETE"
    assert trials[0].state.name == "FAIL" and "OOMKilled" in trials[0].user_attrs["fail_reason"]
    assert retry.params == trials[0].params


def test_the_failure_budget_ends_a_study_as_failed_with_a_clear_message_and_no_pods_running(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env) as kubelet:
        for number in range(10):  # every attempt is OOM-killed at once
            kubelet.simulate_oom(trial_pod_name("doomed", number), after=0.0)
        apply(kubectl, study_manifest("doomed", s3_bucket, max_trials=4, parallel=2, searchSpace=ONE_LAYER_SPACE,
                                      trials={"max": 4, "parallel": 2, "maxFailed": 1, "retries": 0}))
        status = wait_for_phase(k8s_api, operator, "doomed", "Failed")
        wait_for(lambda: not kubelet.running, timeout=20, message="no trainer process left")
        wait_for(lambda: all((p.get("status") or {}).get("phase") in TERMINAL_POD_PHASES
                             for p in trial_pods(k8s_api, "doomed")), timeout=20, message="every pod terminal")

    # both first pods die together; a third may start between their reports, never after the end
    assert re.fullmatch(r"[23] trial attempts failed, more than maxFailed=1", status["message"]), status["message"]
    failed = condition(status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "FailureBudgetExceeded")
    assert "maxFailed=1" in failed["message"]
    assert condition(status, "Complete")["status"] == "False"
    assert condition(status, "Running")["status"] == "False"
    [warning] = events(k8s_api, "doomed", "StudyFailed")
    assert warning["type"] == "Warning" and "maxFailed=1" in warning["message"]
    assert len(events(k8s_api, "doomed", "TrialFailed", type_="Warning")) == status["trials"]["failed"]
    assert not events(k8s_api, "doomed", "TrialRetried")  # retries: 0

    trials = optuna_trials(postgres_url, "doomed")
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert len(configurations(trials)) <= 4
    pods = {p["metadata"]["name"] for p in trial_pods(k8s_api, "doomed")}
    assert 2 <= len(pods) <= 3
    time.sleep(3)  # three reconcile intervals: a Failed study starts nothing
    assert {p["metadata"]["name"] for p in trial_pods(k8s_api, "doomed")} == pods
    assert len(events(k8s_api, "doomed", "StudyFailed")) == 1
