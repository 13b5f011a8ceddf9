"""`strata run | status | best` as a user runs them: a subprocess on a study file, real trainers.

Studies that train use tiny data (200 Fashion-MNIST images padded to 16x16, one epoch), so a trial
takes a few seconds, nearly all of it the trainer process starting (importing torch).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from strata.families import architecture_from_params
from strata.objectstore import open_object_store
from strata.registry import LayerRegistry
from strata.spec import load_study_file
from strata.study import open_storage
from tests.services import free_port, wait_for

torch = pytest.importorskip("torch")
from strata_trainer.checkpoints import prefix_from_bytes  # noqa: E402

STRATA = Path(sys.executable).with_name("strata")  # the console script of this venv
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                         reason="Debian package dataset-fashion-mnist is not installed")

TINY_STUDY: dict[str, Any] = {
    "apiVersion": "hpo.strata.dev/v1alpha1",
    "kind": "HPOStudy",
    "metadata": {"name": "tiny"},
    "spec": {
        "searchSpace": {
            "convLayers": {"type": "int", "low": 1, "high": 3},
            "learningRate": {"type": "categorical", "choices": [0.001, 0.003]},
        },
        "sampler": {"name": "random", "seed": 2},  # its first proposal has 2 conv layers: a donor is enqueued
        "trials": {"max": 4, "parallel": 2, "maxFailed": 1, "retries": 1, "timeoutSeconds": 300},
        "training": {"subsetSize": 200, "inputSize": 16, "epochs": 1, "epochsWhenReusing": 1},
        "reuse": {"reuseAwareScheduling": True},
    },
}


def write_study(directory: Path, name: str = "tiny", **spec_sections: Any) -> Path:
    document = copy.deepcopy(TINY_STUDY)
    document["metadata"]["name"] = name
    for section, value in spec_sections.items():
        document["spec"][section] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "study.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def strata(*args: str | Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(STRATA), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(directory.rglob("*"))}


def journal_trials(study_file: Path, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(f"journal://{study_file.parent / (name + '.optuna.journal')}")
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


# --- bad input -----------------------------------------------------------------------------------

BAD_INPUT = [
    ("unknown parameter type",
     dict(searchSpace={"convLayers": {"type": "integer", "low": 1, "high": 2}}), [],
     "strata: spec.searchSpace.convLayers.type: unknown parameter type 'integer'"),
    ("negative trial count", dict(trials={"max": -2}), [],
     "strata: spec.trials.max: "),
    ("missing dataset path",
     dict(training={"dataset": {"name": "fashion-mnist", "path": "/nonexistent/fashion"}, "inputSize": 16}), [],
     "strata: spec.training.dataset.path: /nonexistent/fashion does not exist"),
    ("unreachable storage", {}, ["--storage", "postgresql+psycopg2://postgres@127.0.0.1:{closed_port}/x"],
     "strata: --storage: cannot open Optuna storage postgresql+psycopg2://postgres"),
    ("zero workers", {}, ["--workers", "0"],
     "strata: --workers: must be at least 1, got 0"),
    ("too many conv layers for the input", dict(searchSpace={"convLayers": {"type": "int", "low": 1, "high": 6}}), [],
     "strata: spec.searchSpace.convLayers: 6 conv layers pool a 16x16 input to nothing"),
]


@pytest.mark.parametrize("spec_sections, args, message", [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_naming_the_field_and_writes_nothing(tmp_path, spec_sections, args, message):
    study_file = write_study(tmp_path, **spec_sections)
    args = [arg.format(closed_port=free_port()) for arg in args]
    before = tree(tmp_path)

    result = strata("run", study_file, *args, cwd=tmp_path, timeout=60)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message), lines[0]
    assert result.stdout == ""
    assert tree(tmp_path) == before  # no journal, no checkpoints, no logs


def test_status_of_a_study_that_never_ran_says_so_and_creates_no_journal(tmp_path):
    study_file = write_study(tmp_path)
    before = tree(tmp_path)

    result = strata("status", study_file, cwd=tmp_path, timeout=60)

    assert result.returncode == 2
    assert re.fullmatch(r"strata: no study storage at journal://\S+tiny\.optuna\.journal: run the study first\n",
                        result.stderr), result.stderr
    assert tree(tmp_path) == before


# --- a tiny study on the embedded defaults -------------------------------------------------------


MODES = {"warm workers": [], "process per trial": ["--per-trial-processes"]}


@pytest.fixture(scope="module", params=list(MODES))
def finished_study(request, tmp_path_factory) -> dict[str, Any]:
    """The tiny study run once with 2 workers on the defaults: a journal and a folder next to it; in
    warm workers (the default) and with a process per trial."""
    directory = tmp_path_factory.mktemp("tiny-study")
    study_file = write_study(directory)
    result = strata("run", study_file, "--workers", "2", "--report", directory / "report.json",
                    *MODES[request.param], cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"directory": directory, "study_file": study_file, "result": result,
            "report": json.loads((directory / "report.json").read_text())}


@needs_fashion_mnist
def test_a_tiny_study_runs_to_the_end_with_the_embedded_defaults(finished_study):
    directory, report = finished_study["directory"], finished_study["report"]

    assert (directory / "tiny.optuna.journal").is_file()
    assert (directory / "tiny.checkpoints" / "layers").is_dir()
    assert sorted(p.name for p in (directory / "tiny.logs").iterdir())[0] == "trial-00000.log"
    assert report["phase"] == "Succeeded"
    assert [t["number"] for t in report["trials"]] == list(range(4))
    for trial in report["trials"]:
        assert {"number", "state", "value", "params", "reused_layers", "train_seconds"} <= set(trial)
        assert trial["state"] == "COMPLETE"
        assert isinstance(trial["value"], float) and trial["value"] > 0
        assert set(trial["params"]) == {"convLayers", "learningRate"}


@needs_fashion_mnist
def test_the_report_names_the_best_trial(finished_study):
    report = finished_study["report"]
    best = report["best"]

    lowest = min(report["trials"], key=lambda t: t["value"])
    assert best["value"] == lowest["value"]
    assert best["params"] == report["trials"][best["number"]]["params"]
    assert f"best: trial {best['number']}, val_loss {best['value']:.4f}" in finished_study["result"].stdout


@needs_fashion_mnist
def test_deeper_trials_reuse_the_layers_of_shallower_ones(finished_study):
    trials = finished_study["report"]["trials"]

    reusing = [t for t in trials if t["reused_layers"] > 0]
    assert reusing, trials
    for trial in reusing:
        donor = trials[trial["donor_trial"]]
        assert 1 <= trial["reused_layers"] < trial["params"]["convLayers"]
        assert donor["params"]["convLayers"] >= trial["reused_layers"]
        assert trial["epochs_run"] == 1 and trial["train_seconds"] > 0
        # the frozen outputs went to (or came from) the machine's shared folder next to the study
        assert (trial["feature_cache"], trial["shared_features"]) in {("float32", "stored"), ("float32", "hit")}
    assert list((finished_study["directory"] / "tiny.features").glob("*.npy"))
    hits = sum(1 for t in trials if t["shared_features"] == "hit")
    assert finished_study["report"]["summary"]["shared_feature_hits"] == hits
    assert f"{hits} read frozen outputs another trial computed" in finished_study["result"].stdout
    assert finished_study["report"]["summary"]["reused_layers"] == sum(t["reused_layers"] for t in reusing)


@needs_fashion_mnist
def test_status_and_best_show_the_same_best_trial_by_file_and_by_storage(finished_study):
    directory, study_file, best = finished_study["directory"], finished_study["study_file"], finished_study["report"]["best"]
    storage = f"journal://{directory / 'tiny.optuna.journal'}"

    by_file = strata("best", study_file, cwd=directory, timeout=60)
    by_storage = strata("best", "--storage", storage, "--study", "tiny", cwd=directory, timeout=60)
    status = strata("status", study_file, cwd=directory, timeout=60)
    status_json = strata("status", "--storage", storage, "--study", "tiny", "--json", cwd=directory, timeout=60)

    by_journal_path = strata("best", "--storage", directory / "tiny.optuna.journal", "--study", "tiny", "--json",
                             cwd=directory, timeout=60)  # a journal file as the optuna CLI takes it

    for result in (by_file, by_storage, status, status_json, by_journal_path):
        assert result.returncode == 0, result.stderr
    assert by_file.stdout == by_storage.stdout
    assert json.loads(by_journal_path.stdout) == best
    assert json.loads(status_json.stdout)["best"] == best
    assert best["model"] and 0 <= best["test_accuracy"] <= 1  # Fashion-MNIST's t10k images
    shown = (f"best: trial {best['number']}, val_loss {best['value']:.4f}, test accuracy {best['test_accuracy']:.4f}, "
             f"{best['model']}")
    assert shown in status.stdout.splitlines() and by_file.stdout.splitlines()[0] == shown
    assert by_file.stdout.splitlines()[1] == "  params: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    header = next(line for line in status.stdout.splitlines() if "val_loss" in line)
    assert header.split()[-2:] == ["convLayers", "learningRate"]  # a column per parameter
    assert next(line for line in status.stdout.splitlines() if line.startswith("*")).split()[1] == str(best["number"])


@needs_fashion_mnist
def test_each_finished_trial_is_a_line_on_stderr_and_the_run_says_how_to_follow_it(finished_study):
    stderr, trials = finished_study["result"].stderr, finished_study["report"]["trials"]
    journal = finished_study["directory"] / "tiny.optuna.journal"

    assert "\x1b" not in stderr and "\r" not in stderr  # not a terminal: plain lines
    for trial in trials:
        line = next(line for line in stderr.splitlines() if line.startswith(f"trial {trial['number']} "))
        assert line.startswith(f"trial {trial['number']} complete: val_loss {trial['value']:.4f}"), line
        if trial["reused_layers"]:
            assert f"reused {trial['reused_layers']} layer" in line and f"of trial {trial['donor_trial']}" in line
    assert sum("new best" in line for line in stderr.splitlines()) >= 1
    assert f"follow it: optuna-dashboard {journal}" in stderr
    assert re.search(r"^\[tiny\] done 4/4 .*elapsed \d\d:\d\d:\d\d$", stderr, re.MULTILINE), stderr


@needs_fashion_mnist
def test_optuna_tools_read_the_study_with_its_metric_name_and_its_spec_as_an_object(finished_study):
    journal = finished_study["directory"] / "tiny.optuna.journal"
    optuna_cli = Path(sys.executable).with_name("optuna")

    listed = subprocess.run([str(optuna_cli), "trials", "--storage", str(journal), "--study-name", "tiny",
                             "-f", "json"], capture_output=True, text=True, timeout=120)
    study = optuna.load_study(study_name="tiny", storage=open_storage(f"journal://{journal}"))

    assert listed.returncode == 0, listed.stderr
    assert [t["number"] for t in json.loads(listed.stdout)] == [0, 1, 2, 3]
    assert study.metric_names == ["val_loss"]
    spec = study.user_attrs["strata.spec"]
    assert isinstance(spec, dict) and spec["searchSpace"]["convLayers"] == {"type": "int", "low": 1, "high": 3,
                                                                            "step": 1, "log": False}


@needs_fashion_mnist
def test_report_draws_the_studys_plots_and_a_page_that_shows_them(finished_study, tmp_path):
    result = strata("report", finished_study["study_file"], "--out", tmp_path / "plots",
                    cwd=finished_study["directory"], timeout=120)

    assert result.returncode == 0, result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in written] == ["best-over-time.png", "timeline.png", "reuse-saved.png",
                                         "distributions.png", "history.png", "slice.png", "index.html"]
    for png in written[:-1]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000, png
    page = written[-1].read_text()
    assert all(f'src="{p.name}"' in page for p in written[:-1])
    assert "tiny: Succeeded" in page and "4 complete" in page
    assert result.stderr == ""  # no warnings on the user's terminal


@needs_fashion_mnist
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux (Debian package tmux) is not installed")
@pytest.mark.parametrize("columns", [80, 160])
def test_on_a_real_terminal_the_live_display_fits_its_width_and_leaves_no_fragments(tmp_path, columns):
    # A tmux pane as the user's terminal: the display on stderr, the table to a file.
    study_file = write_study(tmp_path, name="a-study-with-a-name-long-enough-to-crowd-an-80-column-line")
    server = f"strata-test-{columns}-{tmp_path.name}"
    command = (f"{STRATA} run {study_file} --workers 2 > {tmp_path / 'table.txt'}; "
               f"echo $? > {tmp_path / 'exit'}; sleep 60")
    subprocess.run(["tmux", "-L", server, "new-session", "-d", "-x", str(columns), "-y", "50", "-c", str(tmp_path),
                    command], check=True, timeout=30)
    try:
        wait_for(lambda: (tmp_path / "exit").exists() and (tmp_path / "exit").read_text().strip(), timeout=240,
                 interval=0.5, message="the study to end in tmux")
        pane = subprocess.run(["tmux", "-L", server, "capture-pane", "-p", "-S", "-200"], capture_output=True,
                              text=True, timeout=30).stdout
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True, timeout=30)

    assert (tmp_path / "exit").read_text().strip() == "0"
    lines = [line.rstrip() for line in pane.splitlines() if line.strip()]
    assert lines and max(len(line) for line in lines) <= columns, pane
    assert sum("eta" in line for line in lines) == 1, pane  # one bar left on screen, no wrapped fragments
    assert sum(line.startswith("done ") for line in lines) == 1 and any(line.startswith("done 4/4") for line in lines)
    for number in range(4):
        assert sum(line.startswith(f"trial {number} complete") for line in lines) == 1, pane


def test_version_and_help_on_every_option():
    import argparse

    from strata.cli import build_parser

    version = subprocess.run([str(STRATA), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and re.fullmatch(r"strata \S+\n", version.stdout), version
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"run", "status", "best", "report"}
    for name, command in commands.items():
        for action in command._actions:
            assert action.help and action.help.strip(), (name, action.dest)
        assert name == "report" or "--json" in command.format_help()


@needs_fashion_mnist
def test_a_closed_pipe_ends_quietly(finished_study):
    # `strata status --json | head -c0`: the reader is gone before strata writes.
    process = subprocess.Popen([str(STRATA), "status", finished_study["study_file"], "--json"],
                               cwd=finished_study["directory"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE
    assert stderr == ""


@needs_fashion_mnist
def test_a_changed_study_file_is_refused_with_what_changed_and_nothing_is_written(finished_study):
    directory = finished_study["directory"]
    document = yaml.safe_load(finished_study["study_file"].read_text())
    document["spec"]["training"]["epochs"] = 2
    document["spec"]["searchSpace"]["learningRate"]["choices"] = [0.001, 0.01]
    document["spec"]["trials"]["max"] = 6  # more trials alone would pass
    changed = directory / "changed.yaml"
    changed.write_text(yaml.safe_dump(document))
    before = (directory / "tiny.optuna.journal").read_bytes()

    result = strata("run", changed, "--storage", directory / "tiny.optuna.journal", "--quiet", cwd=directory,
                    timeout=120)

    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"strata: {changed} changed since study tiny last ran (searchSpace.learningRate."
                              "choices: [0.001, 0.003] -> [0.001, 0.01]; training.epochs: 1 -> 2)"), message
    assert "--allow-spec-change" in message and "trials.max" not in message
    assert (directory / "tiny.optuna.journal").read_bytes() == before


# --- interrupt and resume ------------------------------------------------------------------------


def trial_logs(directory: Path) -> dict[int, str]:
    logs = directory / "tiny.logs"
    if not logs.is_dir():
        return {}
    return {int(p.stem.split("-")[1]): p.read_text() for p in logs.glob("trial-*.log")}


def finished_in_logs(directory: Path) -> set[int]:
    return {n for n, text in trial_logs(directory).items() if re.search(rf"trial {n} (complete|pruned)", text)}


@needs_fashion_mnist
@pytest.mark.parametrize("mode", list(MODES))
def test_an_interrupted_study_resumes_without_losing_or_repeating_a_trial(tmp_path, mode):
    # Trials long enough to be interrupted in the middle even in a warm worker.
    # (8 epochs: at 2 and at 4, a trial seen running could finish before the SIGINT reached it, on a
    # loaded 2-core CI machine.)
    study_file = write_study(tmp_path, trials={"max": 5, "parallel": 2, "maxFailed": 0, "retries": 0},
                             training={"subsetSize": 3000, "inputSize": 16, "epochs": 8, "epochsWhenReusing": 8,
                                       "earlyStopPatience": 0})
    run = subprocess.Popen([str(STRATA), "run", str(study_file), "--workers", "2", "--quiet", *MODES[mode]],
                           cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Two trials done and another trainer started (its log exists, it has not finished).
        wait_for(lambda: len(finished_in_logs(tmp_path)) >= 2 and set(trial_logs(tmp_path)) - finished_in_logs(tmp_path),
                 timeout=120, interval=0.1, message="two finished trials and a running one")
        interrupted_at = time.monotonic()
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, stderr
    assert time.monotonic() - interrupted_at < 15
    assert "run `strata run" in stderr and "again to resume" in stderr

    interrupted = set(trial_logs(tmp_path)) - finished_in_logs(tmp_path)
    assert interrupted, "no trainer was stopped mid-trial"
    left = {t.number: t for t in journal_trials(study_file)}
    assert all(left[n].state == TrialState.RUNNING for n in interrupted)  # left for the next run, not failed
    assert [n for n, t in left.items() if t.state == TrialState.FAIL] == []

    resumed = strata("run", study_file, "--workers", "2", "--report", tmp_path / "report.json", "--quiet",
                     *MODES[mode], cwd=tmp_path)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials = journal_trials(study_file)
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(5)]
    assert all(trials[n].params == t.params for n, t in left.items())  # the same trials, resumed in place
    logs = trial_logs(tmp_path)
    for trial in trials:
        completions = logs.get(trial.number, "").count(f"trial {trial.number} complete")
        expected = 0 if "strata.duplicate_of" in trial.user_attrs else 1  # a repeat is told, never trained
        assert completions == expected, f"trial {trial.number} completed {completions} times"
    for number in interrupted:
        assert logs[number].count(f"trial {number} complete") == 1


# --- PostgreSQL and S3 -------------------------------------------------------------------------


@needs_fashion_mnist
def test_on_postgresql_and_s3_later_trials_reuse_the_donors_exact_weights(tmp_path, postgres_url, s3_bucket):
    study_file = write_study(tmp_path, name="shared")

    result = strata("run", study_file, "--storage", postgres_url, "--checkpoints", s3_bucket, "--workers", "2",
                    "--report", tmp_path / "report.json", "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [t["state"] for t in report["trials"]] == ["COMPLETE"] * 4
    reusing = [t for t in report["trials"] if t["reused_layers"] > 0]
    assert reusing, report["trials"]
    assert not (tmp_path / "shared.optuna.journal").exists()
    assert not (tmp_path / "shared.checkpoints").exists()

    spec = load_study_file(study_file).spec
    registry = LayerRegistry(open_object_store(s3_bucket))
    for trial in reusing:
        k, donor_number = trial["reused_layers"], trial["donor_trial"]
        arch = architecture_from_params(spec, trial["params"])
        (donor_entry,) = [d for d in registry.donors(arch.prefix_signature(k))
                          if d.study == "shared" and d.trial_number == donor_number]
        (own_entry,) = [d for d in registry.donors(arch.prefix_signature(k + 1))
                        if d.study == "shared" and d.trial_number == trial["number"]]
        donor_weights = prefix_from_bytes(registry.load_weights(donor_entry))
        own_weights = prefix_from_bytes(registry.load_weights(own_entry))

        shared = sorted(name for name in own_weights if int(name.split(".")[0]) < k)
        assert shared == sorted(donor_weights)
        for name in shared:
            assert torch.equal(own_weights[name], donor_weights[name]), f"trial {trial['number']} {name}"
        deeper = [name for name in own_weights if int(name.split(".")[0]) == k]
        assert deeper  # and the trial trained a block of its own on top

    storage = open_storage(postgres_url)
    assert len(optuna.load_study(study_name="shared", storage=storage).get_trials()) == 4

