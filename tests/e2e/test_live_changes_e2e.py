"""Spec changes apply to a running study: suspend and resume, more trials for a finished one, more
parallel pods, and a delete that takes the Optuna study and the study's checkpoints with it."""

from __future__ import annotations

import time

import optuna
import pytest

from strata.objectstore import open_object_store
from strata.registry import LayerRegistry
from tests.e2e.studies import (
    apply, assert_exactly, condition, events, optuna_trials, patch_spec, study_manifest, trial_pods, wait_for_phase,
    wait_for_status,
)
from tests.k8s.kubelet import LocalKubelet
from tests.services import wait_for

pytestmark = pytest.mark.e2e


def pod_names(k8s_api) -> set[str]:
    return {p["metadata"]["name"] for p in trial_pods(k8s_api, "live")}


def test_suspend_resume_more_trials_more_parallel_pods_and_a_delete_that_keeps_nothing(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    trials = {"max": 2, "parallel": 1, "maxFailed": 1, "retries": 0}
    manifest = study_manifest("live", s3_bucket, trials=trials)
    manifest["spec"]["searchSpace"]["learningRate"]["choices"] = [0.003, 0.01]  # a grid of 8
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env) as kubelet:
        apply(kubectl, manifest)
        wait_for(lambda: kubelet.running, timeout=30, message="the first trainer to run")

        patch_spec(kubectl, "live", {"suspend": True})
        status = wait_for_phase(k8s_api, operator, "live", "Suspended", timeout=30)
        assert condition(status, "Running")["status"] == "False"
        suspended_pods = pod_names(k8s_api)
        # the running trial finishes; nothing new starts, however many reconciles pass
        wait_for(lambda: not kubelet.running, timeout=60, message="the running trainer to finish")
        time.sleep(4)
        assert pod_names(k8s_api) == suspended_pods
        status = wait_for_status(k8s_api, operator, "live", lambda s: s["trials"]["running"] == 0, "no trial running")
        assert status["phase"] == "Suspended" and status["trials"]["finished"] == len(suspended_pods)

        patch_spec(kubectl, "live", {"suspend": False})
        status = wait_for_status(k8s_api, operator, "live",
                                 lambda s: s.get("phase") == "Succeeded" and s["observedGeneration"] >= 3,
                                 "Succeeded after resuming")
        assert status["completed"] == "2/2"
        assert suspended_pods < pod_names(k8s_api)

        # a finished study given a higher max continues to it
        patch_spec(kubectl, "live", {"trials": {**trials, "max": 3}})
        status = wait_for_status(k8s_api, operator, "live",
                                 lambda s: s.get("phase") == "Succeeded" and s["trials"]["max"] == 3,
                                 "Succeeded with max 3")
        assert status["completed"] == "3/3" and status["trials"]["complete"] == 3
        assert len(pod_names(k8s_api)) == 3 and kubelet.peak_running == 1

        # more parallel pods: two at once from now on
        patch_spec(kubectl, "live", {"trials": {**trials, "max": 7, "parallel": 2}})
        status = wait_for_status(k8s_api, operator, "live",
                                 lambda s: s.get("phase") == "Succeeded" and s["trials"]["max"] == 7,
                                 "Succeeded with max 7", timeout=150)
    assert status["completed"] == "7/7" and status["trials"]["complete"] == 7
    assert kubelet.peak_running == 2
    assert_exactly(optuna_trials(postgres_url, "live"), 7)
    assert len(events(k8s_api, "live", "TrialStarted")) == 7
    assert len(events(k8s_api, "live", "StudySucceeded")) == 3  # once per time it finished

    # keepOnDelete: false, then delete: the Optuna study and this study's checkpoints go with it
    registry = LayerRegistry(open_object_store(s3_bucket))
    assert registry.usage(study="default.live")[0] > 0
    patch_spec(kubectl, "live", {"storage": {"keepOnDelete": False}})
    wait_for(lambda: k8s_api.get("hpostudies", "live")["spec"]["storage"]["keepOnDelete"] is False, timeout=10,
             message="the patch")
    kubectl("delete", "hpostudy", "live", "--wait=false")
    wait_for(lambda: k8s_api.get("hpostudies", "live") is None, timeout=15, interval=0.2,
             message="the finalizer to let the study go")
    assert "default.live" not in optuna.get_all_study_names(storage=postgres_url)
    assert registry.usage(study="default.live") == (0, 0)
