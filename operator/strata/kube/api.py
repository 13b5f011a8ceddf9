"""Kubernetes adapter: the only module that talks to the API server (pods, secrets).

Every verb used here is listed in the Helm chart's RBAC rules (a test checks they agree):
pods: list, create, delete, patch; secrets: get; events: create (named once per happening, so a
second post is a 409 and nothing is posted twice). The HPOStudy itself goes through Kopf.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

# (resource, verb) pairs this module calls: the RBAC test reads this.
VERBS_USED = {("pods", "list"), ("pods", "create"), ("pods", "delete"), ("pods", "patch"), ("secrets", "get"),
              ("events", "create")}


class SecretMissing(LookupError):
    """A Secret (or a key in it) named by the spec or the operator settings does not exist."""


class KubeApi:
    def __init__(self, api_client: client.ApiClient | None = None):
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self.api_client.sanitize_for_serialization(p) for p in pods.items]

    def create_event(self, body: dict[str, Any]) -> bool:
        """Post an Event; False if one of that name exists already (it was posted before a restart)."""
        try:
            self.core.create_namespaced_event(body["metadata"]["namespace"], body)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise

    def create_pod(self, body: dict[str, Any]) -> bool:
        """False if a pod of that name exists already (a reconcile after a restart)."""
        try:
            self.core.create_namespaced_pod(body["metadata"]["namespace"], body)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise

    def delete_pod(self, namespace: str, name: str, grace_seconds: int = 30) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace_seconds)
        except ApiException as error:
            if error.status != 404:
                raise

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        try:
            self.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": annotations}})
        except ApiException as error:
            if error.status != 404:
                raise

    def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404:
                raise SecretMissing(f"Secret {namespace}/{name} not found") from None
            raise
        data = secret.data or {}
        if key not in data:
            raise SecretMissing(f"Secret {namespace}/{name} has no key {key!r}")
        # The log filter (strata.redaction.SecretFilter) hides every value this read brought in (the
        # response carries all keys): decoded (with a URL's password) and base64 as in the body.
        from strata.redaction import register_secret

        for encoded in data.values():
            if encoded:
                register_secret(encoded)
                try:
                    register_secret(base64.b64decode(encoded).decode())
                except ValueError:  # not text: its base64 form is registered
                    pass
        return base64.b64decode(data[key]).decode()
