"""bench/families.py --quick runs every part end to end and writes well-formed results (not a speed test:
the ratios are measured by the full run, documented in docs/benchmarks.md)."""

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
def test_the_quick_families_benchmark_measures_throughput_reuse_and_augmentation(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "families.py"), "--quick", "--out",
                                str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())

    rows = results["throughput"]["rows"]
    assert {r["family"] for r in rows} == {"paper-cnn", "vgg", "resnet", "mobilenetv2"}
    assert all(r["plain_seconds"] > 0 and r["strata_seconds"] > 0 and r["ratio"] > 0 for r in rows)
    runs = {r["arm"]: r for r in results["reuse"]["runs"]}
    assert runs["reuse on"]["reused_trials"] == 1 and runs["reuse off"]["reused_trials"] == 0
    assert all(0 <= r["best_test_accuracy"] <= 1 for r in runs.values())
    caches = [r["feature_cache"] for r in results["augmentation"]["rows"]]
    assert caches == ["float32", "off", "off"]  # augmentation: nothing to cache
    text = (tmp_path / "results.md").read_text()
    assert "Reuse speed-up: wall" in text and "plain PyTorch loop" in text
