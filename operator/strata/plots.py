"""`strata report`: a study's story as pictures, PNG files and one HTML page that shows them.

    best-over-time.png   each finished trial's value at the wall-clock time it ended, and the best so far
    timeline.png         each trial: its wait for a donor or a slot, start-up, then training
    reuse-saved.png      seconds each trial saved by reuse (the trainer's estimate), by reused layers
    distributions.png    values and training times of trials by how many layers they reused
    history.png, slice.png   Optuna's own plots (optuna.visualization.matplotlib)

The input is the JSON report (`strata status --json`), so a report of any study, local or in a
cluster, draws the same way. matplotlib is the `report` extra: `pip install 'strata[report]'`.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path
from typing import Any, Callable

PLOTS = ("best-over-time", "timeline", "reuse-saved", "distributions", "history", "slice")


class PlotsUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable("strata report draws with matplotlib: pip install 'strata[report]'") from None
    return plt


def _finished(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in report["trials"] if t.get("finished_at") is not None and t.get("started_at") is not None]


def best_over_time(report: dict[str, Any], ax) -> None:
    trials = sorted(_finished(report), key=lambda t: t["finished_at"])
    origin = min((t["started_at"] for t in trials), default=0.0)
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    pick = max if report.get("direction") == "maximize" else min
    xs, best, line_x, line_y = [], None, [], []
    for t in done:
        minutes = (t["finished_at"] - origin) / 60
        xs.append(minutes)
        best = t["value"] if best is None else pick(best, t["value"])
        line_x.append(minutes)
        line_y.append(best)
    reused = [t["reused_layers"] > 0 for t in done]
    ax.scatter([x for x, r in zip(xs, reused) if not r], [t["value"] for t, r in zip(done, reused) if not r],
               s=18, color="tab:gray", label="trial, from scratch")
    ax.scatter([x for x, r in zip(xs, reused) if r], [t["value"] for t, r in zip(done, reused) if r],
               s=18, color="tab:blue", label="trial that reused layers")
    if line_x:
        ax.step(line_x, line_y, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("wall time since the first trial started (min)")
    ax.set_ylabel(report.get("metric") or "value")
    ax.set_title(f"{report['study']}: best {report.get('metric') or 'value'} over the study's wall time")
    if done:
        ax.legend(loc="best", fontsize="small")


def timeline(report: dict[str, Any], ax) -> None:
    """A trial's Optuna start is when it started running; a trial that waited for a donor or a slot
    was asked `queued_seconds` earlier (the scheduler parks it meanwhile), drawn before it."""
    trials = sorted(_finished(report), key=lambda t: t["number"])
    origin = min((t["started_at"] - (t.get("queued_seconds") or 0.0) for t in trials), default=0.0)
    colours = {"COMPLETE": "tab:green", "PRUNED": "tab:orange", "FAIL": "tab:red"}
    for row, t in enumerate(trials):
        start = t["started_at"] - origin
        queued = t.get("queued_seconds") or 0.0
        training = (t.get("training_started") or t["started_at"]) - origin
        end = t["finished_at"] - origin
        if queued:
            ax.barh(row, queued, left=start - queued, color="whitesmoke", edgecolor="lightgray", linewidth=0.5)
        ax.barh(row, training - start, left=start, color="darkgray")
        ax.barh(row, end - training, left=training, color=colours.get(t["state"], "tab:gray"))
    ax.set_yticks(range(len(trials)), [str(t["number"]) for t in trials], fontsize="x-small")
    ax.set_xlabel("seconds since the first trial was asked")
    ax.set_ylabel("trial")
    ax.set_title("Trials: waiting for a donor or a slot (light), start-up (gray), then training\n"
                 "(green complete, orange pruned, red failed)", fontsize="medium")


def reuse_saved(report: dict[str, Any], ax) -> None:
    trials = sorted(report["trials"], key=lambda t: t["number"])
    numbers = [t["number"] for t in trials]
    saved = [t.get("seconds_saved") or 0.0 for t in trials]
    layers = [t["reused_layers"] for t in trials]
    colours = [f"C{min(n, 9)}" for n in layers]
    ax.bar(numbers, saved, color=colours)
    total = report["summary"].get("seconds_saved_estimate") or sum(saved)
    ax.set_xlabel("trial")
    ax.set_ylabel("training seconds saved (estimate)")
    ax.set_title(f"Time saved by reuse: about {total:.0f} s in all (colour: reused layers)")
    for n in sorted(set(layers)):
        ax.bar([], [], color=f"C{min(n, 9)}", label=f"{n} layers reused")
    if layers:
        ax.legend(loc="best", fontsize="small")


def distributions(report: dict[str, Any], axes) -> None:
    """The papers' view: does reuse cost quality (left) and what does it save (right)?"""
    finished = [t for t in report["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
    groups = sorted({t["reused_layers"] for t in finished})
    values = [[t["value"] for t in finished if t["reused_layers"] == g and t["value"] is not None] for g in groups]
    seconds = [[t["train_seconds"] for t in finished if t["reused_layers"] == g and t["train_seconds"] is not None]
               for g in groups]
    labels = [str(g) for g in groups]
    left, right = axes
    if groups:
        left.boxplot([v or [float("nan")] for v in values], tick_labels=labels)
        right.boxplot([s or [float("nan")] for s in seconds], tick_labels=labels)
    left.set_xlabel("reused layers")
    left.set_ylabel(report.get("metric") or "value")
    left.set_title(f"{report.get('metric') or 'value'} by reused layers")
    right.set_xlabel("reused layers")
    right.set_ylabel("training seconds")
    right.set_title("training time by reused layers")


def _optuna_plot(kind: str, study) -> Any:
    """Optuna's own plot of the study, as a matplotlib figure."""
    import optuna.visualization.matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        axes = (ovm.plot_optimization_history if kind == "history" else ovm.plot_slice)(study)
    return getattr(axes, "flat", [axes])[0].figure  # plot_slice: an array of axes, one per parameter


def write_report(report: dict[str, Any], out_dir: Path, study=None) -> list[Path]:
    """Draw every plot into out_dir (PNG), and index.html showing them; the paths written.

    `study`: the Optuna study, for Optuna's own plots (skipped without it)."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(name: str, draw: Callable[[], Any]) -> None:
        figure = draw()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Optuna's slice figure has a colour bar axis
            figure.tight_layout()
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    def single(draw: Callable[[dict[str, Any], Any], None], size=(9, 4.5)) -> Callable[[], Any]:
        def make():
            figure, ax = plt.subplots(figsize=size)
            draw(report, ax)
            return figure
        return make

    def pair():
        figure, axes = plt.subplots(1, 2, figsize=(10, 4))
        distributions(report, axes)
        return figure

    save("best-over-time", single(best_over_time))
    rows = len(_finished(report))
    save("timeline", single(timeline, (9, max(3.0, min(24.0, 0.22 * rows + 1.5)))))
    save("reuse-saved", single(reuse_saved))
    save("distributions", pair)
    if study is not None and report["summary"]["complete"]:
        for kind in ("history", "slice"):
            save(kind, lambda kind=kind: _optuna_plot(kind, study))
    index = out_dir / "index.html"
    index.write_text(_page(report, written))
    return [*written, index]


def _page(report: dict[str, Any], images: list[Path]) -> str:
    best = report.get("best")
    summary = report["summary"]
    head = (f"{summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed; reuse "
            f"{summary['reuse_rate']:.0%} of trials; about {summary['seconds_saved_estimate']:.0f} s saved")
    if best:
        head += f"; best trial {best['number']}: {report.get('metric') or 'value'} {best['value']:.4g}"
    figures = "\n".join(f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">'
                        f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in images)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(report['study'])}</title>"
            "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}figure{margin:1em 0}</style></head>"
            f"<body><h1>{html.escape(report['study'])}: {html.escape(report['phase'])}</h1><p>{html.escape(head)}</p>"
            f"\n{figures}\n</body></html>\n")
