"""What a user waits for: whole studies through `strata run`, side by side in one run.

    python bench/overhead.py                 # full: about 25 minutes on 2 cores
    python bench/overhead.py --quick         # a few minutes (CI: tests/test_bench.py)
    python bench/overhead.py --only overhead,reuse --out /tmp/overhead

Parts (each arm a fresh `strata run` subprocess on its own journal and checkpoint folder, the arms
of a part alternated so machine noise hits them alike):

overhead  the same 8-trial TPE study of the paper's size (1,500 Fashion-MNIST images at 32x32,
          5 epochs) with a trainer process per trial and with warm workers, at 1 and 2 workers.
          Per-trial overhead = (wall - sum of training seconds / workers) / trials, wall being the
          command's whole wall time (start-up, data check, hand-offs and shut-down included).
reuse     the SMALL grid (examples/paper-small.yaml) with reuse on and off, warm workers: the
          wall-time ratio next to the training-time ratio of the same runs.
handoff   on the Kubernetes API emulator with the test kubelet and the real operator: p95 time from
          one trial's end to the next trial's first epoch on the same slot, a pod per trial against
          worker pods.

Prints a table per part and writes results.json and results.md into --out
(default bench/results/overhead-<timestamp>).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from strata.study import attr_time  # noqa: E402

STRATA = Path(sys.executable).with_name("strata")
TARGETS = {"overhead_seconds": 0.3, "reuse_wall_share": 0.9, "handoff_p95_seconds": 1.0}

PAPER_STUDY: dict[str, Any] = {
    "apiVersion": "hpo.strata.dev/v1alpha1",
    "kind": "HPOStudy",
    "metadata": {"name": "overhead"},
    "spec": {
        "objective": {"metric": "val_loss"},
        "searchSpace": {
            "convLayers": {"type": "int", "low": 1, "high": 3},
            "learningRate": {"type": "categorical", "choices": [0.01, 0.001]},
            "filters": {"type": "categorical", "choices": [18]},
            "fcLayout": {"type": "categorical", "choices": ["500", "250", "50", "500-250", "500-50", "250-50"]},
            "batchSize": {"type": "categorical", "choices": [10, 20, 30, 40]},
        },
        "sampler": {"name": "tpe", "seed": 5},
        "trials": {"max": 8, "parallel": 1, "maxFailed": 2, "retries": 1},
        "training": {"dataset": {"name": "fashion-mnist"}, "inputSize": 32, "subsetSize": 1500,
                     "validationSplit": 0.2, "epochs": 5, "earlyStopPatience": 1},
        "reuse": {"enabled": True},
    },
}


def run_study(document: dict[str, Any], directory: Path, *args: str) -> dict[str, Any]:
    """One `strata run` as a user types it; its wall time and its report."""
    directory.mkdir(parents=True, exist_ok=True)
    study_file = directory / "study.yaml"
    study_file.write_text(yaml.safe_dump(document, sort_keys=False))
    report_file = directory / "report.json"
    started, started_epoch = time.monotonic(), time.time()
    completed = subprocess.run([str(STRATA), "run", str(study_file), "--quiet", "--report", str(report_file), *args],
                               cwd=directory, capture_output=True, text=True, timeout=7200)
    wall = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(f"strata run {' '.join(args)} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    report = json.loads(report_file.read_text())
    trained = [t for t in report["trials"] if t.get("train_seconds") is not None and not t.get("duplicate_of")]
    train = sum(float(t["train_seconds"]) for t in trained)
    begun = [t["training_started"] for t in trained if t.get("training_started")]
    # Start-up: from the command to the first trial's training (Python, imports, the data check, the
    # first worker or process); after it, every second not training is per-trial overhead.
    startup = min(begun) - started_epoch if begun else None
    multi = [t for t in trained if int(t["params"].get("convLayers", 1)) > 1]
    return {"wall": wall, "startup": startup, "loop_wall": report["summary"]["wall_seconds"], "train": train,
            "train_multi": sum(float(t["train_seconds"]) for t in multi), "trials_multi": len(multi),
            "trials": len(trained),
            "best": report["best"]["value"] if report.get("best") else None, "phase": report["phase"],
            "reused_trials": report["summary"]["reused_trials"]}


def overhead_part(quick: bool, work: Path) -> dict[str, Any]:
    document = copy.deepcopy(PAPER_STUDY)
    if quick:
        document["spec"]["trials"]["max"] = 4
        document["spec"]["training"].update({"subsetSize": 300, "epochs": 1, "inputSize": 16})
    rows = []
    for workers in (1, 2):
        for mode, flags in (("process per trial", ["--per-trial-processes"]), ("warm workers", [])):
            arm = run_study(document, work / f"overhead-{workers}-{'warm' if not flags else 'process'}",
                            "--workers", str(workers), *flags)
            arm["overhead"] = (arm["wall"] - arm["train"] / workers) / arm["trials"]
            arm["steady_overhead"] = (arm["wall"] - arm["startup"] - arm["train"] / workers) / arm["trials"]
            rows.append({"workers": workers, "mode": mode, **arm})
            print(f"  {workers} worker(s), {mode:17s}: wall {arm['wall']:6.1f} s, training {arm['train']:6.1f} s, "
                  f"start-up {arm['startup']:.1f} s, overhead {arm['overhead']:.2f} s/trial "
                  f"({arm['steady_overhead']:.2f} after start-up)", flush=True)
    by = {(r["workers"], r["mode"]): r for r in rows}
    ratios = {workers: by[(workers, "process per trial")]["wall"] / by[(workers, "warm workers")]["wall"]
              for workers in (1, 2)}
    return {"rows": rows, "wall_ratio": ratios}


def reuse_part(quick: bool, work: Path) -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "examples" / "paper-small.yaml").read_text())
    document["metadata"]["name"] = "reuse-ab"
    spec = document["spec"]
    if quick:
        spec["searchSpace"]["fcLayout"]["choices"] = ["250"]
        spec["searchSpace"]["batchSize"]["choices"] = [40]
        spec["training"].update({"subsetSize": 300, "epochs": 2, "inputSize": 16})
    spec["trials"]["max"] = 1000  # the whole grid
    arms = {}
    for label, enabled in (("reuse off", False), ("reuse on", True)):
        variant = copy.deepcopy(document)
        variant["spec"]["reuse"]["enabled"] = enabled
        arms[label] = run_study(variant, work / f"reuse-{'on' if enabled else 'off'}", "--workers", "2")
        arm = arms[label]
        print(f"  {label}: wall {arm['wall']:6.1f} s, training {arm['train']:6.1f} s, {arm['trials']} trials, "
              f"best {arm['best']:.4f}", flush=True)
    wall_ratio = arms["reuse off"]["wall"] / arms["reuse on"]["wall"]
    train_ratio = arms["reuse off"]["train"] / arms["reuse on"]["train"]
    multi_ratio = arms["reuse off"]["train_multi"] / max(arms["reuse on"]["train_multi"], 1e-9)
    print(f"  multi-layer trials: training {multi_ratio:.2f}x faster with reuse", flush=True)
    return {"arms": arms, "wall_ratio": wall_ratio, "train_ratio": train_ratio, "multi_layer_train_ratio": multi_ratio,
            "wall_share": (wall_ratio - 1) / (train_ratio - 1) if train_ratio > 1 else None,
            "wall_over_train": wall_ratio / train_ratio}


def handoff_part(quick: bool, work: Path) -> dict[str, Any]:
    """The real operator on the emulator with the test kubelet (bench.fault_campaign.Rig): one study
    per mode, parallel 1, so each trial's successor runs on the same slot."""
    from bench.fault_campaign import Rig
    from tests.e2e.studies import optuna_trials

    trials = 4 if quick else 10
    training = {"inputSize": 16, "subsetSize": 3000, "epochs": 4, "earlyStopPatience": 0}
    arms: dict[str, Any] = {}
    with Rig(work / "handoff") as rig:
        rig.env["STRATA_RECONCILE_SECONDS"] = RECONCILE_SECONDS  # the chart's default, not the tests' 1 s
        rig.stop_operator()
        rig.start_operator()
        for label, mode in (("pod per trial", "perTrial"), ("worker pods", "warmWorkers")):
            name = f"handoff-{mode.lower()}"
            started = time.monotonic()
            rig.study(name, max_trials=trials, parallel=1, mode=mode, training=training, searchSpace=HANDOFF_SPACE,
                      trials={"max": trials, "parallel": 1, "maxFailed": 2, "retries": 1})
            rig.wait_phase(name, ("Succeeded", "Failed"), timeout=1800)
            wall = time.monotonic() - started
            done = sorted((t for t in optuna_trials(rig.database_url, name) if t.state.name == "COMPLETE"),
                          key=lambda t: attr_time(t.user_attrs["strata.training_started"]))
            gaps = [attr_time(b.user_attrs["strata.training_started"]) - a.datetime_complete.timestamp()
                    for a, b in zip(done, done[1:])]
            train = sum(float(t.user_attrs.get("train_seconds") or 0) for t in done)
            arms[label] = {"count": len(gaps), "median": statistics.median(gaps), "p95": _p95(gaps), "gaps": gaps,
                           "wall": wall, "train": train, "trials": len(done)}
            print(f"  {label}: {len(gaps)} hand-offs, median {arms[label]['median']:.2f} s, "
                  f"p95 {arms[label]['p95']:.2f} s; study wall {wall:.1f} s for {train:.1f} s of training", flush=True)
    return {"arms": arms, "reconcile_seconds": float(RECONCILE_SECONDS)}


RECONCILE_SECONDS = "5"
HANDOFF_SPACE = {  # a grid of 24: 1- and 2-layer networks
    "convLayers": {"type": "int", "low": 1, "high": 2},
    "filters": {"type": "categorical", "choices": [8]},
    "fcLayout": {"type": "categorical", "choices": ["32", "64"]},
    "learningRate": {"type": "categorical", "choices": [0.003, 0.01, 0.03]},
    "batchSize": {"type": "categorical", "choices": [32, 64]},
}


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(0.95 * len(ordered) + 0.5)) - 1))]


PARTS: dict[str, Callable[[bool, Path], dict[str, Any]]] = {"overhead": overhead_part, "reuse": reuse_part,
                                                            "handoff": handoff_part}


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["# Overhead benchmark", ""]
    if "overhead" in results:
        lines += ["| workers | mode | wall (s) | training (s) | trials | start-up (s) | overhead (s/trial) | "
                  "overhead after start-up (s/trial) |", "|---|---|---|---|---|---|---|---|"]
        for r in results["overhead"]["rows"]:
            lines.append(f"| {r['workers']} | {r['mode']} | {r['wall']:.1f} | {r['train']:.1f} | {r['trials']} | "
                         f"{r['startup']:.1f} | {r['overhead']:.2f} | {r['steady_overhead']:.2f} |")
        lines += ["", "Wall-time ratio, process per trial / warm workers: " + ", ".join(
            f"{w} worker(s) {ratio:.2f}x" for w, ratio in results["overhead"]["wall_ratio"].items()), ""]
    if "reuse" in results:
        part = results["reuse"]
        lines += ["| arm | wall (s) | training (s) | trials | best val loss |", "|---|---|---|---|---|"]
        for label, arm in part["arms"].items():
            lines.append(f"| {label} | {arm['wall']:.1f} | {arm['train']:.1f} | {arm['trials']} | {arm['best']:.4f} |")
        lines += ["", f"Reuse speed-up: wall {part['wall_ratio']:.2f}x, training {part['train_ratio']:.2f}x "
                      f"(wall / training {part['wall_over_train']:.0%}); multi-layer trials' training "
                      f"{part['multi_layer_train_ratio']:.2f}x", ""]
    if "handoff" in results:
        part = results["handoff"]
        lines += [f"Operator reconcile interval {part['reconcile_seconds']:g} s (the chart's default).", "",
                  "| mode | hand-offs | median (s) | p95 (s) | study wall (s) | training (s) |",
                  "|---|---|---|---|---|---|"]
        for label, arm in part["arms"].items():
            lines.append(f"| {label} | {arm['count']} | {arm['median']:.2f} | {arm['p95']:.2f} | {arm['wall']:.1f} | "
                         f"{arm['train']:.1f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small studies: checks it runs (CI)")
    parser.add_argument("--only", default="", help=f"comma-separated parts of: {', '.join(PARTS)}")
    parser.add_argument("--out", help="results directory (default bench/results/overhead-<timestamp>)")
    args = parser.parse_args(argv)
    chosen = [p for p in (args.only.split(",") if args.only else PARTS) if p]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    out = Path(args.out or ROOT / "bench" / "results" / time.strftime("overhead-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="strata-overhead-") as work:
        for name in chosen:
            print(f"{name}:", flush=True)
            started = time.monotonic()
            results[name] = PARTS[name](args.quick, Path(work))
            results[name]["seconds"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "results.md")
    print((out / "results.md").read_text())
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
