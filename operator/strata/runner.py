"""The study loop for one machine: scheduler decides, an executor runs, until the study ends.

Interrupting (Ctrl-C) stops the workers and leaves their trials RUNNING in Optuna; the next run
finds them without a worker and starts them again under the same trial numbers, so no trial is
lost or duplicated.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from strata.executors import Executor, LocalExecutor, WorkerExit
from strata.retrying_storage import describe, transient
from strata.scheduler import Outcome, Plan, Progress, TrialScheduler

log = logging.getLogger(__name__)


def handle_exit(scheduler: TrialScheduler, worker: WorkerExit) -> None:
    """A worker that ended without telling Optuna failed its attempt (the scheduler may retry it)."""
    scheduler.fail_attempt(worker.number, f"trainer exited with code {worker.exit_code} ({worker.reason})",
                           kind="infrastructure")


def step(scheduler: TrialScheduler, executor: Executor, parallel: int) -> tuple[Outcome, Plan, list[WorkerExit]]:
    """One reconciliation: record ended workers, enforce timeouts, decide, launch. Idempotent."""
    exits = executor.poll()
    for worker in exits:
        handle_exit(scheduler, worker)
    timeout = scheduler.spec.trials.timeout_seconds
    if timeout:
        for number in list(executor.active()):
            if time.time() - executor.started_at(number) > timeout:
                executor.stop(number)
                scheduler.fail_attempt(number, f"trial exceeded timeoutSeconds={timeout}", kind="timeout")
    active = executor.active()
    outcome = scheduler.outcome(active)
    if outcome.stop_active and active:
        log.info("stopping %d running trials: %s", len(active), outcome.message)
        executor.stop_all()
        for number in active:
            scheduler.fail_attempt(number, outcome.message, kind="interrupted")
        return scheduler.outcome(set()), Plan(), exits
    if outcome.finished:
        scheduler.stop_waiting(active, outcome.message)
        return outcome, Plan(), exits
    plan = scheduler.plan(active, max(0, parallel - len(active)))
    for number in plan.launch:
        executor.start(number)
    return outcome, plan, exits


def run_loop(
    scheduler: TrialScheduler,
    executor: LocalExecutor,
    parallel: int,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[Progress, Outcome, Plan], None] | None = None,
    poll_seconds: float = 0.5,
) -> Outcome:
    stop = stop or threading.Event()
    scheduler.started_at()
    down_since: float | None = None
    try:
        while not stop.is_set():
            try:
                outcome, plan, _ = step(scheduler, executor, parallel)
                progress = scheduler.progress(executor.active())
            except Exception as error:
                # The database went away (a restart, the network): say so once, keep the workers, try again.
                if not transient(error):
                    raise
                if down_since is None:
                    down_since = time.time()
                    log.warning("Optuna storage unreachable (%s); the study waits for it", describe(error))
                stop.wait(max(poll_seconds, 2.0))
                continue
            if down_since is not None:
                log.warning("Optuna storage reachable again after %.0f s", time.time() - down_since)
                down_since = None
            if on_progress:
                on_progress(progress, outcome, plan)
            if outcome.finished:
                return outcome
            executor.wait(poll_seconds)  # returns early when a trial ends (warm workers)
    finally:
        if stop.is_set():
            executor.stop_all()  # trials stay RUNNING: a resumed run starts them again
    return Outcome(False, "Interrupted", "Interrupted", "stopped by the user; run again to resume")

