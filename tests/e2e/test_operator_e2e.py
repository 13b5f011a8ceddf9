"""The operator end to end over HTTP: kubectl applies a study, trainer pods run, status follows."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.k8s.kubelet import LocalKubelet
from tests.services import wait_for

pytestmark = pytest.mark.e2e


def study_manifest(name: str, bucket: str, *, max_trials: int = 4, parallel: int = 2, **spec_overrides) -> dict:
    spec = {
        "searchSpace": {
            "convLayers": {"type": "int", "low": 1, "high": 2},
            "filters": {"type": "categorical", "choices": [8]},
            "fcLayout": {"type": "categorical", "choices": ["32", "64"]},
            "learningRate": {"type": "categorical", "choices": [0.003]},
            "batchSize": {"type": "categorical", "choices": [32]},
        },
        "sampler": {"name": "random", "seed": 1},
        "trials": {"max": max_trials, "parallel": parallel, "maxFailed": 2, "retries": 1},
        "training": {"inputSize": 16, "subsetSize": 300, "epochs": 2, "epochsWhenReusing": 1},
        "storage": {"databaseSecret": {"name": "strata-db", "key": "url"}, "checkpoints": bucket,
                    "objectStoreSecret": "strata-s3"},
        "trainer": {"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1", "memory": "2Gi"}}},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "hpo.strata.dev/v1alpha1", "kind": "HPOStudy", "metadata": {"name": name, "namespace": "default"},
            "spec": spec}


def apply(kubectl, manifest: dict) -> None:
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(manifest))


def study_status(k8s_api, name: str) -> dict:
    obj = k8s_api.get("hpostudies", name) or {}
    return obj.get("status") or {}


def wait_for_phase(k8s_api, operator, name: str, phase: str, timeout: float = 240) -> dict:
    try:
        return wait_for(lambda: (s := study_status(k8s_api, name)).get("phase") == phase and s,
                        timeout=timeout, interval=0.5, message=f"{name} to reach {phase}")
    except TimeoutError as error:
        raise AssertionError(f"{error}; status {study_status(k8s_api, name)}\noperator log:\n{operator.output()[-4000:]}")


def test_a_study_runs_to_exactly_max_trials_with_reuse_and_kubectl_shows_it(
        k8s_api, kubectl, cluster_env, operator, s3_bucket, tmp_path):
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env, max_running=2):
        apply(kubectl, study_manifest("fashion", s3_bucket, max_trials=4))
        status = wait_for_phase(k8s_api, operator, "fashion", "Succeeded")
    assert status["trials"]["finished"] == 4
    assert status["trials"]["complete"] + status["trials"]["pruned"] == 4
    assert status["best"]["value"] > 0
    assert status["reuse"]["trials"] >= 1
    table = kubectl("get", "hpostudies").stdout
    assert "PHASE" in table and "Succeeded" in table and "4/4" in table
    describe = kubectl("describe", "hpostudy", "fashion").stdout
    assert "TrialStarted" in describe and "TrialFinished" in describe
    pods = k8s_api.list("pods", "default")
    assert {p["metadata"]["labels"]["hpo.strata.dev/trial"] for p in pods} >= {"0", "1", "2", "3"}
