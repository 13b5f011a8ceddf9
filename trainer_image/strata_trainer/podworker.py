"""A worker pod: `python -m strata_trainer --study S --serve POD --slots K`.

The pod runs the trials the operator assigned it (strata.kube.worker_pods: the trial's
`strata.assigned` names this pod), up to K at once, each in one of K warm trainer processes
(strata.workers.WarmWorkerExecutor: torch imported once, the dataset kept). Several small trials
thus share one GPU as separate processes on the same device (trialsPerGpu), each with its own CUDA
context and memory, and each stopped alone by killing its process.

Every POLL_SECONDS the pod reads the study's trials under way (RUNNING, or parked) and:
- kills a trial the operator stopped (`strata.stop`, a timeout or the study's end) or finished;
- records a trainer that ended without telling Optuna (a crash, a kill, a storage error):
  `strata.worker_exit` = {code, reason}, which the operator turns into a failed attempt;
- claims its next assigned trials for its free slots (`strata.worker`, `strata.worker_started`)
  and starts them, the claim written before training begins. A trial that waited in this pod's
  queue has Optuna's clock restarted first (WAITING, then RUNNING again), so Optuna's duration is
  its run time; the wait is added to its `queued_seconds`.

It runs until the pod is deleted (SIGTERM stops its trainers first) or the study is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import optuna
from optuna.trial import TrialState

from strata.study import (
    ATTR_ASSIGNED, ATTR_STOP, ATTR_WORKER, ATTR_WORKER_EXIT, ATTR_WORKER_STARTED, iso_now,
    restart_clock, under_way,
)
from strata.workers import WarmWorkerExecutor

log = logging.getLogger("strata.podworker")
POLL_SECONDS = 0.2
GONE_SECONDS = 2.0  # a trial not RUNNING this long, without its trainer's answer, was failed by the operator
TOLD = (0, 1, 3)  # exit codes of a trainer that told Optuna itself (complete, failed, pruned)


def serve_pod(storage_url: str, study_name: str, pod_name: str, slots: int) -> int:
    from strata.retrying_storage import open_trial_storage
    from strata_trainer.resources import cpu_limit, memory_limit

    storage = open_trial_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        log.error("no study %s in the storage", study_name)
        return 2
    slots = max(1, slots)
    env = {"STRATA_CPU_LIMIT": str(max(1, cpu_limit() // slots))}
    memory = memory_limit()
    if memory:
        env["STRATA_MEMORY_LIMIT"] = str(memory // slots)  # each trainer sizes its feature cache to its share
    executor = WarmWorkerExecutor(storage_url, study_name, os.environ.get("STRATA_CHECKPOINTS") or None, None,
                                  max(1, cpu_limit() // slots), slots, env=env, own_session=False)
    executor.keep_logs()
    executor.warm_up()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("worker pod %s: %d slot(s) for study %s", pod_name, slots, study_name)
    gone: dict[int, float] = {}
    try:
        while not stop.is_set():
            try:
                running = {t.number: t for t in storage.get_all_trials(
                    study_id, deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)) if under_way(t)}
            except KeyError:
                log.info("study %s is gone: stopping", study_name)
                return 0
            step(storage, executor, running, pod_name, slots, gone)
            executor.wait(POLL_SECONDS)
    finally:
        executor.stop_all()
        executor.close()
    return 0


def step(storage: optuna.storages.BaseStorage, executor: WarmWorkerExecutor, running: dict, pod_name: str,
         slots: int, gone: dict[int, float] | None = None) -> list[int]:
    """One pass: record what ended, stop what the operator stopped, claim. Returns the trials claimed.

    `gone` (kept across passes): since when a trial this pod runs is no longer RUNNING. A trainer
    tells Optuna before it answers, so a trial that just finished looks gone for a moment while its
    answer is on the way; it is killed only if it stays so (the operator failed it: a timeout, the
    study's end) or carries the stop mark."""
    gone = gone if gone is not None else {}
    for ended in executor.poll():
        gone.pop(ended.number, None)
        trial = running.get(ended.number)
        if ended.exit_code not in TOLD and trial is not None:
            storage.set_trial_user_attr(trial._trial_id, ATTR_WORKER_EXIT,
                                        {"code": ended.exit_code, "reason": ended.reason})
    now = time.time()
    for number in list(executor.active()):
        trial = running.get(number)
        if trial is not None and not trial.user_attrs.get(ATTR_STOP):
            gone.pop(number, None)
            continue
        since = gone.setdefault(number, now)
        if (trial is not None and trial.user_attrs.get(ATTR_STOP)) or now - since > GONE_SECONDS:
            log.info("trial %d stopped by the operator", number)
            executor.stop(number)
            gone.pop(number, None)
    claimed = []
    queued = sorted((t for t in running.values() if t.user_attrs.get(ATTR_ASSIGNED) == pod_name
                     and ATTR_WORKER_STARTED not in t.user_attrs and not t.user_attrs.get(ATTR_STOP)),
                    key=lambda t: t.number)
    for trial in queued[:max(0, slots - len(executor.active()))]:
        try:
            restart_clock(storage, trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # the operator ended it meanwhile (the study's end): nothing to claim
        storage.set_trial_user_attr(trial._trial_id, ATTR_WORKER, pod_name)
        storage.set_trial_user_attr(trial._trial_id, ATTR_WORKER_STARTED, iso_now())
        executor.start(trial.number)
        claimed.append(trial.number)
    return claimed

