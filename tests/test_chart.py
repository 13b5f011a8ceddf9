"""The Helm chart (charts/strata), rendered offline by the Helm SDK (no helm binary, no cluster).

It renders for every supported Kubernetes version, its schema rejects bad values, its RBAC grants
exactly what the operator calls, every container runs unprivileged with credentials from Secrets,
and what it wires (env, Secrets, CRD, dashboard) is what the operator, the trainer pods and the
exporter really use.
"""

from __future__ import annotations

import ast
import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from strata.kube import api as kube_api  # noqa: E402
from strata.kube import builders  # noqa: E402
from strata.spec import API_GROUP, parse_spec  # noqa: E402
from tests.dashboard_queries import PROMETHEUS_VARIABLES, iter_panels, load_dashboard_queries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "strata"
RELEASE, NAMESPACE = "strata", "ml"
KUBE_VERSIONS = ["1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}  # custom resources: kubernetes-validate has no schema for them
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob"}
WATCHED = ["team-a", "team-b"]  # watchNamespaces: neither is the release namespace

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespace-rbac": {"rbac": {"scope": "namespace"}},
    "watch-namespaces": {"rbac": {"scope": "namespace"}, "watchNamespaces": WATCHED,
                         "postgresql": {"enabled": True}, "minio": {"enabled": True}},
    "bundled-services": {"postgresql": {"enabled": True}, "minio": {"enabled": True}},
    "external-services": {
        "externalDatabase": {"existingSecret": "optuna-db", "existingSecretKey": "optuna-url"},
        "externalObjectStore": {"endpoint": "https://s3.example.com", "bucket": "strata-layers",
                                "existingSecret": "s3-keys"},
    },
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                                                  "namespace": "monitoring", "annotations": {"team": "ml"},
                                                  "relabelings": [{"targetLabel": "cluster", "replacement": "eu-1"}],
                                                  "metricRelabelings": [{"sourceLabels": ["__name__"],
                                                                         "regex": "python_gc_.*", "action": "drop"}]},
                               "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                                                  "alertLabels": {"team": "ml-platform"}}},
                   "dashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "Strata"}}},
    "everything": {
        "rbac": {"scope": "namespace"}, "postgresql": {"enabled": True, "auth": {"password": "given-pass"}},
        "minio": {"enabled": True, "auth": {"accessKey": "strata", "secretKey": "given-secret-key"}},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "imagePullSecrets": [{"name": "registry"}],
        "trainer": {"image": {"repository": "registry.example.com/trainer", "tag": "0.1.0-cuda"},
                    "cpuNodeSelector": {"pool": "cpu"},
                    "cpuTolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
                    "gpuNodeSelector": {"pool": "gpu"},
                    "gpuTolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "operator": {"extraArgs": ["--verbose"], "nodeSelector": {"pool": "system"},
                     "extraEnv": [{"name": "STRATA_S3_REGION", "value": "eu-west-1"}],
                     "extraVolumes": [{"name": "ca", "configMap": {"name": "corporate-ca"}}],
                     "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/corporate", "readOnly": True}],
                     "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                                    "whenUnsatisfiable": "ScheduleAnyway"}]},
        "networkPolicy": {"enabled": True, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}, {}]},
    },
}


# --- rendering --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _render(values_json: str) -> dict[str, str]:
    chart = helm_python.Chart.load(str(CHART))
    return chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included)."""
    return _render(json.dumps(values or {}, sort_keys=True))


def manifests(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(render(values).items()):
        if path.endswith(".yaml"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = only(docs, "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in WORKLOAD_KINDS]


def secret_data(doc: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}


# --- helm lint and Kubernetes schemas -----------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_chart_lints_clean_in_strict_mode(case: str) -> None:
    report = helm_python.lint(str(CHART), VALUE_SETS[case], strict=True, kube_version="v1.30.0", namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@functools.lru_cache(maxsize=None)
def _unique_manifests() -> list[dict[str, Any]]:
    """Every distinct rendered manifest of every value set, plus the chart's CRD."""
    seen: dict[str, dict[str, Any]] = {}
    for values in VALUE_SETS.values():
        for doc in manifests(values):
            seen.setdefault(json.dumps(doc, sort_keys=True), doc)
    crd = yaml.safe_load((CHART / "crds" / "hpostudy.yaml").read_text())
    seen.setdefault(json.dumps(crd, sort_keys=True), crd)
    return list(seen.values())


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    checked, errors = set(), []
    for doc in _unique_manifests():
        if doc["kind"] in CUSTOM_KINDS:
            continue  # no upstream schema; the ServiceMonitor is checked field by field below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {error}")
        checked.add(doc["kind"])
    assert not errors, "\n".join(errors)
    assert {"Deployment", "StatefulSet", "Job", "Service", "Secret", "ConfigMap", "ServiceAccount", "ClusterRole",
            "ClusterRoleBinding", "Role", "RoleBinding", "CustomResourceDefinition"} <= checked


def test_the_kubernetes_version_constraint_matches_the_tested_versions() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["version"] == "0.1.0" and chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"


# --- values.schema.json ---------------------------------------------------------------------------------

BAD_VALUES = {
    "unknown rbac scope": {"rbac": {"scope": "galaxy"}},
    "negative replicas": {"replicaCount": -1},
    "two active operators": {"replicaCount": 2},
    "negative metrics port": {"metrics": {"port": -1}},
    "port out of range": {"metrics": {"port": 70000}},
    "string for a boolean": {"postgresql": {"enabled": "yes"}},
    "unknown top-level key": {"postgres": {"enabled": True}},
    "unknown nested key": {"operator": {"replicas": 2}},
    "latest operator tag": {"image": {"tag": "latest"}},
    "latest postgres tag": {"postgresql": {"image": {"tag": "latest"}}},
    "bad pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "zero reconcile interval": {"operator": {"reconcileSeconds": 0}},
    "bad scrape interval": {"metrics": {"serviceMonitor": {"interval": "often"}}},
    "short minio secret key": {"minio": {"auth": {"secretKey": "short"}}},
    "bad bucket name": {"minio": {"bucket": "Not_A_Bucket"}},
    "endpoint without scheme": {"externalObjectStore": {"endpoint": "minio:9000"}},
    "bad gpu toleration": {"trainer": {"gpuTolerations": [{"operator": "Maybe"}]}},
    "per-pod feature cache volume": {"trainer": {"featureCacheVolume": {"emptyDir": {}}}},
    "two feature cache volumes": {"trainer": {"featureCacheVolume": {"hostPath": {"path": "/a"},
                                                                       "persistentVolumeClaim": {"claimName": "b"}}}},
    "zero feature cache bytes": {"trainer": {"featureCacheBytes": 0}},
    "trainer module not a module name": {"trainer": {"module": "strata-trainer"}},
    "trainer module with arguments": {"trainer": {"module": "strata_trainer --worker"}},
    "watched namespace not a DNS label": {"rbac": {"scope": "namespace"}, "watchNamespaces": ["Team_A"]},
    "watched namespace with a dot": {"rbac": {"scope": "namespace"}, "watchNamespaces": ["team.a"]},
    "watched namespace too long": {"rbac": {"scope": "namespace"}, "watchNamespaces": ["a" * 64]},
    "empty watched namespace": {"rbac": {"scope": "namespace"}, "watchNamespaces": [""]},
    "watched namespace listed twice": {"rbac": {"scope": "namespace"}, "watchNamespaces": ["team-a", "team-a"]},
    "watched namespaces as one string": {"rbac": {"scope": "namespace"}, "watchNamespaces": "team-a,team-b"},
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(case: str) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(BAD_VALUES[case])


def test_schema_forbids_unknown_keys_at_every_level_it_defines() -> None:
    def walk(node: Any, where: str) -> list[str]:
        if not isinstance(node, dict):
            return []
        loose = [where] if "properties" in node and node.get("additionalProperties") is not False else []
        for key, child in node.get("properties", {}).items():
            loose += walk(child, f"{where}.{key}")
        return loose + walk(node.get("items"), f"{where}[]")

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert walk(schema, "values") == ["values.global"]  # Helm's globals are shared with other charts


def test_global_image_registry_and_digests_reach_every_image_trainer_pods_included() -> None:
    digest = "sha256:" + "ab" * 32
    values = {"global": {"imageRegistry": "mirror.example.com/ml"}, "postgresql": {"enabled": True},
              "minio": {"enabled": True, "image": {"digest": digest}}}
    docs = manifests(values)
    images = sorted({c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")
                     for c in d["spec"]["template"]["spec"]["containers"]})
    assert images == sorted([
        "mirror.example.com/ml/library/postgres:16.4-bookworm",  # docker.io/library/postgres
        f"mirror.example.com/ml/minio/minio@{digest}",  # quay.io/minio/minio, pinned
        "mirror.example.com/ml/minio/mc:RELEASE.2024-10-08T09-37-26Z",
        "mirror.example.com/ml/strata-hpo/operator:0.1.0"])
    assert env_of(operator_container(docs))["STRATA_TRAINER_IMAGE"]["value"] == \
        "mirror.example.com/ml/strata-hpo/trainer:0.1.0"
    pinned = env_of(operator_container(manifests({"trainer": {"image": {"digest": digest}}})))
    assert pinned["STRATA_TRAINER_IMAGE"]["value"] == f"ghcr.io/strata-hpo/trainer@{digest}"
    assert operator_container(manifests())["image"] == "ghcr.io/strata-hpo/operator:0.1.0"  # unchanged by default


@pytest.mark.parametrize("values, message", [
    ({"postgresql": {"enabled": True}, "externalDatabase": {"existingSecret": "db"}}, "not both"),
    ({"minio": {"enabled": True}, "externalObjectStore": {"existingSecret": "keys"}}, "not both"),
    ({"externalObjectStore": {"endpoint": "https://s3.example.com"}}, "externalObjectStore.bucket is required"),
    ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
    ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}, "metrics.service.enabled"),
    # A ClusterRole reaches every namespace: a list of namespaces with it would be a false promise.
    ({"watchNamespaces": WATCHED}, "watchNamespaces needs rbac.scope=namespace"),
    ({"rbac": {"scope": "cluster", "create": False}, "watchNamespaces": WATCHED},
     "watchNamespaces needs rbac.scope=namespace"),
])
def test_contradictory_values_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render(values)


# --- operator Deployment --------------------------------------------------------------------------------

def _operator_launch_args(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> list[str]:
    """The `kopf run` command line that `python -m strata.kube` builds with this env (kopf is not started)."""
    kopf_cli = pytest.importorskip("kopf.cli")
    from strata.kube import __main__ as entrypoint

    captured: list[str] = []
    monkeypatch.setattr(kopf_cli, "main", lambda: captured.extend(entrypoint.sys.argv))
    monkeypatch.setattr(entrypoint.sys, "argv", ["python -m strata.kube"])
    for name in [n for n in os.environ if n.startswith("STRATA_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    entrypoint.main()
    return captured


def plain_env(container: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, str]:
    """The container's environment as the kubelet sets it (fieldRef metadata.namespace resolved)."""
    env = {}
    for name, entry in env_of(container).items():
        if "value" in entry:
            env[name] = entry["value"]
        elif entry["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[name] = namespace
    return env


def test_operator_deployment_runs_one_standalone_kopf_with_probes_on_its_health_endpoint(
        monkeypatch: pytest.MonkeyPatch) -> None:
    docs = manifests()
    deployment = only(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = operator_container(docs)
    assert container["image"] == "ghcr.io/strata-hpo/operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"] == ["python", "-m", "strata.kube"]

    argv = _operator_launch_args(monkeypatch, plain_env(container))
    assert "--standalone" in argv, "without --standalone Kopf needs (Cluster)KopfPeering objects and RBAC"
    assert "--all-namespaces" in argv
    liveness = next(a for a in argv if a.startswith("--liveness="))
    match = re.fullmatch(r"--liveness=http://0\.0\.0\.0:(\d+)(/\S*)", liveness)
    assert match, liveness
    port, path = int(match.group(1)), match.group(2)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": port, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": path, "port": "health"}


def test_namespace_scope_restricts_the_operator_to_the_release_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster_env = env_of(operator_container(manifests()))
    assert "STRATA_NAMESPACE" not in cluster_env
    container = operator_container(manifests({"rbac": {"scope": "namespace"}}))
    assert env_of(container)["STRATA_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    argv = _operator_launch_args(monkeypatch, plain_env(container))
    assert argv[argv.index("--namespace") + 1] == NAMESPACE and "--all-namespaces" not in argv


def test_watch_namespaces_restricts_the_operator_to_the_listed_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    container = operator_container(manifests(VALUE_SETS["watch-namespaces"]))
    env = env_of(container)
    assert env["STRATA_NAMESPACES"] == {"name": "STRATA_NAMESPACES", "value": "team-a,team-b"}
    assert "STRATA_NAMESPACE" not in env  # the list replaces the release namespace
    argv = _operator_launch_args(monkeypatch, plain_env(container))
    assert "--all-namespaces" not in argv
    assert [argv[i + 1] for i, arg in enumerate(argv) if arg == "--namespace"] == WATCHED


def test_operator_gets_its_settings_from_values_and_secret_references() -> None:
    env = env_of(operator_container(manifests(VALUE_SETS["external-services"])))
    assert env["STRATA_TRAINER_IMAGE"]["value"] == "ghcr.io/strata-hpo/trainer:0.1.0"
    assert env["STRATA_METRICS_PORT"]["value"] == "9090" and env["STRATA_RECONCILE_SECONDS"]["value"] == "5"
    assert env["STRATA_DATABASE_SECRET"]["value"] == "optuna-db/optuna-url"
    assert env["STRATA_OBJECT_STORE_SECRET"]["value"] == "s3-keys"
    assert env["STRATA_CHECKPOINTS"]["value"] == "s3://strata-layers"
    assert env["STRATA_S3_ENDPOINT"]["value"] == "https://s3.example.com"
    for name, key in (("STRATA_S3_ACCESS_KEY", "accessKey"), ("STRATA_S3_SECRET_KEY", "secretKey")):
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "s3-keys", "key": key}}


def _strata_env_read_by_the_operator() -> set[str]:
    names = set()
    for source in (ROOT / "operator" / "strata").rglob("*.py"):
        names |= set(re.findall(r"[\"'](STRATA_[A-Z0-9_]+)[\"']", source.read_text()))
    return names


def test_every_strata_variable_the_chart_sets_is_one_the_operator_reads() -> None:
    read = _strata_env_read_by_the_operator()
    for case, values in VALUE_SETS.items():
        names = {n for n in env_of(operator_container(manifests(values))) if n.startswith("STRATA_")}
        unknown = names - read
        assert not unknown, f"{case}: the operator never reads {sorted(unknown)}"


def test_node_pools_from_the_values_place_cpu_and_gpu_trainer_pods() -> None:
    """values -> operator env (JSON) -> operator settings -> where trainer pods of a silent spec go."""
    from strata.kube.reconcile import settings_from_env

    env = env_of(operator_container(manifests(VALUE_SETS["everything"])))
    assert env["STRATA_TRAINER_IMAGE"]["value"] == "registry.example.com/trainer:0.1.0-cuda"
    settings = settings_from_env({n: e["value"] for n, e in env.items() if "value" in e})
    spec = parse_spec({"searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 3}}, "trials": {"max": 4},
                       "trainer": {"gpu": {"enabled": True, "minConvLayers": 3}}})

    def placement(layers: int) -> tuple[dict, list]:
        pod = builders.build_trial_pod(name="s", namespace=NAMESPACE, uid="uid-1", number=0,
                                       params={"convLayers": layers}, spec=spec, settings=settings)
        return pod["spec"].get("nodeSelector"), pod["spec"].get("tolerations")

    assert placement(1) == ({"pool": "cpu"}, [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}])
    assert placement(3) == ({"pool": "gpu"}, [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    assert not any(n.startswith(("STRATA_GPU", "STRATA_CPU_N", "STRATA_CPU_T"))
                   for n in env_of(operator_container(manifests())))


def test_the_trainer_module_value_becomes_the_command_of_trainer_pods() -> None:
    """values -> STRATA_TRAINER_MODULE -> the module every trainer pod runs (the stand-in for load tests)."""
    from pydantic import TypeAdapter

    assert env_of(operator_container(manifests()))["STRATA_TRAINER_MODULE"]["value"] == "strata_trainer"
    env = env_of(operator_container(manifests({"trainer": {"module": "strata_trainer.standin"}})))
    module = TypeAdapter(builders.TrainerModule).validate_python(env["STRATA_TRAINER_MODULE"]["value"])
    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "fashion-quick.yaml").read_text())["spec"])
    pod = builders.build_trial_pod(name="s", namespace=NAMESPACE, uid="uid-1", number=0, params={"convLayers": 2},
                                   spec=spec, settings=builders.OperatorSettings(trainer_module=module))
    assert pod["spec"]["containers"][0]["command"] == ["python", "-m", "strata_trainer.standin"]


def test_the_trainer_pod_security_context_value_reaches_trainer_pods_and_openshift_takes_an_empty_one() -> None:
    from strata.kube.reconcile import settings_from_env

    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "fashion-quick.yaml").read_text())["spec"])
    for values, expected in (({}, {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}),
                             ({"trainer": {"podSecurityContext": {}}}, {})):
        env = {n: e["value"] for n, e in env_of(operator_container(manifests(values))).items()
               if n == "STRATA_TRAINER_POD_SECURITY_CONTEXT"}
        pod = builders.build_trial_pod(name="s", namespace=NAMESPACE, uid="uid-1", number=0,
                                       params={"convLayers": 2}, spec=spec, settings=settings_from_env(env))
        assert pod["spec"]["securityContext"] == {**expected, "runAsNonRoot": True,
                                                  "seccompProfile": {"type": "RuntimeDefault"}}


def test_s3_by_web_identity_gives_the_operator_and_every_trainer_pod_a_projected_token_and_no_keys() -> None:
    from strata.kube.reconcile import settings_from_env

    values = {"externalObjectStore": {"endpoint": "https://s3.eu-west-1.amazonaws.com", "bucket": "layers",
                                      "webIdentity": {"stsEndpoint": "https://sts.amazonaws.com",
                                                      "roleArn": "arn:aws:iam::123456789012:role/strata"}}}
    docs = manifests(values)
    container = operator_container(docs)
    env = env_of(container)
    assert env["STRATA_S3_STS_ENDPOINT"]["value"] == "https://sts.amazonaws.com"
    assert env["STRATA_S3_WEB_IDENTITY_TOKEN_FILE"]["value"] == "/var/run/secrets/strata/s3/token"
    assert "STRATA_S3_ACCESS_KEY" not in env and "STRATA_OBJECT_STORE_SECRET" not in env
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "s3-token")
    assert volume["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "sts.amazonaws.com"
    assert {"name": "s3-token", "mountPath": "/var/run/secrets/strata/s3", "readOnly": True} in container["volumeMounts"]

    settings = settings_from_env(plain_env(container))
    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "fashion-quick.yaml").read_text())["spec"])
    pod = builders.build_trial_pod(name="s", namespace=NAMESPACE, uid="uid-1", number=0, params={"convLayers": 2},
                                   spec=spec, settings=settings)
    trainer_env = env_of(pod["spec"]["containers"][0])
    assert trainer_env["STRATA_S3_STS_ENDPOINT"]["value"] == "https://sts.amazonaws.com"
    assert trainer_env["STRATA_S3_ROLE_ARN"]["value"] == "arn:aws:iam::123456789012:role/strata"
    assert "STRATA_S3_ACCESS_KEY" not in trainer_env
    token = next(v for v in pod["spec"]["volumes"] if v["name"] == "s3-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"] == {
        "audience": "sts.amazonaws.com", "expirationSeconds": 3600, "path": "token"}
    assert manifests()  # and off by default:
    assert not any(v["name"] == "s3-token" for v in next(d for d in manifests() if d["kind"] == "Deployment")
                   ["spec"]["template"]["spec"]["volumes"])


def test_a_node_shared_feature_cache_volume_reaches_the_trainer_pods() -> None:
    from strata.kube.reconcile import settings_from_env

    volume = {"hostPath": {"path": "/var/cache/strata-features", "type": "DirectoryOrCreate"}}
    env = env_of(operator_container(manifests({"trainer": {"featureCacheVolume": volume,
                                                           "featureCacheBytes": 8589934592}})))
    settings = settings_from_env({n: e["value"] for n, e in env.items() if "value" in e})
    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "fashion-quick.yaml").read_text())["spec"])
    pod = builders.build_trial_pod(name="s", namespace=NAMESPACE, uid="uid-1", number=0,
                                   params={"convLayers": 2}, spec=spec, settings=settings)

    trainer = pod["spec"]["containers"][0]
    assert {"name": "features", **volume} in pod["spec"]["volumes"]
    assert {"name": "features", "mountPath": "/var/cache/strata-features"} in trainer["volumeMounts"]
    trainer_env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert trainer_env["STRATA_FEATURE_CACHE_DIR"] == "/var/cache/strata-features"
    assert trainer_env["STRATA_FEATURE_CACHE_BYTES"] == "8589934592"
    assert "STRATA_FEATURE_CACHE_VOLUME" not in env_of(operator_container(manifests()))
    assert "share frozen-layer outputs" in render({"trainer": {"featureCacheVolume": volume}})["strata/templates/NOTES.txt"]


@pytest.mark.parametrize("case", ["bundled-services", "external-services", "everything"])
def test_trainer_pods_built_from_the_chart_settings_reference_the_chart_secrets(case: str) -> None:
    """Chart env -> operator settings -> trainer pod: every secretKeyRef names a Secret and key that exist."""
    from strata.kube.reconcile import settings_from_env

    docs = manifests(VALUE_SETS[case])
    plain = {n: e["value"] for n, e in env_of(operator_container(docs)).items() if "value" in e}
    settings = settings_from_env(plain)
    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "fashion-quick.yaml").read_text())["spec"])
    pod = builders.build_trial_pod(name="fashion-quick", namespace=NAMESPACE, uid="uid-1", number=0,
                                   params={"convLayers": 1}, spec=spec, settings=settings)
    trainer = pod["spec"]["containers"][0]
    assert trainer["image"] == plain["STRATA_TRAINER_IMAGE"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(refs) == {"STRATA_STORAGE_URL", "STRATA_S3_ACCESS_KEY", "STRATA_S3_SECRET_KEY"}
    rendered = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for ref in refs.values():
        if ref["name"] in rendered:  # bundled services: the chart made the Secret
            assert ref["key"] in rendered[ref["name"]]["data"], ref
        else:  # external services: the user's Secret, named in values
            assert ref["name"] in ("optuna-db", "s3-keys") and case == "external-services"
    trainer_env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert trainer_env["STRATA_CHECKPOINTS"] == plain["STRATA_CHECKPOINTS"]
    assert trainer_env["STRATA_S3_ENDPOINT"] == plain["STRATA_S3_ENDPOINT"]


def test_no_storage_configured_leaves_studies_to_name_their_own() -> None:
    docs = manifests()
    env = env_of(operator_container(docs))
    assert not {"STRATA_DATABASE_SECRET", "STRATA_DATABASE_URL", "STRATA_OBJECT_STORE_SECRET", "STRATA_CHECKPOINTS"} & set(env)
    assert not [d for d in docs if d["kind"] in ("Secret", "StatefulSet", "Job")]
    assert "no Optuna storage is configured" in render()["strata/templates/NOTES.txt"]


# --- RBAC ------------------------------------------------------------------------------------------------

def granted(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) granted by the chart's Roles and ClusterRoles."""
    result = set()
    for role in (d for d in docs if d["kind"] in ("Role", "ClusterRole")):
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        result.add((group, resource, verb))
    return result


# strata.kube.api's own calls (all core group), from its declaration.
OPERATOR_CALLS = {("", resource, verb) for resource, verb in kube_api.VERBS_USED}
# Kopf: list+watch the custom resource, patch it (finalizer, progress annotations) and its status,
# POST core v1 Events (kopf.info/kopf.warn), and watch the study-labelled pods (the study driver
# patches the status too). --standalone: no peering objects.
KOPF_NEEDS = {
    (API_GROUP, "hpostudies", "list"), (API_GROUP, "hpostudies", "watch"), (API_GROUP, "hpostudies", "patch"),
    (API_GROUP, "hpostudies/status", "patch"), ("", "events", "create"), ("", "pods", "watch"),
}
# The operator disables Kopf's scanning (settings.scanning.disabled): no CRD watch, in either scope.
KOPF_CLUSTER_NEEDS: set[tuple[str, str, str]] = set()
# Reads that add nothing to list (a list returns every object) but that kubectl-style clients expect.
HARMLESS_READS = {(API_GROUP, "hpostudies", "get"), (API_GROUP, "hpostudies/status", "get")}
ALLOWED = OPERATOR_CALLS | KOPF_NEEDS | KOPF_CLUSTER_NEEDS | HARMLESS_READS


def test_the_declared_api_verbs_match_the_calls_in_the_api_module() -> None:
    """VERBS_USED is what the RBAC test trusts: prove it against strata/kube/api.py's CoreV1Api calls."""
    tree = ast.parse(Path(kube_api.__file__).read_text())
    verbs = {"read": "get", "list": "list", "create": "create", "delete": "delete", "patch": "patch",
             "replace": "update", "watch": "watch"}
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "core":
            match = re.fullmatch(r"(read|list|create|delete|patch|replace|watch)_namespaced_(\w+?)(_status|_log)?",
                                 node.attr)
            assert match, f"unexpected CoreV1Api call {node.attr}"
            resource = match.group(2) + "s" + (match.group(3) or "").replace("_", "/")
            calls.add((resource, verbs[match.group(1)]))
    assert calls == kube_api.VERBS_USED


@pytest.mark.parametrize("case", ["defaults", "namespace-rbac", "watch-namespaces"])
def test_rbac_grants_what_the_operator_uses_and_nothing_more(case: str) -> None:
    roles = [d for d in manifests(VALUE_SETS[case]) if d["kind"] in ("Role", "ClusterRole")]
    assert roles
    for role in roles:  # each Role on its own: the operator needs all of it in every namespace it serves
        rules = granted([role])
        assert OPERATOR_CALLS <= rules, OPERATOR_CALLS - rules
        assert KOPF_NEEDS <= rules, KOPF_NEEDS - rules
        assert rules <= ALLOWED, rules - ALLOWED
        assert not any("*" in part for rule in rules for part in rule)
        assert ("", "secrets", "list") not in rules and ("", "secrets", "watch") not in rules
        # no exec, attach, portforward: only reading a finished trial pod's log before removing it
        assert {(g, r, v) for g, r, v in rules if r.startswith("pods/")} == {("", "pods/log", "get")}
        assert not any(group == "apiextensions.k8s.io" for group, _, _ in rules)
        assert not any(resource == "namespaces" for _, resource, _ in rules)  # exact names, no scanning


def test_cluster_scope_binds_a_cluster_role_to_the_operator_service_account() -> None:
    docs = manifests()
    role, binding = only(docs, "ClusterRole"), only(docs, "ClusterRoleBinding")
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    account = only(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}]
    assert only(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_namespace_scope_creates_only_namespaced_objects_in_the_release_namespace() -> None:
    docs = manifests(VALUE_SETS["everything"])
    role, binding = only(docs, "Role"), only(docs, "RoleBinding")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in docs} == {NAMESPACE}


def test_watch_namespaces_binds_one_role_per_listed_namespace_and_no_cluster_role() -> None:
    docs = manifests(VALUE_SETS["watch-namespaces"])
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert len(roles) == len(bindings) == len(WATCHED)
    assert sorted(roles) == sorted(bindings) == sorted(WATCHED)  # not the release namespace: it is not listed
    cluster_rules = only(manifests(), "ClusterRole")["rules"]
    account = only(docs, "ServiceAccount")
    for namespace in WATCHED:
        role, binding = roles[namespace], bindings[namespace]
        assert role["rules"] == cluster_rules, f"{namespace}: not the operator's rules"
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                        "namespace": NAMESPACE}]
    # Everything else (operator, its ServiceAccount, services) stays in the release namespace.
    rbac_kinds = {"Role", "RoleBinding"}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in rbac_kinds} == {NAMESPACE}
    # The release namespace is served when listed, once.
    listed = manifests({"rbac": {"scope": "namespace"}, "watchNamespaces": [NAMESPACE, "team-a"]})
    assert sorted(d["metadata"]["namespace"] for d in listed if d["kind"] == "Role") == sorted([NAMESPACE, "team-a"])
    # rbac.create=false: no RBAC objects, the operator is still confined to the list.
    own = manifests({"rbac": {"scope": "namespace", "create": False}, "watchNamespaces": WATCHED})
    assert not [d for d in own if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    assert env_of(operator_container(own))["STRATA_NAMESPACES"] == {"name": "STRATA_NAMESPACES",
                                                                    "value": ",".join(WATCHED)}


# --- security ---------------------------------------------------------------------------------------------

CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET_KEY|ACCESS_KEY|TOKEN|CREDENTIAL|ROOT_USER|_URL$", re.I)
URL_WITH_CREDENTIALS = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def privilege_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for where, spec in pod_specs(docs):
        pod_context = spec.get("securityContext", {})
        if pod_context.get("seccompProfile") != {"type": "RuntimeDefault"}:
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = {**pod_context, **container.get("securityContext", {})}
            label = f"{where}/{container['name']}"
            if context.get("runAsNonRoot") is not True or context.get("runAsUser", 0) <= 0:
                problems.append(f"{label} may run as root")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{label} may escalate privileges")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{label} has a writable root filesystem")
            if context.get("capabilities") != {"drop": ["ALL"]} or context.get("privileged"):
                problems.append(f"{label} keeps capabilities")
            if "/tmp" not in {m["mountPath"] for m in container.get("volumeMounts", [])}:
                problems.append(f"{label}: a read-only root needs a writable /tmp")
    return problems


def credential_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for where, spec in pod_specs(docs):
        for container in spec.get("initContainers", []) + spec["containers"]:
            for env in container.get("env", []):
                label = f"{where}/{container['name']}: {env['name']}"
                if "value" in env:
                    if CREDENTIAL_NAME.search(env["name"]):
                        problems.append(f"{label} is a credential in plain text")
                    if URL_WITH_CREDENTIALS.search(env["value"]):
                        problems.append(f"{label} holds a URL with credentials")
                elif CREDENTIAL_NAME.search(env["name"]) and set(env["valueFrom"]) != {"secretKeyRef"}:
                    problems.append(f"{label} is a credential from somewhere else than a Secret")
    return problems


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_every_container_runs_unprivileged(case: str) -> None:
    docs = manifests(VALUE_SETS[case])
    assert pod_specs(docs)
    assert privilege_problems(docs) == []


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_credentials_reach_containers_only_through_secret_references(case: str) -> None:
    assert credential_problems(manifests(VALUE_SETS[case])) == []


def test_the_security_checks_notice_a_weakened_operator() -> None:
    """The two checks above would fail on a chart that ran as root or passed a password in plain text."""
    weakened = manifests({"securityContext": {"readOnlyRootFilesystem": False},
                          "podSecurityContext": {"runAsUser": 0},
                          "operator": {"extraEnv": [
                              {"name": "DB_PASSWORD", "value": "hunter2"},
                              {"name": "OPTUNA", "value": "postgresql://u:hunter2@db:5432/optuna"}]}})
    assert privilege_problems(weakened) == [f"Deployment/{RELEASE}/operator may run as root",
                                            f"Deployment/{RELEASE}/operator has a writable root filesystem"]
    assert len(credential_problems(weakened)) == 2


def test_operator_runs_as_the_image_user() -> None:
    spec = only(manifests(), "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == 1000 and spec["securityContext"]["fsGroup"] == 1000
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}} in spec["volumes"]


def test_given_passwords_appear_only_inside_secrets() -> None:
    values = VALUE_SETS["everything"]
    for path, text in render(values).items():
        for secret in ("given-pass", "given-secret-key"):
            assert secret not in text, f"{path} shows {secret} in plain text"
    docs = manifests(values)
    url = secret_data(only(docs, "Secret", f"{RELEASE}-postgresql-url"))["url"]
    assert url == f"postgresql+psycopg2://strata:given-pass@{RELEASE}-postgresql.{NAMESPACE}.svc:5432/optuna"
    assert secret_data(only(docs, "Secret", f"{RELEASE}-minio")) == {"accessKey": "strata",
                                                                       "secretKey": "given-secret-key"}


def test_generated_database_password_is_shared_by_the_server_and_the_optuna_url() -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    docs = manifests(VALUE_SETS["bundled-services"])
    password = secret_data(only(docs, "Secret", f"{RELEASE}-postgresql-auth"))["password"]
    url = sqlalchemy.engine.make_url(secret_data(only(docs, "Secret", f"{RELEASE}-postgresql-url"))["url"])
    assert len(password) >= 32 and url.password == password
    assert (url.drivername, url.username, url.database, url.port) == ("postgresql+psycopg2", "strata", "optuna", 5432)
    keys = secret_data(only(docs, "Secret", f"{RELEASE}-minio"))
    assert len(keys["accessKey"]) >= 3 and len(keys["secretKey"]) >= 40


def test_a_password_with_url_characters_survives_the_optuna_url() -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    password = "p@ss:w/rd?#%"
    docs = manifests({"postgresql": {"enabled": True, "auth": {"password": password}}})
    url = secret_data(only(docs, "Secret", f"{RELEASE}-postgresql-url"))["url"]
    assert sqlalchemy.engine.make_url(url).password == password


# --- PostgreSQL and MinIO ---------------------------------------------------------------------------------

def test_bundled_postgresql_keeps_its_data_on_a_volume_as_the_postgres_user() -> None:
    docs = manifests(VALUE_SETS["bundled-services"])
    statefulset = only(docs, "StatefulSet", f"{RELEASE}-postgresql")
    spec = statefulset["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == 999 and spec["securityContext"]["fsGroup"] == 999
    container = spec["containers"][0]
    assert not container["image"].endswith(":latest")
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    env = env_of(container)
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-postgresql-auth", "key": "password"}
    assert env["PGDATA"]["value"].startswith(container["volumeMounts"][0]["mountPath"] + "/")
    service = only(docs, "Service", f"{RELEASE}-postgresql")
    assert service["spec"]["ports"][0]["port"] == 5432
    auth = only(docs, "Secret", f"{RELEASE}-postgresql-auth")
    assert auth["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # On upgrade the password is looked up from the installed Secret rather than regenerated.
    assert 'lookup "v1" "Secret"' in (CHART / "templates" / "postgresql.yaml").read_text()


def test_bundled_minio_creates_the_bucket_in_a_post_install_hook() -> None:
    docs = manifests(VALUE_SETS["bundled-services"])
    statefulset = only(docs, "StatefulSet", f"{RELEASE}-minio")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    job = only(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("quay.io/minio/mc:RELEASE.")
    env = env_of(container)
    assert env["S3_BUCKET"]["value"] == "strata-layers"
    assert env["S3_ENDPOINT"]["value"] == f"http://{RELEASE}-minio.{NAMESPACE}.svc:9000"
    assert "mc mb --ignore-existing" in container["args"][0]
    assert only(docs, "Service", f"{RELEASE}-minio")["spec"]["ports"][0]["port"] == 9000


def test_every_image_is_pinned() -> None:
    for values in VALUE_SETS.values():
        for where, spec in pod_specs(manifests(values)):
            for container in spec["containers"]:
                image = container["image"]
                assert re.search(r":[\w][\w.-]*$", image) and not image.endswith(":latest"), f"{where}: {image}"


# --- CRD ---------------------------------------------------------------------------------------------------

def test_chart_ships_the_repository_crd() -> None:
    chart_crd = CHART / "crds" / "hpostudy.yaml"
    assert chart_crd.read_text() == (ROOT / "crds" / "hpostudy.yaml").read_text(), (
        "the chart's CRD is stale: cp crds/hpostudy.yaml charts/strata/crds/hpostudy.yaml")
    from strata.crd import build_crd

    assert yaml.safe_load(chart_crd.read_text()) == build_crd(), (
        "crds/hpostudy.yaml is stale: python -m strata.crd > crds/hpostudy.yaml, then copy it into the chart")


# --- metrics Service, ServiceMonitor and Grafana dashboard -------------------------------------------------

def test_metrics_service_and_service_monitor_select_the_operator() -> None:
    docs = manifests(VALUE_SETS["monitoring"])
    service = only(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "strata"  # the dashboard's up{job="strata"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert {k: v for k, v in endpoint.items() if "elabelings" not in k} == {
        "port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s", "honorLabels": True}
    assert not [d for d in manifests() if d["kind"] == "ServiceMonitor"]


def _exported_metric_names() -> set[str]:
    """Series names the operator's exporter really produces (counters get _total, histograms _bucket...)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from strata.metrics import StrataMetrics, StudySnapshot

    metrics = StrataMetrics()
    metrics.update("ml", "s", StudySnapshot(phase="Running", complete=2, best_value=0.3, durations=[4.0], max_trials=8,
                                            registry_objects=3, registry_bytes=10,
                                            dependencies_up={"database": True}, dependency_failures={"database": 1}))
    with metrics.reconcile("ml", "s"):
        pass
    metrics.reconcile_errors.labels("ml", "s").inc()
    metrics.storage_seconds.labels("ask").observe(0.01)
    text = prometheus_client.generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_config_map_carries_the_sidecar_label_and_the_dashboard() -> None:
    docs = manifests()
    config_map = only(docs, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["strata.json"]) == json.loads((CHART / "dashboards" / "strata.json").read_text())
    custom = only(manifests({"dashboard": {"label": "dashboards", "labelValue": "strata", "namespace": "monitoring"}}),
                  "ConfigMap")
    assert custom["metadata"]["labels"]["dashboards"] == "strata" and custom["metadata"]["namespace"] == "monitoring"
    assert not [d for d in manifests({"dashboard": {"enabled": False}}) if d["kind"] == "ConfigMap"]


def test_dashboard_panels_query_prometheus_through_the_datasource_variable() -> None:
    dashboard = json.loads((CHART / "dashboards" / "strata.json").read_text())
    assert dashboard["uid"] == "strata-hpo" and dashboard["title"] == "Strata HPO"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "study"):
        assert variables[name]["type"] == "query" and "label_values(" in variables[name]["definition"]
    ids = [p["id"] for p in iter_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in iter_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]


def test_dashboard_queries_use_only_metrics_the_operator_exports() -> None:
    exported = _exported_metric_names() | {"up", "ALERTS"}  # Prometheus' own series
    queries = load_dashboard_queries()
    used = set()
    for title, expr in queries:
        names = set(re.findall(r"\b(strata_[a-z_]+|process_[a-z_]+|up|ALERTS)\b(?=\s*[{\[)])", expr))
        assert names, f"{title}: no metric in {expr}"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported"
        used |= names
    # Every family the dashboard promises: progress, best value, states, durations, reuse, health, registry.
    for family in ("strata_trials_total", "strata_trials_current", "strata_best_objective_value",
                   "strata_trial_duration_seconds_bucket", "strata_reused_trials_total",
                   "strata_training_seconds_saved_total", "strata_reconcile_duration_seconds_bucket",
                   "strata_reconcile_errors_total", "strata_optuna_storage_call_duration_seconds_bucket",
                   "strata_registry_objects", "strata_registry_bytes", "strata_registry_load_failures_total",
                   "strata_dependency_up", "strata_dependency_failures_total", "up", "strata_trials_max",
                   "strata_trial_retries_total", "process_cpu_seconds_total", "process_resident_memory_bytes",
                   "ALERTS"):
        assert family in used, f"no panel shows {family}"


def test_the_dashboard_shows_a_down_operator_in_red_and_what_each_study_is_doing() -> None:
    dashboard = json.loads((CHART / "dashboards" / "strata.json").read_text())
    panels = {p["title"]: p for p in iter_panels(dashboard)}
    up = panels["Operator up"]["fieldConfig"]["defaults"]
    assert up["noValue"] == "DOWN"  # no series at all (the target is gone) reads DOWN
    assert up["thresholds"]["steps"] == [{"color": "red", "value": None}, {"color": "green", "value": 1}]
    assert up["mappings"][0]["options"]["0"] == {"text": "DOWN", "color": "red", "index": 0}
    assert panels["Operator up"]["options"]["colorMode"] == "background"
    assert "strata_trials_max" in panels["Progress"]["targets"][0]["expr"]
    table = panels["Studies"]
    assert table["type"] == "table" and [t["refId"] for t in table["targets"]] == ["A", "B", "C", "D", "E"]
    assert all(t["format"] == "table" and t["instant"] for t in table["targets"])
    assert table["transformations"][0]["id"] == "merge"
    assert {"Trial throughput", "Failures and retries", "Operator CPU", "Operator memory",
            "Strata alerts firing"} <= set(panels)


def test_dashboard_query_loader_substitutes_grafana_variables() -> None:
    raw = load_dashboard_queries()
    plain = load_dashboard_queries(variables=PROMETHEUS_VARIABLES)
    assert [t for t, _ in raw] == [t for t, _ in plain] and len(raw) >= 15
    assert any("$namespace" in e for _, e in raw)
    assert not [e for _, e in plain if "$" in e]


def test_notes_tell_how_to_run_and_watch_a_study() -> None:
    notes = render(VALUE_SETS["bundled-services"])["strata/templates/NOTES.txt"]
    for text in ("examples/fashion-quick.yaml", "kubectl get hpostudies", "kubectl describe hpostudy",
                 '"Strata HPO"', "/metrics", f"{RELEASE}-postgresql-url"):
        assert text in notes, text
    assert "copy" in notes  # cluster scope: studies elsewhere need the Secrets in their namespace


def test_notes_name_the_namespaces_the_operator_watches() -> None:
    notes = render(VALUE_SETS["watch-namespaces"])["strata/templates/NOTES.txt"]
    assert "in namespaces team-a, team-b only" in notes and "helm upgrade" in notes
    assert "kubectl apply -n team-a -f examples/fashion-quick.yaml" in notes  # a namespace it serves
    assert "(in team-a, team-b)" in notes and "copy" in notes  # the Secrets are needed there
    assert "every namespace" in render()["strata/templates/NOTES.txt"]
    single = render({"rbac": {"scope": "namespace"}, "postgresql": {"enabled": True}})["strata/templates/NOTES.txt"]
    assert f"in namespace {NAMESPACE} only" in single and "copy" not in single



# --- alerts --------------------------------------------------------------------------------------------

def test_the_service_monitor_takes_a_namespace_annotations_and_relabelings() -> None:
    monitor = only(manifests(VALUE_SETS["monitoring"]), "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring" and monitor["metadata"]["annotations"] == {"team": "ml"}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}  # the Service stays where it is
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["relabelings"] == [{"targetLabel": "cluster", "replacement": "eu-1"}]
    assert endpoint["metricRelabelings"][0]["action"] == "drop"


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed")


def _rules_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    rule = only(manifests(values), "PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


@needs_promtool
def test_the_alerts_are_valid_prometheus_rules_that_fire_on_what_they_name(tmp_path: Path) -> None:
    rules = _rules_file(tmp_path, VALUE_SETS["monitoring"])
    checked = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    study = 'namespace="ml",study="fashion"'
    tests = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'up{job="strata"}', "values": "1 1 0x20"},
            {"series": f'strata_study_phase{{{study},phase="Failed"}}', "values": "0 0 1x20"},
            {"series": f'strata_study_phase{{namespace="ml",study="ok",phase="Failed"}}', "values": "0x22"},
            {"series": f'strata_reconcile_errors_total{{{study}}}', "values": "0+1x22"},
            {"series": f'strata_dependency_up{{{study},dependency="database"}}', "values": "1 0x21"},
            {"series": f'strata_dependency_up{{{study},dependency="registry"}}', "values": "1x22"},
            {"series": f'strata_trials_total{{{study},state="failed"}}', "values": "0+2x22"},
            {"series": f'strata_trials_total{{{study},state="complete"}}', "values": "0+1x22"},
            {"series": f'strata_trials_total{{namespace="ml",study="ok",state="failed"}}', "values": "0x22"},
            {"series": f'strata_trials_total{{namespace="ml",study="ok",state="complete"}}', "values": "0+3x22"},
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "StrataOperatorDown", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "team": "ml-platform"},
                 "exp_annotations": {"summary": "The Strata operator is down", "description": (
                     "No scrape of the Strata operator (job strata) has succeeded for 5m; HPOStudies are not "
                     "reconciled and no trial starts.")}}]},
            {"eval_time": "1m", "alertname": "StrataOperatorDown", "exp_alerts": []},
            {"eval_time": "5m", "alertname": "StrataStudyFailed", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "ml-platform", "namespace": "ml", "study": "fashion",
                                "phase": "Failed"},
                 "exp_annotations": {"summary": "HPOStudy ml/fashion failed", "description": (
                     "kubectl describe hpostudy -n ml fashion shows why (its Failed condition and Events).")}}]},
            {"eval_time": "20m", "alertname": "StrataReconcileErrors", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "ml-platform", "namespace": "ml", "study": "fashion"},
                 "exp_annotations": {"summary": "Reconciles of ml/fashion keep failing",
                                     "description": "10 reconcile errors in 10 minutes; the operator log has the "
                                                    "tracebacks."}}]},
            {"eval_time": "20m", "alertname": "StrataDependencyDown", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "team": "ml-platform", "namespace": "ml", "study": "fashion",
                                "dependency": "database"},
                 "exp_annotations": {"summary": "The database of ml/fashion is unreachable", "description": (
                     "Its Degraded condition says since when; the study waits (database), runs without reuse "
                     "(registry) or cannot start pods (kubernetes).")}}]},
            {"eval_time": "3m", "alertname": "StrataDependencyDown", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "StrataTrialFailureRate", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "ml-platform", "namespace": "ml", "study": "fashion"},
                 "exp_annotations": {"summary": "Many trials of ml/fashion fail", "description": (
                     "More than 25% of its trials finished as failed in 30 minutes; the TrialFailed Events carry "
                     "the reasons.")}}]},
        ],
    }]}
    test_file = tmp_path / "test.yml"
    test_file.write_text(yaml.safe_dump(tests))

    result = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_alerts_use_is_one_the_exporter_serves() -> None:
    from prometheus_client import generate_latest

    from strata.metrics import StrataMetrics, StudySnapshot

    metrics = StrataMetrics()
    metrics.update("ml", "fashion", StudySnapshot(phase="Running", dependencies_up={"database": True}))
    metrics.reconcile_errors.labels("ml", "fashion").inc()
    served = set(re.findall(r"^([a-z_]+)[{ ]", generate_latest(metrics.registry).decode(), re.MULTILINE))
    rule = only(manifests({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    used = {name for r in rule["spec"]["groups"][0]["rules"] for name in re.findall(r"\b(strata_[a-z_]+)", r["expr"])}
    assert used and used <= served, used - served



# --- operator pod extras, service account, network policies ----------------------------------------------

def test_operator_extra_volumes_topology_spread_and_a_service_account_without_automount() -> None:
    docs = manifests(VALUE_SETS["everything"])
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "ca", "configMap": {"name": "corporate-ca"}} in pod["volumes"]
    assert {"name": "ca", "mountPath": "/etc/ssl/corporate", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert pod["automountServiceAccountToken"] is True  # the operator calls the API server
    assert only(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert only(manifests({"serviceAccount": {"automount": True}}), "ServiceAccount")["automountServiceAccountToken"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_network_policies_let_only_the_operator_and_trainer_pods_reach_the_bundled_services() -> None:
    docs = manifests(VALUE_SETS["everything"])
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"strata", "strata-postgresql", "strata-minio"}  # release "strata": no prefix
    operator_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "fashion-quick.yaml").read_text())["spec"])
    trainer_labels = builders.build_trial_pod(name="s", namespace="team-a", uid="u", number=0, params={"convLayers": 1},
                                              spec=spec, settings=builders.OperatorSettings())["metadata"]["labels"]
    statefulsets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}

    operator_policy = policies["strata"]
    assert _selects(operator_policy["spec"]["podSelector"], operator_labels)
    assert operator_policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert operator_policy["spec"]["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}],
                                                   "from": [{"namespaceSelector": {}}]}]
    for component, port in (("postgresql", 5432), ("minio", 9000)):
        policy = policies[f"strata-{component}"]["spec"]
        server = next(s for s in statefulsets.values() if s["metadata"]["labels"]["app.kubernetes.io/component"] == component)
        assert _selects(policy["podSelector"], server["spec"]["template"]["metadata"]["labels"])
        (rule,) = policy["ingress"]
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        peers = rule["from"]
        assert any("namespaceSelector" not in p and _selects(p["podSelector"], operator_labels) for p in peers)
        assert any(p.get("namespaceSelector") == {} and _selects(p["podSelector"], trainer_labels) for p in peers)
        assert not any(p.get("podSelector") == {} or p.get("namespaceSelector") == {} and "podSelector" not in p
                       for p in peers)  # never everyone
    assert not [d for d in manifests() if d["kind"] == "NetworkPolicy"]
    only_ingress = only(manifests({"networkPolicy": {"enabled": True}}), "NetworkPolicy")
    assert only_ingress["spec"]["policyTypes"] == ["Ingress"]


def test_a_database_password_from_an_existing_secret_survives_template_based_gitops() -> None:
    # helm template (Argo CD, Flux) cannot look up the installed Secret: a generated password would
    # change on every render. With existingSecret the chart renders no password at all.
    values = {"postgresql": {"enabled": True, "auth": {"existingSecret": "optuna-db-credentials"}}}
    first, second = manifests(values), manifests(values)
    assert first == second
    assert not [d for d in first if d["kind"] == "Secret" and "postgresql" in d["metadata"]["name"]]
    server = next(d for d in first if d["kind"] == "StatefulSet" and "postgresql" in d["metadata"]["name"])
    password = next(e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]
                    if e["name"] == "POSTGRES_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "optuna-db-credentials", "key": "password"}
    assert env_of(operator_container(first))["STRATA_DATABASE_SECRET"]["value"] == "optuna-db-credentials/url"
    generated = [d for d in manifests({"postgresql": {"enabled": True}}) if d["kind"] == "Secret"]
    assert len(generated) == 2  # without it: the generated password's Secret and the URL's, as before


def test_the_chart_readme_lists_every_value_and_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart_readme.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    readme = (CHART / "README.md").read_text()
    for key in ("global.imageRegistry", "trainer.podSecurityContext", "metrics.prometheusRule.enabled",
                "networkPolicy.enabled", "postgresql.auth.existingSecret", "externalObjectStore.webIdentity.stsEndpoint"):
        assert f"| `{key}` |" in readme, key



def test_minio_keys_from_an_existing_secret_survive_template_based_gitops() -> None:
    values = {"minio": {"enabled": True, "auth": {"existingSecret": "layer-store-keys"}}}
    first = manifests(values)
    assert first == manifests(values)
    assert not [d for d in first if d["kind"] == "Secret" and "minio" in d["metadata"]["name"]]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in first if d["kind"] in ("StatefulSet", "Job")
            for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if "valueFrom" in e
            and "secretKeyRef" in e["valueFrom"]}
    assert refs == {"layer-store-keys"}
    env = env_of(operator_container(first))
    assert env["STRATA_OBJECT_STORE_SECRET"]["value"] == "layer-store-keys"
    assert env["STRATA_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "layer-store-keys"


def test_on_openshift_no_pod_names_a_uid_gid_or_fs_group_trainer_pods_included() -> None:
    from strata.kube.reconcile import settings_from_env

    values = {"openshift": True, "postgresql": {"enabled": True}, "minio": {"enabled": True}}
    docs = manifests(values)
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert len(pods) == 4
    for pod in pods:
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context), context
        for container in pod["containers"]:
            assert not {"runAsUser", "runAsGroup"} & set(container.get("securityContext") or {})
    settings = settings_from_env(plain_env(operator_container(docs)))
    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "fashion-quick.yaml").read_text())["spec"])
    trainer = builders.build_trial_pod(name="s", namespace=NAMESPACE, uid="u", number=0, params={"convLayers": 1},
                                       spec=spec, settings=settings)
    assert trainer["spec"]["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    # elsewhere (null: not detected here, where helm renders without the cluster's API list) the ids stay
    default = only(manifests(), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert default["runAsUser"] == 1000
    explicit = {"openshift": True, "trainer": {"podSecurityContext": {"runAsUser": 1000680000}}}
    assert env_of(operator_container(manifests(explicit)))["STRATA_TRAINER_POD_SECURITY_CONTEXT"]["value"] == \
        '{"runAsUser":1000680000}'
