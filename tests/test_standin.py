"""The stand-in trainer (strata_trainer.standin): the trainer's command line and protocols, no torch.

Each test runs it as the product would (a trial process, a warm worker under WarmWorkerExecutor, a
worker pod, `strata run`) with epochs of 0.01-0.05 s, and checks what Optuna and the operator read.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from strata.executors import trainer_command, trainer_module
from strata.retrying_storage import open_trial_storage
from strata.runner import run_loop
from strata.scheduler import TrialScheduler
from strata.spec import parse_spec
from strata.study import (
    ATTR_ASSIGNED, ATTR_DATA_CHECK, ATTR_EPOCHS_RUN, ATTR_FAIL_REASON, ATTR_MODEL, ATTR_QUEUED_SECONDS,
    ATTR_REUSED_LAYERS,
    ATTR_TRAIN_SECONDS, ATTR_TRAINING_STARTED, ATTR_WORKER, attr_time, create_or_load_study, data_check_key, distributions, open_storage,
)
from strata.workers import WarmWorkerExecutor
from strata_trainer.standin import (
    EXIT_CRASHED, MODULE, StandinConfig, objective_loss, run_standin_trial,
)
from tests.services import wait_for

STRATA = Path(sys.executable).with_name("strata")
SPACE = {"convLayers": {"type": "int", "low": 1, "high": 3},
         "filters": {"type": "categorical", "choices": [8, 16, 32]},
         "learningRate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}
GOOD = {"convLayers": 1, "filters": 16, "learningRate": 0.003}


def spec_of(epochs: int = 3, **sections):
    return parse_spec({"searchSpace": SPACE, "sampler": {"name": "tpe", "seed": 1},
                       "trials": {"max": 4, "parallel": 2, "maxFailed": 10},
                       "training": {"epochs": epochs}, "reuse": {"enabled": False}, **sections})


def make_study(url: str, spec, name: str = "standin") -> optuna.Study:
    return create_or_load_study(spec, name, open_storage(url))


def ask(study: optuna.Study, spec, params: dict | None = None) -> optuna.trial.Trial:
    """A RUNNING trial, as the scheduler leaves it for a trainer (with these params when given)."""
    if params is not None:
        study.enqueue_trial(params)
    return study.ask(distributions(spec))


def journal(tmp_path: Path) -> str:
    return f"journal://{tmp_path / 'standin.journal'}"


def standin(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-m", MODULE, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "STRATA_STANDIN_EPOCH_SECONDS": "0.01", **(env or {})})


def imported_torch(importtime_stderr: str) -> bool:
    return any(re.search(r"\|\s+torch(\.|$)", line) for line in importtime_stderr.splitlines())


def test_a_trial_process_reports_each_epoch_sets_the_trainers_attrs_and_tells_a_value_of_its_params(tmp_path):
    spec = spec_of(epochs=3)
    url = journal(tmp_path)
    study = make_study(url, spec)
    trial = ask(study, spec, GOOD)

    run = standin("--storage", url, "--study", "standin", "--trial", str(trial.number), "--checkpoints", "/ignored",
                  python_flags=("-X", "importtime"))

    assert run.returncode == 0, run.stderr
    assert not imported_torch(run.stderr)
    frozen = study.get_trials()[trial.number]
    assert frozen.state == TrialState.COMPLETE
    assert sorted(frozen.intermediate_values) == [1, 2, 3]
    values = [frozen.intermediate_values[e] for e in (1, 2, 3)]
    assert values == sorted(values, reverse=True)  # the loss falls epoch after epoch, to the told value
    assert frozen.value == values[-1] == pytest.approx(objective_loss(spec, GOOD))
    attrs = frozen.user_attrs
    assert attrs[ATTR_REUSED_LAYERS] == 0 and attrs[ATTR_EPOCHS_RUN] == 3 and attrs[ATTR_MODEL]
    assert attrs["val_loss"] == frozen.value and 0 < attrs["val_accuracy"] < 1
    assert attrs[ATTR_TRAIN_SECONDS] >= 0.03 and abs(attr_time(attrs[ATTR_TRAINING_STARTED]) - time.time()) < 600
    assert attrs[ATTR_TRAINING_STARTED].endswith("Z")  # ISO 8601, UTC, as optuna-dashboard shows it
    assert len(attrs["val_loss_per_epoch"]) == 3

    # the same params give the same value, in this process too (what a benchmark's threads run)
    again = ask(study, spec, GOOD)
    assert run_standin_trial(open_trial_storage(url), "standin", again.number, StandinConfig(epoch_seconds=0)) == 0
    assert study.get_trials()[again.number].value == frozen.value
    # a finished trial is never run twice: its state's exit code
    assert standin("--storage", url, "--study", "standin", "--trial", str(trial.number)).returncode == 0


def test_the_objective_has_its_optimum_inside_the_space():
    spec = spec_of()
    grid = [dict(zip(("convLayers", "filters", "learningRate"), p))
            for p in itertools.product((1, 2, 3), (8, 16, 32), (1e-4, 1e-3, 1e-2, 1e-1))]
    losses = [objective_loss(spec, p) for p in grid]
    assert min(losses) >= 0.2 and max(losses) > 2 * min(losses)
    assert min(grid, key=lambda p: objective_loss(spec, p))["learningRate"] not in (1e-4, 1e-1)


def test_fail_rate_one_fails_the_trial_with_a_reason(tmp_path):
    spec = spec_of()
    url = journal(tmp_path)
    study = make_study(url, spec)
    trial = ask(study, spec)

    run = standin("--study", "standin", "--trial", str(trial.number),
                  env={"STRATA_STORAGE_URL": url, "STRATA_STANDIN_FAIL_RATE": "1"})

    assert run.returncode == 1, run.stderr
    frozen = study.get_trials()[trial.number]
    assert frozen.state == TrialState.FAIL
    assert frozen.user_attrs[ATTR_FAIL_REASON].startswith("StandinFailure: stand-in failure at epoch")


def test_crash_rate_one_exits_137_without_telling(tmp_path):
    spec = spec_of()
    url = journal(tmp_path)
    study = make_study(url, spec)
    trial = ask(study, spec)

    run = standin("--study", "standin", "--trial", str(trial.number),
                  env={"STRATA_STORAGE_URL": url, "STRATA_STANDIN_CRASH_RATE": "1"})

    assert run.returncode == EXIT_CRASHED, run.stderr
    assert study.get_trials()[trial.number].state == TrialState.RUNNING  # for the scheduler to fail and retry


def test_fates_are_drawn_per_trial_and_seed_reproducibly():
    config = StandinConfig(fail_rate=0.3, crash_rate=0.2, seed=7)
    fates = [config.fate(n, 5)[0] for n in range(200)]
    assert fates == [StandinConfig(fail_rate=0.3, crash_rate=0.2, seed=7).fate(n, 5)[0] for n in range(200)]
    assert 30 < fates.count("fail") < 90 and 15 < fates.count("crash") < 65
    assert fates != [StandinConfig(fail_rate=0.3, crash_rate=0.2, seed=8).fate(n, 5)[0] for n in range(200)]


def test_a_trial_worse_than_the_median_is_pruned(tmp_path):
    spec = spec_of(epochs=3, pruner={"name": "median", "startupTrials": 0, "warmupSteps": 0})
    url = journal(tmp_path)
    study = make_study(url, spec)
    storage = open_trial_storage(url)
    config = StandinConfig(epoch_seconds=0)
    for params in sorted((GOOD, {**GOOD, "filters": 8}), key=lambda p: -objective_loss(spec, p)):  # each beats the last
        assert run_standin_trial(storage, "standin", ask(study, spec, params).number, config) == 0
    worst = {"convLayers": 3, "filters": 32, "learningRate": 1e-4}
    assert objective_loss(spec, worst) > objective_loss(spec, GOOD)

    bad = ask(study, spec, worst)
    assert run_standin_trial(storage, "standin", bad.number, config) == 3

    frozen = study.get_trials()[bad.number]
    assert frozen.state == TrialState.PRUNED and frozen.user_attrs[ATTR_EPOCHS_RUN] == 1


def test_check_data_records_an_ok_verdict_for_the_studys_data_settings(tmp_path):
    spec = spec_of()
    url = journal(tmp_path)
    make_study(url, spec)

    run = standin("--storage", url, "--study", "standin", "--check-data")

    assert run.returncode == 0, run.stderr
    verdict = optuna.load_study(study_name="standin", storage=open_storage(url)).user_attrs[ATTR_DATA_CHECK]
    assert verdict["ok"] is True and verdict["key"] == data_check_key(spec)
    assert {"train", "validation", "test", "classes", "message"} <= set(verdict)


def test_warm_workers_of_the_standin_run_a_study_through_the_scheduler(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_STANDIN_EPOCH_SECONDS", "0.02")
    spec = spec_of(epochs=2)
    url = journal(tmp_path)
    study = make_study(url, spec)
    scheduler = TrialScheduler(study, spec, None)
    executor = WarmWorkerExecutor(url, "standin", None, tmp_path / "logs", 1, 2,
                                  env={"STRATA_TRAINER_MODULE": MODULE})
    verdict = executor.check_data(spec)  # in a stand-in worker, as strata run asks it
    assert verdict["ok"] is True and verdict["key"] == data_check_key(spec)
    stop = threading.Event()
    timer = threading.Timer(60, stop.set)
    timer.start()
    try:
        outcome = run_loop(scheduler, executor, 2, stop=stop, poll_seconds=0.05)
    finally:
        timer.cancel()
        executor.close()

    assert outcome.phase == "Succeeded", outcome
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(t.value == pytest.approx(objective_loss(spec, t.params)) for t in trials)
    assert executor.workers_started == 2  # two processes, four trials
    for trial in trials:
        assert f"trial {trial.number} complete" in (tmp_path / "logs" / f"trial-{trial.number:05d}.log").read_text()


def test_a_crash_in_a_worker_ends_the_worker_with_137_and_leaves_the_trial_running(tmp_path):
    spec = spec_of()
    url = journal(tmp_path)
    study = make_study(url, spec)
    trial = ask(study, spec)
    env = {**os.environ, "STRATA_STORAGE_URL": url, "STRATA_STANDIN_CRASH_RATE": "1",
           "STRATA_STANDIN_EPOCH_SECONDS": "0.01"}
    worker = subprocess.Popen([sys.executable, "-m", MODULE, "--worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert json.loads(worker.stdout.readline()) == {"ready": worker.pid}
        worker.stdin.write(json.dumps({"trial": trial.number, "study": "standin", "log": None}) + "\n")
        worker.stdin.flush()
        assert worker.wait(timeout=30) == EXIT_CRASHED
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert study.get_trials()[trial.number].state == TrialState.RUNNING


def test_a_worker_pod_of_standins_runs_its_assigned_trial_and_stops_on_sigterm(tmp_path):
    spec = spec_of(epochs=2)
    url = journal(tmp_path)
    study = make_study(url, spec)
    trial = ask(study, spec, GOOD)
    study._storage.set_trial_user_attr(trial._trial_id, ATTR_ASSIGNED, "pod-a")
    env = {key: value for key, value in os.environ.items() if key != "STRATA_TRAINER_MODULE"}
    pod = subprocess.Popen([sys.executable, "-X", "importtime", "-m", MODULE, "--study", "standin", "--serve", "pod-a",
                            "--slots", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**env, "STRATA_STORAGE_URL": url, "STRATA_STANDIN_EPOCH_SECONDS": "0.01"})
    try:
        wait_for(lambda: study.get_trials()[trial.number].state == TrialState.COMPLETE, timeout=60,
                 message="the assigned trial complete")
        pod.send_signal(signal.SIGTERM)
        _, stderr = pod.communicate(timeout=30)
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait()
    assert pod.returncode == 0, stderr[-2000:]
    assert not imported_torch(stderr)  # the pod process itself
    frozen = study.get_trials()[trial.number]
    assert frozen.value == pytest.approx(objective_loss(spec, GOOD))  # a stand-in worker ran it
    assert frozen.user_attrs[ATTR_WORKER] == "pod-a"


def test_a_worker_pod_restarts_optunas_clock_of_a_trial_that_waited_in_its_queue(tmp_path):
    """Optuna's duration of a trial is its run time: one handed to the pod a second before the pod
    took it, and one left parked by a claim cut between its two writes, both start their clock when
    the pod starts them, and keep the wait in queued_seconds."""
    spec = spec_of(epochs=2)
    url = journal(tmp_path)
    study = make_study(url, spec)
    first = ask(study, spec, GOOD)
    second = ask(study, spec, {**GOOD, "filters": 32})
    for trial in (first, second):
        study._storage.set_trial_user_attr(trial._trial_id, ATTR_ASSIGNED, "pod-a")
    study._storage.set_trial_state_values(second._trial_id, TrialState.WAITING)  # parked, still the pod's
    handed = datetime.datetime.now()
    time.sleep(1.0)
    env = {key: value for key, value in os.environ.items() if key != "STRATA_TRAINER_MODULE"}
    pod = subprocess.Popen([sys.executable, "-m", MODULE, "--study", "standin", "--serve", "pod-a", "--slots", "1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**env, "STRATA_STORAGE_URL": url, "STRATA_STANDIN_EPOCH_SECONDS": "0.3"})
    try:
        wait_for(lambda: all(t.state == TrialState.COMPLETE for t in study.get_trials()), timeout=60,
                 message="both assigned trials complete")
        pod.send_signal(signal.SIGTERM)
        _, stderr = pod.communicate(timeout=30)
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait()
    assert pod.returncode == 0, stderr[-2000:]
    one, two = study.get_trials()
    assert one.user_attrs[ATTR_QUEUED_SECONDS] >= 1.0 and one.datetime_start >= handed + datetime.timedelta(seconds=1)
    assert two.datetime_start >= one.datetime_complete  # one slot: it waited for the first to end
    assert two.user_attrs[ATTR_QUEUED_SECONDS] >= (one.datetime_complete - handed).total_seconds() - 0.1
    assert two.duration.total_seconds() < two.user_attrs[ATTR_QUEUED_SECONDS]  # 2 epochs of 0.3 s
    assert {one.user_attrs[ATTR_WORKER], two.user_attrs[ATTR_WORKER]} == {"pod-a"}


def test_strata_run_with_the_standin_module_completes_a_study_in_seconds(tmp_path):
    data = tmp_path / "fashion"  # never read: the stand-in's data check reads nothing
    data.mkdir()
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "apiVersion": "hpo.strata.dev/v1alpha1", "kind": "HPOStudy", "metadata": {"name": "quick"},
        "spec": {"searchSpace": SPACE, "sampler": {"name": "tpe", "seed": 3},
                 "trials": {"max": 6, "parallel": 2, "maxFailed": 1},
                 "training": {"epochs": 2, "dataset": {"name": "fashion-mnist", "path": str(data)}}},
    }))
    started = time.monotonic()
    run = subprocess.run([str(STRATA), "run", str(study_file), "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "STRATA_TRAINER_MODULE": MODULE,
                                           "STRATA_STANDIN_EPOCH_SECONDS": "0.02"})
    elapsed = time.monotonic() - started

    assert run.returncode == 0, run.stderr
    storage = open_storage(f"journal://{tmp_path / 'quick.optuna.journal'}")
    trials = optuna.load_study(study_name="quick", storage=storage).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6
    assert elapsed < 60, elapsed


def test_many_standin_trials_share_one_storage_in_threads_of_one_process(postgres_url):
    spec = spec_of(epochs=2, trials={"max": 12, "parallel": 8, "maxFailed": 10})
    study = make_study(postgres_url, spec)
    numbers = [ask(study, spec).number for _ in range(8)]
    storage = open_trial_storage(postgres_url)
    config = StandinConfig(epoch_seconds=0.01, fail_rate=0.25, seed=4)

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda n: run_standin_trial(storage, "standin", n, config), numbers))

    states = {t.number: t.state for t in study.get_trials()}
    expected = {n: (1 if config.fate(n, 2)[0] == "fail" else 0) for n in numbers}
    assert dict(zip(numbers, codes)) == expected
    assert all(states[n] == (TrialState.FAIL if code else TrialState.COMPLETE) for n, code in zip(numbers, codes))


def test_a_missing_trial_or_study_or_a_bad_setting_exits_2(tmp_path):
    spec = spec_of()
    url = journal(tmp_path)
    study = make_study(url, spec)
    assert run_standin_trial(open_trial_storage(url), "no-such-study", 0, StandinConfig()) == 2
    assert run_standin_trial(open_trial_storage(url), "standin", 5, StandinConfig()) == 2
    study.enqueue_trial(GOOD)
    waiting = study.get_trials()[-1].number  # WAITING: not asked yet
    assert run_standin_trial(open_trial_storage(url), "standin", waiting, StandinConfig()) == 2

    run = standin("--storage", url, "--study", "standin", "--trial", "0", env={"STRATA_STANDIN_FAIL_RATE": "2"})
    assert run.returncode == 2 and "STRATA_STANDIN_FAIL_RATE" in run.stderr


def test_the_trainer_module_comes_from_one_variable_and_is_checked(monkeypatch, tmp_path):
    assert trainer_module({}) == "strata_trainer"
    assert trainer_module({"STRATA_TRAINER_MODULE": MODULE}) == MODULE
    assert trainer_command(None, "s", 1, None, module=MODULE)[:3] == ["python", "-m", MODULE]
    monkeypatch.setenv("STRATA_TRAINER_MODULE", MODULE)
    assert trainer_command(None, "s", 1, None)[:3] == ["python", "-m", MODULE]
    for bad in ("strata trainer", "strata_trainer.", "-m", "import.x", "a;rm"):
        with pytest.raises(ValueError, match="STRATA_TRAINER_MODULE"):
            trainer_module({"STRATA_TRAINER_MODULE": bad})
    monkeypatch.setenv("STRATA_TRAINER_MODULE", "no such")
    with pytest.raises(ValueError, match="STRATA_TRAINER_MODULE"):
        WarmWorkerExecutor(journal(tmp_path), "s", None, None, 1, 1)


def test_exit_codes_are_the_trainers():
    pytest.importorskip("torch")
    from strata_trainer import standin, trial

    assert (standin.EXIT_COMPLETE, standin.EXIT_FAILED, standin.EXIT_USAGE, standin.EXIT_PRUNED) == (
        trial.EXIT_COMPLETE, trial.EXIT_FAILED, trial.EXIT_USAGE, trial.EXIT_PRUNED)
    assert standin.STATE_EXIT == trial.STATE_EXIT


def test_the_standin_and_the_worker_pod_path_import_no_torch():
    code = ("import sys, strata_trainer.standin, strata_trainer.podworker\n"
            "from strata_trainer.resources import cpu_limit, memory_limit\n"
            "cpu_limit(); memory_limit()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
