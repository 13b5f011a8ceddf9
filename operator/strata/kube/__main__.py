"""`python -m strata.kube`: run the operator (kopf run) for all namespaces or STRATA_NAMESPACE."""

from __future__ import annotations

import os
import sys

import kopf.cli


def main() -> None:
    # Standalone: one operator replica, no peering objects (and no RBAC for them).
    health = os.environ.get("STRATA_HEALTH_URL", "http://0.0.0.0:8080/healthz")
    args = ["run", "-m", "strata.kube.handlers", "--standalone", f"--liveness={health}"]
    namespace = os.environ.get("STRATA_NAMESPACE")
    args += ["--namespace", namespace] if namespace else ["--all-namespaces"]
    sys.argv = ["kopf", *args, *sys.argv[1:]]
    kopf.cli.main()


if __name__ == "__main__":
    main()
