"""bench/operator_scale.py --quick: 1 and 3 studies of parallel 10 on one operator process, the API
emulator in its own process, PostgreSQL, stand-in trials (well-formed results and a working hand-off,
not a speed test: docs/benchmarks.md has the full run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_operator_scale_benchmark_measures_hand_offs_cost_and_calls_per_size(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "operator_scale.py"), "--quick",
                                "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]

    assert [r["studies"] for r in rows] == [1, 3] and all(r["parallel"] == 10 for r in rows)
    for row in rows:
        assert row["stand_in_errors"] == [], row["stand_in_errors"]
        assert row["pods_ended_in_window"] > 0 and row["cores"]["operator"] > 0, row
        # every slot freed in the window was handed to a next trial: about parallel x studies / trial time
        assert row["hand_offs"] >= 0.5 * row["window_s"] * row["studies"] * 10 / row["trial_seconds"], row
        assert 0 <= row["hand_off_p50_s"] <= row["hand_off_p95_s"] <= row["hand_off_p99_s"] < 30, row
        assert 0 < row["operator_cores"] < 2 and 50 < row["operator_rss_peak_mib"] < 2048, row
        assert row["reconciles_per_s"] > 0 and row["api_requests_per_reconcile"] > 0, row
        assert row["storage_calls_per_reconcile"] > 0 and row["storage_calls_per_reconcile_by_method"], row
        assert not math.isnan(row["hand_off_p95_s"])
        assert 0 < row["status_bytes_max"] < 8192, row
        served = sum(b["hand_offs"] for b in row["hand_off_breakdown"]["by_launches_ahead"].values())
        assert 0 < served <= row["hand_offs"], row  # those still waiting when the window closed are left out
    assert "| 3 |" in (tmp_path / "results.md").read_text()


def test_the_hand_off_breakdown_counts_the_launches_ahead_of_each_pod_in_its_pass():
    sys.path.insert(0, str(ROOT / "bench"))
    from operator_scale import PARALLEL, hand_off_breakdown

    first = {f"s-trial-{i}": 0.0 for i in range(PARALLEL)}
    # three slots free at 10.0 and are taken by pods made 0.3, 0.4 and 0.5 s later (one pass), a fourth
    # frees at 20.0 and is taken 0.2 s later, alone
    ended = {"s-trial-0": 10.0, "s-trial-1": 10.0, "s-trial-2": 10.0, "s-trial-3": 20.0}
    created = {**first, f"s-trial-{PARALLEL}": 10.3, f"s-trial-{PARALLEL + 1}": 10.4,
               f"s-trial-{PARALLEL + 2}": 10.5, f"s-trial-{PARALLEL + 3}": 20.2}
    result = hand_off_breakdown(created, ended, since=5.0, until=30.0)

    assert {k: v["hand_offs"] for k, v in result["by_launches_ahead"].items()} == {"0": 2, "1": 1, "2": 1}
    assert result["by_launches_ahead"]["2"]["p50_s"] == 0.5
    assert result["by_launches_ahead"]["0"]["p95_s"] == 0.3
    assert result["launch_gap_p50_s"] == 0.1
