"""End-to-end fixtures: the emulated API, the test kubelet, and the real operator process."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.k8s.fixtures import k8s_api, kubectl, test_kubelet  # noqa: F401
from tests.services import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "hpostudy.yaml"


def secret(name: str, data: dict[str, str], namespace: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


class OperatorProcess:
    """`python -m strata.kube` as a real process, pointed at the emulator by its kubeconfig."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env, self.log = env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "OperatorProcess":
        handle = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "strata.kube", "--verbose"], env=self.env, stdout=handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crashed or evicted operator pod: no cleanup runs."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def cluster_env(k8s_api, kubectl, postgres_url, s3_server, tmp_path) -> dict[str, str]:
    """The CRD applied with kubectl, Secrets for the database and the object store, env for processes."""
    kubectl("apply", "-f", str(CRD))
    k8s_api.create("secrets", secret("strata-db", {"url": postgres_url}))
    k8s_api.create("secrets", secret("strata-s3", {"accessKey": s3_server.access_key, "secretKey": s3_server.secret_key}))
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **k8s_api.env(),
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "STRATA_DATABASE_URL": postgres_url,
        "STRATA_S3_ENDPOINT": s3_server.endpoint,
        "STRATA_S3_ACCESS_KEY": s3_server.access_key,
        "STRATA_S3_SECRET_KEY": s3_server.secret_key,
        "STRATA_METRICS_PORT": "0",
        "STRATA_HEALTH_URL": f"http://127.0.0.1:{free_port()}/healthz",
        "STRATA_RECONCILE_SECONDS": "1",
        "STRATA_CPU_LIMIT": "1",
    }


@pytest.fixture
def operator(cluster_env, tmp_path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster_env, tmp_path / "operator.log").start()
    yield process
    process.stop()
