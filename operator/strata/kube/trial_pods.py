"""Trial pods: the Executor protocol over one trainer pod per trial (spec.execution.mode perTrial).

Which trial runs where lives in pod labels (strata.dev/trial) and the trial's `strata.pod` attr;
a restarted operator lists the pods again. Shared with strata.kube.worker_pods: how a pod ended,
what the API said, and Happening (an Event to post once).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from kubernetes.client.rest import ApiException
from optuna.trial import TrialState

from strata.executors import WorkerExit
from strata.kube import builders
from strata.kube.api import KubeApi
from strata.spec import StudySpec
from strata.study import ATTR_LOGS, ATTR_RETRY_OF, attr_time, read_trial

log = logging.getLogger(__name__)
ATTR_POD = "strata.pod"  # set when a pod is created: a RUNNING trial with it but no pod was lost
TERMINAL = ("Succeeded", "Failed")
POD_REJECTED = {400, 409, 422}  # the API refuses this pod as built: retrying cannot help
PRUNE_PER_PASS = 10  # finished pods removed per reconcile at most (each: a log read, a put, a delete)
LOG_LIMIT_BYTES = 4 << 20  # a trial's archived log: its last 4 MiB


def owned_pods(api: KubeApi, namespace: str, name: str, label: str | None = None) -> list[dict[str, Any]]:
    """The study's own pods (selected by its label, owned by it), those carrying `label` if given."""
    return [pod for pod in api.list_pods(namespace, builders.study_selector(name))
            if builders.owned_by(pod, name) and (label is None or label in (pod["metadata"].get("labels") or {}))]


@dataclass(frozen=True)
class Happening:
    """Something to post as an Event, once: `key` names the happening (trial 3 started, ...)."""

    type: str
    reason: str
    message: str
    key: str


class PodExecutor:
    """The Executor protocol over one study's trainer pods (refreshed once per reconcile).

    `post` puts an Event out at once (before the pod exists for TrialStarted): a restart between
    the two posts it again under the same name, which the API refuses, so each is posted once.
    """

    def __init__(self, api: KubeApi, namespace: str, name: str, uid: str, spec: StudySpec,
                 settings: builders.OperatorSettings, study: optuna.Study, post: Callable[[Happening], None]):
        self.api, self.namespace, self.name, self.uid = api, namespace, name, uid
        self.spec, self.settings, self.study, self.post = spec, settings, study, post
        self.pods: dict[int, dict[str, Any]] = {}
        self.rejected: dict[int, str] = {}  # trials whose pod the API refused as built: fail them
        self.create_error: str | None = None  # the API failed a create for another reason (quota, outage)
        self.refresh()

    def refresh(self) -> None:
        self.pods = {int(pod["metadata"]["labels"][builders.LABEL_TRIAL]): pod
                     for pod in owned_pods(self.api, self.namespace, self.name, builders.LABEL_TRIAL)}

    @staticmethod
    def _phase(pod: dict[str, Any]) -> str:
        return (pod.get("status") or {}).get("phase") or "Pending"

    def capacity(self) -> int:
        return self.spec.trials.parallel  # a pod per trial: launched is running

    def running(self) -> set[int]:
        return self.active()

    def fit(self, suspended: bool) -> None:
        """Nothing to fit: a trial pod ends with its trial."""

    def active(self) -> set[int]:
        return {n for n, pod in self.pods.items()
                if self._phase(pod) not in TERMINAL and not pod["metadata"].get("deletionTimestamp")}

    def started_at(self, number: int) -> float:
        stamp = (self.pods[number].get("status") or {}).get("startTime") or self.pods[number]["metadata"].get("creationTimestamp")
        return attr_time(stamp) if stamp else time.time()

    def poll(self) -> list[WorkerExit]:
        exits = []
        for number, pod in self.pods.items():
            annotations = pod["metadata"].get("annotations") or {}
            if self._phase(pod) in TERMINAL and annotations.get(builders.ANNOTATION_REPORTED) != "true":
                code, reason = _termination(pod)
                exits.append(WorkerExit(number, code, reason, 0.0))
        # Lost: a trial we gave a pod is still RUNNING in Optuna, but its pod is gone.
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if ATTR_POD in trial.user_attrs and trial.number not in self.pods:
                exits.append(WorkerExit(trial.number, -1, "Lost", 0.0))
        return exits

    def start(self, number: int) -> None:
        trial = read_trial(self.study, number)  # not the whole study: the ask before wrote to it
        body = builders.build_trial_pod(name=self.name, namespace=self.namespace, uid=self.uid, number=number,
                                        params=trial.params, spec=self.spec, settings=self.settings)
        pod_name = body["metadata"]["name"]
        gpu = " on a GPU node" if self.spec.trainer.gpu.wants(trial.params) else ""
        retry = trial.user_attrs.get(ATTR_RETRY_OF)
        if retry is not None:
            self.post(Happening("Normal", "TrialRetried", f"trial {number} retries trial {retry} (pod {pod_name}){gpu}",
                                f"trial-{number}-started"))
        else:
            self.post(Happening("Normal", "TrialStarted", f"trial {number} started in pod {pod_name}{gpu}",
                                f"trial-{number}-started"))
        try:
            created = self.api.create_pod(body)
        except ApiException as error:
            message = f"pod {pod_name}: {_api_reason(error)}"
            if error.status in POD_REJECTED:
                self.rejected[number] = f"the API refused trial {number}'s pod: {message}"
            else:
                self.create_error = message
            return
        if not created:
            old = self.pods.get(number)
            if old is None:  # the name is taken by a pod that is not this trial's
                self.rejected[number] = f"pod name {pod_name} is taken by a pod this study does not own"
            elif self._phase(old) in TERMINAL:
                # A finished pod of a trial that is RUNNING again: replace it on the next reconcile.
                self.api.delete_pod(self.namespace, old["metadata"]["name"], grace_seconds=0)
            return
        self.create_error = None
        self.study._storage.set_trial_user_attr(trial._trial_id, ATTR_POD, pod_name)
        self.pods[number] = body

    def stop(self, number: int) -> None:
        pod = self.pods.pop(number, None)
        if pod is not None:
            self.api.delete_pod(self.namespace, pod["metadata"]["name"])

    def stop_all(self) -> None:
        for number in list(self.active()):
            self.stop(number)

    def remove_finished(self, archive: Callable[[int, str], str] | None, limit: int = PRUNE_PER_PASS) -> list[int]:
        """Remove finished trial pods beyond spec.trainer.keepFinishedPods (count, seconds), oldest first,
        each once its log is archived (archive(number, text) -> the folder of the study's logs; it
        raises if the store cannot take it, and the pod stays). No archive (no registry): pods stay.
        The study's `logs` attr names the folder (a finished trial's attrs cannot change). The
        trials whose pods were removed."""
        keep = self.spec.trainer.keep_finished_pods
        if archive is None or (keep.count is None and keep.seconds is None):
            return []
        done = sorted(((_finished_at(pod), number) for number, pod in self.pods.items()
                       if self._phase(pod) in TERMINAL and not pod["metadata"].get("deletionTimestamp")
                       and (pod["metadata"].get("annotations") or {}).get(builders.ANNOTATION_REPORTED) == "true"),
                      reverse=True)  # newest first
        now = time.time()
        doomed = [number for rank, (ended, number) in enumerate(done)
                  if (keep.count is not None and rank >= keep.count)
                  or (keep.seconds is not None and now - ended > keep.seconds)]
        removed, folder_named = [], None if not doomed else self.study.user_attrs.get(ATTR_LOGS)
        for number in sorted(doomed)[:limit]:
            pod_name = self.pods[number]["metadata"]["name"]
            text = self.api.read_pod_log(self.namespace, pod_name, LOG_LIMIT_BYTES)
            if text is not None:
                try:
                    folder = archive(number, text)
                except Exception as error:  # the store is down: keep the pods (and their logs) for now
                    log.warning("could not archive the log of %s, keeping the pod: %s", pod_name, error)
                    break
                if folder_named != folder:
                    self.study.set_user_attr(ATTR_LOGS, folder)
                    folder_named = folder
            self.api.delete_pod(self.namespace, pod_name, grace_seconds=0)
            del self.pods[number]
            removed.append(number)
        return removed

    def mark_reported(self, exits: list[WorkerExit]) -> None:
        for worker in exits:
            pod = self.pods.get(worker.number)
            if pod is not None:
                self.api.annotate_pod(self.namespace, pod["metadata"]["name"], {builders.ANNOTATION_REPORTED: "true"})


def _finished_at(pod: dict[str, Any]) -> float:
    """When the pod's trainer ended (its container's finishedAt), else when the pod was made."""
    status = pod.get("status") or {}
    stamps = [((c.get("state") or {}).get("terminated") or {}).get("finishedAt")
              for c in status.get("containerStatuses") or []]
    stamp = next((s for s in stamps if s), None) or pod["metadata"].get("creationTimestamp")
    return attr_time(stamp) if stamp else time.time()


def _api_reason(error: ApiException) -> str:
    """The API server's own message (its Status body), else the HTTP reason."""
    try:
        return json.loads(error.body or "{}").get("message") or f"{error.status} {error.reason}"
    except (TypeError, ValueError):
        return f"{error.status} {error.reason}"


def _termination(pod: dict[str, Any]) -> tuple[int, str]:
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return -1, "Evicted"
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return int(terminated.get("exitCode", -1)), terminated.get("reason") or "Error"
    return (0, "Completed") if status.get("phase") == "Succeeded" else (-1, status.get("reason") or "Error")
