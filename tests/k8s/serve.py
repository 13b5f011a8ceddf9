"""The API emulator as its own process, for load tests: `python -m tests.k8s.serve WORKDIR`.

In a test the emulator shares the test's process and GIL; under a load of a thousand pods that
measures the harness, not the operator. Served from its own process it gets a core of its own.

- WORKDIR/cluster.json: {"url", "token", "kubeconfig", "pid"} once it serves.
- Requests are counted by User-Agent instead of kept (a load test sends hundreds of thousands).
- Pods' lives are recorded where the API server sees them: when each pod was created and when its
  status first said Succeeded or Failed (what the operator's watch then sees).
- SIGUSR1 writes WORKDIR/stats.json: {"seq", "requests": {agent: count}, "created": {ns/name: t},
  "ended": {ns/name: t}, "hpostudies": {ns/name: status bytes}} (t: time.time()), then "seq" + 1.
- SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import collections
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.k8s.emulator import EmulatedCluster

ENDED = {"Succeeded", "Failed"}


class CountingLog(list):
    """The emulator's request log, keeping a count per User-Agent and only the request being served.

    kmock matches each request by testing `request in view` for its reactions, which walks the whole
    log: with every request kept, each one costs more than the last (a load test sends hundreds of
    thousands). The match runs right after the append, before anything awaits, so the request being
    matched is always the one kept. The reactions' own copies are dropped every 1,000 requests."""

    def __init__(self, handler: Any) -> None:
        super().__init__()
        self.handler = handler
        self.by_agent: collections.Counter[str] = collections.Counter()
        self.total = 0

    def append(self, request: Any) -> None:  # noqa: D102 (list's)
        headers = getattr(request, "headers", None) or {}
        self.by_agent[str(headers.get("User-Agent", ""))] += 1
        self.total += 1
        self.clear()
        super().append(request)
        if self.total % 1000 == 0:
            for payload in self.handler._payloads:
                payload._requests.clear()


class PodLives(list):
    """The emulator's change log (watches read it as a list), noting when each pod was created and
    when its status first said Succeeded or Failed."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def append(self, change: Any) -> None:  # noqa: D102 (list's)
        if change.resource.plural == "pods" and change.new is not None:
            meta = change.new["metadata"]
            key = f"{meta.get('namespace')}/{meta['name']}"
            if change.type == "ADDED":
                self.created.setdefault(key, time.time())
            elif ((change.new.get("status") or {}).get("phase") in ENDED
                  and ((change.old or {}).get("status") or {}).get("phase") not in ENDED):
                self.ended.setdefault(key, time.time())
        super().append(change)


def main(argv: list[str]) -> int:
    workdir = Path(argv[0])
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = EmulatedCluster(workdir)
    lives, log = PodLives(), CountingLog(cluster.handler)
    cluster.handler._changes, cluster.handler._requests = lives, log
    created, ended = lives.created, lives.ended
    cluster.start()
    asked, stop = threading.Event(), threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: asked.set())
    signal.signal(signal.SIGTERM, lambda *_: (stop.set(), asked.set()))
    signal.signal(signal.SIGINT, lambda *_: (stop.set(), asked.set()))
    (workdir / "cluster.json.tmp").write_text(json.dumps({
        "url": cluster.url, "token": cluster.token, "kubeconfig": str(cluster.kubeconfig), "pid": __import__("os").getpid()}))
    (workdir / "cluster.json.tmp").replace(workdir / "cluster.json")
    seq = 0
    while not stop.is_set():
        asked.wait()
        asked.clear()
        if stop.is_set():
            break

        def snapshot() -> dict[str, Any]:  # on the emulator's loop: nothing changes meanwhile
            studies = {f"{o['metadata'].get('namespace')}/{o['metadata']['name']}":
                       len(json.dumps(o.get("status") or {}, separators=(",", ":")))
                       for o in cluster.handler.objects_of(cluster.resolve("hpostudies"))}
            return {"requests": dict(log.by_agent), "created": dict(created), "ended": dict(ended),
                    "hpostudies": studies}

        seq += 1
        stats = {"seq": seq, **cluster._call(snapshot)}
        (workdir / "stats.json.tmp").write_text(json.dumps(stats))
        (workdir / "stats.json.tmp").replace(workdir / "stats.json")
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
