"""Write charts/strata/README.md from Chart.yaml and values.yaml (helm-docs' `# --` comments).

    python scripts/chart_readme.py          # rewrite the README
    python scripts/chart_readme.py --check  # exit 1 if it is stale (tests/test_chart.py runs this)

Every value gets a row (a documented map as one row): its dotted key, its default and the `# --`
comment above it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "strata"

INTRO = """# The Strata chart

Installs the Strata operator: the `HPOStudy` CRD, the operator Deployment (Kopf, no torch) with
least-privilege RBAC, its metrics Service, and optionally a ServiceMonitor, a PrometheusRule with
Strata's alerts, the Grafana dashboard, NetworkPolicies, and an in-cluster PostgreSQL (Optuna) and
MinIO (the layer registry) for evaluation. Generated from `values.yaml` by
`python scripts/chart_readme.py`; [docs/helm.md](../../docs/helm.md) explains the choices.

```bash
helm install strata charts/strata -n strata --create-namespace \\
  --set postgresql.enabled=true --set minio.enabled=true
kubectl apply -n strata -f examples/fashion-quick.yaml
```

In production point it at your own database and bucket (`externalDatabase.existingSecret`,
`externalObjectStore.*`), confine it to the namespaces where studies live
(`rbac.scope=namespace`, `watchNamespaces`), and turn on `metrics.serviceMonitor`,
`metrics.prometheusRule` and `networkPolicy`. GitOps (`helm template`): give
`postgresql.auth.existingSecret` so no generated password changes between renders. OpenShift:
`openshift: true` (detected by itself when the cluster serves `security.openshift.io/v1`).

## Values

| Key | Default | Description |
|---|---|---|
"""


def documented(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for each key with a `# --` comment, in file order."""
    rows, stack, comment = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped[1:].strip())
            continue
        match = re.match(r"(\s*)([A-Za-z0-9_]+):", line)
        if not match:
            comment = None if not stripped else comment
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if comment is not None:
            rows.append((".".join(k for _, k in stack), " ".join(comment)))
        comment = None
    return rows


def lookup(values: Any, key: str) -> Any:
    for part in key.split("."):
        values = values[part]
    return values


def render() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    out = [INTRO.replace("# The Strata chart", f"# The Strata chart ({chart['version']}, app {chart['appVersion']})")]
    described = dict(documented(text))
    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:  # every leaf, and every documented key, in file order
        for name, value in node.items():
            key = f"{prefix}{name}"
            if key in described or not isinstance(value, dict) or not value:
                keys.append(key)
            if isinstance(value, dict) and key not in described:
                walk(value, key + ".")
    walk(values, "")
    for key in keys:
        description = described.get(key, "")
        default = json.dumps(lookup(values, key))
        shown = description.replace("|", "\\|")
        out.append(f"| `{key}` | `{default}` | {shown} |\n")
    return "".join(out)


def main() -> int:
    readme = CHART / "README.md"
    fresh = render()
    if "--check" in sys.argv:
        if not readme.is_file() or readme.read_text() != fresh:
            print(f"{readme} is stale: python scripts/chart_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
