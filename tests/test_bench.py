"""bench/reuse_benchmark.py --quick runs end to end and writes well-formed results (not a speed test)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from bench.report import quartiles, time_to_reach  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ARMS = ("baseline", "paper", "strata")
OUTPUTS = ("results.json", "results.md", "fig_time.png", "fig_val_loss.png", "table2_epochs.md",
           "table2_epochs.png", "tpe_claim.png", "runs.jsonl")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    if not FASHION_MNIST.is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    out = tmp_path_factory.mktemp("bench")
    # One thread: on a busy 2-core CI machine it is the fastest and steadiest setting.
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "reuse_benchmark.py"), "--quick", "--threads", "1",
                                "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return out


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_benchmark_writes_every_output(quick_results):
    for name in OUTPUTS:
        assert (quick_results / name).is_file(), name
        assert (quick_results / name).stat().st_size > 0, name


def test_plots_are_png_files(quick_results):
    for name in OUTPUTS:
        if name.endswith(".png"):
            assert (quick_results / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_json_has_every_arm_with_numeric_times_losses_and_ratios(quick_results):
    result = json.loads((quick_results / "results.json").read_text())
    assert result["meta"]["quick"] is True
    assert result["meta"]["grid_configs_run"] == result["meta"]["grid_size"] == 6
    for arm in ARMS:
        for scope in ("multi_layer", "whole_search"):
            summary = result["arms"][arm][scope]
            for key in ("total_seconds", "speedup_vs_baseline", "best_val_loss", "best_val_loss_ratio_to_baseline"):
                assert is_number(summary[key]), (arm, scope, key, summary[key])
            assert summary["best_config"]
            assert all(is_number(summary["time"][q]) for q in ("q1", "median", "q3"))
            assert summary["time"]["q1"] <= summary["time"]["median"] <= summary["time"]["q3"]
            assert all(is_number(summary["val_loss"][q]) for q in ("q1", "median", "q3"))
        assert result["arms"][arm]["multi_layer"]["configs"] == 4  # the 2- and 3-layer configurations
    assert result["arms"]["baseline"]["multi_layer"]["speedup_vs_baseline"] == 1.0
    assert result["arms"]["paper"]["multi_layer"]["reused"] == result["arms"]["strata"]["multi_layer"]["reused"] == 4
    assert set(result["table2"]) == set(ARMS)
    assert is_number(result["targets"]["strata_speedup_multi_layer"])
    tpe = result["tpe"]["seeds"]
    assert len(tpe) == 1 and set(tpe[0]["arms"]) == {"no-reuse", "reuse"}
    assert all(is_number(tpe[0]["arms"][arm]["seconds"]) for arm in ("no-reuse", "reuse"))


def test_every_training_is_recorded_once_per_arm(quick_results):
    runs = [json.loads(line) for line in (quick_results / "runs.jsonl").read_text().splitlines()]
    # 1-layer configurations: baseline and strata (the paper arm shares the baseline's); deeper ones: all three.
    assert sorted(r["arm"] for r in runs) == sorted(["baseline"] * 6 + ["strata"] * 6 + ["paper"] * 4)
    assert all(r["seconds"] > 0 and r["val_loss"] is not None for r in runs)


def test_markdown_table_has_a_row_per_arm(quick_results):
    text = (quick_results / "results.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header = rows[0]
    columns = header.count("|")
    for arm in ARMS:
        row = next(r for r in rows if r.startswith(f"| {arm} |"))
        assert row.count("|") == columns
        assert re.search(r"\d+\.\d+x", row), row
    table2 = (quick_results / "table2_epochs.md").read_text().splitlines()
    assert table2[0] == "| epoch | baseline | paper | strata |"
    assert table2[2].startswith("| 1 |")


def test_time_to_reach_is_the_first_time_the_best_so_far_is_low_enough():
    timeline = [[0.0, None], [1.0, 0.9], [2.5, 0.7], [4.0, 0.6]]
    assert time_to_reach(timeline, 0.7) == 2.5
    assert time_to_reach(timeline, 0.95) == 1.0
    assert time_to_reach(timeline, 0.5) is None
    assert time_to_reach(timeline, None) is None


def test_quartiles_ignore_failed_runs():
    stats = quartiles([1.0, None, 2.0, float("nan"), 3.0])
    assert (stats["q1"], stats["median"], stats["q3"]) == (1.5, 2.0, 2.5)
    assert quartiles([None])["median"] is None


def test_strata_configurations_on_the_same_donor_share_its_frozen_outputs(quick_results):
    runs = [json.loads(line) for line in (quick_results / "runs.jsonl").read_text().splitlines()]
    reusing = [r for r in runs if r["arm"] == "strata" and r["reused_layers"]]

    assert {r["shared_features"] for r in reusing} <= {"stored", "hit"}
    assert any(r["shared_features"] == "hit" for r in reusing), reusing
    assert all(r["shared_features"] == "" for r in runs if r["arm"] != "strata")
    result = json.loads((quick_results / "results.json").read_text())
    hits = sum(1 for r in reusing if r["shared_features"] == "hit")
    assert result["arms"]["strata"]["multi_layer"]["shared_feature_hits"] == hits
