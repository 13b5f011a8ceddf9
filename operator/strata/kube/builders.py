"""Pure builders: study spec + trial -> trainer pod manifest; progress -> status and conditions.

No Kubernetes API here: plain values in, plain dicts out, unit tested without a cluster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Annotated, Any, Sequence

from pydantic import AfterValidator

from strata.executors import DEFAULT_TRAINER_MODULE, TRAINER_MODULE_ENV, check_trainer_module
from strata.health import Outage
from strata.scheduler import Outcome, Progress
from strata.spec import API_GROUP, API_VERSION, KIND, SecretKeyRef, StudySpec, Toleration

LABEL_STUDY = f"{API_GROUP}/study"
LABEL_TRIAL = f"{API_GROUP}/trial"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_WORKER = f"{API_GROUP}/worker"  # worker pods (spec.execution.mode warmWorkers): the pool, cpu or gpu
ANNOTATION_REPORTED = f"{API_GROUP}/reported"
TRAINER_COMMAND = ["python", "-m", DEFAULT_TRAINER_MODULE]  # the trainer image's entrypoint module
# OperatorSettings.trainer_module as settings_from_env parses it (a bad one names the variable once).
TrainerModule = Annotated[str, AfterValidator(lambda name: check_trainer_module(name, None))]
TRAINER_UID = 1000
DEFAULT_POD_SECURITY_CONTEXT = {"runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID, "fsGroup": TRAINER_UID}
FEATURE_CACHE_MOUNT = "/var/cache/strata-features"
S3_TOKEN_MOUNT = "/var/run/secrets/strata/s3"  # a projected ServiceAccount token, for S3 by web identity


@dataclass(frozen=True)
class OperatorSettings:
    """The operator's defaults (Helm values -> env), used where a study's spec is silent."""

    trainer_image: str = "ghcr.io/strata-hpo/trainer:0.1.0"
    database_secret: SecretKeyRef | None = None  # Optuna URL for studies without spec.storage.databaseSecret
    object_store_secret: str | None = None
    checkpoints: str | None = None  # e.g. s3://strata-layers
    s3_endpoint: str | None = None
    # The cluster's GPU pool, for studies whose spec.trainer.gpu names none.
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_tolerations: tuple[Toleration, ...] = ()
    # The cluster's CPU pool, for CPU trials of studies whose spec.trainer names no nodeSelector/tolerations.
    cpu_node_selector: dict[str, str] = field(default_factory=dict)
    cpu_tolerations: tuple[Toleration, ...] = ()
    # A volume source (hostPath, persistentVolumeClaim...) shared by the trainer pods of a node: trials
    # reusing the same donor read its frozen outputs there instead of computing them (strata_trainer.features).
    feature_cache_volume: dict[str, Any] = field(default_factory=dict)
    feature_cache_bytes: int | None = None
    # The trainer pods' user and group. A fixed uid suits most clusters (the image's user, and volumes
    # made writable for its group); under OpenShift's restricted SCC the platform assigns both, so
    # there it is {} (Helm: trainer.podSecurityContext). runAsNonRoot and seccomp are always set.
    trainer_pod_security_context: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_POD_SECURITY_CONTEXT))
    # S3 by web identity (no keys): trainer pods get a projected ServiceAccount token with this
    # audience and trade it at this STS (strata.objectstore.credential_chain), as the operator does.
    s3_sts_endpoint: str | None = None
    s3_role_arn: str | None = None
    s3_token_audience: str = "sts.amazonaws.com"
    # Check each study's data once in a trainer pod before its first trial (strata_trainer.datacheck).
    check_data: bool = True
    # `python -m MODULE` in every trainer, worker and data-check pod: strata_trainer.standin is the
    # torch-free stand-in for load tests (same image, same arguments, same protocols).
    trainer_module: str = DEFAULT_TRAINER_MODULE

    def __post_init__(self) -> None:
        check_trainer_module(self.trainer_module)


def optuna_study_name(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


# Pod names are kept to 63 characters (a pod's hostname is its name) and label values must be:
# an HPOStudy's name may be a DNS subdomain of up to 253. Longer names are cut and made unique
# again with a digest of the whole name, so two studies (or two trials) never share a pod name.
NAME_LIMIT = 63
EVENT_NAME_LIMIT = 253


def _digest(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _fit(text: str, limit: int, suffix: str = "") -> str:
    """text + suffix within limit; when text must be cut, a digest of all of it keeps it unique."""
    if len(text) + len(suffix) <= limit:
        return text + suffix
    head = text[:limit - len(suffix) - 9].rstrip("-.")
    return f"{head}-{_digest(text)}{suffix}"


def study_label(study: str) -> str:
    """The value of the study label: the name itself when it fits a label value (63), else cut + digest."""
    return _fit(study, NAME_LIMIT)


def trial_pod_name(study: str, number: int) -> str:
    return _pod_name(study, f"-trial-{number}")


def worker_pod_name(study: str, gpu: bool, token: str) -> str:
    """A worker pod's name: unique per pod ever made (token), so a replacement never takes a dead
    pod's name while that one is still being removed, and a trial's worker is never ambiguous."""
    return _pod_name(study, f"-{'gpu' if gpu else 'cpu'}-worker-{token}")


def data_check_pod_name(study: str) -> str:
    return _pod_name(study, "-data-check")


def _pod_name(study: str, suffix: str) -> str:
    """A DNS label (the pod's hostname): dots become dashes, with a digest so my.study and my-study differ."""
    if "." not in study:
        return _fit(study, NAME_LIMIT, suffix)
    flat = study.replace(".", "-")
    return f"{flat[:NAME_LIMIT - len(suffix) - 9].rstrip('-')}-{_digest(study)}{suffix}"


def study_selector(study: str) -> str:
    return f"{LABEL_STUDY}={study_label(study)}"


def owned_by(obj: dict[str, Any], study: str) -> bool:
    """The label selects by a (possibly cut) name: the owner reference names the study exactly."""
    return any(ref.get("kind") == KIND and ref.get("name") == study
               for ref in obj.get("metadata", {}).get("ownerReferences") or ())


def omit_none(value: Any) -> Any:
    """What a client sends the API: unset fields left out (an explicit null can fail an enum, a 422)."""
    if isinstance(value, dict):
        return {k: omit_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [omit_none(v) for v in value if v is not None]
    return value


def event_name(study: str, uid: str, key: str) -> str:
    """A deterministic Event name per happening: posting it twice (a restart, two handlers) is a 409."""
    return _fit(study, EVENT_NAME_LIMIT - 17, f".{_digest(uid + '/' + key, 16)}")


def build_event(*, name: str, namespace: str, uid: str, type_: str, reason: str, message: str, key: str,
                component: str = "strata-operator") -> dict[str, Any]:
    """A core v1 Event about an HPOStudy, named by its happening (`key`) so it is posted once."""
    stamp = now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(name, uid, key), "namespace": namespace,
                     "labels": {LABEL_STUDY: study_label(name)}},
        "involvedObject": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": name,
                           "namespace": namespace, "uid": uid},
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": component,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def _toleration(t: Toleration) -> dict[str, Any]:
    return t.model_dump(by_alias=True, exclude_none=True)


def trainer_args(optuna_name: str, number: int) -> list[str]:
    return ["--study", optuna_name, "--trial", str(number)]


def trainer_database(spec: StudySpec, settings: OperatorSettings) -> SecretKeyRef | str | None:
    """Where trainer pods find the Optuna storage: the same precedence as the operator's own."""
    return spec.storage.database_secret or spec.storage.optuna_url or settings.database_secret


def build_trial_pod(*, name: str, namespace: str, uid: str, number: int, params: dict[str, Any],
                    spec: StudySpec, settings: OperatorSettings) -> dict[str, Any]:
    """One trainer pod for one asked trial: placement from the spec, credentials from Secrets."""
    return _trainer_pod(name=name, namespace=namespace, uid=uid, spec=spec, settings=settings,
                        pod_name=trial_pod_name(name, number), gpu=spec.trainer.gpu.wants(params),
                        args=trainer_args(optuna_study_name(namespace, name), number),
                        labels={LABEL_TRIAL: str(number), LABEL_COMPONENT: "trainer"})


def build_worker_pod(*, name: str, namespace: str, uid: str, gpu: bool, token: str, slots: int,
                     spec: StudySpec, settings: OperatorSettings) -> dict[str, Any]:
    """A long-lived worker pod (strata_trainer.podworker): it runs the trials the operator assigns it,
    `slots` at once, one after another, without starting Python or torch again. Placement as a GPU or
    CPU trial's pod; no activeDeadlineSeconds (the operator times out each trial)."""
    pod_name = worker_pod_name(name, gpu, token)
    return _trainer_pod(name=name, namespace=namespace, uid=uid, spec=spec, settings=settings, pod_name=pod_name,
                        gpu=gpu, args=["--study", optuna_study_name(namespace, name), "--serve", pod_name,
                                       "--slots", str(slots)],
                        labels={LABEL_WORKER: "gpu" if gpu else "cpu", LABEL_COMPONENT: "worker"}, deadline=False)


def build_data_check_pod(*, name: str, namespace: str, uid: str, spec: StudySpec,
                         settings: OperatorSettings) -> dict[str, Any]:
    """The pod that checks the study's data once before its first trial (strata_trainer.datacheck):
    a trainer pod (same image, volumes, credentials, CPU placement) with `--check-data`."""
    return _trainer_pod(name=name, namespace=namespace, uid=uid, spec=spec, settings=settings,
                        pod_name=data_check_pod_name(name), gpu=False,
                        args=["--study", optuna_study_name(namespace, name), "--check-data"],
                        labels={LABEL_COMPONENT: "data-check"})


def _trainer_pod(*, name: str, namespace: str, uid: str, spec: StudySpec, settings: OperatorSettings,
                 pod_name: str, gpu: bool, args: list[str], labels: dict[str, str],
                 deadline: bool = True) -> dict[str, Any]:
    trainer = spec.trainer
    gpu_selector = (trainer.gpu.node_selector or settings.gpu_node_selector) if gpu else {}
    gpu_tolerations = list(trainer.gpu.tolerations or settings.gpu_tolerations) if gpu else []
    pool_selector = {} if gpu or trainer.node_selector else settings.cpu_node_selector
    pool_tolerations = [] if gpu or trainer.tolerations else list(settings.cpu_tolerations)
    node_selector = {**pool_selector, **trainer.node_selector, **gpu_selector}
    tolerations = [_toleration(t) for t in pool_tolerations + list(trainer.tolerations) + gpu_tolerations]
    resources = {"requests": dict(trainer.resources.requests), "limits": dict(trainer.resources.limits)}
    if gpu:
        resources["limits"]["nvidia.com/gpu"] = str(trainer.gpu.count)
    env: list[dict[str, Any]] = []
    if settings.trainer_module != DEFAULT_TRAINER_MODULE:  # a worker pod spawns its trainers by this name
        env.append({"name": TRAINER_MODULE_ENV, "value": settings.trainer_module})
    database = trainer_database(spec, settings)
    if isinstance(database, SecretKeyRef):
        env.append({"name": "STRATA_STORAGE_URL", "valueFrom": {"secretKeyRef": {"name": database.name, "key": database.key}}})
    elif database:  # spec.storage.optunaUrl carries no credentials (those go in databaseSecret)
        env.append({"name": "STRATA_STORAGE_URL", "value": database})
    checkpoints = spec.storage.checkpoints or settings.checkpoints
    if checkpoints:
        env.append({"name": "STRATA_CHECKPOINTS", "value": checkpoints})
    endpoint = spec.storage.s3_endpoint or settings.s3_endpoint
    if endpoint:
        env.append({"name": "STRATA_S3_ENDPOINT", "value": endpoint})
    store_secret = spec.storage.object_store_secret or settings.object_store_secret
    if store_secret:
        env += [
            {"name": "STRATA_S3_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": store_secret, "key": "accessKey"}}},
            {"name": "STRATA_S3_SECRET_KEY", "valueFrom": {"secretKeyRef": {"name": store_secret, "key": "secretKey"}}},
        ]
    env += [
        # Threads and the feature cache follow the pod's limits, not the node's size.
        {"name": "STRATA_CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}},
        {"name": "STRATA_MEMORY_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1"}}},
        {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"},  # no spinning threads burning the CPU quota
        {"name": "STRATA_SPILL_DIR", "value": "/tmp"},
        {"name": "STRATA_DATA_CACHE", "value": "/tmp/datasets"},
        {"name": "HOME", "value": "/tmp"},
    ]
    token_mounts, token_volumes = [], []
    if settings.s3_sts_endpoint:
        env += [{"name": "STRATA_S3_STS_ENDPOINT", "value": settings.s3_sts_endpoint},
                {"name": "STRATA_S3_WEB_IDENTITY_TOKEN_FILE", "value": f"{S3_TOKEN_MOUNT}/token"}]
        if settings.s3_role_arn:
            env.append({"name": "STRATA_S3_ROLE_ARN", "value": settings.s3_role_arn})
        token_mounts.append({"name": "s3-token", "mountPath": S3_TOKEN_MOUNT, "readOnly": True})
        token_volumes.append({"name": "s3-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": settings.s3_token_audience, "expirationSeconds": 3600, "path": "token"}}]}})
    env += [omit_none(e.model_dump(by_alias=True)) for e in trainer.env]  # the user's, after ours (none clash)
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, *token_mounts]
    mounts += [omit_none(m.model_dump(by_alias=True)) for m in trainer.volume_mounts]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, *token_volumes, *trainer.volumes]
    if settings.feature_cache_volume and spec.reuse.enabled and spec.reuse.cache_frozen_features:
        env.append({"name": "STRATA_FEATURE_CACHE_DIR", "value": FEATURE_CACHE_MOUNT})
        if settings.feature_cache_bytes:
            env.append({"name": "STRATA_FEATURE_CACHE_BYTES", "value": str(settings.feature_cache_bytes)})
        mounts.append({"name": "features", "mountPath": FEATURE_CACHE_MOUNT})
        volumes.append({"name": "features", **settings.feature_cache_volume})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {**settings.trainer_pod_security_context, "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "trainer",
            "image": trainer.image or settings.trainer_image,
            "imagePullPolicy": trainer.image_pull_policy,
            "command": ["python", "-m", settings.trainer_module],
            "args": args,
            "env": env,
            "resources": resources,
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if trainer.service_account_name:
        pod_spec["serviceAccountName"] = trainer.service_account_name
    else:
        pod_spec["automountServiceAccountToken"] = False  # trainers never call the Kubernetes API
    if spec.trials.timeout_seconds and deadline:
        pod_spec["activeDeadlineSeconds"] = spec.trials.timeout_seconds + 60  # the operator stops it first
    if trainer.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in trainer.image_pull_secrets]
    if trainer.affinity:
        pod_spec["affinity"] = trainer.affinity
    if trainer.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = trainer.topology_spread_constraints
    if trainer.priority_class_name:
        pod_spec["priorityClassName"] = trainer.priority_class_name
    if trainer.runtime_class_name:
        pod_spec["runtimeClassName"] = trainer.runtime_class_name
    return omit_none({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "labels": {**trainer.labels, LABEL_STUDY: study_label(name), **labels,
                       "app.kubernetes.io/name": "strata-trainer", "app.kubernetes.io/managed-by": "strata"},
            "annotations": dict(trainer.annotations) or None,
            "ownerReferences": [{"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": name,
                                 "uid": uid, "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": pod_spec,
    })


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str,
                  generation: int | None) -> list[dict[str, Any]]:
    """Kubernetes convention: lastTransitionTime moves only when status flips; unset fields are left out."""
    value = "True" if status else "False"
    result, found = [], False
    for c in conditions or []:
        if c.get("type") == type_:
            found = True
            changed = c.get("status") != value
            c = {**c, "status": value, "reason": reason, "message": message, "observedGeneration": generation,
                 "lastTransitionTime": now() if changed else c.get("lastTransitionTime", now())}
        result.append(omit_none(c))
    if not found:
        result.append(omit_none({"type": type_, "status": value, "reason": reason, "message": message,
                                 "observedGeneration": generation, "lastTransitionTime": now()}))
    return result


def _degraded(conditions: list[dict[str, Any]], outages: Sequence[Outage], generation: int | None) -> list[dict[str, Any]]:
    """Degraded=True while a dependency is down: which, since when, and the last error."""
    if outages:
        return set_condition(conditions, "Degraded", True, outages[0].reason,
                             "; ".join(o.describe() for o in outages)[:1000], generation)
    return set_condition(conditions, "Degraded", False, "DependenciesReachable",
                         "the database, the layer registry and the Kubernetes API answer", generation)


def build_status(previous: dict[str, Any], progress: Progress, outcome: Outcome, *, max_trials: int,
                 optuna_name: str, generation: int | None, outages: Sequence[Outage] = ()) -> dict[str, Any]:
    """Small and bounded: counts, the best trial and reuse totals; never a per-trial list."""
    conditions = previous.get("conditions") or []
    conditions = set_condition(conditions, "Ready", True, "StudyReady", f"Optuna study {optuna_name}", generation)
    running = outcome.phase in ("Running", "Pending")
    conditions = set_condition(conditions, "Running", running and not outcome.finished,
                               outcome.reason, outcome.message, generation)
    conditions = set_condition(conditions, "Complete", outcome.finished and outcome.phase == "Succeeded",
                               outcome.reason, outcome.message, generation)
    conditions = set_condition(conditions, "Failed", outcome.phase == "Failed", outcome.reason, outcome.message,
                               generation)
    conditions = _degraded(conditions, outages, generation)
    best = progress.best
    return omit_none({
        "phase": outcome.phase,
        "message": outcome.message,
        "observedGeneration": generation,
        "optunaStudy": optuna_name,
        "trials": {"max": max_trials, "complete": progress.complete, "pruned": progress.pruned,
                   "failed": progress.failed, "retried": progress.retried, "running": progress.running,
                   "waiting": progress.waiting, "finished": progress.finished},
        "completed": f"{progress.finished}/{max_trials}",
        "best": omit_none({"number": best.number, "value": best.value, "display": f"{best.value:.4g}",
                           "params": {k: str(v) for k, v in best.params.items()},
                           "testAccuracy": best.test_accuracy, "model": best.model}) if best else None,
        "reuse": {"trials": progress.reused_trials, "layers": progress.reused_layers,
                  "secondsSaved": round(progress.seconds_saved, 1), "rate": f"{progress.reuse_rate:.0%}"},
        "conditions": conditions,
    })


def invalid_status(previous: dict[str, Any], reason: str, message: str, generation: int | None) -> dict[str, Any]:
    conditions = set_condition(previous.get("conditions") or [], "Ready", False, reason, message, generation)
    return omit_none({"phase": "Invalid" if reason in ("InvalidSpec", "InvalidData") else "Error", "message": message,
                      "observedGeneration": generation, "conditions": conditions})


def unreachable_status(previous: dict[str, Any], outage: Outage, generation: int | None) -> dict[str, Any]:
    """The database is down: Ready=False and Degraded=True say so; the phase and counts stay as they were
    (a study that never reached its database is in Error)."""
    message = outage.describe()
    conditions = set_condition(previous.get("conditions") or [], "Ready", False, outage.reason, message, generation)
    conditions = _degraded(conditions, [outage], generation)
    phase = previous.get("phase") if previous.get("phase") not in (None, "Invalid") else "Error"
    return omit_none({**previous, "phase": phase, "message": message[:1000], "observedGeneration": generation,
                      "conditions": conditions})
