"""Kopf handlers: registration and wiring only; StudyService does the work.

Run with `kopf run -m strata.kube.handlers --all-namespaces` (or `python -m strata.kube`).
"""

from __future__ import annotations

import logging
import os

import kopf

from strata.kube.api import KubeApi
from strata.metrics import StrataMetrics
from strata.kube.reconcile import ReconcileResult, SettingsError, StudyService, settings_from_env
from strata.spec import API_GROUP, API_VERSION

RESOURCE = (API_GROUP, API_VERSION, "hpostudies")
FINALIZER = f"{API_GROUP}/finalizer"
RECONCILE_SECONDS = float(os.environ.get("STRATA_RECONCILE_SECONDS", "5"))
# Studies in worker pods reconcile more often: each worker pod holds one queued trial beyond those it
# runs, and a reconcile refills it, so short trials never leave a warm pod waiting for work.
WORKER_RECONCILE_SECONDS = float(os.environ.get("STRATA_WORKER_RECONCILE_SECONDS", "1"))
log = logging.getLogger("strata.operator")


def _protect_secrets_in_logs() -> None:
    """Never log a Secret's body. Kopf has configured logging by now (`--verbose` puts the root logger
    at DEBUG, where the kubernetes client logs every response body, Secrets included): keep the
    client's REST logger at INFO whatever the verbosity, and scrub every secret value the operator
    reads (KubeApi.read_secret_key registers them) from every record the handlers format."""
    from strata.redaction import install_log_filter, register_secret

    for variable in ("STRATA_DATABASE_URL", "STRATA_S3_SECRET_KEY"):  # the operator's own credentials
        register_secret(os.environ.get(variable, ""))
    for name in ("kubernetes.client.rest", "kubernetes_asyncio.client.rest"):
        rest = logging.getLogger(name)
        if rest.level < logging.INFO:  # NOTSET (inherit the root's DEBUG) or DEBUG
            rest.setLevel(logging.INFO)
    install_log_filter("kopf.objects")  # the root's handlers, and Kopf's poster of log lines as Events


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    _protect_secrets_in_logs()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.scanning.disabled = True  # the CRD is installed first (Helm crds/); no CRD watch RBAC needed
    settings.watching.server_timeout = 60
    # A delete that lands while the (threaded, uncancellable) reconcile timer runs waits for it to exit;
    # Kopf's default re-check is 60 s, which held `kubectl delete` for a minute. The timer exits in ~1 s.
    settings.background.cancellation_polling = 1.0
    metrics = StrataMetrics()
    port = int(os.environ.get("STRATA_METRICS_PORT", "9090"))
    if port:
        metrics.serve(port, os.environ.get("STRATA_METRICS_ADDRESS", "0.0.0.0"))
    try:
        operator_settings = settings_from_env()
    except SettingsError as error:  # a bad Helm value: stop at start with one line naming it
        raise kopf.PermanentError(str(error)) from None
    memo.service = StudyService(KubeApi(), operator_settings, metrics=metrics)


def _apply(result: ReconcileResult, body: kopf.Body, patch: kopf.Patch) -> None:
    # Events are already posted by the service, each named by its happening (so never twice).
    if result.status != dict(body.get("status") or {}):
        patch.status.update(result.status)


def _reconcile(memo: kopf.Memo, body: kopf.Body, patch: kopf.Patch) -> None:
    meta = body["metadata"]
    result = memo.service.reconcile(meta["namespace"], meta["name"], meta["uid"], dict(body.get("spec") or {}),
                                    dict(body.get("status") or {}), meta.get("generation"))
    _apply(result, body, patch)


@kopf.on.create(*RESOURCE)
@kopf.on.resume(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def on_spec(memo: kopf.Memo, body: kopf.Body, patch: kopf.Patch, **_) -> None:
    """Validate and start at once (the timer keeps it going); spec changes apply live."""
    _reconcile(memo, body, patch)


def _in_worker_pods(spec: kopf.Spec, **_) -> bool:
    return (spec.get("execution") or {}).get("mode", "warmWorkers") == "warmWorkers"


def _in_trial_pods(spec: kopf.Spec, **kwargs) -> bool:
    return not _in_worker_pods(spec, **kwargs)


# backoff: an unexpected error retries at the reconcile pace, not after Kopf's default minute.
@kopf.timer(*RESOURCE, interval=RECONCILE_SECONDS, initial_delay=1.0, sharp=False, backoff=RECONCILE_SECONDS,
            when=_in_trial_pods)
def on_timer(memo: kopf.Memo, body: kopf.Body, patch: kopf.Patch, **_) -> None:
    _reconcile(memo, body, patch)


@kopf.timer(*RESOURCE, interval=WORKER_RECONCILE_SECONDS, initial_delay=1.0, sharp=False,
            backoff=WORKER_RECONCILE_SECONDS, when=_in_worker_pods)
def on_worker_timer(memo: kopf.Memo, body: kopf.Body, patch: kopf.Patch, **_) -> None:
    _reconcile(memo, body, patch)


@kopf.on.delete(*RESOURCE)
def on_delete(memo: kopf.Memo, body: kopf.Body, **_) -> None:
    meta = body["metadata"]
    memo.service.delete(meta["namespace"], meta["name"], dict(body.get("spec") or {}))
