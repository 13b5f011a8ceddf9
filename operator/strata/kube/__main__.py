"""`python -m strata.kube`: run the operator (kopf run) for all namespaces or the ones it is given.

STRATA_NAMESPACES (comma-separated, the chart's `watchNamespaces`) or STRATA_NAMESPACE (one, the
chart's `rbac.scope=namespace`) restrict Kopf to those namespaces; with neither it watches all.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import kopf.cli


def watched_namespaces(env: Mapping[str, str]) -> list[str]:
    """The namespaces to watch, in order and without repeats; [] means every namespace.

    STRATA_NAMESPACES wins over STRATA_NAMESPACE when it names at least one namespace.
    Whitespace around names and empty items ("a,,b", a trailing comma) are ignored.
    """
    for variable in ("STRATA_NAMESPACES", "STRATA_NAMESPACE"):
        names = [n.strip() for n in env.get(variable, "").split(",")]
        names = list(dict.fromkeys(n for n in names if n))
        if names:
            return names
    return []


def kopf_args(env: Mapping[str, str]) -> list[str]:
    """Kopf's namespace options: `--namespace NS` once per namespace, or `--all-namespaces`.

    Each namespace is its own option: Kopf treats a pattern with a comma as a pattern, not as a
    name, and with scanning disabled (no RBAC to list namespaces) it serves exact names only.
    """
    names = watched_namespaces(env)
    if not names:
        return ["--all-namespaces"]
    return [arg for name in names for arg in ("--namespace", name)]


def main() -> None:
    # Standalone: one operator replica, no peering objects (and no RBAC for them).
    health = os.environ.get("STRATA_HEALTH_URL", "http://0.0.0.0:8080/healthz")
    args = ["run", "-m", "strata.kube.handlers", "--standalone", f"--liveness={health}", *kopf_args(os.environ)]
    sys.argv = ["kopf", *args, *sys.argv[1:]]
    kopf.cli.main()


if __name__ == "__main__":
    main()
