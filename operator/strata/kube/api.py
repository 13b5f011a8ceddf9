"""Kubernetes adapter: the only module that talks to the API server (pods, secrets, study status).

Every verb used here is listed in the Helm chart's RBAC rules (a test checks they agree):
pods: list, create, delete, patch; secrets: get; events: create (named once per happening, so a
second post is a 409 and nothing is posted twice); hpostudies/status: patch (the study driver's
status, strata.kube.driver). Kopf watches the HPOStudy objects and the trainer pods.

Secrets are read with `get` only (no list or watch: least privilege), so a change cannot be seen
as it happens: a value is kept for STRATA_SECRET_CACHE_SECONDS (default 30) and read again after;
a missing Secret or key is never kept, so creating it is seen at the next reconcile.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections import Counter
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

# (resource, verb) pairs this module calls: the RBAC test reads this.
VERBS_USED = {("pods", "list"), ("pods", "create"), ("pods", "delete"), ("pods", "patch"), ("pods/log", "get"),
              ("secrets", "get"), ("events", "create")}


class SecretMissing(LookupError):
    """A Secret (or a key in it) named by the spec or the operator settings does not exist."""


def secret_cache_seconds(env: dict[str, str] | None = None) -> float:
    raw = (os.environ if env is None else env).get("STRATA_SECRET_CACHE_SECONDS", "").strip() or "30"
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"STRATA_SECRET_CACHE_SECONDS: not a number of seconds: {raw!r}") from None


class KubeApi:
    def __init__(self, api_client: client.ApiClient | None = None, secret_seconds: float | None = None):
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.secret_seconds = secret_cache_seconds() if secret_seconds is None else secret_seconds
        self._secrets: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}  # -> (read at, data)
        self._lock = threading.Lock()
        self.calls: Counter[tuple[str, str]] = Counter()  # (resource, verb) -> requests sent (metrics, benchmarks)

    def _count(self, resource: str, verb: str) -> None:
        with self._lock:
            self.calls[resource, verb] += 1

    def _pod(self, obj: Any) -> dict[str, Any] | None:
        pod = self.api_client.sanitize_for_serialization(obj)
        return pod if isinstance(pod, dict) and pod.get("metadata") else None

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        self._count("pods", "list")
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self.api_client.sanitize_for_serialization(p) for p in pods.items]

    def create_event(self, body: dict[str, Any]) -> bool:
        """Post an Event; False if one of that name exists already (it was posted before a restart)."""
        self._count("events", "create")
        try:
            self.core.create_namespaced_event(body["metadata"]["namespace"], body)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise

    def create_pod(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The pod as created; None if a pod of that name exists already (a reconcile after a restart)."""
        self._count("pods", "create")
        try:
            return self._pod(self.core.create_namespaced_pod(body["metadata"]["namespace"], body)) or body
        except ApiException as error:
            if error.status == 409:
                return None
            raise

    def delete_pod(self, namespace: str, name: str, grace_seconds: int = 30) -> dict[str, Any] | None:
        """The pod as it is while it terminates (None if gone, or if the API answered a Status)."""
        self._count("pods", "delete")
        try:
            return self._pod(self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace_seconds))
        except ApiException as error:
            if error.status != 404:
                raise
            return None

    def read_pod_log(self, namespace: str, name: str, limit_bytes: int) -> str | None:
        """The pod's log (its last limit_bytes at most); None if the pod is gone; a note if it has none
        (its container never started: the API answers 400)."""
        self._count("pods", "log")
        try:
            # Raw bytes: the client's own decoding turns a text/plain body into the repr of bytes.
            response = self.core.read_namespaced_pod_log(name, namespace, limit_bytes=limit_bytes,
                                                         _preload_content=False)
            return response.data.decode("utf-8", errors="replace")
        except ApiException as error:
            if error.status == 404:
                return None
            if error.status == 400:
                return f"(no log: {error.reason})\n"
            raise

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> dict[str, Any] | None:
        """The pod as patched; None if it is gone."""
        self._count("pods", "patch")
        try:
            return self._pod(self.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": annotations}}))
        except ApiException as error:
            if error.status != 404:
                raise
            return None

    def patch_study_status(self, group: str, version: str, namespace: str, name: str,
                           status: dict[str, Any]) -> None:
        """Merge the status into an HPOStudy's status subresource (gone: nothing to do)."""
        self._count("hpostudies/status", "patch")
        try:
            self.custom.patch_namespaced_custom_object_status(group, version, namespace, "hpostudies", name,
                                                              {"status": status})
        except ApiException as error:
            if error.status != 404:
                raise

    def _secret_data(self, namespace: str, name: str, fresh: bool) -> dict[str, str]:
        now = time.monotonic()
        with self._lock:
            kept = self._secrets.get((namespace, name))
        if kept is not None and not fresh and now - kept[0] < self.secret_seconds:
            return kept[1]
        self._count("secrets", "get")
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404:
                with self._lock:
                    self._secrets.pop((namespace, name), None)
                raise SecretMissing(f"Secret {namespace}/{name} not found") from None
            raise
        data = dict(secret.data or {})
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
        with self._lock:
            self._secrets[namespace, name] = (now, data)
        return data

    def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        data = self._secret_data(namespace, name, fresh=False)
        if key not in data:  # a key just added is seen now, not after the cache time
            data = self._secret_data(namespace, name, fresh=True)
        if key not in data:
            raise SecretMissing(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode()
