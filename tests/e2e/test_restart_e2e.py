"""The operator killed mid-study (SIGKILL, as an evicted pod) and started again finishes the study."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from tests.e2e.conftest import OperatorProcess
from tests.e2e.studies import (
    apply, assert_exactly, events, optuna_trials, study_manifest, trial_pods, wait_for_phase, wait_for_status,
)
from tests.k8s.kubelet import LocalKubelet
from tests.services import wait_for

pytestmark = pytest.mark.e2e


def test_an_operator_killed_mid_study_and_restarted_finishes_it_with_no_trial_lost_or_repeated(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env, max_running=2) as kubelet:
        apply(kubectl, study_manifest("resilient", s3_bucket, max_trials=4, parallel=2))
        # mid-study: a trial has finished and others are training
        wait_for_status(k8s_api, operator, "resilient",
                        lambda s: (s.get("trials") or {}).get("finished", 0) >= 1 and kubelet.running,
                        "one trial finished while another trains")
        operator.kill()
        pods_at_kill = {p["metadata"]["name"] for p in trial_pods(k8s_api, "resilient")}
        # the trainers go on without the operator; let one finish unobserved
        wait_for(lambda: not kubelet.running, timeout=60, message="the running trainers to finish")

        restarted = OperatorProcess(cluster_env, tmp_path / "operator-restarted.log").start()
        try:
            status = wait_for_phase(k8s_api, restarted, "resilient", "Succeeded")
        finally:
            restarted.stop()

    assert status["trials"]["finished"] == 4 and status["trials"]["complete"] == 4
    assert status["trials"]["failed"] == 0
    trials = optuna_trials(postgres_url, "resilient")
    assert_exactly(trials, 4)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # nothing failed, retried or duplicated
    pods = trial_pods(k8s_api, "resilient")
    assert sorted(p["metadata"]["labels"]["hpo.strata.dev/trial"] for p in pods) == ["0", "1", "2", "3"]
    assert pods_at_kill <= {p["metadata"]["name"] for p in pods}  # the restart did not replace them
    assert {t.user_attrs["strata.pod"] for t in trials} == {p["metadata"]["name"] for p in pods}
    assert len(events(k8s_api, "resilient", "TrialStarted")) == 4
    assert len(events(k8s_api, "resilient", "StudySucceeded")) == 1
    assert "Traceback" not in restarted.output(), restarted.output()[-6000:]
