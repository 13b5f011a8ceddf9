"""The operator's reconcile logic (StudyService) against the Kubernetes API emulator over HTTP.

No Kopf and no kubelet here: the test plays the kubelet by patching pod statuses, and the trainer
by telling Optuna (SQLite), so each pod fate the end-to-end tests cannot easily produce (an
eviction, a pod that vanished, a pruned trial, a goal reached while others still run) is one
reconcile away.
"""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from strata.kube.api import KubeApi
from strata.kube.builders import OperatorSettings, owned_by, study_selector
from strata.kube.reconcile import ReconcileResult, StudyService
from tests.k8s.fixtures import k8s_api  # noqa: F401

NAME, UID = "fates", "6f1c2a9e-0000-4000-8000-0000000000aa"


class Reconciler:
    """One study reconciled the way the Kopf timer does it, with status and events kept between passes."""

    def __init__(self, k8s_api, storage_url: str, name: str = NAME, uid: str = UID, check_data: bool = False,
                 **spec_changes: Any):
        self.name, self.uid = name, uid
        self.client = k8s_api.kubernetes_client()
        self.k8s_api = k8s_api
        # The data check pod (tests/test_data_check.py) is off: these tests play each trial pod's fate.
        self.service = StudyService(KubeApi(self.client), OperatorSettings(trainer_image="trainer:test",
                                                                           check_data=check_data))
        self.spec = {
            "searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 1},
                            "learningRate": {"type": "float", "low": 0.001, "high": 0.1, "log": True}},
            "sampler": {"name": "random", "seed": 3},
            "trials": {"max": 4, "parallel": 2, "maxFailed": 5, "retries": 1},
            "storage": {"optunaUrl": storage_url},
            "execution": {"mode": "perTrial"},  # these tests play each trial pod's fate (worker pods: e2e)
            **spec_changes,
        }
        self.status: dict[str, Any] = {}
        self.events: list[tuple[str, str, str]] = []
        self.storage_url = storage_url

    def reconcile(self) -> ReconcileResult:
        result = self.service.reconcile("default", self.name, self.uid, self.spec, self.status, 1)
        self.status = result.status
        self.events += result.events
        return result

    def pods(self) -> dict[int, dict[str, Any]]:
        return {int(p["metadata"]["labels"]["hpo.strata.dev/trial"]): p
                for p in self.k8s_api.list("pods", "default", labels=study_selector(self.name) + ",hpo.strata.dev/trial")
                if owned_by(p, self.name)}

    def set_pod_status(self, number: int, status: dict[str, Any]) -> None:
        self.k8s_api.patch("pods", self.pods()[number]["metadata"]["name"], {"status": status}, subresource="status")

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=f"default.{self.name}", storage=self.storage_url)

    def reasons(self, reason: str) -> list[str]:
        return [message for _, r, message in self.events if r == reason]

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def reconciler(k8s_api, tmp_path):
    made: list[Reconciler] = []

    def make(**spec_changes: Any) -> Reconciler:
        made.append(Reconciler(k8s_api, f"sqlite:///{tmp_path / 'optuna.db'}", **spec_changes))
        return made[-1]
    yield make
    for r in made:
        r.close()


def terminated(phase: str, code: int, reason: str) -> dict[str, Any]:
    # A container status as a kubelet writes it (the kubernetes client insists on its required fields).
    return {"phase": phase, "containerStatuses": [
        {"name": "trainer", "image": "trainer:test", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": code, "reason": reason}}}]}


def test_an_evicted_pod_fails_its_attempt_and_the_trial_is_retried(reconciler):
    r = reconciler()
    r.reconcile()
    assert sorted(r.pods()) == [0, 1]

    r.set_pod_status(0, {"phase": "Failed", "reason": "Evicted", "message": "node low on memory"})
    r.reconcile()

    trials = r.study().trials
    assert trials[0].state == TrialState.FAIL and "Evicted" in trials[0].user_attrs["fail_reason"]
    retry = [t for t in trials if t.user_attrs.get("strata.retry_of") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params
    assert r.reasons("TrialFailed") and "Evicted" in r.reasons("TrialFailed")[0]
    assert r.reasons("TrialRetried") == [f"trial {retry[0].number} retries trial 0 "
                                         f"(pod {NAME}-trial-{retry[0].number})"]
    assert (r.status["trials"]["failed"], r.status["trials"]["retried"]) == (1, 1)


def test_a_pod_that_vanished_is_a_lost_attempt_and_is_retried(reconciler, k8s_api):
    r = reconciler()
    r.reconcile()
    k8s_api.delete("pods", r.pods()[1]["metadata"]["name"])

    r.reconcile()

    lost = r.study().trials[1]
    assert lost.state == TrialState.FAIL and "Lost" in lost.user_attrs["fail_reason"]
    assert any(t.user_attrs.get("strata.retry_of") == 1 for t in r.study().trials)
    assert len(r.reasons("TrialRetried")) == 1


def test_an_oom_killed_pod_is_reported_with_its_exit_code_and_reason(reconciler):
    r = reconciler(trials={"max": 2, "parallel": 2, "maxFailed": 5, "retries": 0})
    r.reconcile()
    r.set_pod_status(0, terminated("Failed", 137, "OOMKilled"))

    r.reconcile()

    assert r.study().trials[0].user_attrs["fail_reason"] == "trainer exited with code 137 (OOMKilled)"
    assert r.reasons("TrialFailed") == ["trial 0 failed: trainer exited with code 137 (OOMKilled)"]
    assert not r.reasons("TrialRetried")


def test_a_trial_the_trainer_pruned_gets_a_trial_pruned_event(reconciler):
    r = reconciler()
    r.reconcile()
    study = r.study()
    study.tell(0, state=TrialState.PRUNED)  # what the trainer does when the pruner stops it (exit code 3)
    r.set_pod_status(0, terminated("Succeeded", 3, "Completed"))

    r.reconcile()

    assert r.reasons("TrialPruned") == ["trial 0 pruned"]
    assert r.status["trials"]["pruned"] == 1
    assert r.reconcile().events == []  # reported once


def test_reaching_the_goal_deletes_the_pods_still_running_and_ends_the_study(reconciler):
    r = reconciler(objective={"metric": "val_loss", "goal": 0.3})
    r.reconcile()
    r.study().tell(0, 0.25)
    r.set_pod_status(0, terminated("Succeeded", 0, "Completed"))
    r.set_pod_status(1, {"phase": "Running"})

    result = r.reconcile()

    assert (result.status["phase"], result.outcome.reason) == ("Succeeded", "GoalReached")
    assert list(r.pods()) == [0]  # the running trial's pod is gone
    stopped = r.study().trials[1]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["strata.failure_kind"] == "interrupted"
    assert r.status["trials"]["failed"] == 0 and r.status["best"]["number"] == 0
    assert r.reasons("StudySucceeded") == ["trial 0 reached 0.25 (goal 0.3)"]


def test_trainer_pod_options_reach_the_pods_the_api_server_stores(reconciler):
    from tests.test_builders import POD_OPTIONS

    r = reconciler(trainer=POD_OPTIONS)
    r.reconcile()

    pods = r.pods()
    assert sorted(pods) == [0, 1]
    stored = pods[0]
    assert stored["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert stored["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert stored["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert stored["spec"]["priorityClassName"] == "batch-low" and stored["spec"]["runtimeClassName"] == "nvidia"
    assert stored["spec"]["affinity"] == POD_OPTIONS["affinity"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "images", "readOnly": True}} in stored["spec"]["volumes"]
    container = stored["spec"]["containers"][0]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    assert {"name": "HF_HOME", "value": "/data/hf"} in container["env"]


def test_finished_trial_pods_beyond_the_kept_count_are_removed_once_their_logs_are_archived(reconciler, k8s_api,
                                                                                              tmp_path):
    # keepFinishedPods.count 1: of two finished trial pods the newer stays; the older one's log is
    # copied next to the layers (named by the trial's `log` attr), then the pod is deleted.
    k8s_api.handler.pod_logs = lambda namespace, name: f"epoch 1 val_loss 0.5 ({name})\n"
    layers = tmp_path / "layers"
    r = reconciler(trials={"max": 4, "parallel": 2, "maxFailed": 5, "retries": 0},
                   storage={"optunaUrl": f"sqlite:///{tmp_path / 'optuna.db'}", "checkpoints": str(layers)},
                   trainer={"keepFinishedPods": {"count": 1}})
    r.reconcile()
    study = r.study()
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    for number, ended in ((0, now - dt.timedelta(seconds=90)), (1, now - dt.timedelta(seconds=30))):
        study.tell(number, 0.5)
        status = terminated("Succeeded", 0, "Completed")
        status["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = ended.strftime("%Y-%m-%dT%H:%M:%SZ")
        r.set_pod_status(number, status)

    r.reconcile()  # reports both ends (annotates the pods) and starts trials 2 and 3
    r.reconcile()  # removes what is beyond the count

    assert sorted(r.pods()) == [1, 2, 3]
    trial = r.study().trials[0]
    assert trial.state == TrialState.COMPLETE and r.study().user_attrs["logs"] == f"{layers}/logs/default.fates/"
    assert (layers / "logs" / "default.fates" / "trial-00000.log").read_text() == "epoch 1 val_loss 0.5 (fates-trial-0)\n"
    assert not (layers / "logs" / "default.fates" / "trial-00001.log").exists()
    assert not r.reasons("TrialFailed")  # a removed pod of a finished trial is not a lost trial


def end_trial_0_and_clean_up(r: Reconciler) -> None:
    """Trial 0 completes and its pod ends; a pass reports it, the next removes what keepFinishedPods says."""
    r.reconcile()
    r.study().tell(0, 0.5)
    r.set_pod_status(0, terminated("Succeeded", 0, "Completed"))
    r.reconcile()
    r.reconcile()


def test_without_a_store_for_their_logs_finished_pods_stay(reconciler, k8s_api):
    k8s_api.handler.pod_logs = lambda namespace, name: "log\n"
    r = reconciler(trials={"max": 3, "parallel": 1, "maxFailed": 5, "retries": 0},
                   trainer={"keepFinishedPods": {"count": 0}})
    end_trial_0_and_clean_up(r)
    assert 0 in r.pods()


def test_with_reuse_off_the_checkpoint_store_still_keeps_removed_pods_logs(reconciler, k8s_api, tmp_path):
    k8s_api.handler.pod_logs = lambda namespace, name: f"log of {name}\n"
    layers = tmp_path / "layers"
    r = reconciler(trials={"max": 3, "parallel": 1, "maxFailed": 5, "retries": 0}, reuse={"enabled": False},
                   storage={"optunaUrl": f"sqlite:///{tmp_path / 'optuna.db'}", "checkpoints": str(layers)},
                   trainer={"keepFinishedPods": {"count": 0}})
    end_trial_0_and_clean_up(r)
    assert 0 not in r.pods()
    assert (layers / "logs" / "default.fates" / "trial-00000.log").read_text() == "log of fates-trial-0\n"
