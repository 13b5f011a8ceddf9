"""Worker pods (spec.execution.mode warmWorkers) end to end: the operator, the emulator over HTTP and
the test kubelet running each worker pod as a process tree. The guarantees of trial pods, here for
pods that run trial after trial: failures counted and retried, restarts lose and repeat nothing,
timeouts, the failure budget, the goal, suspend, live parallel, several trials on one GPU worker."""

from __future__ import annotations

import time

import pytest
from optuna.trial import TrialState

from strata.study import attr_time
from tests.e2e.conftest import OperatorProcess
from tests.e2e.studies import (
    apply, assert_exactly, condition, events, optuna_trials, patch_spec, study_manifest, wait_for_phase,
    wait_for_status, worker_pods,
)
from tests.k8s.kubelet import LocalKubelet
from tests.services import wait_for

pytestmark = pytest.mark.e2e
LONGER = {"inputSize": 16, "subsetSize": 3000, "epochs": 3, "epochsWhenReusing": 2, "earlyStopPatience": 0}


def claimed(trials, states=(TrialState.RUNNING,)):
    return [t for t in trials if t.state in states and "strata.worker_started" in t.user_attrs]


def claimed_in(postgres_url: str, name: str):
    try:
        return claimed(optuna_trials(postgres_url, name))
    except KeyError:  # the operator has not made the Optuna study yet
        return []


def training_overlaps(trials) -> int:
    """How many pairs of trials trained at the same time (from their own start and end stamps)."""
    spans = [(attr_time(t.user_attrs["strata.training_started"]), t.datetime_complete.timestamp())
             for t in trials if t.state == TrialState.COMPLETE and "strata.training_started" in t.user_attrs]
    return sum(1 for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1])


def test_an_oom_killed_worker_and_a_killed_operator_lose_and_repeat_no_trial(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    manifest = study_manifest("workers", s3_bucket, max_trials=6, parallel=2, mode="warmWorkers", training=LONGER,
                              trials={"max": 6, "parallel": 2, "maxFailed": 2, "retries": 1})
    manifest["spec"]["searchSpace"]["learningRate"]["choices"] = [0.003, 0.01]
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env) as kubelet:
        apply(kubectl, manifest)
        # a worker pod trains a trial: kill it as the kernel would for memory
        victim = wait_for(lambda: next(iter(claimed_in(postgres_url, "workers")), None),
                          timeout=90, interval=0.1, message="a trial claimed by a worker pod")
        pod = victim.user_attrs["strata.worker"]
        assert kubelet.oom_kill(pod)
        wait_for_status(k8s_api, operator, "workers", lambda s: s["trials"]["failed"] >= 1, "the failure counted")
        # then the operator dies mid-study; the workers go on without it
        wait_for_status(k8s_api, operator, "workers", lambda s: s["trials"]["finished"] >= 2, "two trials finished")
        operator.kill()
        time.sleep(3)
        restarted = OperatorProcess(cluster_env, tmp_path / "operator-restarted.log").start()
        try:
            status = wait_for_phase(k8s_api, restarted, "workers", "Succeeded", timeout=150)
            wait_for(lambda: not worker_pods(k8s_api, "workers") and not kubelet.running, timeout=20,
                     message="the worker pods removed and their trainers stopped")
        finally:
            restarted.stop()
    assert kubelet.peak_running <= 3  # 2 workers, and the killed one's replacement starting as it goes

    trials = optuna_trials(postgres_url, "workers")
    assert_exactly(trials, 6)
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == victim.number and failed.user_attrs["strata.failure_kind"] == "infrastructure"
    assert "OOMKilled" in failed.user_attrs["fail_reason"] and pod in failed.user_attrs["fail_reason"]
    (retry,) = [t for t in trials if t.user_attrs.get("strata.retry_of") == failed.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["strata.worker"] != pod
    assert status["trials"]["complete"] == 6 and status["trials"]["failed"] == 1
    assert len(events(k8s_api, "workers", "TrialStarted")) == 6
    assert len(events(k8s_api, "workers", "TrialRetried")) == 1
    assert len(events(k8s_api, "workers", "TrialFinished")) == 6
    [failed_event] = events(k8s_api, "workers", "TrialFailed")
    assert "OOMKilled" in failed_event["message"]
    assert len(events(k8s_api, "workers", "StudySucceeded")) == 1
    # each trial was claimed once, by one pod; pods are few and each ran several trials
    workers = [t.user_attrs["strata.worker"] for t in trials]
    assert len(set(workers)) <= 4 and max(workers.count(w) for w in set(workers)) >= 2
    # Optuna's clock of each trial starts when its pod took it, not when it was queued for the pod
    for t in trials:
        assert t.datetime_start.timestamp() >= attr_time(t.user_attrs["strata.worker_started"]) - 0.6, t.number
    assert any(t.user_attrs.get("queued_seconds", 0) >= 0.5 for t in trials)  # a queued one waited for a slot
    for log in (operator.output(), restarted.output()):
        assert "Traceback" not in log, log[-6000:]


def test_suspend_live_parallel_and_the_goal_with_worker_pods(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    trials = {"max": 6, "parallel": 1, "maxFailed": 1, "retries": 0}
    manifest = study_manifest("pausing", s3_bucket, mode="warmWorkers", training=LONGER, trials=trials)
    manifest["spec"]["searchSpace"]["learningRate"]["choices"] = [0.003, 0.01]
    goal = study_manifest("goal", s3_bucket, max_trials=4, parallel=2, mode="warmWorkers",
                          objective={"metric": "val_loss", "direction": "minimize", "goal": 100.0})
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env) as kubelet:
        apply(kubectl, manifest)
        apply(kubectl, goal)
        wait_for(lambda: claimed_in(postgres_url, "pausing"), timeout=90, interval=0.1,
                 message="the first trial claimed")
        patch_spec(kubectl, "pausing", {"suspend": True})
        wait_for_phase(k8s_api, operator, "pausing", "Suspended", timeout=30)
        # the running trial finishes, the idle worker pod goes, nothing new is claimed
        status = wait_for_status(k8s_api, operator, "pausing", lambda s: s["trials"]["running"] == 0
                                 and not worker_pods(k8s_api, "pausing"), "no trial running, no worker pod",
                                 timeout=60)
        finished = status["trials"]["finished"]
        time.sleep(3)
        assert study_finished(k8s_api, "pausing") == finished and not worker_pods(k8s_api, "pausing")

        patch_spec(kubectl, "pausing", {"suspend": False, "trials": {**trials, "parallel": 2}})
        status = wait_for_phase(k8s_api, operator, "pausing", "Succeeded", timeout=150)
        goal_status = wait_for_phase(k8s_api, operator, "goal", "Succeeded", timeout=60)
        wait_for(lambda: not worker_pods(k8s_api, "pausing") and not worker_pods(k8s_api, "goal"), timeout=20,
                 message="the worker pods removed")

    assert status["completed"] == "6/6" and status["trials"]["complete"] == 6
    done = optuna_trials(postgres_url, "pausing")
    assert_exactly(done, 6)
    assert training_overlaps(done) >= 1  # two at once after parallel went to 2
    assert condition(goal_status, "Complete")["reason"] == "GoalReached"
    goal_trials = optuna_trials(postgres_url, "goal")
    assert not [t for t in goal_trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(t.state == TrialState.COMPLETE for t in goal_trials) >= 1
    assert len(events(k8s_api, "goal", "StudySucceeded")) == 1


def study_finished(k8s_api, name: str) -> int:
    return ((k8s_api.get("hpostudies", name) or {}).get("status") or {}).get("trials", {}).get("finished", 0)


def test_trial_timeouts_count_towards_the_failure_budget_and_stop_only_their_trial(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    manifest = study_manifest("slow", s3_bucket, mode="warmWorkers",
                              training={"inputSize": 16, "subsetSize": 6000, "epochs": 40, "earlyStopPatience": 0},
                              trials={"max": 4, "parallel": 2, "maxFailed": 1, "retries": 0, "timeoutSeconds": 2})
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env) as kubelet:
        apply(kubectl, manifest)
        status = wait_for_phase(k8s_api, operator, "slow", "Failed", timeout=120)
        wait_for(lambda: not worker_pods(k8s_api, "slow") and not kubelet.running, timeout=20,
                 message="the worker pods and their trainers gone")
    assert condition(status, "Failed")["reason"] == "FailureBudgetExceeded"
    trials = optuna_trials(postgres_url, "slow")
    timed_out = [t for t in trials if t.user_attrs.get("strata.failure_kind") == "timeout"]
    assert len(timed_out) >= 2 and all(t.state == TrialState.FAIL for t in timed_out)
    assert all("timeoutSeconds=2" in t.user_attrs["fail_reason"] for t in timed_out)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # a timed-out trial was stopped inside its worker: the worker pod itself was not replaced for it
    assert len({t.user_attrs.get("strata.worker") for t in timed_out}) <= 2


def test_a_gpu_worker_runs_trials_per_gpu_trials_at_once_and_a_delete_stops_it(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    manifest = study_manifest("packed", s3_bucket, max_trials=4, parallel=2, mode="warmWorkers", training=LONGER)
    manifest["spec"]["execution"]["trialsPerGpu"] = 2
    manifest["spec"]["searchSpace"]["learningRate"]["choices"] = [0.003, 0.01]  # a grid of 8 for the second run
    manifest["spec"]["trainer"]["gpu"] = {"enabled": True, "count": 1}
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env) as kubelet:
        apply(kubectl, manifest)
        status = wait_for_phase(k8s_api, operator, "packed", "Succeeded", timeout=150)
        trials = optuna_trials(postgres_url, "packed")
        assert_exactly(trials, 4)
        workers = {t.user_attrs["strata.worker"] for t in trials}
        assert len(workers) == 1 and "-gpu-worker-" in next(iter(workers))  # one GPU pod held both slots
        assert training_overlaps(trials) >= 1  # two trials trained on it at once
        made = [p for p in k8s_api.list("pods", "default", labels="hpo.strata.dev/study=packed,hpo.strata.dev/worker")]
        assert made == []  # removed at the end
        pods = {r.name for r in k8s_api.requests if r.method == "DELETE" and r.resource and r.resource.plural == "pods"
                and r.name and "-worker-" in r.name}
        assert pods == workers  # one pod (its two trainer processes inside), made once, removed once
        assert status["trials"]["complete"] == 4

        # a second run of the same study, deleted while it trains: its worker pod and trainers stop
        patch_spec(kubectl, "packed", {"trials": {"max": 8, "parallel": 2, "maxFailed": 2, "retries": 1}})
        wait_for(lambda: claimed_in(postgres_url, "packed"), timeout=60, interval=0.1,
                 message="a trial claimed again")
        kubectl("delete", "hpostudy", "packed", "--wait=false")
        wait_for(lambda: k8s_api.get("hpostudies", "packed") is None and not worker_pods(k8s_api, "packed")
                 and not kubelet.running, timeout=30, interval=0.2, message="the study, its pods and trainers gone")
