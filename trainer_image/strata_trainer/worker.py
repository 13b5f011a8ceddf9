"""A warm trainer worker: one process that imports torch once and runs trial after trial.

`python -m strata_trainer --worker` reads one JSON assignment per line on stdin,
`{"trial": N, "study": NAME, "log": PATH, "checkpoints": LOCATION|null}`, runs it exactly as
`python -m strata_trainer --trial N` would (strata_trainer.trial.run_trial, the same code path), and
answers one line on its stdout, `{"trial": N, "exit": CODE, "seconds": S}` with the trial process's
exit codes (0 complete, 3 pruned, 1 failed, 2 storage or spec). `{"check": SPEC}` checks a spec's
data as the trials will load it (strata_trainer.datacheck) and answers `{"check": VERDICT}`, the
dataset kept for the first trial. It exits when stdin closes.

What stays between trials (WarmContext): the Optuna storage (one connection pool, or one journal
reader), the parsed datasets (at most DATASETS_KEPT, by their training settings), torch and the
model code. What does not: the model, its optimizer, its batches and feature caches are locals of
run_trial and are collected after each trial, and CUDA's cached blocks are given back.

The scheduler side (strata.workers.WarmWorkerExecutor) decides what runs; a worker only runs what
it is given. A crash, a kill or a timeout ends the worker with its trial, which the scheduler fails
as an infrastructure failure (retried) exactly as for a trial process.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from typing import IO, Any

from strata_trainer.trial import TrialContext
from strata_trainer.worker_io import LOG_FORMAT, TrialLog, send

log = logging.getLogger("strata.worker")
DATASETS_KEPT = 2  # bounded: a worker serves one study, whose trials share one dataset


class WarmContext(TrialContext):
    """TrialContext that keeps what is expensive to open and safe to share across trials."""

    def __init__(self) -> None:
        self._storages: dict[str, Any] = {}
        self._datasets: OrderedDict[str, Any] = OrderedDict()

    def storage(self, url: str):
        if url not in self._storages:
            self._storages[url] = super().storage(url)
        return self._storages[url]

    def dataset(self, spec):
        key = json.dumps([spec.training.model_dump(mode="json"), spec.storage.s3_endpoint], sort_keys=True)
        if key in self._datasets:
            self._datasets.move_to_end(key)
            return self._datasets[key]
        data = super().dataset(spec)
        self._datasets[key] = data
        while len(self._datasets) > DATASETS_KEPT:
            self._datasets.popitem(last=False)
        return data

    @staticmethod
    def after_trial() -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def warm_up() -> None:
    """Pay once what every trial process pays: torch's optimizers import torch._dynamo (and sympy)
    on first use, about 4 s here, and the first conv runs set up the thread pool. Then freeze what
    start-up made, so the collection after each trial scans only that trial's objects (0.3 s a
    trial otherwise)."""
    import torch

    from strata.families import TrainingOptions
    from strata.spec import OPTIMIZERS
    from strata_trainer.training import make_optimizer

    weight = torch.zeros(1, 1, 3, 3, requires_grad=True)
    for name in OPTIMIZERS:
        optimizer = make_optimizer(TrainingOptions(optimizer=name), [weight])
        torch.nn.functional.conv2d(torch.zeros(1, 1, 8, 8), weight).sum().backward()
        optimizer.step()
    gc.collect()
    gc.freeze()


def serve(storage_url: str, requests: IO[str], answers: IO[str]) -> int:
    """Run assignments until `requests` ends. Never raises for one trial's failure."""
    from strata.spec import SpecError
    from strata.study import StorageError
    from strata_trainer.resources import configure_threads
    from strata_trainer.trial import EXIT_FAILED, EXIT_USAGE, run_trial

    context = WarmContext()
    configure_threads()
    warm_up()
    send(answers, {"ready": os.getpid()})
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        if "check" in request:
            send(answers, {"check": _check(request["check"], context)})
            continue
        number = int(request["trial"])
        started = time.perf_counter()
        with TrialLog(request.get("log")):
            try:
                code = run_trial(storage_url, request["study"], number, request.get("checkpoints"), context)
            except (StorageError, SpecError) as error:
                log.error("trial %d: %s", number, error)
                code = EXIT_USAGE
            except Exception:  # run_trial records training errors itself; anything else is this trial's
                log.exception("trial %d: unexpected error in the worker", number)
                code = EXIT_FAILED
        context.after_trial()
        send(answers, {"trial": number, "exit": code, "seconds": round(time.perf_counter() - started, 4)})
    return 0


def _check(raw_spec: dict[str, Any], context: WarmContext) -> dict[str, Any]:
    from strata.spec import parse_spec
    from strata_trainer.datacheck import verdict_for

    try:
        return verdict_for(parse_spec(raw_spec), context.dataset)
    except Exception as error:  # the check must answer, whatever the data does
        return {"ok": False, "message": f"{type(error).__name__}: {error}"}


def main(storage_url: str) -> int:
    """The worker's process: answers on the original stdout, everything printed goes to stderr."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print() must not corrupt the answers
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    return serve(storage_url, sys.stdin, answers)
