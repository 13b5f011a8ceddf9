"""strata report's plots (strata.plots) for studies a user may point it at: empty, all failed, under way."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from strata.plots import write_report  # noqa: E402

SUMMARY = {"complete": 0, "pruned": 0, "failed": 0, "reuse_rate": 0.0, "seconds_saved_estimate": 0.0}


def report(trials: list[dict], **summary) -> dict:
    return {"study": "s", "phase": "Running", "metric": "val_loss", "direction": "minimize", "best": None,
            "summary": {**SUMMARY, **summary}, "trials": trials}


def trial(number: int, state: str, value=None, reused=0, started=100.0, training=None, finished=None, saved=None):
    return {"number": number, "state": state, "value": value, "params": {"convLayers": 1 + reused},
            "reused_layers": reused, "train_seconds": 2.0 if value is not None else None, "started_at": started,
            "training_started": training, "finished_at": finished, "seconds_saved": saved}


@pytest.mark.parametrize("trials, summary", [
    ([], {}),
    ([trial(0, "FAIL", finished=105.0)], {"failed": 1}),
    ([trial(0, "COMPLETE", 0.5, started=100, training=101, finished=110),
      trial(1, "COMPLETE", 0.4, reused=1, started=100, training=110, finished=115, saved=3.0),
      trial(2, "PRUNED", 0.9, reused=1, started=111, training=112, finished=113, saved=0.5),
      trial(3, "RUNNING", started=114)], {"complete": 2, "pruned": 1, "reuse_rate": 0.67}),
])
def test_every_plot_is_drawn_without_a_warning_whatever_the_study_holds(tmp_path: Path, trials, summary):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_report(report(trials, **summary), tmp_path)
    assert [p.name for p in written] == ["best-over-time.png", "timeline.png", "reuse-saved.png",
                                         "distributions.png", "index.html"]
    assert all(p.stat().st_size > 1000 for p in written[:-1])
    assert "<h1>s: Running</h1>" in written[-1].read_text()


def test_the_timeline_draws_a_trials_wait_before_its_start_then_start_up_then_training():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from strata.plots import timeline

    waited = {**trial(1, "COMPLETE", 0.4, reused=1, started=110, training=112, finished=120), "queued_seconds": 8.0}
    fig, ax = plt.subplots()
    try:
        timeline(report([trial(0, "COMPLETE", 0.5, started=100, training=101, finished=110), waited]), ax)
        bars = [(round(b.get_x(), 3), round(b.get_width(), 3), b.get_y() + b.get_height() / 2) for b in ax.patches]
    finally:
        plt.close(fig)
    # the first trial was asked at 100 (the origin); trial 1 was asked at 102, parked 8 s, started at 110
    assert bars == [(0.0, 1.0, 0.0), (1.0, 9.0, 0.0), (2.0, 8.0, 1.0), (10.0, 2.0, 1.0), (12.0, 8.0, 1.0)]
