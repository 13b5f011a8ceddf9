"""Pytest fixtures for tests that need a Kubernetes API: the emulator, kubectl, the test kubelet.

Tests under ``tests/k8s/`` get them through ``tests/k8s/conftest.py``; elsewhere import them into a
conftest (``from tests.k8s.fixtures import k8s_api, kubectl, test_kubelet``) or list
``pytest_plugins = ['tests.k8s.fixtures']`` in the top-level ``tests/conftest.py``.

* ``k8s_api``: a fresh :class:`EmulatedCluster` per test (``.url``, ``.kubeconfig``, ``.get()``,
  ``.list()``, ``.create()``, ``.patch()``, ``.delete()``, ``.events_for()``, ``.request()``,
  ``.env()``, ``.kopf_connection_info()``, ``.kubernetes_client()``). The test fails if the
  emulator itself raised an unexpected error (a 500) while serving it.
* ``kubectl``: ``kubectl('get', 'pods', '-o', 'json')`` runs the real /usr/bin/kubectl against it.
* ``test_kubelet``: a :class:`LocalKubelet` that runs the pods' commands as local processes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from .emulator import EmulatedCluster
from .kubelet import LocalKubelet

KUBECTL = shutil.which('kubectl') or '/usr/bin/kubectl'


class Kubectl(Protocol):
    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 30) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture()
def k8s_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedCluster]:
    """A fresh emulated API server for this test; it fails the test if the emulator itself broke."""
    with EmulatedCluster(tmp_path_factory.mktemp('k8s-api')) as cluster:
        yield cluster
        errors = cluster.internal_errors
    assert not errors, 'The Kubernetes API emulator failed internally:\n' + '\n'.join(errors)


def run_kubectl(cluster: EmulatedCluster, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run kubectl against the emulator; with ``check``, a non-zero exit fails with kubectl's stderr."""
    cache = cluster.workdir / 'kubectl-cache'  # discovery cache per emulator, never in $HOME
    command = [KUBECTL, '--kubeconfig', str(cluster.kubeconfig), '--cache-dir', str(cache), *args]
    env = {**os.environ, **cluster.env(), 'HOME': str(cluster.workdir)}
    result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f'kubectl {" ".join(args)} exited with {result.returncode}:\n'
                             f'{result.stderr}{result.stdout}')
    return result


@pytest.fixture()
def kubectl(k8s_api: EmulatedCluster) -> Kubectl:
    def kubectl(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run_kubectl(k8s_api, *args, **kwargs)
    return kubectl


@pytest.fixture()
def test_kubelet(k8s_api: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKubelet]:
    """A kubelet with default options; for others, use ``with LocalKubelet(k8s_api, dir, ...)``."""
    with LocalKubelet(k8s_api, tmp_path_factory.mktemp('kubelet')) as kubelet:
        yield kubelet
