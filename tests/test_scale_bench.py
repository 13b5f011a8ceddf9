"""bench/scale.py --quick: one study's Optuna and scheduler costs measured at two sizes on PostgreSQL
(well-formed results, not a speed test: docs/benchmarks.md has the full run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_scale_benchmark_measures_ask_tell_scheduler_and_status_at_each_size(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--out", str(tmp_path)],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]

    assert [r["finished"] for r in rows] == [100, 300] and all(r["running"] == 64 for r in rows)
    for row in rows:
        for measure in ("ask", "ask_in_pass", "tell", "progress", "outcome", "plan", "plan_in_pass"):
            assert 0 < row[measure]["median_ms"] <= row[measure]["p95_ms"], (measure, row)
        assert 0 < row["status_bytes"] < 8192  # the status stays small whatever the trial count
    assert "| 300 |" in (tmp_path / "results.md").read_text()
