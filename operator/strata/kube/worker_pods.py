"""Worker pods: the Executor protocol over long-lived trainer pods (spec.execution.mode warmWorkers).

A worker pod (strata_trainer.podworker) imports torch once and runs trial after trial. The
operator stays the only one who decides: the scheduler plans as for trial pods, and this executor
hands each launched trial to a worker pod of the right pool (GPU trials to GPU workers, by
spec.trainer.gpu) by writing the pod's name into the trial (user attr `strata.assigned`) in the
Optuna storage that both already share.

How a trial is claimed, exactly once: only the operator assigns (Kopf runs one handler per study at
a time), and a trial is assigned to one pod; the pod claims it by writing `strata.worker_started`
before it trains. A trial is taken back (assigned to nobody, planned again, not a failure) only when
its pod is gone or terminal and it was never claimed; a claimed trial whose pod died is a failed
attempt (infrastructure: retried as a new trial, as for a trial pod). A pod that is gone can write
nothing more, so the operator reads its claims only after it is gone: no trial runs twice.

Hand-off without waiting for a reconcile: each pod gets one trial more than it runs at once (its
next one, queued in the storage; two while trials last under SHORT_TRIAL_SECONDS), so when a trial
ends the pod starts the next within its poll interval (0.2 s), and the operator refills the queue at
its next reconcile (every second for these studies).

The bound of spec.trials.parallel: the pods' slots (1 per CPU pod, trialsPerGpu per GPU pod, at
most parallel) add up to at most parallel, so at most parallel trials train at once. Pods are
created as trials need them, idle ones are removed when the study is suspended, ends or needs the
room for the other pool, and a dead pod is replaced by a new one (a new name) for later trials.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

import optuna
from kubernetes.client.rest import ApiException
from optuna.trial import FrozenTrial, TrialState

from strata.executors import WorkerExit
from strata.kube import builders
from strata.kube.api import KubeApi
from strata.kube.trial_pods import POD_REJECTED, TERMINAL, Happening, _api_reason, _termination, owned_pods
from strata.spec import StudySpec
from strata.study import (
    ATTR_ASSIGNED, ATTR_REPORTED_BELOW, ATTR_RETRY_OF, ATTR_STOP, ATTR_WORKER, ATTR_WORKER_EXIT, ATTR_WORKER_STARTED,
    attr_time, read_trial, under_way,
)
QUEUED_PER_POD = 1  # trials waiting in a pod beyond those it runs: the next one, started without a reconcile
SHORT_TRIAL_SECONDS = 3.0  # trials shorter than this (median of the last few) get a second queued one: a
SHORT_QUEUED_PER_POD = 2  # queue of one drains before the next reconcile (1 s apart) can refill it


class WorkerPodExecutor:
    def __init__(self, api: KubeApi, namespace: str, name: str, uid: str, spec: StudySpec,
                 settings: builders.OperatorSettings, study: optuna.Study, post: Callable[[Happening], None],
                 reported: set[int] | None = None):
        """reported: trials whose end this operator process has seen (kept across reconciles); below
        the study's `strata.reported_below` every end was seen, across restarts (a finished trial
        cannot carry the mark itself: Optuna refuses to change it)."""
        self.api, self.namespace, self.name, self.uid = api, namespace, name, uid
        self.spec, self.settings, self.study, self.post = spec, settings, study, post
        self.reported = reported if reported is not None else set()
        self.rejected: dict[int, str] = {}
        self.create_error: str | None = None
        self._refused: str | None = None  # the API refused a worker pod as built
        self.pods: dict[str, dict[str, Any]] = {}
        self.trials: list[FrozenTrial] = []
        self._assignments: dict[int, str] = {}  # written since the last refresh (no re-read per launch)
        self.refresh()

    # --- what is there ---------------------------------------------------------------------------

    def refresh(self) -> None:
        self.pods = {pod["metadata"]["name"]: pod
                     for pod in owned_pods(self.api, self.namespace, self.name, builders.LABEL_WORKER)}
        self.trials = self.study.get_trials(deepcopy=False)
        self._assignments = {}

    @staticmethod
    def _alive(pod: dict[str, Any]) -> bool:
        return ((pod.get("status") or {}).get("phase") or "Pending") not in TERMINAL \
            and not pod["metadata"].get("deletionTimestamp")

    def _live_pods(self, pool: str | None = None) -> list[str]:
        return sorted(name for name, pod in self.pods.items() if self._alive(pod)
                      and (pool is None or pod["metadata"]["labels"].get(builders.LABEL_WORKER) == pool))

    def _pool(self, params: dict[str, Any]) -> str:
        return "gpu" if self.spec.trainer.gpu.wants(params) else "cpu"

    def slots(self, pool: str) -> int:
        per_gpu = self.spec.execution.trials_per_gpu if pool == "gpu" else 1
        return max(1, min(per_gpu, self.spec.trials.parallel))

    def _assigned_to(self, t: FrozenTrial) -> str:
        if t.number in self._assignments:
            return self._assignments[t.number]
        return str(t.user_attrs.get(ATTR_ASSIGNED) or "")

    def _assign(self, t: FrozenTrial, pod_name: str) -> None:
        self.study._storage.set_trial_user_attr(t._trial_id, ATTR_ASSIGNED, pod_name)
        self._assignments[t.number] = pod_name

    def _slots_used(self) -> int:
        return sum(self.slots(self.pods[n]["metadata"]["labels"].get(builders.LABEL_WORKER, "cpu"))
                   for n in self._live_pods())

    def _queue(self, pod_name: str) -> list[FrozenTrial]:
        """Trials given to this pod (running or next), whose trainer has not given up: RUNNING, or for
        a moment parked while the pod restarts Optuna's clock of a queued trial it claims."""
        return [t for t in self.trials if under_way(t) and self._assigned_to(t) == pod_name
                and ATTR_WORKER_EXIT not in t.user_attrs]

    # --- the Executor protocol -------------------------------------------------------------------

    def capacity(self) -> int:
        """Trials the scheduler may keep launched: parallel, plus one queued next per live pod."""
        return self.spec.trials.parallel + self._queued_per_pod() * len(self._live_pods())

    def _queued_per_pod(self) -> int:
        """One queued trial per pod; two while trials are short (each queued trial is one proposal the
        sampler makes before seeing the running ones' results, so no deeper than needed)."""
        recent = [t.datetime_complete.timestamp() - attr_time(t.user_attrs[ATTR_WORKER_STARTED])
                  for t in self.trials[-12:] if t.state == TrialState.COMPLETE and t.datetime_complete
                  and ATTR_WORKER_STARTED in t.user_attrs][-5:]
        if len(recent) >= 3 and sorted(recent)[len(recent) // 2] < SHORT_TRIAL_SECONDS:
            return SHORT_QUEUED_PER_POD
        return QUEUED_PER_POD

    def active(self) -> set[int]:
        return {t.number for name in self._live_pods() for t in self._queue(name)}

    def running(self) -> set[int]:
        """Claimed by a live pod: what status shows as running (the rest of active() is queued)."""
        return {t.number for name in self._live_pods() for t in self._queue(name) if ATTR_WORKER_STARTED in t.user_attrs}

    def started_at(self, number: int) -> float:
        started = self.trials[number].user_attrs.get(ATTR_WORKER_STARTED)
        return attr_time(started) if started is not None else time.time()  # queued: its clock has not started

    def poll(self) -> list[WorkerExit]:
        exits = []
        below = int(self.study.user_attrs.get(ATTR_REPORTED_BELOW, 0))
        for t in self.trials[below:]:
            pod_name = self._assigned_to(t)
            if not pod_name:
                continue
            if t.state.is_finished():
                if t.number not in self.reported:
                    exits.append(WorkerExit(t.number, 0, "Completed", 0.0))  # its Event (named by it) once
                continue
            if not under_way(t):
                continue
            given_up = t.user_attrs.get(ATTR_WORKER_EXIT)
            if given_up:
                exits.append(WorkerExit(t.number, int(given_up.get("code", -1)), str(given_up.get("reason", "Error")),
                                        0.0))
                continue
            pod = self.pods.get(pod_name)
            if pod is not None and self._alive(pod):
                continue
            if pod is not None and pod["metadata"].get("deletionTimestamp") \
                    and (pod.get("status") or {}).get("phase") not in TERMINAL:
                continue  # still stopping: it may yet write; judge it once it is gone
            if t.user_attrs.get(ATTR_WORKER) == pod_name:
                code, reason = _termination(pod) if pod is not None else (-1, "Lost")
                exits.append(WorkerExit(t.number, code, f"worker pod {pod_name}: {reason}", 0.0))
            else:  # never claimed: give it back to the scheduler, no attempt was made
                self._assign(t, "")
        return exits

    def start(self, number: int) -> None:
        trial = self.trials[number] if number < len(self.trials) else read_trial(self.study, number)
        pool = self._pool(trial.params)
        slots = self.slots(pool)
        loads = sorted((len(self._queue(n)), n) for n in self._live_pods(pool))
        # A free slot first, then a new pod (if parallel leaves room), then a place in a queue.
        free = [n for load, n in loads if load < slots]
        pod_name = free[0] if free else self._new_pod(pool)
        if pod_name is None:
            queued = [n for load, n in loads if load < slots + self._queued_per_pod()]
            pod_name = queued[0] if queued else None
        if pod_name is None:
            if self._refused:  # the API refuses the pool's pod as built: the trial fails with its reason
                self.rejected[number] = f"the API refused trial {number}'s worker pod: {self._refused}"
            return  # no room yet: the trial stays planned and is launched at a later reconcile
        gpu = " on a GPU node" if pool == "gpu" else ""
        retry = trial.user_attrs.get(ATTR_RETRY_OF)
        if retry is not None:
            self.post(Happening("Normal", "TrialRetried", f"trial {number} retries trial {retry} "
                                                          f"(worker pod {pod_name}){gpu}", f"trial-{number}-started"))
        else:
            self.post(Happening("Normal", "TrialStarted", f"trial {number} started in worker pod {pod_name}{gpu}",
                                f"trial-{number}-started"))
        if number >= len(self.trials):  # asked by this plan: the list grows, earlier entries stay
            self.trials = self.study.get_trials(deepcopy=False)
        self._assign(trial, pod_name)

    def _new_pod(self, pool: str) -> str | None:
        """A new worker pod for the pool if the pods' slots leave room within parallel."""
        if self._slots_used() + self.slots(pool) > self.spec.trials.parallel:
            self._remove_idle(exclude_pool=pool, limit=1)  # room for the next reconcile
            return None
        body = builders.build_worker_pod(name=self.name, namespace=self.namespace, uid=self.uid, gpu=pool == "gpu",
                                         token=secrets.token_hex(3), slots=self.slots(pool), spec=self.spec,
                                         settings=self.settings)
        pod_name = body["metadata"]["name"]
        try:
            created = self.api.create_pod(body)
        except ApiException as error:
            message = f"worker pod {pod_name}: {_api_reason(error)}"
            if error.status in POD_REJECTED:
                self._refused = message
            else:
                self.create_error = message
            return None
        if not created:
            return None
        self.create_error = None
        self.pods[pod_name] = body
        return pod_name

    def _remove_idle(self, exclude_pool: str | None = None, limit: int | None = None) -> int:
        removed = 0
        idle = [n for n in self._live_pods() if not self._queue(n)
                and self.pods[n]["metadata"]["labels"].get(builders.LABEL_WORKER) != exclude_pool]
        for pod_name in idle:
            if limit is not None and removed >= limit:
                break
            self.api.delete_pod(self.namespace, pod_name, grace_seconds=0)
            self.pods.pop(pod_name, None)
            removed += 1
        return removed

    def fit(self, suspended: bool) -> None:
        """After a reconcile's plan: idle pods beyond parallel's room go (all idle ones when suspended)."""
        if suspended:
            self._remove_idle()
            return
        while self._slots_used() > self.spec.trials.parallel and self._remove_idle(limit=1):
            pass

    def stop(self, number: int) -> None:
        """Stop one trial: its worker kills it (and only it) at its next poll; the pod stays."""
        t = self.trials[number]
        self.study._storage.set_trial_user_attr(t._trial_id, ATTR_STOP, True)

    def stop_all(self) -> None:
        """The study is over (or stops every trial): stop them all and remove every worker pod."""
        for number in self.active():
            self.stop(number)
        for pod_name in list(self.pods):
            pod = self.pods[pod_name]
            if not pod["metadata"].get("deletionTimestamp"):
                self.api.delete_pod(self.namespace, pod_name, grace_seconds=0)
        self.pods = {}

    def mark_reported(self, exits: list[WorkerExit]) -> None:
        trials = self.study.get_trials(deepcopy=False)
        for worker in exits:
            if trials[worker.number].state.is_finished():
                self.reported.add(worker.number)
        # Every trial below the first one still under way (or finished but unseen) is dealt with.
        below = next((t.number for t in trials if not t.state.is_finished()
                      or (self._assigned_to(t) and t.number not in self.reported)), len(trials))
        if below > int(self.study.user_attrs.get(ATTR_REPORTED_BELOW, 0)):
            self.study.set_user_attr(ATTR_REPORTED_BELOW, below)
        # Terminal pods whose trials are all dealt with: remove them (a new pod takes their place).
        for pod_name, pod in list(self.pods.items()):
            if (pod.get("status") or {}).get("phase") in TERMINAL and not any(
                    under_way(t) and self._assigned_to(t) == pod_name for t in trials):
                self.api.delete_pod(self.namespace, pod_name, grace_seconds=0)
                del self.pods[pod_name]
