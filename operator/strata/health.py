"""Which of a study's dependencies are down, since when: what conditions, Events and metrics show.

A dependency is the Optuna database, the layer registry (S3/MinIO or a folder) or the Kubernetes
API's pod creation. An outage starts at the first failed call and ends at the first good one; the
caller posts one Warning when it starts and one Normal Event when it ends, and never raises to its
own caller for it (a reconcile that raised was backed off by Kopf for a minute).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

DATABASE, REGISTRY, KUBERNETES = "database", "registry", "kubernetes"
DEPENDENCIES = (DATABASE, REGISTRY, KUBERNETES)
REASONS = {DATABASE: "StorageUnreachable", REGISTRY: "RegistryUnreachable", KUBERNETES: "PodCreateFailed"}


@dataclass
class Outage:
    dependency: str
    since: float  # epoch seconds
    message: str
    failures: int = 1  # failed calls or probes during this outage

    @property
    def reason(self) -> str:
        return REASONS[self.dependency]

    @property
    def since_text(self) -> str:
        return dt.datetime.fromtimestamp(self.since, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def describe(self) -> str:
        return f"{self.dependency} unreachable since {self.since_text}: {self.message}"


@dataclass
class DependencyHealth:
    outages: dict[str, Outage] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=lambda: {d: 0 for d in DEPENDENCIES})  # ever, for metrics

    def failed(self, dependency: str, message: str, now: float | None = None) -> Outage | None:
        """Record a failure; the new Outage if this one starts an outage (post its Warning), else None."""
        self.failures[dependency] = self.failures.get(dependency, 0) + 1
        current = self.outages.get(dependency)
        if current is not None:
            current.failures += 1
            current.message = message
            return None
        self.outages[dependency] = Outage(dependency, time.time() if now is None else now, message)
        return self.outages[dependency]

    def recovered(self, dependency: str) -> Outage | None:
        """Record a good call; the Outage it ends, if any (post its Normal Event)."""
        return self.outages.pop(dependency, None)

    def down(self, dependency: str) -> bool:
        return dependency in self.outages

    def up(self) -> dict[str, bool]:
        return {d: d not in self.outages for d in DEPENDENCIES}
