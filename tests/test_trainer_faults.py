"""Dependencies that fail under a running trainer and a running `strata run`: nothing lost, nothing silent.

- a PostgreSQL restart while a trainer reports its epochs: the trainer waits it out and completes
  (it used to fail the trial, burning a retry and the failure budget);
- a layer registry that is unreachable: the trial trains from scratch and records the failed load
  and publish, and `strata run` shows them in its progress line, summary and JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from tests.services import free_port, pause_postgres, resume_postgres, wait_for
from tests.test_cli import STRATA, journal_trials, needs_fashion_mnist, write_study
from tests.test_trainer import GOOD, E2E_SPACE, ask, make_spec, new_study, run_trainer, trial

pytestmark = needs_fashion_mnist


def test_a_trainer_rides_out_a_database_restart_and_completes_its_trial(private_postgres, tmp_path):
    url = private_postgres.create_database("optuna")
    spec = make_spec(search_space=E2E_SPACE, epochs=8)
    study = new_study(spec, url)
    number = ask(study, spec, **GOOD)
    env = {"STRATA_CPU_LIMIT": "1", "STRATA_SPILL_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    trainer = subprocess.Popen([sys.executable, "-m", "strata_trainer", "--storage", url, "--study", "fashion-e2e",
                                "--trial", str(number)], env={**os.environ, **env}, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: trial(url, "fashion-e2e", number).intermediate_values, timeout=120,
                 message="the trainer to report its first epoch")
        pause_postgres(private_postgres)  # the database restarts while the trainer trains
        time.sleep(6)
        resume_postgres(private_postgres)
        output, _ = trainer.communicate(timeout=240)
    finally:
        trainer.kill()

    assert trainer.returncode == 0, output[-3000:]
    done = trial(url, "fashion-e2e", number)
    assert done.state == TrialState.COMPLETE
    assert len(done.intermediate_values) == done.user_attrs["epochs_run"]  # no epoch report was lost
    assert "Optuna storage unreachable" in output  # it said what it waited for


def test_an_unreachable_registry_is_recorded_as_a_load_and_a_publish_failure(postgres_url, tmp_path):
    spec = make_spec(search_space=E2E_SPACE, checkpoints="s3://layers/x")
    study = new_study(spec, postgres_url)
    number = ask(study, spec, **{**GOOD, "convLayers": 2})

    run = run_trainer(postgres_url, "fashion-e2e", number, tmp_path,
                      STRATA_S3_ENDPOINT=f"http://127.0.0.1:{free_port()}")  # nothing listens there

    assert run.returncode == 0, run.stderr[-3000:]
    done = trial(postgres_url, "fashion-e2e", number)
    assert done.state == TrialState.COMPLETE and done.user_attrs["reused_layers"] == 0
    assert done.user_attrs["registry_load_failures"] >= 1
    assert done.user_attrs["registry_publish_failures"] == 1


def test_strata_run_shows_registry_failures_in_its_progress_summary_and_report(tmp_path, private_s3, monkeypatch):
    """The checkpoint store goes away after the study started: trials still finish, and the user sees it."""
    monkeypatch.setenv("STRATA_S3_ENDPOINT", private_s3.endpoint)
    monkeypatch.setenv("STRATA_S3_ACCESS_KEY", private_s3.access_key)
    monkeypatch.setenv("STRATA_S3_SECRET_KEY", private_s3.secret_key)
    private_s3.client().make_bucket("layers")
    study_file = write_study(tmp_path, trials={"max": 3, "parallel": 1, "maxFailed": 1, "retries": 1})
    run = subprocess.Popen([str(STRATA), "run", str(study_file), "--checkpoints", "s3://layers/tiny",
                            "--report", str(tmp_path / "report.json")], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def one_complete() -> bool:
            try:
                return any(t.state == TrialState.COMPLETE for t in journal_trials(study_file))
            except (KeyError, FileNotFoundError):  # not created yet
                return False

        wait_for(one_complete, timeout=120, message="the first trial to complete")
        private_s3.stop()
        stdout, stderr = run.communicate(timeout=300)
    finally:
        run.kill()

    assert run.returncode == 0, stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    failures = report["summary"]["registry_load_failures"] + report["summary"]["registry_publish_failures"]
    assert failures >= 2 and report["summary"]["complete"] + report["summary"]["pruned"] == 3
    assert "layer registry:" in stdout and "lost reuse" in stdout
    assert "registry errors" in stderr  # the progress line


def test_strata_run_refuses_a_checkpoint_location_it_cannot_write_and_writes_nothing(tmp_path):
    study_file = write_study(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())

    result = subprocess.run([str(STRATA), "run", str(study_file), "--checkpoints", "/dev/null/x"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("strata: --checkpoints: /dev/null/x is not writable"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no journal, no logs


def test_the_storage_retry_gives_up_after_its_deadline_and_passes_other_errors_at_once(monkeypatch):
    import sqlalchemy.exc

    from strata.retrying_storage import call_with_retry

    calls = []

    def down():
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    slept: list[float] = []
    with pytest.raises(sqlalchemy.exc.OperationalError):
        call_with_retry(down, "test", deadline_seconds=5, sleep=slept.append)
    assert len(calls) >= 3 and sum(slept) <= 5

    def broken():
        raise optuna.exceptions.UpdateFinishedTrialError("already finished")

    calls.clear()
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        call_with_retry(broken, "tell", deadline_seconds=60, sleep=slept.append)
