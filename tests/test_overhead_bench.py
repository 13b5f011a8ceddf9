"""bench/overhead.py --quick (the local parts) runs end to end through `strata run` and writes
well-formed results: both modes at 1 and 2 workers, the reuse A/B (not a speed test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="Debian package dataset-fashion-mnist is not installed")
def test_the_quick_overhead_benchmark_measures_both_modes_and_the_reuse_ab(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead.py"), "--quick", "--only",
                                "overhead,reuse", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                               timeout=500)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["overhead"]["rows"]
    assert {(r["workers"], r["mode"]) for r in rows} == {(w, m) for w in (1, 2)
                                                          for m in ("process per trial", "warm workers")}
    for row in rows:
        assert row["trials"] == 4 and row["wall"] > row["startup"] > 0 and row["train"] > 0
        assert row["overhead"] >= row["steady_overhead"]
    reuse = results["reuse"]
    assert reuse["arms"]["reuse on"]["reused_trials"] > 0 and reuse["arms"]["reuse off"]["reused_trials"] == 0
    assert reuse["arms"]["reuse on"]["trials"] == reuse["arms"]["reuse off"]["trials"] == 6
    assert reuse["wall_ratio"] > 0 and reuse["train_ratio"] > 0
    assert "Reuse speed-up: wall" in (tmp_path / "results.md").read_text()
