"""The operator end to end over HTTP: kubectl applies a study, trainer pods run, status follows."""

from __future__ import annotations

import re

import optuna
import pytest
from optuna.trial import TrialState

from tests.e2e.studies import (
    MODES, apply, assert_exactly, events, optuna_trials, study_manifest, study_pods, wait_for_phase,
)
from tests.k8s.kubelet import LocalKubelet
from tests.services import wait_for

pytestmark = pytest.mark.e2e


def reused_weights_match_their_donors(storage_url: str, study_name: str, location: str) -> int:
    """For every trial that reused k frozen layers: the first k layers it published are the donor's,
    tensor for tensor, read back from the S3 layer registry. Returns how many trials were checked."""
    import torch

    from strata.families import architecture_from_params
    from strata.objectstore import open_object_store
    from strata.registry import LayerRegistry
    from strata.study import load_study
    from strata_trainer.checkpoints import prefix_from_bytes

    study, spec = load_study(study_name, storage_url)
    registry = LayerRegistry(open_object_store(location))

    def published(trial_number: int, signature) -> dict[str, torch.Tensor]:
        [entry] = [d for d in registry.donors(signature) if d.study == study_name and d.trial_number == trial_number]
        return prefix_from_bytes(registry.load_weights(entry))

    checked = 0
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        k = int(trial.user_attrs.get("reused_layers") or 0)
        if not k:
            continue
        arch = architecture_from_params(spec, trial.params)
        donor = published(int(trial.user_attrs["donor_trial"]), arch.prefix_signature(k))
        own = published(trial.number, arch.prefix_signature(k + 1))
        assert set(donor) and set(donor) < set(own)
        for name, tensor in donor.items():
            assert torch.equal(own[name], tensor), f"trial {trial.number}: {name} differs from its donor's"
        checked += 1
    return checked


def operator_api_calls(k8s_api) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every request the operator process made (Kopf's and the kubernetes
    client's User-Agents; kubectl and the test kubelet have their own), as RBAC names them."""
    calls = set()
    for request in k8s_api.requests:
        agent = request.headers.get("User-Agent", "")
        if not agent.startswith(("kopf/", "OpenAPI-Generator/")) or request.resource is None \
                or not request.resource.plural:
            continue  # another client, or discovery (granted to every account by system:discovery)
        watching = request.params.get("watch") in ("true", "1")
        verb = {"GET": "watch" if watching else ("get" if request.name else "list"), "POST": "create",
                "PATCH": "patch", "PUT": "update", "DELETE": "delete" if request.name else "deletecollection"}
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        calls.add((request.resource.group, resource, verb[request.method]))
    return calls


def test_a_resnet_depth_search_runs_in_worker_pods_reusing_the_stem_and_first_blocks(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    """A non-paper family through the operator: ResNet-8 and ResNet-14, the deeper one taking the
    shallower one's stem and first block from the S3 registry; the best trial's test accuracy in status."""
    manifest = study_manifest(
        "resnets", s3_bucket, max_trials=2, parallel=1, mode="warmWorkers",
        model={"family": "resnet"},
        searchSpace={"depth": {"type": "categorical", "choices": [8, 14]},
                     "learningRate": {"type": "categorical", "choices": [0.01]}},
        training={"inputSize": 16, "subsetSize": 300, "epochs": 1, "optimizer": "sgd", "weightDecay": 0.0005})
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env, max_running=2):
        apply(kubectl, manifest)
        status = wait_for_phase(k8s_api, operator, "resnets", "Succeeded", timeout=150)

    trials = {t.params["depth"]: t for t in optuna_trials(postgres_url, "resnets")}
    assert status["completed"] == "2/2" and status["reuse"]["trials"] == 1
    assert trials[14].user_attrs["reused_layers"] == 2 and trials[14].user_attrs["model"] == "resnet-14"
    assert reused_weights_match_their_donors(postgres_url, "default.resnets", s3_bucket) == 1
    best = trials[int(status["best"]["params"]["depth"])]
    assert status["best"]["testAccuracy"] == pytest.approx(best.user_attrs["test_accuracy"])
    assert status["best"]["model"] == best.user_attrs["model"]
    assert not events(k8s_api, "resnets", type_="Warning")


@pytest.mark.parametrize("mode", MODES)
def test_a_study_runs_to_exactly_max_trials_reusing_its_donors_weights_and_kubectl_shows_it(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path, mode):
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env, max_running=2) as kubelet:
        apply(kubectl, study_manifest("fashion", s3_bucket, max_trials=4, mode=mode))
        status = wait_for_phase(k8s_api, operator, "fashion", "Succeeded")
    assert kubelet.peak_running <= 2  # trainer pods, or worker pods (each running one trial at a time)
    assert status["trials"]["finished"] == 4 and status["completed"] == "4/4"
    assert status["trials"]["complete"] == 4 and status["trials"]["running"] == 0
    assert status["best"]["value"] > 0
    assert status["reuse"]["trials"] >= 1
    trials = optuna_trials(postgres_url, "fashion")
    assert_exactly(trials, 4)
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert status["best"]["number"] == best.number and status["best"]["value"] == pytest.approx(best.value)

    # the reused layers are the donor's weights, byte for byte through the registry
    assert reused_weights_match_their_donors(postgres_url, "default.fashion", s3_bucket) == status["reuse"]["trials"]

    # kubectl get: the printer columns
    header, row = kubectl("get", "hpostudies").stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "COMPLETED", "RUNNING", "BEST", "REUSED", "AGE"]
    name, phase, completed, running, best_value, reused, _age = row.split()
    assert (name, phase, completed, running) == ("fashion", "Succeeded", "4/4", "0")
    assert float(best_value) == pytest.approx(status["best"]["value"], rel=1e-3)
    assert int(reused) == status["reuse"]["trials"]
    assert kubectl("get", "hpo", "fashion", "-o", "name").stdout.strip() == "hpostudy.hpo.strata.dev/fashion"

    # kubectl describe: conditions and the trials' events
    describe = kubectl("describe", "hpostudy", "fashion").stdout
    assert "Conditions:" in describe
    for type_, value in (("Ready", "True"), ("Complete", "True"), ("Running", "False"), ("Failed", "False")):
        assert re.search(rf"Status:\s+{value}\s+Type:\s+{type_}\b", describe), f"{type_}={value}:\n{describe}"
    assert "TrialStarted" in describe and "TrialFinished" in describe and "StudySucceeded" in describe
    assert len(events(k8s_api, "fashion", "TrialStarted")) == 4
    assert len(events(k8s_api, "fashion", "TrialFinished")) == 4
    assert len(events(k8s_api, "fashion", "StudySucceeded")) == 1
    assert not events(k8s_api, "fashion", type_="Warning")

    # kubectl delete: the finalizer removes the trainer pods, the Optuna study stays (keepOnDelete)
    pods = {p["metadata"]["name"] for p in study_pods(k8s_api, "fashion", mode)}
    if mode == "perTrial":
        assert len(pods) == 4
    else:  # the worker pods went when the study ended; every trial ran in one of at most 2 of them
        workers = {t.user_attrs["strata.worker"] for t in trials}
        assert pods == set() and 1 <= len(workers) <= 2, workers
    assert "hpo.strata.dev/finalizer" in k8s_api.get("hpostudies", "fashion")["metadata"]["finalizers"]
    # --wait=false: kubectl's own wait races the emulator's watch replay under load; poll the API instead
    assert "deleted" in kubectl("delete", "hpostudy", "fashion", "--wait=false").stdout
    try:
        # within seconds, even when the delete lands during a reconcile (Kopf waited 60 s for the timer before)
        wait_for(lambda: k8s_api.get("hpostudies", "fashion") is None, timeout=15, interval=0.2,
                 message="the finalizer to let the study go")
    except TimeoutError:
        left = (k8s_api.get("hpostudies", "fashion") or {}).get("metadata")
        trail = [line for line in operator.output().splitlines()
                 if "inaliz" in line or "atch" in line or "elet" in line][-40:]
        pytest.fail(f"the study was not removed; metadata {left}; operator:\n" + "\n".join(trail))
    assert study_pods(k8s_api, "fashion", mode) == []
    deleted_by_operator = {r.name for r in k8s_api.requests if r.method == "DELETE" and r.resource
                           and r.resource.plural == "pods"}
    assert pods <= deleted_by_operator  # not left to garbage collection
    if mode == "warmWorkers":
        assert workers <= deleted_by_operator
    kept = optuna.load_study(study_name="default.fashion", storage=postgres_url)
    assert len(kept.trials) == len(trials)
    assert "Traceback" not in operator.output(), operator.output()[-6000:]

    # RBAC: every call the operator made in this whole life cycle is granted by the chart, in either scope
    from tests.test_chart import granted, manifests

    made = operator_api_calls(k8s_api)
    assert {("", "pods", "create"), ("", "pods", "delete"), ("", "secrets", "get"),
            ("hpo.strata.dev", "hpostudies", "watch"), ("hpo.strata.dev", "hpostudies/status", "patch"),
            ("", "events", "create")} <= made, made
    for scope in ("cluster", "namespace"):
        missing = made - granted(manifests({"rbac": {"scope": scope}}))
        assert not missing, f"{scope} RBAC lacks {sorted(missing)}"
