"""A database URL with a password never shows: not in the operator's --verbose log, the study's
status, the Events, the pods' specs, the trainers' argv or their logs."""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path

import pytest

from strata.redaction import redact
from tests.e2e.conftest import secret
from tests.e2e.studies import NAMESPACE, apply, study_manifest, trial_pods
from tests.k8s.kubelet import LocalKubelet
from tests.services import wait_for

pytestmark = pytest.mark.e2e


def test_a_database_password_appears_nowhere_the_operator_writes(
        k8s_api, kubectl, cluster_env, operator, postgres_url, s3_bucket, tmp_path):
    # The test cluster trusts every connection: the password is accepted (and ignored) by PostgreSQL.
    decoded = f"E2e@{uuid.uuid4().hex[:10]}-pw"
    encoded = decoded.replace("@", "%40")
    url = postgres_url.replace("postgres@", f"postgres:{encoded}@", 1) + "?application_name=strata-e2e"
    k8s_api.create("secrets", secret("strata-db-pw", {"url": url}))
    manifest = study_manifest("hush", s3_bucket, max_trials=2, parallel=2,
                              searchSpace={"convLayers": {"type": "int", "low": 1, "high": 1},
                                           "filters": {"type": "categorical", "choices": [8]},
                                           "fcLayout": {"type": "categorical", "choices": ["32", "64"]}})
    manifest["spec"]["storage"]["databaseSecret"] = {"name": "strata-db-pw", "key": "url"}

    argvs: list[bytes] = []
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env, max_running=2) as kubelet:
        apply(kubectl, manifest)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            for pod in kubelet.running:  # the trainers' command lines, as `ps` shows them, while they run
                pid = kubelet.pid(pod)
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes() if pid else b""
                except OSError:
                    argv = b""
                if argv and argv not in argvs:
                    argvs.append(argv)
            status = (k8s_api.get("hpostudies", "hush") or {}).get("status") or {}
            if status.get("phase") in ("Succeeded", "Failed"):
                break
            time.sleep(0.1)
        assert status.get("phase") == "Succeeded", f"{status}\noperator log:\n{operator.output()[-6000:]}"
        wait_for(lambda: not kubelet.running, timeout=20, message="the trainers to exit")

    assert status["trials"]["complete"] == 2
    assert argvs and all(b"strata_trainer" in argv for argv in argvs)

    log = operator.output()
    assert " DEBUG " in log or "[DEBUG" in log  # --verbose really was on
    places = {
        "operator log": log,
        "status": kubectl("get", "hpostudy", "hush", "-o", "yaml").stdout,
        "events": kubectl("get", "events", "-n", NAMESPACE, "-o", "yaml").stdout,
        "pods": kubectl("get", "pods", "-n", NAMESPACE, "-o", "yaml").stdout,
        "argv": b"\n".join(argvs).decode(errors="replace").replace("\0", " "),
        "trainer logs": "".join(p.read_text(errors="replace") for p in (tmp_path / "kubelet" / "logs").rglob("*")
                                if p.is_file()),
    }
    secrets = [decoded, encoded, decoded.split("@", 1)[1], url, base64.b64encode(url.encode()).decode()]
    leaks = [(place, s) for place, text in places.items() for s in secrets if s in text]
    assert not leaks, leaks
    assert len(trial_pods(k8s_api, "hush")) == 2
    assert redact(url) not in places["argv"]  # not even redacted: the pods read it from the Secret
