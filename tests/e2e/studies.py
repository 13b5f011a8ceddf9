"""What the end-to-end tests say about studies: manifests, kubectl apply, waiting on status, Events, Optuna."""

from __future__ import annotations

import json
from typing import Any, Callable

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from tests.services import wait_for

NAMESPACE = "default"
TERMINAL_POD_PHASES = ("Succeeded", "Failed")


MODES = ("perTrial", "warmWorkers")  # spec.execution.mode: a pod per trial, or worker pods


def study_manifest(name: str, bucket: str, *, max_trials: int = 4, parallel: int = 2, mode: str = "perTrial",
                   **spec_overrides: Any) -> dict:
    """A tiny study (16x16 inputs, 300 images, 1-2 epochs): a grid of 1- and 2-layer networks whose
    2-layer trials reuse the 1-layer ones' conv layer. mode: how its trials run (both are tested)."""
    spec = {
        "searchSpace": {
            "convLayers": {"type": "int", "low": 1, "high": 2},
            "filters": {"type": "categorical", "choices": [8]},
            "fcLayout": {"type": "categorical", "choices": ["32", "64"]},
            "learningRate": {"type": "categorical", "choices": [0.003]},
            "batchSize": {"type": "categorical", "choices": [32]},
        },
        "sampler": {"name": "grid", "seed": 1},
        "trials": {"max": max_trials, "parallel": parallel, "maxFailed": 2, "retries": 1},
        "training": {"inputSize": 16, "subsetSize": 300, "epochs": 2, "epochsWhenReusing": 1},
        "storage": {"databaseSecret": {"name": "strata-db", "key": "url"}, "checkpoints": bucket,
                    "objectStoreSecret": "strata-s3"},
        "trainer": {"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1", "memory": "2Gi"}}},
        "execution": {"mode": mode},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "hpo.strata.dev/v1alpha1", "kind": "HPOStudy",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def apply(kubectl, manifest: dict, *, validate: bool = True) -> None:
    # validate=False: what a cluster's schema would refuse still reaches the emulator (and the operator).
    kubectl("apply", *([] if validate else ["--validate=false"]), "-f", "-", input=yaml.safe_dump(manifest))


def patch_spec(kubectl, name: str, spec: dict) -> None:
    kubectl("patch", "hpostudy", name, "--type", "merge", "-p", json.dumps({"spec": spec}))


def study_status(k8s_api, name: str) -> dict:
    obj = k8s_api.get("hpostudies", name) or {}
    return obj.get("status") or {}


def wait_for_status(k8s_api, operator, name: str, predicate: Callable[[dict], Any], message: str,
                    timeout: float = 90) -> dict:
    """The study's status once predicate(status) holds; on timeout, the status and the operator's log."""
    try:
        return wait_for(lambda: (s := study_status(k8s_api, name)) and predicate(s) and s,
                        timeout=timeout, interval=0.25, message=f"{name}: {message}")
    except TimeoutError as error:
        raise AssertionError(f"{error}; status {json.dumps(study_status(k8s_api, name), indent=1)}\n"
                             f"operator log:\n{operator.output()[-6000:]}") from None


def wait_for_phase(k8s_api, operator, name: str, phase: str, timeout: float = 90) -> dict:
    return wait_for_status(k8s_api, operator, name, lambda s: s.get("phase") == phase, f"phase {phase}", timeout)


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def events(k8s_api, name: str, reason: str | None = None, type_: str | None = None) -> list[dict]:
    """Events about the HPOStudy, oldest first (a repeated event counts as many times as it happened)."""
    obj = k8s_api.get("hpostudies", name)
    found = [e for e in k8s_api.events_for(obj)
             if (reason is None or e.get("reason") == reason) and (type_ is None or e.get("type") == type_)]
    return [e for e in found for _ in range(int(e.get("count") or 1))]


def trial_pods(k8s_api, name: str) -> list[dict]:
    """The study's trial pods (not its data check pod)."""
    return k8s_api.list("pods", NAMESPACE, labels=f"hpo.strata.dev/study={name},hpo.strata.dev/trial")


def worker_pods(k8s_api, name: str) -> list[dict]:
    """The study's worker pods (spec.execution.mode warmWorkers)."""
    return k8s_api.list("pods", NAMESPACE, labels=f"hpo.strata.dev/study={name},hpo.strata.dev/worker")


def study_pods(k8s_api, name: str, mode: str) -> list[dict]:
    """Where the study's trials run: its trial pods, or its worker pods."""
    return worker_pods(k8s_api, name) if mode == "warmWorkers" else trial_pods(k8s_api, name)


def data_check_pods(k8s_api, name: str) -> list[dict]:
    return k8s_api.list("pods", NAMESPACE, labels=f"hpo.strata.dev/study={name},app.kubernetes.io/component=data-check")


def optuna_trials(storage_url: str, name: str) -> list[FrozenTrial]:
    study = optuna.load_study(study_name=f"{NAMESPACE}.{name}", storage=storage_url)
    return study.get_trials(deepcopy=False)


def configurations(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that count towards trials.max: retries of a failed trial do not."""
    return [t for t in trials if "strata.retry_of" not in t.user_attrs]


def assert_exactly(trials: list[FrozenTrial], max_trials: int) -> None:
    """max configurations, all finished, nothing left RUNNING, no configuration trained twice."""
    configs = configurations(trials)
    assert len(configs) == max_trials, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pods = [t.user_attrs["strata.pod"] for t in complete if "strata.pod" in t.user_attrs]
    assert len(pods) == len(set(pods)), f"two complete trials share a pod: {pods}"
    keys = [tuple(sorted(t.params.items())) for t in configs]
    assert len(keys) == len(set(keys)), f"a configuration ran twice: {keys}"
