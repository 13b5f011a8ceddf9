"""The PromQL of the Grafana dashboard (charts/strata/dashboards/strata.json), for tests that run it.

    for title, expr in load_dashboard_queries(DASHBOARD, variables=PROMETHEUS_VARIABLES):
        prometheus.query(expr)  # every panel must evaluate against a real Prometheus

Grafana substitutes its template variables before a query reaches Prometheus; `variables` does the
same here (both `$name` and `${name}` forms), so the expressions are plain PromQL.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

DASHBOARD = Path(__file__).resolve().parents[1] / "charts" / "strata" / "dashboards" / "strata.json"

# What Grafana sends with "All" selected and a 15 s scrape interval.
PROMETHEUS_VARIABLES = {"namespace": ".*", "study": ".*", "__rate_interval": "1m", "__interval": "15s",
                        "__range": "1h"}

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana variables that `variables` names; leave the others as they are."""
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return _VARIABLE.sub(replace, expr)


def load_dashboard_queries(path: str | Path = DASHBOARD,
                           variables: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel, in dashboard order."""
    dashboard = json.loads(Path(path).read_text())
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            queries.append((panel.get("title", ""), substitute(expr, variables) if variables else expr))
    return queries
