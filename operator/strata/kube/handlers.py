"""Kopf handlers: registration and wiring only; StudyService does the work, StudyDriver says when.

Run with `kopf run -m strata.kube.handlers --all-namespaces` (or `python -m strata.kube`).
Each HPOStudy has a daemon that reconciles it when its trainer pods change (Kopf watches the pods
with the study label) and otherwise on a slow timer (strata.kube.driver).
"""

from __future__ import annotations

import logging
import os

import kopf

from strata.kube import builders
from strata.kube.api import KubeApi
from strata.kube.driver import StudyDriver, Wakeups, on_pod_event
from strata.kube.pod_index import IndexedKubeApi, PodIndex
from strata.metrics import StrataMetrics
from strata.kube.reconcile import SettingsError, StudyService, settings_from_env
from strata.spec import API_GROUP, API_VERSION

RESOURCE = (API_GROUP, API_VERSION, "hpostudies")
FINALIZER = f"{API_GROUP}/finalizer"
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


class _QuietPodEvents(logging.Filter):
    """Kopf logs every successful run of an event handler at INFO: three lines per trainer pod (a
    10,000-trial study: 30,000 lines; at 100 studies, writing them was 44 of the main thread's 113
    busy samples in a 30 s profile). Kopf's own indexers are terse the same way; warnings and errors
    of on_pod still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.getMessage() != "Handler 'on_pod' succeeded."


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    _protect_secrets_in_logs()
    objects = logging.getLogger("kopf.objects")
    if not any(isinstance(f, _QuietPodEvents) for f in objects.filters):  # an operator started again in-process
        objects.addFilter(_QuietPodEvents())
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.scanning.disabled = True  # the CRD is installed first (Helm crds/); no CRD watch RBAC needed
    settings.watching.server_timeout = 60
    # A delete waits for the study's daemon to exit (after the reconcile it may be running); Kopf's
    # default re-check is 60 s, which held `kubectl delete` for a minute. The daemon exits in ~1 s.
    settings.background.cancellation_polling = 1.0
    metrics = StrataMetrics()
    port = int(os.environ.get("STRATA_METRICS_PORT", "9090"))
    if port:
        metrics.serve(port, os.environ.get("STRATA_METRICS_ADDRESS", "0.0.0.0"))
    try:
        operator_settings = settings_from_env()
    except SettingsError as error:  # a bad Helm value: stop at start with one line naming it
        raise kopf.PermanentError(str(error)) from None
    api = KubeApi()
    memo.pods = PodIndex()
    memo.wakeups = Wakeups()
    memo.service = StudyService(IndexedKubeApi(api, memo.pods), operator_settings, metrics=metrics)
    try:
        memo.driver = StudyDriver.from_env(memo.service, api, memo.wakeups)
    except ValueError as error:
        raise kopf.PermanentError(str(error)) from None
    metrics.watch_operator(api, memo.wakeups)


@kopf.on.cleanup()
def close(memo: kopf.Memo, **_) -> None:
    if getattr(memo, "driver", None) is not None:
        memo.driver.close()


@kopf.on.create(*RESOURCE)
@kopf.on.resume(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def on_spec(memo: kopf.Memo, body: kopf.Body, **_) -> None:
    """A new or changed spec: its study's daemon reconciles at once (spec changes apply live)."""
    memo.driver.wake_study(body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.daemon(*RESOURCE, cancellation_timeout=30.0)
async def drive(memo: kopf.Memo, body: kopf.Body, stopped: kopf.DaemonStopped, **_) -> None:
    await memo.driver.drive(body, stopped)


@kopf.on.event("", "v1", "pods", labels={builders.LABEL_STUDY: kopf.PRESENT})
async def on_pod(memo: kopf.Memo, event: kopf.RawEvent, **_) -> None:
    """A trainer, worker or data check pod changed: keep the index, wake its study if it matters."""
    on_pod_event(memo.pods, memo.wakeups, event.get("type"), event["object"])


@kopf.on.delete(*RESOURCE)
def on_delete(memo: kopf.Memo, body: kopf.Body, **_) -> None:
    meta = body["metadata"]
    memo.service.delete(meta["namespace"], meta["name"], dict(body.get("spec") or {}))
    memo.pods.forget(meta["namespace"], builders.study_label(meta["name"]))
