"""Warm workers on one machine: the Executor protocol over long-lived trainer processes.

Each worker (`python -m strata_trainer --worker`, strata_trainer.worker; $STRATA_TRAINER_MODULE
names another module, as for trial processes) imports torch once, keeps the storage and the
dataset, and runs the trials this executor hands it one at a time, through the very code a trial
process runs. The scheduler, its reuse-aware order, its retries, timeouts and failure budget see
the same protocol as with LocalProcessExecutor: start a trial, poll for ended trials, stop one,
stop all.

- A trial ends when its worker answers; the exit code means what a trial process's means.
- A worker that dies (crash, kill, OOM) ends its trial with the process's return code, exactly as
  a trial process dying would; the scheduler fails it as an infrastructure failure and retries it.
  A fresh worker takes the next trial.
- Stopping a trial (timeout, goal reached, Ctrl-C) kills its worker's process group: nothing of the
  trial survives, the trial stays RUNNING in Optuna for the scheduler to fail or resume, and a
  fresh worker is started for what comes next.
- `wait(seconds)` returns as soon as any worker answers or dies, so the runner hands out the next
  trial at once instead of at its next poll.
- `check_data(spec)` runs the study's data check in a worker (which keeps the dataset for its first
  trial), so `strata run` itself never imports torch. Until `keep_logs()` (the run's inputs are
  good), workers' output is held in memory: a refused run writes nothing.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from strata.executors import STORAGE_ENV, WorkerExit, _terminate, trainer_module


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen
    trial: int | None = None
    trial_started: float = 0.0  # epoch seconds
    alive: bool = True
    log: IO[bytes] | None = field(default=None, repr=False)
    held: list[bytes] = field(default_factory=list, repr=False)  # output before keep_logs()


class WarmWorkerExecutor:
    def __init__(self, storage_url: str, study_name: str, checkpoints: str | None, log_dir: Path | None,
                 threads_per_trial: int, workers: int, env: dict[str, str] | None = None,
                 grace_seconds: float = 5.0, own_session: bool = True):
        """log_dir None: every log line to this process's stderr (a worker pod's log), none to files.
        own_session: workers in their own process group (a terminal's Ctrl-C reaches only the runner);
        False keeps them in this one's (a pod's processes are stopped as one group)."""
        self.storage_url, self.study_name, self.checkpoints = storage_url, study_name, checkpoints
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.own_session = own_session
        self.threads, self.size = threads_per_trial, max(1, workers)
        self.env = env or {}
        self.module = trainer_module({**os.environ, **self.env})  # checked here, not at each spawn
        self.grace = grace_seconds
        self._workers: list[_Worker] = []
        self._events: queue.Queue[tuple[_Worker, dict[str, Any] | None]] = queue.Queue()
        self._wake = threading.Event()
        self._next_index = 0
        self._winding_down = False  # stop_all or close: dead or stopped workers are not replaced
        self.workers_started = 0  # ever, replacements included (the report shows it)
        self._logs_kept = False
        self._log_lock = threading.Lock()

    # --- the pool ------------------------------------------------------------------------------

    def log_path(self, number: int) -> Path | None:
        return self.log_dir / f"trial-{number:05d}.log" if self.log_dir is not None else None

    def warm_up(self) -> None:
        """Start the pool now, so torch imports while the study is being prepared."""
        while len(self._live()) < self.size:
            self._spawn()

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers if w.alive]

    def _spawn(self) -> _Worker:
        index = self._next_index
        self._next_index += 1
        # As for trial processes: passive OpenMP waits, a share of the cores, the storage URL (it may
        # carry a password) in the environment and never on the command line.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **self.env, "STRATA_CPU_LIMIT": str(self.threads),
               "PYTHONUNBUFFERED": "1", STORAGE_ENV: self.storage_url}
        proc = subprocess.Popen([sys.executable, "-m", self.module, "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=self.own_session)
        worker = _Worker(index, proc)
        self._workers.append(worker)
        self.workers_started += 1
        if self._logs_kept:
            self._open_log(worker)
        threading.Thread(target=self._read, args=(worker,), name=f"strata-worker-{index}", daemon=True).start()
        threading.Thread(target=self._pump_log, args=(worker,), name=f"strata-worker-{index}-log", daemon=True).start()
        return worker

    def _open_log(self, worker: _Worker) -> None:
        if self.log_dir is None:
            worker.log = os.fdopen(os.dup(sys.stderr.fileno()), "ab")
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            worker.log = open(self.log_dir / f"worker-{worker.index:03d}.log", "ab")
        worker.log.write(b"".join(worker.held))
        worker.log.flush()
        worker.held.clear()

    def _pump_log(self, worker: _Worker) -> None:
        """A worker's own output (start-up, warnings; its trials log to their files) to worker-NNN.log."""
        assert worker.proc.stderr is not None
        for line in worker.proc.stderr:
            with self._log_lock:
                if worker.log is not None and not worker.log.closed:
                    worker.log.write(line)
                    worker.log.flush()
                elif len(worker.held) < 1000:
                    worker.held.append(line)

    def keep_logs(self) -> None:
        """The run's inputs are good: from now on workers write their logs into log_dir."""
        with self._log_lock:
            self._logs_kept = True
            for worker in self._workers:
                if worker.log is None:
                    self._open_log(worker)

    def held_output(self) -> str:
        """What the workers printed while their logs were held (shown when a run is refused)."""
        with self._log_lock:
            return b"".join(b"".join(w.held) for w in self._workers).decode(errors="replace")

    def check_data(self, spec: Any, timeout: float = 900.0) -> dict[str, Any]:
        """The data check of strata_trainer.datacheck in a worker: its verdict dict."""
        self.warm_up()
        worker = self._live()[0]
        assert worker.proc.stdin is not None
        raw = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            worker.proc.stdin.write((json.dumps({"check": raw}) + "\n").encode())
            worker.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        deadline = time.time() + timeout
        held: list[tuple[_Worker, dict[str, Any] | None]] = []
        try:
            while time.time() < deadline:
                try:
                    source, message = self._events.get(timeout=max(0.0, deadline - time.time()))
                except queue.Empty:
                    break
                if source is worker and message is not None and "check" in message:
                    return message["check"]
                held.append((source, message))
                if source is worker and message is None:
                    output = self.held_output().strip().splitlines()[-5:]
                    raise RuntimeError("the trainer worker exited during the data check"
                                       + (": " + " | ".join(output) if output else ""))
        finally:
            for item in held:  # for poll(): a ready line, or a death it must see
                self._events.put(item)
        raise RuntimeError(f"the data check did not answer within {timeout:.0f} s")

    def _read(self, worker: _Worker) -> None:
        assert worker.proc.stdout is not None
        for raw in worker.proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            self._events.put((worker, message))
            self._wake.set()
        worker.proc.wait()
        self._events.put((worker, None))  # the worker is gone
        self._wake.set()

    def _retire(self, worker: _Worker) -> None:
        worker.alive = False
        if worker in self._workers:
            self._workers.remove(worker)
        with self._log_lock:
            if worker.log is not None:
                worker.log.close()

    # --- the Executor protocol -----------------------------------------------------------------

    def start(self, number: int) -> None:
        self._winding_down = False
        if not self._logs_kept:
            self.keep_logs()  # a trial starts: the run's inputs were accepted
        idle = [w for w in self._live() if w.trial is None]
        worker = idle[0] if idle else self._spawn()
        log = self.log_path(number)
        request = {"trial": number, "study": self.study_name, "log": str(log) if log else None,
                   "checkpoints": self.checkpoints}
        worker.trial, worker.trial_started = number, time.time()
        try:
            assert worker.proc.stdin is not None
            worker.proc.stdin.write((json.dumps(request) + "\n").encode())
            worker.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died meanwhile: its reader reports the trial as ended with the worker's code

    def poll(self) -> list[WorkerExit]:
        exits: list[WorkerExit] = []
        self._wake.clear()
        while True:
            try:
                worker, message = self._events.get_nowait()
            except queue.Empty:
                break
            if not worker.alive:
                continue  # stopped on purpose: its trial was already dealt with
            if message is None:
                code = worker.proc.returncode if worker.proc.returncode is not None else -1
                if worker.trial is not None:
                    reason = "OOMKilled" if code == -signal.SIGKILL else "Error"
                    exits.append(WorkerExit(worker.trial, code, reason, time.time() - worker.trial_started))
                self._retire(worker)
            elif "trial" in message and worker.trial == int(message["trial"]):
                code = int(message["exit"])
                reason = "Completed" if code in (0, 3) else "Error"
                exits.append(WorkerExit(worker.trial, code, reason, float(message.get("seconds", 0.0))))
                worker.trial = None
        # Keep the pool at its size: a dead worker's replacement imports torch while others train.
        while not self._winding_down and len(self._live()) < self.size:
            self._spawn()
        return exits

    def active(self) -> set[int]:
        return {w.trial for w in self._live() if w.trial is not None}

    def started_at(self, number: int) -> float:
        for worker in self._live():
            if worker.trial == number:
                return worker.trial_started
        raise KeyError(number)

    def stop(self, number: int) -> None:
        for worker in self._live():
            if worker.trial == number:
                self._retire(worker)
                self._terminate([worker.proc])

    def stop_all(self) -> None:
        self._winding_down = True
        workers = self._live()
        for worker in workers:
            self._retire(worker)
        self._terminate([w.proc for w in workers])

    def _terminate(self, procs: list[subprocess.Popen], grace: float | None = None) -> None:
        grace = self.grace if grace is None else grace
        if self.own_session:  # the worker and anything it started
            _terminate(procs, grace)
            return
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.time() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def wait(self, seconds: float) -> None:
        self._wake.wait(seconds)

    def close(self) -> None:
        """The study ended: idle workers exit when their input closes; any still busy are stopped."""
        self._winding_down = True
        workers = self._live()
        for worker in workers:
            self._retire(worker)
            try:
                if worker.proc.stdin is not None:
                    worker.proc.stdin.close()
            except OSError:
                pass
        deadline = time.time() + self.grace
        for worker in workers:
            try:
                worker.proc.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self._terminate([worker.proc], grace=0.0)
