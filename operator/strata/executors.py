"""Executors run asked trials somewhere: here as local trainer processes (the operator uses pods).

An executor only starts, watches and stops workers; the scheduler decides what runs.
"""

from __future__ import annotations

import keyword
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class WorkerExit:
    number: int
    exit_code: int
    reason: str  # Completed | Error | OOMKilled | Evicted | Lost | Timeout ...
    seconds: float


class Executor(Protocol):
    def start(self, number: int) -> None: ...
    def poll(self) -> list[WorkerExit]: ...
    def active(self) -> set[int]: ...
    def started_at(self, number: int) -> float: ...  # epoch seconds
    def stop(self, number: int) -> None: ...
    def stop_all(self) -> None: ...


class LocalExecutor(Executor, Protocol):
    """An executor on this machine (the runner's): it can also wait for an ended trial, and close."""

    def wait(self, seconds: float) -> None: ...  # return early once a trial may have ended
    def close(self) -> None: ...  # the study is over: release every worker


STORAGE_ENV = "STRATA_STORAGE_URL"  # where the trainer reads its storage URL by default
# `python -m MODULE` is the trainer: strata_trainer.standin puts the torch-free stand-in behind the
# same command line and protocols, for load tests of the scheduler and the operator.
TRAINER_MODULE_ENV = "STRATA_TRAINER_MODULE"
DEFAULT_TRAINER_MODULE = "strata_trainer"


def check_trainer_module(name: str, variable: str | None = TRAINER_MODULE_ENV) -> str:
    """A dotted Python module name, or ValueError naming the variable it came from: it becomes argv
    of every trainer, and a typo would otherwise fail each trial with "No module named"."""
    if not name or not all(part.isidentifier() and not keyword.iskeyword(part) for part in name.split(".")):
        raise ValueError(f"{variable + ': ' if variable else ''}{name!r} is not a Python module name "
                         f"(dotted identifiers, like strata_trainer.standin)")
    return name


def trainer_module(env: dict[str, str] | None = None) -> str:
    """The trainer module of $STRATA_TRAINER_MODULE in `env` (default: this process's), checked."""
    env = os.environ if env is None else env
    return check_trainer_module(env.get(TRAINER_MODULE_ENV) or DEFAULT_TRAINER_MODULE)


def trainer_command(storage_url: str | None, study_name: str, trial_number: int, checkpoints: str | None,
                    python: str = "python", module: str | None = None) -> list[str]:
    """The one command a trial runs, in a local process or a trainer pod alike.

    storage_url None (what the executor and pods do): no --storage, the trainer reads
    $STRATA_STORAGE_URL. A URL given here lands in the process's argv, which anyone on the
    machine can read (`ps`), password included: pass it through the environment instead.
    module None: $STRATA_TRAINER_MODULE, else strata_trainer.
    """
    command = [python, "-m", check_trainer_module(module) if module else trainer_module()]
    if storage_url:
        command += ["--storage", storage_url]
    command += ["--study", study_name, "--trial", str(trial_number)]
    if checkpoints:
        command += ["--checkpoints", checkpoints]
    return command


class LocalProcessExecutor:
    def __init__(self, storage_url: str, study_name: str, checkpoints: str | None, log_dir: Path,
                 threads_per_trial: int, env: dict[str, str] | None = None, grace_seconds: float = 5.0):
        self.storage_url, self.study_name, self.checkpoints = storage_url, study_name, checkpoints
        self.log_dir = Path(log_dir)
        self.threads = threads_per_trial
        self.env = env or {}
        self.module = trainer_module({**os.environ, **self.env})
        self.grace = grace_seconds
        self._procs: dict[int, tuple[subprocess.Popen, float]] = {}

    def log_path(self, number: int) -> Path:
        return self.log_dir / f"trial-{number:05d}.log"

    def start(self, number: int) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Passive OpenMP waits: spinning threads of parallel trials on shared cores ran 5-15x slower.
        # The storage URL (it may carry a password) goes in the environment, never on the command line.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **self.env, "STRATA_CPU_LIMIT": str(self.threads),
               "PYTHONUNBUFFERED": "1", STORAGE_ENV: self.storage_url}
        with open(self.log_path(number), "ab") as log:
            # Own process group: Ctrl-C in the terminal reaches the runner, which stops workers itself.
            proc = subprocess.Popen(
                trainer_command(None, self.study_name, number, self.checkpoints, sys.executable, self.module),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        self._procs[number] = (proc, time.time())

    def poll(self) -> list[WorkerExit]:
        exits = []
        for number, (proc, started) in list(self._procs.items()):
            code = proc.poll()
            if code is not None:
                del self._procs[number]
                reason = "Completed" if code in (0, 3) else ("OOMKilled" if code == -signal.SIGKILL else "Error")
                exits.append(WorkerExit(number, code, reason, time.time() - started))
        return exits

    def active(self) -> set[int]:
        return set(self._procs)

    def started_at(self, number: int) -> float:
        return self._procs[number][1]

    def stop(self, number: int) -> None:
        entry = self._procs.pop(number, None)
        if entry is not None:
            _terminate([entry[0]], self.grace)

    def stop_all(self) -> None:
        procs = [proc for proc, _ in self._procs.values()]
        self._procs.clear()
        _terminate(procs, self.grace)

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        self.stop_all()


def _terminate(procs: list[subprocess.Popen], grace: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
