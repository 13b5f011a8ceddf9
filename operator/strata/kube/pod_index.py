"""The study's pods as Kopf's pod watch reports them, instead of a list per reconcile.

Each reconcile used to list its study's pods (two lists a pass, an API request each, and the API
server filtering every pod in the namespace). Kopf now watches the pods carrying the study label
(strata.kube.handlers) and feeds this index; IndexedKubeApi answers `list_pods` from it and writes
through what the operator itself creates, deletes and annotates, so a reconcile that follows its own
create sees the pod before the watch does.

Kept honest three ways:
- the newest resourceVersion wins, so a watch event that was on its way before the operator's own
  patch cannot undo it (an exit reported twice);
- a study's first look and every 75-100% of `resync_seconds` after (10 minutes; spread by the
  study's name so that 100 studies listed at start-up do not all list again in the same second) is
  a real list (the slow safety net for a watch that missed something, and a restarted operator's
  first view), merged the same way. Kopf lists again itself whenever its watch reconnects. At 60 s,
  the lists of 100 studies' growing pod sets were 15% of the reconcile threads' time;
- only what a reconcile reads is kept of each pod (metadata, phase, termination), so memory
  stays small with thousands of finished pods.
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Any, Callable

from strata.kube import builders
from strata.kube.api import KubeApi

RESYNC_SECONDS = 600.0


def _version(pod: dict[str, Any]) -> int:
    """A pod's resourceVersion as a number (-1 if it has none: a body the operator built)."""
    try:
        return int(pod["metadata"].get("resourceVersion") or -1)
    except (TypeError, ValueError):
        return -1


def slim(pod: dict[str, Any]) -> dict[str, Any]:
    """What PodExecutor, WorkerPodExecutor and the data check read of a pod."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    kept_meta = {k: meta[k] for k in ("name", "namespace", "uid", "labels", "annotations", "ownerReferences",
                                      "resourceVersion", "creationTimestamp", "deletionTimestamp") if k in meta}
    kept_status = {k: status[k] for k in ("phase", "reason", "message", "startTime", "containerStatuses")
                   if k in status}
    return {"metadata": kept_meta, "status": kept_status}


def study_of(pod: dict[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(builders.LABEL_STUDY)


class PodIndex:
    """Pods by (namespace, study label) -> name. Thread-safe: the watch writes, reconciles read."""

    def __init__(self, resync_seconds: float = RESYNC_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.resync_seconds = resync_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._seen: dict[tuple[str, str, str], float] = {}  # when each pod was last written here
        self._due: dict[tuple[str, str], float] = {}  # when each study is next listed for real
        self._deleted: dict[tuple[str, str, str], int] = {}  # pods the watch saw deleted (until the next list)

    def observe(self, event_type: str | None, pod: dict[str, Any]) -> bool:
        """A watch event; True if it changed what a reconcile would decide on (a phase, a deletion)."""
        label = study_of(pod)
        meta = pod.get("metadata") or {}
        if label is None or not meta.get("name"):
            return False
        key = (meta.get("namespace") or "", label)
        with self._lock:
            pods = self._pods.setdefault(key, {})
            old = pods.get(meta["name"])
            if event_type == "DELETED":
                self._deleted[(*key, meta["name"])] = _version(pod)
                if old is not None and _version(old) <= _version(pod):
                    del pods[meta["name"]]
                    self._seen.pop((*key, meta["name"]), None)
                    return True
                return False
            if old is not None and _version(old) > _version(pod):
                return False  # older than what the operator's own write brought back
            if _version(pod) <= self._deleted.get((*key, meta["name"]), -2):
                return False  # the answer to a delete, after the watch saw the pod go
            pods[meta["name"]] = slim(pod)
            self._seen[(*key, meta["name"])] = self._clock()
        if old is None:
            return True
        phase = lambda p: (p.get("status") or {}).get("phase")  # noqa: E731
        return phase(old) != phase(pod) or bool(meta.get("deletionTimestamp")) != bool(
            old["metadata"].get("deletionTimestamp"))

    def put(self, pod: dict[str, Any]) -> None:
        """The operator's own write (the API's answer, or the body it sent)."""
        self.observe("MODIFIED", pod)

    def remove(self, namespace: str, label: str, name: str) -> None:
        with self._lock:
            (self._pods.get((namespace, label)) or {}).pop(name, None)

    def pods(self, namespace: str, label: str) -> list[dict[str, Any]] | None:
        """The study's pods, or None when it is due a real list."""
        key = (namespace, label)
        with self._lock:
            due = self._due.get(key)
            if due is None or self._clock() > due:
                return None
            return list((self._pods.get(key) or {}).values())

    def replace(self, namespace: str, label: str, listed: list[dict[str, Any]], started: float) -> list[dict[str, Any]]:
        """A real list begun at `started`: it wins, except over what was written here since it began."""
        key = (namespace, label)
        with self._lock:
            old = self._pods.get(key) or {}
            pods = {}
            for pod in listed:
                name = pod["metadata"]["name"]
                mine = old.get(name)
                pods[name] = mine if mine is not None and _version(mine) > _version(pod) else slim(pod)
            for name, pod in old.items():
                if name not in pods and self._seen.get((*key, name), -1.0) >= started:
                    pods[name] = pod  # created (or seen) after the list was taken
            self._pods[key] = pods
            spread = 0.75 + 0.25 * zlib.crc32(f"{namespace}/{label}".encode()) / 2**32
            self._due[key] = self._clock() + self.resync_seconds * spread
            for gone in [k for k in self._deleted if k[:2] == key]:
                del self._deleted[gone]
            return list(pods.values())

    def forget(self, namespace: str, label: str) -> None:
        with self._lock:
            self._pods.pop((namespace, label), None)
            self._due.pop((namespace, label), None)

    def clock(self) -> float:
        return self._clock()


class IndexedKubeApi:
    """KubeApi whose study pod lists come from the index (everything else is the API's)."""

    def __init__(self, api: KubeApi, index: PodIndex):
        self.api, self.index = api, index

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        key, _, label = selector.partition("=")
        if key != builders.LABEL_STUDY or not label or "," in label:
            return self.api.list_pods(namespace, selector)
        pods = self.index.pods(namespace, label)
        if pods is None:
            started = self.index.clock()
            pods = self.index.replace(namespace, label, self.api.list_pods(namespace, selector), started)
        return pods

    def create_pod(self, body: dict[str, Any]) -> dict[str, Any] | None:
        created = self.api.create_pod(body)
        if created is not None:
            self.index.put(created)
        return created

    def delete_pod(self, namespace: str, name: str, grace_seconds: int = 30) -> dict[str, Any] | None:
        terminating = self.api.delete_pod(namespace, name, grace_seconds)
        if terminating is not None:
            self.index.put(terminating)
        return terminating

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> dict[str, Any] | None:
        patched = self.api.annotate_pod(namespace, name, annotations)
        if patched is not None:
            self.index.put(patched)
        return patched
