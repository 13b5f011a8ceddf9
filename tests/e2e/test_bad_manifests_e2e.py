"""Bad manifests get one clear error each where the user looks, and the operator carries on.

The emulator, unlike an API server, enforces no CRD schema: these reach the operator as written,
so its own validation (the spec model) and its Secret checks must catch them.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.studies import apply, condition, events, study_manifest, study_status, trial_pods, wait_for_phase, \
    wait_for_status
from tests.k8s.kubelet import LocalKubelet

pytestmark = pytest.mark.e2e

TRIALS = {"max": 1, "parallel": 1, "maxFailed": 1, "retries": 0}
# name -> (spec changes, phase, reason, what the message must name)
BAD = {
    "wrong-type": ({"trials": {**TRIALS, "max": "four"}}, "Invalid", "InvalidSpec", "spec.trials.max"),
    "unknown-sampler": ({"sampler": {"name": "bayes"}}, "Invalid", "InvalidSpec", "spec.sampler.name"),
    "negative-count": ({"trials": {**TRIALS, "parallel": -1}}, "Invalid", "InvalidSpec", "spec.trials.parallel"),
    "missing-secret": ({"storage": {"databaseSecret": {"name": "no-such-secret", "key": "url"}}},
                       "Error", "SecretNotFound", "spec.storage.databaseSecret"),
}


def test_bad_manifests_each_get_one_clear_error_and_a_good_study_still_runs(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    for name, (changes, *_) in BAD.items():
        apply(kubectl, study_manifest(name, s3_bucket, **{"trials": TRIALS, **changes}), validate=False)

    for name, (_, phase, reason, field) in BAD.items():
        status = wait_for_phase(k8s_api, operator, name, phase, timeout=30)
        ready = condition(status, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", reason), ready
        assert field in ready["message"] and status["message"] == ready["message"]
    missing = study_status(k8s_api, "missing-secret")["message"]
    assert "no-such-secret" in missing, missing

    time.sleep(4)  # four reconcile intervals: the timer must not repeat the warning every tick
    for name, (_, phase, reason, field) in BAD.items():
        warnings = events(k8s_api, name, type_="Warning")
        assert [(e["reason"], field in e["message"]) for e in warnings] == [(reason, True)], (name, warnings)
        assert study_status(k8s_api, name)["phase"] == phase
        assert trial_pods(k8s_api, name) == []
    assert operator.proc.poll() is None, "the operator exited"
    assert "Traceback" not in operator.output(), operator.output()[-6000:]

    # the operator keeps reconciling: a good study applied afterwards runs to the end
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env):
        apply(kubectl, study_manifest("healthy", s3_bucket, max_trials=1, parallel=1,
                                      searchSpace={"convLayers": {"type": "int", "low": 1, "high": 1},
                                                   "filters": {"type": "categorical", "choices": [8]}}))
        status = wait_for_phase(k8s_api, operator, "healthy", "Succeeded", timeout=60)
    assert status["completed"] == "1/1" and condition(status, "Ready")["status"] == "True"

    # fixing a manifest clears its error (a new Secret, no new Warning)
    from tests.e2e.conftest import secret
    k8s_api.create("secrets", secret("no-such-secret", {"url": postgres_url}))
    status = wait_for_status(k8s_api, operator, "missing-secret", lambda s: s.get("phase") not in ("Error", None),
                             "the Secret to be found", timeout=30)
    assert condition(status, "Ready")["status"] == "True"
    assert len(events(k8s_api, "missing-secret", type_="Warning")) == 1
