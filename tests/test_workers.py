"""Warm workers (strata.workers, strata_trainer.worker): real worker processes on real data.

The scheduler and runner are the product's; only the executor differs from a process per trial.
Studies are tiny (200 Fashion-MNIST images at 16x16, one epoch) so a trial trains in a fraction of
a second and what is measured is the hand-off.
"""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from strata.executors import LocalProcessExecutor
from strata.objectstore import LocalFolderStore
from strata.registry import LayerRegistry
from strata.runner import run_loop
from strata.scheduler import ATTR_FAIL_KIND, TrialScheduler
from strata.spec import parse_spec
from strata.study import ATTR_RETRY_OF, create_or_load_study, open_storage
from strata.workers import WarmWorkerExecutor
from tests.services import wait_for

torch = pytest.importorskip("torch")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Debian package dataset-fashion-mnist is not installed")


def tiny_spec(training=None, batch_sizes=(32,), **trials):
    """A grid of 1- and 2-layer networks (4 with one batch size): smaller depths run first."""
    return parse_spec({
        "searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 2},
                        "learningRate": {"type": "categorical", "choices": [0.001, 0.003]},
                        "batchSize": {"type": "categorical", "choices": list(batch_sizes)}},
        "sampler": {"name": "grid"},
        "trials": {"max": 4, "parallel": 1, "maxFailed": 2, "retries": 1, **trials},
        "training": {"subsetSize": 200, "inputSize": 16, "epochs": 1, **(training or {})},
    })


def make_study(tmp_path: Path, name: str, spec):
    url = f"journal://{tmp_path / (name + '.journal')}"
    checkpoints = str(tmp_path / f"{name}.checkpoints")
    spec = spec.model_copy(update={"storage": spec.storage.model_copy(update={"checkpoints": checkpoints})})
    study = create_or_load_study(spec, name, open_storage(url))
    registry = LayerRegistry(LocalFolderStore(checkpoints))
    return url, checkpoints, study, TrialScheduler(study, spec, registry)


def warm(tmp_path: Path, name: str, url: str, checkpoints: str, workers: int = 1) -> WarmWorkerExecutor:
    return WarmWorkerExecutor(url, name, checkpoints, tmp_path / f"{name}.logs", 1, workers)


def run(scheduler, executor, parallel: int = 1, timeout: float = 240):
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        return run_loop(scheduler, executor, parallel, stop=stop, poll_seconds=0.2)
    finally:
        timer.cancel()
        executor.close()


def test_one_warm_worker_runs_the_whole_study_with_the_results_of_trial_processes(tmp_path):
    """Same seeds, same code path: a warm worker's trials give exactly what fresh processes give."""
    url, ckpt, study, scheduler = make_study(tmp_path, "warm", tiny_spec(max=4))
    executor = warm(tmp_path, "warm", url, ckpt)
    outcome = run(scheduler, executor)
    assert outcome.phase == "Succeeded", outcome
    assert executor.workers_started == 1  # one process, one torch import, four trials

    url2, ckpt2, study2, scheduler2 = make_study(tmp_path, "fresh", tiny_spec(max=4))
    fresh = LocalProcessExecutor(url2, "fresh", ckpt2, tmp_path / "fresh.logs", 1)
    assert run(scheduler2, fresh).phase == "Succeeded"

    def results(s):
        return {json.dumps(t.params, sort_keys=True): (t.value, t.user_attrs["reused_layers"])
                for t in s.get_trials() if t.state == TrialState.COMPLETE}

    warm_results, fresh_results = results(study), results(study2)
    assert len(warm_results) == 4 and warm_results.keys() == fresh_results.keys()
    for key, (value, reused) in warm_results.items():
        assert reused == fresh_results[key][1], key
        assert value == pytest.approx(fresh_results[key][0], rel=1e-5), key
    assert sum(reused for _, reused in warm_results.values()) >= 2  # the 2-layer trials reused their donors
    # each trial logged to its own file, as a trial process does
    logs = tmp_path / "warm.logs"
    for trial in study.get_trials():
        text = (logs / f"trial-{trial.number:05d}.log").read_text()
        assert f"trial {trial.number} complete" in text and text.count(" complete: ") == 1


def test_a_killed_worker_fails_its_trial_as_infrastructure_which_is_retried_by_a_fresh_worker(tmp_path):
    url, ckpt, study, scheduler = make_study(tmp_path, "kill", tiny_spec(max=4))
    executor = warm(tmp_path, "kill", url, ckpt)
    killed: list[int] = []

    def kill_first_busy_worker():
        def busy():
            return next((w for w in executor._live() if w.trial is not None), None)

        worker = wait_for(busy, timeout=60, interval=0.01, message="a busy worker")
        killed.append(worker.trial)
        os.kill(worker.proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_first_busy_worker)
    killer.start()
    outcome = run(scheduler, executor)
    killer.join()
    assert outcome.phase == "Succeeded", outcome
    trials = study.get_trials()
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == killed[0] and failed.user_attrs[ATTR_FAIL_KIND] == "infrastructure"
    assert "OOMKilled" in failed.user_attrs["fail_reason"]  # SIGKILL reads as the kernel's OOM kill
    (retry,) = [t for t in trials if t.user_attrs.get(ATTR_RETRY_OF) == failed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert executor.workers_started == 2  # the dead one was replaced


def test_a_trial_past_its_timeout_is_stopped_with_its_worker_and_the_next_trial_gets_a_fresh_one(tmp_path):
    spec = tiny_spec({"subsetSize": 6000, "epochs": 30, "earlyStopPatience": 0}, max=2, timeoutSeconds=2, maxFailed=1)
    url, ckpt, study, scheduler = make_study(tmp_path, "slow", spec)
    executor = warm(tmp_path, "slow", url, ckpt)
    started = time.monotonic()
    outcome = run(scheduler, executor)
    trials = study.get_trials()
    assert [t.user_attrs.get(ATTR_FAIL_KIND) for t in trials] == ["timeout", "timeout"]
    assert all(t.state == TrialState.FAIL for t in trials) and outcome.phase == "Failed"
    assert executor.workers_started >= 2  # the stopped worker was not reused
    assert time.monotonic() - started < 60


def test_between_trials_a_worker_keeps_the_dataset_and_frees_the_models(tmp_path):
    """The worker's loop in this process: tensors alive after each trial stay at the dataset's."""
    from strata_trainer import worker

    url, ckpt, study, scheduler = make_study(tmp_path, "leak", tiny_spec(batch_sizes=(32, 64), max=4))
    plan = scheduler.plan(set(), 4)
    assert len(plan.launch) == 4

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    original = worker.WarmContext.after_trial

    def counting_after_trial():
        original()
        counts.append(live_tensors())

    requests = io.StringIO("".join(json.dumps({"trial": n, "study": "leak", "log": None, "checkpoints": ckpt}) + "\n"
                                   for n in plan.launch))
    answers = io.StringIO()
    worker.WarmContext.after_trial = staticmethod(counting_after_trial)
    try:
        assert worker.serve(url, requests, answers) == 0
    finally:
        worker.WarmContext.after_trial = staticmethod(original)
    lines = [json.loads(line) for line in answers.getvalue().splitlines()]
    assert lines[0] == {"ready": os.getpid()}
    assert [(m["trial"], m["exit"]) for m in lines[1:]] == [(n, 0) for n in plan.launch]
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())
    assert counts[-1] <= counts[0], counts  # models, optimizers and batches do not pile up


def test_an_interrupt_leaves_the_running_trial_running_and_a_resume_trains_it_once(tmp_path):
    spec = tiny_spec({"subsetSize": 3000, "epochs": 8, "earlyStopPatience": 0}, max=3, retries=0, maxFailed=0)
    url, ckpt, study, scheduler = make_study(tmp_path, "resume", spec)
    executor = warm(tmp_path, "resume", url, ckpt)
    stop = threading.Event()

    def interrupt_during_second_trial():
        wait_for(lambda: sum(t.state == TrialState.COMPLETE for t in study.get_trials()) >= 1
                 and executor.active(), timeout=120, interval=0.05, message="a finished and a running trial")
        time.sleep(0.5)  # into its training (a trial here trains for several seconds)
        stop.set()

    thread = threading.Thread(target=interrupt_during_second_trial)
    thread.start()
    try:
        outcome = run_loop(scheduler, executor, 1, stop=stop, poll_seconds=0.2)
    finally:
        executor.close()
        thread.join()
    assert outcome.phase == "Interrupted"
    running = [t.number for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert running and not [t for t in study.get_trials() if t.state == TrialState.FAIL]

    executor = warm(tmp_path, "resume", url, ckpt)
    assert run(scheduler, executor).phase == "Succeeded"
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    logs = tmp_path / "resume.logs"
    for trial in trials:
        assert (logs / f"trial-{trial.number:05d}.log").read_text().count(f"trial {trial.number} complete") == 1
