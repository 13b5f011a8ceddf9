"""An Optuna storage for trainers that rides out a database restart instead of failing the trial.

A trainer reports every epoch; with PostgreSQL restarting for 20 s, each report (and the final
tell) raised, every training trial failed and burned a retry and the failure budget. Here a call
that fails because the database cannot be reached is tried again, with backoff, for up to
STRATA_STORAGE_RETRY_SECONDS (default 120); any other error, and an outage longer than that,
propagates as before. The operator does not use this: a reconcile must not block, it reports the
outage and tries again on its next pass.

Retrying is safe for what a trainer calls: reads, intermediate values and user attrs are
idempotent, and a tell whose commit landed before the connection dropped fails its retry with
Optuna's own "already finished" error, which the trainer already treats as "told".
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import sqlalchemy.exc
from optuna.exceptions import StorageInternalError

log = logging.getLogger(__name__)
TRANSIENT = (StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def transient(error: BaseException) -> bool:
    """A database that cannot be reached now (also behind strata.study.StorageError), not a bad URL."""
    while error is not None:
        if isinstance(error, TRANSIENT):
            return True
        error = error.__cause__
    return False


def describe(error: BaseException) -> str:
    """The root cause's first line: Optuna's StorageInternalError says 'invalid data in the commit'
    for a refused connection; the driver's own error says what happened."""
    while error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.orig is not None:
        error = error.orig
    from strata.redaction import scrub_registered

    text = scrub_registered(str(error).strip())  # a driver may echo parts of a URL's password
    return text.splitlines()[0] if text else type(error).__name__


def retry_seconds() -> float:
    return float(os.environ.get("STRATA_STORAGE_RETRY_SECONDS", "120"))


def call_with_retry(call: Callable[[], Any], what: str, deadline_seconds: float | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> Any:
    """call() until it stops raising a transient database error or the deadline passes."""
    budget = retry_seconds() if deadline_seconds is None else deadline_seconds
    started, waited, delay = time.monotonic(), 0.0, 0.5
    while True:
        try:
            return call()
        except Exception as error:
            if not transient(error) or max(time.monotonic() - started, waited) + delay > budget:
                raise
            log.warning("Optuna storage unreachable during %s (%s); retrying in %.1f s", what, describe(error), delay)
            sleep(delay)
            waited += delay
            delay = min(delay * 2, 10.0)


class RetryingStorage:
    """Wraps an Optuna storage (as metrics.TimedStorage does) and retries transient failures."""

    def __init__(self, storage: Any, deadline_seconds: float | None = None):
        self._storage, self._deadline = storage, deadline_seconds

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._storage, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def retried(*args: Any, **kwargs: Any) -> Any:
            return call_with_retry(lambda: attr(*args, **kwargs), name, self._deadline)

        return retried


def open_trial_storage(url: str) -> Any:
    """A trainer's storage: the connection retried, then every call (a journal file has no outage to
    ride out). Torch-free, for the trial, its warm worker, a worker pod and the stand-in trainer alike."""
    from strata.study import open_storage

    storage = call_with_retry(lambda: open_storage(url), "connect")
    return storage if url.startswith("journal://") else RetryingStorage(storage)
