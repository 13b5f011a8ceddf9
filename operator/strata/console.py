"""What `strata run | status | best` show a person: a live display, trial events, tables (rich).

On a terminal `strata run` keeps one live display at the bottom (a bar with elapsed time, ETA and
rate, and a line of counts) and prints each finished trial above it. Anywhere else (a log, CI, a
pipe) it prints a line per change and nothing else: no cursor moves, no colours.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any, Iterable, TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, \
    TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from strata.study import ATTR_DONOR_TRIAL, ATTR_FAIL_REASON, ATTR_REUSED_LAYERS, ATTR_RETRY_OF, ATTR_TRAIN_SECONDS

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def fmt_value(value: Any) -> str:
    """A metric or parameter as a person reads it: 4 significant digits for floats, as is otherwise."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    return "-" if value is None else str(value)


def fmt_param(value: Any) -> str:
    """A hyperparameter: 4 significant digits (a learning rate of 0.00012 stays 0.00012)."""
    return f"{value:.4g}" if isinstance(value, float) else fmt_value(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else time.strftime("%H:%M:%S", time.gmtime(seconds))


# --- trial events ----------------------------------------------------------------------------------


class TrialEvents:
    """A line for each trial that finished since the last call: its value, whether it is the new best,
    what it reused, and why it failed (the reason Optuna keeps; the trial's log has the rest)."""

    def __init__(self, study: optuna.Study, metric: str, log_path=None):
        self.study, self.metric, self.log_path = study, metric, log_path
        self.maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        self.best: float | None = None
        self.seen: set[int] = set()
        for trial in study.get_trials(deepcopy=False, states=FINISHED):  # a resumed study: only what is new
            self.seen.add(trial.number)
            self._beats(trial)

    def _beats(self, trial: FrozenTrial) -> bool:
        if trial.state != TrialState.COMPLETE or trial.value is None:
            return False
        if self.best is None or (trial.value > self.best if self.maximize else trial.value < self.best):
            self.best = trial.value
            return True
        return False

    def new(self) -> list[tuple[str, str]]:
        """(style, line) for each newly finished trial, in trial order."""
        lines = []
        for trial in self.study.get_trials(deepcopy=False, states=FINISHED):
            if trial.number not in self.seen:
                self.seen.add(trial.number)
                lines.append(self.describe(trial))
        return lines

    def describe(self, trial: FrozenTrial) -> tuple[str, str]:
        attrs = trial.user_attrs
        reuse = ""
        layers = int(attrs.get(ATTR_REUSED_LAYERS) or 0)
        if layers:
            donor = attrs.get(ATTR_DONOR_TRIAL)
            reuse = f"; reused {layers} layer{'s' if layers != 1 else ''}" + (f" of trial {donor}" if donor is not None
                                                                              else "")
        seconds = attrs.get(ATTR_TRAIN_SECONDS)
        if seconds is None and trial.datetime_start and trial.datetime_complete:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        took = f"; {fmt_duration(seconds)}" if seconds is not None else ""
        retry = f" (retry of trial {attrs[ATTR_RETRY_OF]})" if ATTR_RETRY_OF in attrs else ""
        if trial.state == TrialState.COMPLETE:
            best = self._beats(trial)
            return ("bold green" if best else "", f"trial {trial.number}{retry} complete: {self.metric} "
                    f"{fmt_value(trial.value)}{', new best' if best else ''}{reuse}{took}")
        if trial.state == TrialState.PRUNED:
            at = f" at epoch {trial.last_step + 1}" if trial.last_step is not None else ""
            value = trial.intermediate_values.get(trial.last_step) if trial.last_step is not None else None
            shown = f" ({self.metric} {fmt_value(value)})" if value is not None else ""
            return "yellow", f"trial {trial.number}{retry} pruned{at}{shown}{reuse}{took}"
        reason = attrs.get(ATTR_FAIL_REASON) or "no reason recorded"
        log = f"; log {self.log_path(trial.number)}" if self.log_path else ""
        return "bold red", f"trial {trial.number}{retry} failed: {reason}{log}"


# --- the live display --------------------------------------------------------------------------------


def _rate(task: Task) -> float | None:
    """Trials per second finished by this run (a resumed study's earlier trials do not count), once
    it has run 10 s and finished one: rich's own estimate jumps wildly over the first few trials."""
    done = task.completed - (task.fields.get("base") or 0)
    elapsed = task.elapsed or 0.0
    return done / elapsed if done > 0 and elapsed >= 10 else None


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = _rate(task)
        return Text(f"{rate * 60:.1f}/min" if rate else "-/min", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = _rate(task)
        if task.finished:
            return Text("eta 0:00:00", style="progress.remaining")
        if not rate or task.total is None:
            return Text("eta -:--:--", style="progress.remaining")
        left = int(max(0.0, (task.total - task.completed) / rate))
        shown = f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}" if left < 86400 else ">1 day"
        return Text(f"eta {shown}", style="progress.remaining")


class _StudyProgress(Progress):
    """The bar, and under it a line of counts that is cut (never wrapped) to the terminal's width."""

    status = Text("")

    def get_renderables(self) -> Iterable[Any]:
        yield self.make_tasks_table(self.tasks)
        yield self.status


def status_line(progress, total: int) -> str:
    best = f"{fmt_value(progress.best.value)} (#{progress.best.number})" if progress.best else "-"
    line = (f"done {progress.finished}/{total}  running {progress.running}  waiting {progress.waiting}  "
            f"pruned {progress.pruned}  failed {progress.failed}  best {best}  reuse {progress.reuse_rate:.0%}")
    registry_errors = progress.registry_load_failures + progress.registry_publish_failures
    if registry_errors:
        line += f"  registry errors {registry_errors}"
    return line


class ProgressDisplay:
    """`strata run`'s display on stderr: live on a terminal, a line per change anywhere else."""

    def __init__(self, name: str, total: int, events: TrialEvents | None = None, quiet: bool = False,
                 console: Console | None = None):
        self.name, self.total, self.events, self.quiet = name, total, events, quiet
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.started = time.monotonic()
        self._last = ""
        self._bar: _StudyProgress | None = None
        if self.live and not quiet:
            self._bar = _StudyProgress(
                TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                           max_width=28)),
                BarColumn(bar_width=None), MofNCompleteColumn(), TimeElapsedColumn(), _EtaColumn(), _RateColumn(),
                console=self.console, expand=True, refresh_per_second=4)
            self._task = self._bar.add_task(escape(name), total=total, base=None)
            self._bar.start()

    def update(self, progress, outcome=None, plan=None) -> None:
        if self.quiet:
            return
        events = self.events.new() if self.events else []
        line = status_line(progress, self.total)
        if self._bar is not None:
            for style, text in events:
                self._bar.console.print(Text(text, style=style), soft_wrap=False, overflow="fold")
            self._bar.status = Text(line, no_wrap=True, overflow="ellipsis")
            if self._bar.tasks[0].fields.get("base") is None:  # what a resumed study had finished before
                self._bar.update(self._task, base=progress.finished)
            self._bar.update(self._task, completed=progress.finished)
            return
        for _, text in events:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        if line != self._last:
            self._last = line
            elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self.started))
            self.console.print(f"[{self.name}] {line}  elapsed {elapsed}", markup=False, highlight=False,
                               soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# --- tables --------------------------------------------------------------------------------------------


def out_console(out: TextIO) -> Console:
    """A console for stdout: the terminal's width on a terminal; in a file or a pipe as wide as the
    table needs (a table squeezed into 80 columns wraps its numbers), and no colours."""
    console = Console(file=out, highlight=False)
    if not console.is_terminal:
        console = Console(file=out, highlight=False, width=100_000, no_color=True)
    return console


def trials_table(report: dict[str, Any], width: int | None = None) -> Table:
    """One row per trial, the parameters in columns, the best trial's row marked with * and bold.

    Narrower than the table would be (width), the parameters share one column as name=value text."""
    table = _trials_table(report, params_in_columns=True)
    if width is not None:
        probe = Console(width=100_000, file=io.StringIO())  # unclamped: the table's natural width
        if Measurement.get(probe, probe.options, table).maximum > width:
            table = _trials_table(report, params_in_columns=False)
    return table


def _trials_table(report: dict[str, Any], params_in_columns: bool) -> Table:
    trials = report["trials"]
    names: list[str] = []
    for t in trials:
        names += [name for name in t["params"] if name not in names]
    has_test = any(t.get("test_accuracy") is not None for t in trials)
    best = (report.get("best") or {}).get("number")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  caption="* best trial" if best is not None else None, caption_justify="left")
    table.add_column("", width=1, no_wrap=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column(report.get("metric") or "value", justify="right", no_wrap=True)
    if has_test:
        table.add_column("test acc", justify="right", no_wrap=True)
    table.add_column("reused", justify="right", no_wrap=True)
    table.add_column("train s", justify="right", no_wrap=True)
    if params_in_columns:
        for name in names:
            table.add_column(name, justify="right", no_wrap=True)
    else:
        table.add_column("params", overflow="fold", ratio=1)
    for t in trials:
        mark = t["number"] == best
        row = ["*" if mark else "", str(t["number"]), t["state"].lower(), fmt_value(t["value"])]
        if has_test:
            row.append(fmt_value(t.get("test_accuracy")))
        row += [str(t["reused_layers"]) if t["reused_layers"] else "-",
                f"{t['train_seconds']:.1f}" if t["train_seconds"] is not None else "-"]
        if params_in_columns:
            row += [fmt_param(t["params"][name]) if name in t["params"] else "" for name in names]
        else:
            row.append(" ".join(f"{k}={fmt_param(v)}" for k, v in t["params"].items()))
        table.add_row(*row, style="bold" if mark else None)
    return table


def summary_lines(report: dict[str, Any]) -> list[str]:
    s = report["summary"]
    lines = [f"{report['study']}: {report['phase']}; {s['complete']} complete, {s['pruned']} pruned, "
             f"{s['failed']} failed; reuse {s['reuse_rate']:.0%} of trials ({s['reused_layers']} layers), "
             f"~{s['seconds_saved_estimate']:.0f} s saved; {s['shared_feature_hits']} read frozen outputs another "
             f"trial computed" + (f"; {fmt_duration(s['wall_seconds'])} in all" if s.get("wall_seconds") else "")]
    if s.get("registry_load_failures") or s.get("registry_publish_failures"):
        lines.append(f"layer registry: {s['registry_load_failures']} load failure(s), "
                     f"{s['registry_publish_failures']} publish failure(s): those trials lost reuse (see the trial logs)")
    return lines


def best_lines(best: dict[str, Any] | None, metric: str | None = None) -> list[str]:
    if not best:
        return []
    test = f", test accuracy {fmt_value(best['test_accuracy'])}" if best.get("test_accuracy") is not None else ""
    model = f", {best['model']}" if best.get("model") else ""
    params = ", ".join(f"{k}={fmt_param(v)}" for k, v in best["params"].items())
    return [f"best: trial {best['number']}, {metric or 'value'} {fmt_value(best['value'])}{test}{model}",
            f"  params: {params}"]


def print_summary(report: dict[str, Any], out: TextIO) -> None:
    console = out_console(out)
    if report["trials"]:
        console.print(trials_table(report, console.width if console.is_terminal else None))
    for line in summary_lines(report) + best_lines(report.get("best"), report.get("metric")):
        console.print(line, markup=False, soft_wrap=True)
