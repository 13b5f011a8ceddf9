"""What `strata run | status | best` show a person (strata.console): events, the live display, tables.

A real Optuna study (in memory) holds the trials; rich renders into a string as it would on an
80-column terminal (force_terminal) or into a log file (not a terminal).
"""

from __future__ import annotations

import io
import re

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from strata.console import ProgressDisplay, TrialEvents, fmt_param, fmt_value, print_summary, trials_table
from strata.scheduler import Best, Progress
from strata.spec import spec_changes

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DISTRIBUTIONS = {"convLayers": IntDistribution(1, 3), "learningRate": FloatDistribution(1e-4, 1e-1, log=True)}


def add(study: optuna.Study, state: TrialState, value: float | None = None, conv: int = 1, lr: float = 0.001,
        **attrs) -> int:
    """A finished trial; its train_seconds attr only if given (else its line shows its wall time, 0.0 s here)."""
    trial = create_trial(state=state, value=value, params={"convLayers": conv, "learningRate": lr},
                         distributions=DISTRIBUTIONS, user_attrs=attrs,
                         intermediate_values={0: 0.9, 1: 0.7} if state == TrialState.PRUNED else None)
    study.add_trial(trial)
    return study.trials[-1].number


@pytest.fixture
def study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="minimize")


def test_each_finished_trial_is_one_line_with_its_value_reuse_and_failure_reason(study):
    events = TrialEvents(study, "val_loss", log_path=lambda n: f"/logs/trial-{n:05d}.log")
    add(study, TrialState.COMPLETE, 0.52, conv=1, train_seconds=4.25)
    add(study, TrialState.COMPLETE, 0.438, conv=3, reused_layers=2, donor_trial=0, train_seconds=2.0)
    add(study, TrialState.COMPLETE, 0.61, conv=2, reused_layers=1, donor_trial=0)
    add(study, TrialState.PRUNED, None, conv=2)
    add(study, TrialState.FAIL, None, fail_reason="CUDA out of memory (trainer exited with code 1)")
    add(study, TrialState.FAIL, None, **{"strata.retry_of": 4})

    lines = [text for _, text in events.new()]

    assert lines == [
        "trial 0 complete: val_loss 0.5200, new best; 4.2 s",
        "trial 1 complete: val_loss 0.4380, new best; reused 2 layers of trial 0; 2.0 s",
        "trial 2 complete: val_loss 0.6100; reused 1 layer of trial 0; 0.0 s",  # its wall time: no train_seconds
        "trial 3 pruned at epoch 2 (val_loss 0.7000); 0.0 s",
        "trial 4 failed: CUDA out of memory (trainer exited with code 1); log /logs/trial-00004.log",
        "trial 5 (retry of trial 4) failed: no reason recorded; log /logs/trial-00005.log",
    ]
    assert events.new() == []  # each trial once


def test_a_resumed_study_reports_only_new_trials_and_knows_the_best_so_far(study):
    add(study, TrialState.COMPLETE, 0.30)
    events = TrialEvents(study, "val_loss")
    add(study, TrialState.COMPLETE, 0.35)
    add(study, TrialState.COMPLETE, 0.25)

    assert [text for _, text in events.new()] == ["trial 1 complete: val_loss 0.3500; 0.0 s",
                                                  "trial 2 complete: val_loss 0.2500, new best; 0.0 s"]


def test_a_maximised_metric_is_best_when_higher():
    study = optuna.create_study(direction="maximize")
    events = TrialEvents(study, "val_accuracy")
    add(study, TrialState.COMPLETE, 0.8)
    add(study, TrialState.COMPLETE, 0.7)
    add(study, TrialState.COMPLETE, 0.9)
    assert ["new best" in text for _, text in events.new()] == [True, False, True]


def progress(done: int, best: float | None = None) -> Progress:
    return Progress(complete=done, finished=done, running=2, waiting=1, pruned=0, failed=0, reused_trials=done // 2,
                    best=Best(number=done - 1, value=best, params={}) if best is not None else None)


def test_on_an_80_column_terminal_the_display_fits_and_prints_each_trial_above_it(study):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, color_system="standard")
    display = ProgressDisplay("a-study-with-a-rather-long-name-that-would-wrap-at-80", 20,
                              TrialEvents(study, "val_loss"), console=console)
    for n in range(1, 6):
        add(study, TrialState.COMPLETE, 1.0 / n, reused_layers=n % 2, donor_trial=0)
        display.update(progress(n, 1.0 / n))
    display.close()

    text = ANSI.sub("", out.getvalue())
    assert "trial 4 complete: val_loss 0.2000, new best; reused 1 layer of trial 0" in text
    rendered = [line for chunk in text.split("\r") for line in chunk.split("\n")]
    assert max(len(line) for line in rendered) <= 80, max(rendered, key=len)
    assert re.search(r"5/20", text) and "eta" in text and "/min" in text
    assert re.search(r"done 5/20 +running 2 +waiting 1", text)


def test_in_a_log_the_display_is_a_line_per_change_without_escape_codes(study):
    out = io.StringIO()
    display = ProgressDisplay("s", 4, TrialEvents(study, "val_loss"), console=Console(file=out, width=80))
    add(study, TrialState.COMPLETE, 0.5)
    display.update(progress(1, 0.5))
    display.update(progress(1, 0.5))  # nothing changed: nothing printed
    add(study, TrialState.COMPLETE, 0.4)
    display.update(progress(2, 0.4))
    display.close()

    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    assert [line.split("  elapsed")[0] for line in lines] == [
        "trial 0 complete: val_loss 0.5000, new best; 0.0 s",
        "[s] done 1/4  running 2  waiting 1  pruned 0  failed 0  best 0.5000 (#0)  reuse 0%",
        "trial 1 complete: val_loss 0.4000, new best; 0.0 s",
        "[s] done 2/4  running 2  waiting 1  pruned 0  failed 0  best 0.4000 (#1)  reuse 50%",
    ]
    assert all(re.search(r"elapsed \d\d:\d\d:\d\d$", line) for line in lines[1::2])


def test_quiet_prints_nothing(study):
    out = io.StringIO()
    display = ProgressDisplay("s", 4, TrialEvents(study, "val_loss"), quiet=True, console=Console(file=out))
    add(study, TrialState.COMPLETE, 0.5)
    display.update(progress(1, 0.5))
    display.close()
    assert out.getvalue() == ""


REPORT = {
    "study": "tiny", "phase": "Succeeded", "metric": "val_loss",
    "best": {"number": 1, "value": 0.4123456, "params": {"convLayers": 2, "learningRate": 0.003},
             "model": "2x18f k3", "test_accuracy": 0.8125},
    "summary": {"complete": 2, "pruned": 0, "failed": 1, "reused_trials": 1, "reused_layers": 1, "reuse_rate": 0.5,
                "seconds_saved_estimate": 3.0, "shared_feature_hits": 1, "registry_load_failures": 0,
                "registry_publish_failures": 0, "wall_seconds": 41.5},
    "trials": [
        {"number": 0, "state": "COMPLETE", "value": 0.5, "params": {"convLayers": 1, "learningRate": 0.001},
         "reused_layers": 0, "train_seconds": 4.0, "test_accuracy": 0.79},
        {"number": 1, "state": "COMPLETE", "value": 0.4123456, "params": {"convLayers": 2, "learningRate": 0.003},
         "reused_layers": 1, "train_seconds": 2.5, "test_accuracy": 0.8125},
        {"number": 2, "state": "FAIL", "value": None, "params": {"convLayers": 3, "someVeryLongParameterName": "x" * 30},
         "reused_layers": 0, "train_seconds": None},
    ],
}


def test_the_summary_table_has_a_column_per_parameter_and_marks_the_best_row():
    out = io.StringIO()
    print_summary(REPORT, out)
    lines = out.getvalue().splitlines()

    header = next(line for line in lines if "val_loss" in line)
    assert header.split() == ["#", "state", "val_loss", "test", "acc", "reused", "train", "s", "convLayers",
                              "learningRate", "someVeryLongParameterName"]
    best_row = next(line for line in lines if line.startswith("*"))
    assert best_row.split() == ["*", "1", "complete", "0.4123", "0.8125", "1", "2.5", "2", "0.003"]
    failed = next(line for line in lines if " fail " in f" {line} ")
    assert "x" * 30 in failed  # a file gets the whole table, not one squeezed into 80 columns
    assert "best: trial 1, val_loss 0.4123, test accuracy 0.8125, 2x18f k3" in lines
    assert "  params: convLayers=2, learningRate=0.003" in lines
    assert any(line.startswith("tiny: Succeeded; 2 complete, 0 pruned, 1 failed") and "41.5 s in all" in line
               for line in lines)


def test_on_a_narrow_terminal_the_table_fits_with_the_parameters_as_text():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    console.print(trials_table(REPORT, width=80))
    lines = ANSI.sub("", out.getvalue()).splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("convLayers=2" in line for line in lines) and any("learningRate=0.003" in line for line in lines)


def test_a_wide_enough_terminal_keeps_a_column_per_parameter():
    table = trials_table(REPORT, width=200)
    assert [c.header for c in table.columns][-3:] == ["convLayers", "learningRate", "someVeryLongParameterName"]


@pytest.mark.parametrize("value, shown", [(0.4123456, "0.4123"), (1e-5, "1e-05"), (123456.0, "1.235e+05"),
                                          (3, "3"), ("adam", "adam"), (None, "-"), (float("nan"), "nan")])
def test_values_are_shown_with_four_decimals_or_significant_digits(value, shown):
    assert fmt_value(value) == shown


def test_parameters_keep_four_significant_digits():
    assert [fmt_param(v) for v in (0.000123456, 0.003, 64, "sgd", True)] == ["0.0001235", "0.003", "64", "sgd", "True"]


# --- spec changes between runs ---------------------------------------------------------------------


SPEC = {"searchSpace": {"lr": {"type": "float", "low": 0.001, "high": 0.1}}, "trials": {"max": 4, "parallel": 2},
        "training": {"epochs": 1}, "sampler": {"name": "tpe"}, "objective": {"metric": "val_loss"}}


def changed(**updates) -> dict:
    import copy

    spec = copy.deepcopy(SPEC)
    for path, value in updates.items():
        *parents, leaf = path.split("__")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


def test_changes_that_keep_trials_comparable_pass():
    assert spec_changes(SPEC, changed(trials__max=40, trials__parallel=8, sampler__name="random",
                                      objective__goal=0.2, storage__checkpoints="/x")) == []


def test_changes_to_what_a_trial_means_are_each_named_with_old_and_new_values():
    assert spec_changes(SPEC, changed(training__epochs=5, searchSpace__lr__high=0.2,
                                      reuse__enabled=False)) == [
        "reuse: (unset) -> {\"enabled\": false}",
        "searchSpace.lr.high: 0.1 -> 0.2",
        "training.epochs: 1 -> 5",
    ]



def test_rate_and_eta_count_this_runs_trials_and_wait_until_they_mean_something():
    from rich.progress import Progress as Bar

    from strata.console import _EtaColumn, _RateColumn

    clock = [0.0]
    bar = Bar(get_time=lambda: clock[0])
    task = bar.add_task("s", total=12, base=2)  # a resumed study: 2 trials were done before this run
    bar.update(task, completed=2)
    clock[0] = 5.0
    bar.update(task, completed=3)
    assert str(_RateColumn().render(bar.tasks[0])) == "-/min"  # 5 s in: not yet
    assert str(_EtaColumn().render(bar.tasks[0])) == "eta -:--:--"
    clock[0] = 60.0
    bar.update(task, completed=5)  # 3 trials in this run's first minute
    assert str(_RateColumn().render(bar.tasks[0])) == "3.0/min"
    assert str(_EtaColumn().render(bar.tasks[0])) == "eta 0:02:20"  # 7 left at 3 a minute
