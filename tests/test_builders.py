"""Pure builders: a trial becomes a trainer pod manifest; progress becomes a small status."""

from __future__ import annotations

import json
from typing import Any

import pytest

from strata.kube import builders
from strata.kube.builders import (
    OperatorSettings, build_data_check_pod, build_status, build_trial_pod, build_worker_pod, invalid_status, set_condition,
)
from strata.scheduler import Best, Outcome, Progress
from strata.spec import SecretKeyRef, SpecError, Toleration, parse_spec

UID = "6f1c2a9e-0000-4000-8000-000000000001"
GPU_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def spec(**overrides: Any):
    raw = {
        "searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 3},
                        "filters": {"type": "categorical", "choices": [18]}},
        "trials": {"max": 4, "parallel": 2},
        "storage": {"databaseSecret": {"name": "strata-db", "key": "url"}, "checkpoints": "s3://layers/p",
                    "s3Endpoint": "http://minio:9000", "objectStoreSecret": "strata-s3"},
        "trainer": {"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "2", "memory": "4Gi"}}},
    }
    raw.update(overrides)
    return parse_spec(raw)


def gpu_spec(**gpu: Any):
    return spec(trainer={"resources": {"limits": {"cpu": "2"}},
                         "gpu": {"enabled": True, "minConvLayers": 3, "nodeSelector": GPU_SELECTOR,
                                 "tolerations": [GPU_TOLERATION], **gpu}})


def pod(study_spec=None, *, layers: int = 1, number: int = 7, settings: OperatorSettings | None = None,
        name: str = "fashion", namespace: str = "ml") -> dict[str, Any]:
    return build_trial_pod(name=name, namespace=namespace, uid=UID, number=number,
                           params={"convLayers": layers, "filters": 18}, spec=study_spec or spec(),
                           settings=settings or OperatorSettings())


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    [only] = manifest["spec"]["containers"]
    return only


def env_of(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(manifest)["env"]}


# --- placement: CPU and GPU trials ---------------------------------------------------------------


def test_a_cpu_trial_gets_no_gpu_no_gpu_node_and_the_specs_resources():
    manifest = pod(layers=3)
    resources = container(manifest)["resources"]
    assert resources == {"requests": {"cpu": "1"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    assert "nodeSelector" not in manifest["spec"] and "tolerations" not in manifest["spec"]


def test_a_deep_trial_of_a_gpu_study_gets_a_gpu_the_gpu_nodes_and_their_tolerations():
    manifest = pod(gpu_spec(), layers=3)
    assert container(manifest)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert manifest["spec"]["nodeSelector"] == GPU_SELECTOR
    assert manifest["spec"]["tolerations"] == [GPU_TOLERATION]


def test_a_shallow_trial_of_the_same_gpu_study_stays_on_cpu_nodes():
    manifest = pod(gpu_spec(), layers=1)
    assert "nvidia.com/gpu" not in container(manifest)["resources"]["limits"]
    assert "nodeSelector" not in manifest["spec"] and "tolerations" not in manifest["spec"]


def test_gpu_count_and_the_operators_gpu_pool_apply_when_the_spec_names_no_pool():
    settings = OperatorSettings(gpu_node_selector={"pool": "gpu"},
                                gpu_tolerations=(Toleration(key="gpu", operator="Exists"),))
    study = spec(trainer={"nodeSelector": {"zone": "a"}, "gpu": {"enabled": True, "count": 2}})
    manifest = pod(study, layers=1, settings=settings)
    assert container(manifest)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert manifest["spec"]["nodeSelector"] == {"zone": "a", "pool": "gpu"}
    assert manifest["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


def test_cpu_trials_go_to_the_operators_cpu_pool_unless_the_spec_names_its_nodes():
    settings = OperatorSettings(cpu_node_selector={"pool": "cpu"}, gpu_node_selector={"pool": "gpu"},
                                cpu_tolerations=(Toleration(key="spot", operator="Exists"),))
    silent = pod(gpu_spec(), layers=1, settings=settings)
    named = pod(spec(trainer={"nodeSelector": {"zone": "a"}, "tolerations": [GPU_TOLERATION]}), layers=1,
                settings=settings)
    on_gpu = pod(gpu_spec(), layers=3, settings=settings)

    assert silent["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert silent["spec"]["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    assert named["spec"]["nodeSelector"] == {"zone": "a"} and named["spec"]["tolerations"] == [GPU_TOLERATION]
    assert on_gpu["spec"]["nodeSelector"] == GPU_SELECTOR  # the spec's GPU pool, not the CPU pool
    assert {"key": "spot", "operator": "Exists"} not in on_gpu["spec"]["tolerations"]


def test_only_studies_that_cache_frozen_features_mount_the_nodes_shared_feature_cache():
    settings = OperatorSettings(feature_cache_volume={"persistentVolumeClaim": {"claimName": "features"}})
    sharing = pod(spec(), layers=2, settings=settings)
    without_cache = pod(spec(reuse={"cacheFrozenFeatures": False}), layers=2, settings=settings)
    without_setting = pod(spec(), layers=2)

    assert {"name": "features", "persistentVolumeClaim": {"claimName": "features"}} in sharing["spec"]["volumes"]
    assert {"name": "STRATA_FEATURE_CACHE_DIR", "value": "/var/cache/strata-features"} in container(sharing)["env"]
    for other in (without_cache, without_setting):
        assert [v["name"] for v in other["spec"]["volumes"]] == ["tmp"]
        assert "STRATA_FEATURE_CACHE_DIR" not in {e["name"] for e in container(other)["env"]}


def test_the_gpu_example_sends_only_its_deep_wide_trials_to_the_gpu_pool():
    from pathlib import Path

    from strata.spec import load_study_file

    study = load_study_file(Path(__file__).resolve().parents[1] / "examples" / "cifar10-gpu.yaml").spec
    settings = OperatorSettings(gpu_node_selector={"pool": "gpu"}, cpu_node_selector={"pool": "cpu"})

    def placement(layers: int, filters: int) -> tuple[dict, str | None]:
        manifest = build_trial_pod(name="cifar10-gpu", namespace="ml", uid=UID, number=1, spec=study,
                                   params={"convLayers": layers, "filters": filters}, settings=settings)
        return manifest["spec"].get("nodeSelector"), container(manifest)["resources"]["limits"].get("nvidia.com/gpu")

    assert placement(3, 64) == ({"pool": "gpu"}, "1")
    assert placement(3, 48) == ({"pool": "gpu"}, "1")
    assert placement(3, 32) == ({"pool": "cpu"}, None)
    assert placement(2, 64) == ({"pool": "cpu"}, None)


def test_builders_do_not_change_the_spec_they_read():
    study = gpu_spec()
    before = study.model_dump()
    pod(study, layers=3)
    pod(study, layers=3)
    assert study.model_dump() == before
    assert "nvidia.com/gpu" not in study.trainer.resources.limits


# --- security -----------------------------------------------------------------------------------


def test_trainer_pods_run_as_non_root_with_a_read_only_root_filesystem():
    manifest = pod()
    security = manifest["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0 and security["runAsGroup"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container(manifest)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    # the only writable place is an emptyDir on /tmp, where HOME, caches and spills point
    assert container(manifest)["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert {"name": "tmp", "emptyDir": {}} in manifest["spec"]["volumes"]
    env = env_of(manifest)
    for name in ("HOME", "STRATA_SPILL_DIR", "STRATA_DATA_CACHE"):
        assert env[name]["value"].startswith("/tmp"), name


def test_under_openshifts_restricted_policy_the_platform_picks_the_uid():
    # trainer.podSecurityContext: {} in Helm: no fixed uid, gid or fsGroup (restricted-v2 assigns them).
    manifest = pod(settings=OperatorSettings(trainer_pod_security_context={}))
    assert manifest["spec"]["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container(manifest)["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_a_pod_security_context_setting_never_makes_trainers_root():
    from strata.kube.reconcile import SettingsError, settings_from_env

    assert settings_from_env({"STRATA_TRAINER_POD_SECURITY_CONTEXT": "{}"}).trainer_pod_security_context == {}
    assert settings_from_env({}).trainer_pod_security_context == {"runAsUser": 1000, "runAsGroup": 1000,
                                                                  "fsGroup": 1000}
    for bad in ('{"runAsUser": 0}', '{"runAsNonRoot": false}', "[1]"):
        with pytest.raises(SettingsError, match="STRATA_TRAINER_POD_SECURITY_CONTEXT"):
            settings_from_env({"STRATA_TRAINER_POD_SECURITY_CONTEXT": bad})


POD_OPTIONS = {
    "imagePullSecrets": ["regcred"],
    "labels": {"kueue.x-k8s.io/queue-name": "team-a", "cost-center": "ml"},
    "annotations": {"sidecar.istio.io/inject": "false"},
    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}]}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "strata-trainer"}}}],
    "priorityClassName": "batch-low",
    "runtimeClassName": "nvidia",
    "env": [{"name": "HF_HOME", "value": "/data/hf"},
            {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}}],
    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "images", "readOnly": True}}],
    "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
}


def test_trainer_pod_options_reach_every_trainer_pod():
    study = spec(trainer=POD_OPTIONS)
    for manifest in (pod(study, layers=2),
                     build_worker_pod(name="fashion", namespace="ml", uid=UID, gpu=False, token="ab12", slots=1,
                                      spec=study, settings=OperatorSettings()),
                     build_data_check_pod(name="fashion", namespace="ml", uid=UID, spec=study,
                                          settings=OperatorSettings())):
        pod_spec, labels = manifest["spec"], manifest["metadata"]["labels"]
        assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and labels["hpo.strata.dev/study"] == "fashion"
        assert manifest["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert pod_spec["affinity"] == POD_OPTIONS["affinity"]
        assert pod_spec["topologySpreadConstraints"] == POD_OPTIONS["topologySpreadConstraints"]
        assert (pod_spec["priorityClassName"], pod_spec["runtimeClassName"]) == ("batch-low", "nvidia")
        env = env_of(manifest)
        assert env["HF_HOME"] == {"name": "HF_HOME", "value": "/data/hf"}
        assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "key"}}
        assert env["HOME"]["value"] == "/tmp"  # the operator's own stay
        assert POD_OPTIONS["volumes"][0] in pod_spec["volumes"] and {"name": "tmp", "emptyDir": {}} in pod_spec["volumes"]
        assert {"name": "data", "mountPath": "/data", "readOnly": True} in container(manifest)["volumeMounts"]


def test_without_options_a_pod_has_none_of_them():
    manifest = pod()
    for key in ("imagePullSecrets", "affinity", "topologySpreadConstraints", "priorityClassName", "runtimeClassName"):
        assert key not in manifest["spec"], key
    assert "annotations" not in manifest["metadata"]


@pytest.mark.parametrize("trainer, message", [
    ({"env": [{"name": "STRATA_STORAGE_URL", "value": "x"}]}, "env.0: STRATA_STORAGE_URL is set by the operator"),
    ({"env": [{"name": "HOME", "value": "/x"}]}, "HOME is set by the operator"),
    ({"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
     "give value or valueFrom, not both"),
    ({"env": [{"name": "1A=", "value": "1"}]}, "is not an environment variable name"),
    ({"volumes": [{"name": "tmp", "emptyDir": {}}]}, "volumes[0].name: tmp is taken by the operator's own volumes"),
    ({"volumes": [{"emptyDir": {}}]}, "volumes[0].name: None is not a volume name"),
    ({"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]}, "volumes[1].name: a is given twice"),
    ({"volumeMounts": [{"name": "data", "mountPath": "/data"}]}, "no volume named data in trainer.volumes"),
    ({"volumes": [{"name": "d", "emptyDir": {}}], "volumeMounts": [{"name": "d", "mountPath": "/tmp/x"}]},
     "mountPath: /tmp/x is the operator's"),
    ({"labels": {"hpo.strata.dev/trial": "1"}}, "label hpo.strata.dev/trial is set by the operator"),
    ({"annotations": {"bad key!": "x"}}, "is not a qualified name"),
    ({"priorityClassName": "Not_A_Name"}, "is not a DNS subdomain name"),
])
def test_bad_trainer_pod_options_are_one_line_naming_the_field(trainer, message):
    with pytest.raises(SpecError) as raised:
        spec(trainer=trainer)
    text = str(raised.value)
    assert "\n" not in text and text.startswith("spec.trainer") and message in text, text


def test_trainer_pods_get_no_service_account_token_unless_the_spec_names_an_account():
    assert pod()["spec"]["automountServiceAccountToken"] is False
    named = pod(spec(trainer={"serviceAccountName": "trainer"}))["spec"]
    assert named["serviceAccountName"] == "trainer" and "automountServiceAccountToken" not in named


def test_credentials_reach_the_pod_only_through_secret_references():
    manifest = pod()
    env = env_of(manifest)
    assert env["STRATA_STORAGE_URL"] == {"name": "STRATA_STORAGE_URL",
                                         "valueFrom": {"secretKeyRef": {"name": "strata-db", "key": "url"}}}
    assert env["STRATA_S3_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "strata-s3", "key": "accessKey"}}
    assert env["STRATA_S3_SECRET_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "strata-s3", "key": "secretKey"}}
    plain = {item["name"]: item["value"] for item in container(manifest)["env"] if "value" in item}
    assert not {"STRATA_STORAGE_URL", "STRATA_S3_ACCESS_KEY", "STRATA_S3_SECRET_KEY"} & set(plain)
    text = json.dumps(manifest)
    assert "postgresql" not in text and "password" not in text.lower()


def test_the_operators_secrets_are_used_when_the_spec_names_none():
    settings = OperatorSettings(database_secret=SecretKeyRef(name="operator-db", key="dsn"),
                                object_store_secret="operator-s3", checkpoints="s3://bucket",
                                s3_endpoint="http://minio:9000")
    env = env_of(pod(spec(storage={}), settings=settings))
    assert env["STRATA_STORAGE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "operator-db", "key": "dsn"}}
    assert env["STRATA_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "operator-s3"
    assert env["STRATA_CHECKPOINTS"]["value"] == "s3://bucket"
    assert env["STRATA_S3_ENDPOINT"]["value"] == "http://minio:9000"


def test_a_credential_free_optuna_url_in_the_spec_reaches_the_trainer_as_the_operator_uses_it():
    # The operator talks to spec.storage.optunaUrl: its trainers must too, not to the operator's default.
    settings = OperatorSettings(database_secret=SecretKeyRef(name="operator-db", key="url"))
    study = spec(storage={"optunaUrl": "postgresql+psycopg2://optuna@db:5432/optuna"})
    env = env_of(pod(study, settings=settings))
    assert env["STRATA_STORAGE_URL"] == {"name": "STRATA_STORAGE_URL",
                                         "value": "postgresql+psycopg2://optuna@db:5432/optuna"}
    assert builders.trainer_database(study, settings) == "postgresql+psycopg2://optuna@db:5432/optuna"


def test_threads_and_memory_follow_the_pods_limits_through_the_downward_api():
    env = env_of(pod())
    assert env["STRATA_CPU_LIMIT"]["valueFrom"] == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}
    assert env["STRATA_MEMORY_LIMIT"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.memory"


# --- identity -----------------------------------------------------------------------------------


def test_the_pod_is_owned_by_its_study_and_labelled_with_study_and_trial():
    manifest = pod(number=12)
    meta = manifest["metadata"]
    assert meta["name"] == "fashion-trial-12" and meta["namespace"] == "ml"
    assert meta["labels"][builders.LABEL_STUDY] == "fashion"
    assert meta["labels"][builders.LABEL_TRIAL] == "12"
    assert meta["labels"][builders.LABEL_COMPONENT] == "trainer"
    assert meta["ownerReferences"] == [{"apiVersion": "hpo.strata.dev/v1alpha1", "kind": "HPOStudy", "name": "fashion",
                                        "uid": UID, "controller": True, "blockOwnerDeletion": True}]
    assert builders.study_selector("fashion") == "hpo.strata.dev/study=fashion"


def test_the_container_runs_the_trainer_module_for_its_study_and_trial():
    c = container(pod(number=12, namespace="ml"))
    assert c["command"] == ["python", "-m", "strata_trainer"]
    assert c["args"] == ["--study", "ml.fashion", "--trial", "12"]
    assert c["image"] == OperatorSettings().trainer_image
    assert pod()["spec"]["restartPolicy"] == "Never"  # a failed attempt is retried as a new trial


def test_the_operators_trainer_module_runs_in_every_trainer_worker_and_data_check_pod():
    """strata_trainer.standin (load tests) replaces the trainer in each pod, and a worker pod passes it on
    to the trainers it spawns; the default module adds nothing to the pod."""
    settings = OperatorSettings(trainer_module="strata_trainer.standin")
    study = spec()
    pods = [pod(settings=settings),
            builders.build_worker_pod(name="fashion", namespace="ml", uid=UID, gpu=False, token="a1", slots=2,
                                      spec=study, settings=settings),
            builders.build_data_check_pod(name="fashion", namespace="ml", uid=UID, spec=study, settings=settings)]
    for manifest in pods:
        assert container(manifest)["command"] == ["python", "-m", "strata_trainer.standin"]
        assert env_of(manifest)["STRATA_TRAINER_MODULE"]["value"] == "strata_trainer.standin"
    assert "STRATA_TRAINER_MODULE" not in env_of(pod())
    with pytest.raises(ValueError, match="STRATA_TRAINER_MODULE: 'strata-trainer' is not a Python module name"):
        OperatorSettings(trainer_module="strata-trainer")


def test_the_spec_image_overrides_the_operators_and_a_trial_timeout_bounds_the_pod():
    study = spec(trainer={"image": "registry.local/trainer:2", "imagePullPolicy": "Always"},
                 trials={"max": 2, "timeoutSeconds": 300})
    manifest = pod(study)
    assert container(manifest)["image"] == "registry.local/trainer:2"
    assert container(manifest)["imagePullPolicy"] == "Always"
    assert manifest["spec"]["activeDeadlineSeconds"] > 300  # the operator stops the trial first


def test_pod_names_are_valid_for_long_study_names():
    name = builders.trial_pod_name("s" * 62, 123)
    assert len(name) <= 63 and not name.endswith("-")


# --- conditions and status ----------------------------------------------------------------------

OLD = "2020-01-01T00:00:00Z"


def test_set_condition_moves_last_transition_time_only_when_the_status_flips():
    before = [{"type": "Ready", "status": "True", "reason": "StudyReady", "message": "a", "lastTransitionTime": OLD}]

    same = set_condition(before, "Ready", True, "StudyReady", "new message", 3)
    assert same[0]["lastTransitionTime"] == OLD
    assert same[0]["message"] == "new message" and same[0]["observedGeneration"] == 3

    flipped = set_condition(before, "Ready", False, "InvalidSpec", "spec.trials.max: bad", 4)
    assert flipped[0]["status"] == "False" and flipped[0]["reason"] == "InvalidSpec"
    assert flipped[0]["lastTransitionTime"] != OLD
    assert before[0]["status"] == "True"  # the input list is not modified


def test_set_condition_adds_a_missing_condition_and_keeps_the_others():
    before = [{"type": "Ready", "status": "True", "reason": "R", "message": "", "lastTransitionTime": OLD}]
    after = set_condition(before, "Failed", False, "TrialsRunning", "", 1)
    assert [c["type"] for c in after] == ["Ready", "Failed"]
    assert after[0] == before[0]
    assert after[1]["status"] == "False" and after[1]["lastTransitionTime"]


def many_trials_progress() -> Progress:
    return Progress(complete=9000, pruned=800, failed=150, running=8, waiting=42, configs=10000, finished=9950,
                    best=Best(1234, 0.1234567, {"convLayers": 3, "filters": 64, "fcLayout": "500-250-50",
                                                "learningRate": 0.000123456789, "batchSize": 32,
                                                "optimizer": "adam", "kernelSize": 3}),
                    reused_trials=7000, reused_layers=12000, seconds_saved=123456.789)


def test_the_status_of_a_10000_trial_study_is_small_and_has_no_per_trial_lists():
    outcome = Outcome(False, "Running", "TrialsRunning", "9950 of 10000 trials finished, 8 running")
    status = build_status({}, many_trials_progress(), outcome, max_trials=10000, optuna_name="ml.fashion",
                          generation=2)
    size = len(json.dumps(status))
    assert size < 4096, size

    def lists(value: Any, path: str = "") -> list[str]:
        if isinstance(value, dict):
            return [p for k, v in value.items() for p in lists(v, f"{path}.{k}")]
        return [path] if isinstance(value, list) else []

    assert lists(status) == [".conditions"] and len(status["conditions"]) == 5  # Ready Running Complete Failed Degraded
    assert status["completed"] == "9950/10000" and status["trials"]["running"] == 8
    assert status["best"]["number"] == 1234 and status["reuse"]["trials"] == 7000
    assert status["phase"] == "Running" and status["observedGeneration"] == 2


@pytest.mark.parametrize("phase, reason, conditions", [
    ("Running", "TrialsRunning", {"Ready": "True", "Running": "True", "Complete": "False", "Failed": "False",
                                  "Degraded": "False"}),
    ("Succeeded", "MaxTrialsReached", {"Ready": "True", "Running": "False", "Complete": "True", "Failed": "False",
                                       "Degraded": "False"}),
    ("Failed", "FailureBudgetExceeded", {"Ready": "True", "Running": "False", "Complete": "False", "Failed": "True",
                                         "Degraded": "False"}),
])
def test_the_conditions_follow_the_outcome(phase, reason, conditions):
    outcome = Outcome(phase != "Running", phase, reason, "m")
    status = build_status({}, Progress(), outcome, max_trials=4, optuna_name="ns.s", generation=1)
    assert {c["type"]: c["status"] for c in status["conditions"]} == conditions
    assert "best" not in status  # unset fields are left out, never sent as null
    if phase == "Failed":
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "FailureBudgetExceeded"


def test_an_invalid_spec_sets_ready_false_and_keeps_earlier_conditions_times():
    earlier = build_status({}, Progress(), Outcome(False, "Running", "TrialsRunning", ""), max_trials=4,
                           optuna_name="ns.s", generation=1)
    status = invalid_status(earlier, "InvalidSpec", "spec.trials.max: Input should be a valid integer", 2)
    assert status["phase"] == "Invalid"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("False", "InvalidSpec", 2)
    assert "spec.trials.max" in ready["message"]
    assert invalid_status({}, "SecretNotFound", "m", 1)["phase"] == "Error"
