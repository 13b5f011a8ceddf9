"""The Grafana dashboard against a real Prometheus scraping the real operator during a real study."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.dashboard_queries import PROMETHEUS_VARIABLES, load_dashboard_queries
from tests.e2e.conftest import OperatorProcess
from tests.e2e.studies import apply, study_manifest, wait_for_phase
from tests.k8s.kubelet import LocalKubelet
from tests.services import PrometheusServer, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def dashboard_variables() -> list[dict]:
    dashboard = json.loads((ROOT / "charts" / "strata" / "dashboards" / "strata.json").read_text())
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert {v["name"] for v in variables} == {"namespace", "study"}
    return variables


@pytest.fixture
def metrics_operator(cluster_env, tmp_path):
    port = free_port()
    process = OperatorProcess({**cluster_env, "STRATA_METRICS_PORT": str(port),
                               "STRATA_METRICS_ADDRESS": "127.0.0.1"}, tmp_path / "operator.log").start()
    yield process, port
    process.stop()


@pytest.fixture
def prometheus(metrics_operator, tmp_path):
    _, port = metrics_operator
    server = PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{port}"])
    yield server
    server.stop()


def test_every_dashboard_panel_returns_data_from_prometheus_scraping_the_operator(
        k8s_api, kubectl, cluster_env, metrics_operator, prometheus, s3_bucket, tmp_path):
    operator, _ = metrics_operator
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env=cluster_env, max_running=2):
        apply(kubectl, study_manifest("watched", s3_bucket, max_trials=3))
        status = wait_for_phase(k8s_api, operator, "watched", "Succeeded")
    # the exporter's last state reaches Prometheus, with enough samples for rate() over the panels' window
    wait_for(lambda: prometheus.query('strata_study_phase{study="watched", phase="Succeeded"} == 1'),
             timeout=30, interval=0.5, message="Prometheus to scrape the finished study")
    before = prometheus.scrapes()
    wait_for(lambda: prometheus.scrapes() >= before + 3, timeout=30, interval=0.5, message="three more scrapes")

    empty = []
    for title, expr in load_dashboard_queries(variables=PROMETHEUS_VARIABLES):
        if not prometheus.query(expr):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)

    # the namespace and study variables list this study (label_values, as Grafana asks Prometheus)
    chosen = {"namespace": "default", "study": "watched"}
    for variable in dashboard_variables():
        match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["query"]["query"])
        assert match, variable
        selector = match.group(1).replace("$namespace", chosen["namespace"])
        assert chosen[variable["name"]] in prometheus.label_values(match.group(2), selector), variable

    finished = prometheus.query('sum(strata_trials_total{study="watched", state=~"complete|pruned"})')
    assert float(finished[0]["value"][1]) == 3
    best = prometheus.query('strata_best_objective_value{study="watched"}')
    assert float(best[0]["value"][1]) == pytest.approx(status["best"]["value"])
    reused = prometheus.query('strata_reused_trials_total{study="watched"}')
    assert float(reused[0]["value"][1]) == status["reuse"]["trials"]
