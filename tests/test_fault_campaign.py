"""bench/fault_campaign.py --quick: every part of the fault campaign passes at a small size (CI).

The full campaign (docs/reliability.md) is run by hand; this keeps it working and its guarantees
true: the operator SIGKILLed mid-study, trainer pods crashed, OOM-killed, evicted and deleted,
PostgreSQL and S3 stopped mid-study, bad manifests and fuzzed specs, tampered checkpoints, and a
secret scan of logs, argv, Events, status, pods and metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.timeout(900)
@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="Debian package dataset-fashion-mnist is not installed")
def test_every_part_of_the_quick_fault_campaign_passes(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "fault_campaign.py"), "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)

    results = json.loads((tmp_path / "results.json").read_text())["results"]
    failed = {part: r for part, r in results.items() if not r.get("ok")}
    assert not failed and run.returncode == 0, json.dumps(failed, indent=1)[:6000] + run.stdout[-3000:]
    assert set(results) == {"kills", "pods", "outages", "manifests", "tampered", "secrets"}
    assert results["kills"]["kills"] >= 2 and results["kills"]["lost"] == 0
    assert results["pods"]["injected_total"] >= 4 and results["pods"]["failed_attempts"] == results["pods"]["injected_total"]
    assert results["outages"]["database_warnings"] == 1 and results["outages"]["store_warnings"] == 1
    assert sum(results["secrets"]["hits"].values()) == 0
