"""What makes a study reconcile: its trainer pods' events, with a timer as the slow safety net.

A Kopf timer reconciled each study every few seconds, so a freed slot waited for the next tick
(1.4 s median with 5 s ticks) and 100 idle studies still cost 20 reconciles a second. Now each
study has one Kopf daemon (`StudyDriver.drive`) that reconciles when woken (a trainer pod of
the study changed phase or went away: strata.kube.handlers feeds `Wakeups`; a spec change) and
otherwise after `interval` seconds (STRATA_RECONCILE_SECONDS; worker-pod studies, whose trials
end inside a pod without a pod event, keep their short STRATA_WORKER_RECONCILE_SECONDS).

Reconciles run on a bounded thread pool (STRATA_RECONCILE_WORKERS, default 4) in the order they
were asked for, and a study never queues twice (one daemon, one wake flag): a burst of events
from one study cannot starve the others. A woken study waits `coalesce` seconds first, so the
pods of one wave that end together are handled in one pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from strata.kube import builders
from strata.kube.api import KubeApi
from strata.kube.reconcile import StudyService
from strata.spec import API_GROUP, API_VERSION

log = logging.getLogger("strata.operator")


def _seconds(name: str, default: str, env: dict[str, str] | None = None) -> float:
    raw = (os.environ if env is None else env).get(name, "").strip() or default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: not a number of seconds: {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name}: must be more than 0 seconds, not {raw!r}")
    return value


class Wakeups:
    """One flag per study (namespace, study label), set from the event loop or any thread."""

    def __init__(self) -> None:
        self._flags: dict[tuple[str, str], asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.woken = 0  # wake-ups delivered (metrics, benchmarks)

    def register(self, namespace: str, label: str) -> asyncio.Event:
        self._loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        with self._lock:
            self._flags[namespace, label] = flag
        return flag

    def unregister(self, namespace: str, label: str, flag: asyncio.Event) -> None:
        with self._lock:
            if self._flags.get((namespace, label)) is flag:
                del self._flags[namespace, label]

    def wake(self, namespace: str, label: str) -> None:
        with self._lock:
            flag = self._flags.get((namespace, label))
        if flag is None or self._loop is None:
            return
        self.woken += 1
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            flag.set()
        else:
            self._loop.call_soon_threadsafe(flag.set)


class StudyDriver:
    """The reconcile loop of every study, one daemon each, on one bounded pool."""

    def __init__(self, service: StudyService, api: KubeApi, wakeups: Wakeups, interval: float,
                 worker_interval: float, workers: int = 4, coalesce: float = 0.05):
        self.service, self.api, self.wakeups = service, api, wakeups
        self.interval, self.worker_interval, self.coalesce = interval, worker_interval, coalesce
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")

    @classmethod
    def from_env(cls, service: StudyService, api: KubeApi, wakeups: Wakeups,
                 env: dict[str, str] | None = None) -> "StudyDriver":
        workers = int(_seconds("STRATA_RECONCILE_WORKERS", "4", env))
        return cls(service, api, wakeups, interval=_seconds("STRATA_RECONCILE_SECONDS", "5", env),
                   worker_interval=_seconds("STRATA_WORKER_RECONCILE_SECONDS", "1", env), workers=max(1, workers))

    def interval_for(self, spec: dict[str, Any]) -> float:
        in_workers = (spec.get("execution") or {}).get("mode", "warmWorkers") == "warmWorkers"
        return self.worker_interval if in_workers else self.interval

    def reconcile_once(self, body: Any) -> None:
        """One pass over the body as it is now; the status goes back as a patch when it changed."""
        meta = body["metadata"]
        status = dict(body.get("status") or {})
        result = self.service.reconcile(meta["namespace"], meta["name"], meta["uid"], dict(body.get("spec") or {}),
                                        status, meta.get("generation"))
        if result.status != status:
            self.api.patch_study_status(API_GROUP, API_VERSION, meta["namespace"], meta["name"], result.status)

    async def drive(self, body: Any, stopped: Any) -> None:
        """Kopf's daemon for one HPOStudy: `body` is live (Kopf updates it), `stopped` ends the loop."""
        loop = asyncio.get_running_loop()
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        label = builders.study_label(name)
        flag = self.wakeups.register(namespace, label)
        try:
            while not stopped:
                flag.clear()
                try:
                    await loop.run_in_executor(self.pool, self.reconcile_once, body)
                except Exception as error:  # the next pass tries again; the operator never dies of one study
                    log.exception("reconcile of %s/%s failed: %s", namespace, name, error)
                    self.service.metrics.reconcile_errors.labels(namespace, name).inc()
                await self._wait(flag, stopped, self.interval_for(dict(body.get("spec") or {})))
        finally:
            self.wakeups.unregister(namespace, label, flag)

    async def _wait(self, flag: asyncio.Event, stopped: Any, seconds: float) -> None:
        waits = [asyncio.ensure_future(flag.wait()), asyncio.ensure_future(stopped.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if flag.is_set() and not stopped and self.coalesce:
            await asyncio.sleep(self.coalesce)

    def wake_study(self, namespace: str, name: str) -> None:
        self.wakeups.wake(namespace, builders.study_label(name))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def on_pod_event(index: Any, wakeups: Wakeups, event_type: str | None, pod: dict[str, Any],
                 wake: Callable[[str, str], None] | None = None) -> None:
    """A trainer pod's watch event: into the index, and wake its study when it matters."""
    if index.observe(event_type, pod):
        meta = pod["metadata"]
        label = (meta.get("labels") or {}).get(builders.LABEL_STUDY)
        if label:
            (wake or wakeups.wake)(meta.get("namespace") or "", label)
