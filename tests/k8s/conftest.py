"""The Kubernetes fixtures for the tests in this folder (other folders: see fixtures.py)."""
from .fixtures import k8s_api, kubectl, test_kubelet  # noqa: F401
