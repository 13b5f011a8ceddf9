"""Scale (issue 13), first part: how one study's Optuna and scheduler costs grow with its trials.

    python bench/scale.py                    # 1,000 / 5,000 / 10,000 trials on PostgreSQL (about 15 minutes)
    python bench/scale.py --quick            # 100 / 300 trials (CI: tests/test_scale_bench.py)

On a throwaway PostgreSQL, one study of the e2e trial shape (the paper family, TPE through Strata's
DistinctSampler, as `strata run` and the operator build it) is filled with finished trials; at each
size, with the latest 64 trials RUNNING (as in a study under way), it measures (median / p95 of `--samples` calls):
- ask and tell latency (`study.ask(distributions)`, `study.tell`), what a hand-off costs in Optuna;
- `TrialScheduler.progress()` and `.outcome()` (what every reconcile and the status read), and
  `plan()` with one free slot (which asks);
- the size of the HPOStudy status the operator writes (strata.kube.builders.build_status).
- ask and a one-slot plan again on the operator's storage, in a reconcile pass (strata.study.
  PassSnapshot + one_pass: the study's trials read once per pass, again only after its own writes).
The operator-side parts of the issue (1-100 studies x parallel 10 on the emulator with the stand-in
trainer) are in bench/operator_scale.py.

Prints a table and writes results.json and results.md into --out (default bench/results/scale-<timestamp>).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNNING = 64
SPEC: dict[str, Any] = {
    "searchSpace": {
        "convLayers": {"type": "int", "low": 1, "high": 3},
        "filters": {"type": "categorical", "choices": [8, 16, 32]},
        "fcLayout": {"type": "categorical", "choices": ["32", "64", "500-250"]},
        "learningRate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "batchSize": {"type": "categorical", "choices": [16, 32, 64]},
    },
    "sampler": {"name": "tpe", "seed": 1},
    "trials": {"max": 100_000, "parallel": RUNNING},
    "reuse": {"enabled": False},
}


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"median_ms": statistics.median(ordered) * 1000, "p95_ms": p95 * 1000}


def _timed(call: Callable[[], Any], samples: int) -> dict[str, float]:
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return _percentiles(times)


def fill(study, distributions, target: int, rng: random.Random) -> None:
    """Finished trials with random parameters and values until the study holds `target` finished ones."""
    import optuna

    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    for _ in range(target - done):
        params = {name: d.to_external_repr(d.to_internal_repr(_sample(d, rng))) for name, d in distributions.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=rng.uniform(0.2, 1.5)))


def _sample(distribution, rng: random.Random) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return rng.choice(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return rng.randint(distribution.low, distribution.high)
    assert isinstance(distribution, FloatDistribution)
    return 10 ** rng.uniform(math.log10(distribution.low), math.log10(distribution.high))


def measure(sizes: list[int], samples: int, url: str) -> list[dict[str, Any]]:
    from strata.kube.builders import build_status
    from strata.scheduler import TrialScheduler
    from strata.spec import parse_spec
    from strata.study import PassSnapshot, cached, create_or_load_study, distributions as distributions_of, one_pass, open_storage

    spec = parse_spec(SPEC)
    study = create_or_load_study(spec, "scale", open_storage(url))
    # The operator's storage (strata.kube.reconcile): each reconcile pass reads the trials once, again
    # only after its own writes; its asks and plans run in such a pass.
    in_pass = create_or_load_study(spec, "scale", PassSnapshot(cached(open_storage(url))))
    pass_scheduler = TrialScheduler(in_pass, spec, None)
    distributions = distributions_of(spec)
    scheduler = TrialScheduler(study, spec, None)
    rng = random.Random(0)
    running: list = []
    rows = []
    for size in sizes:
        for trial in running:  # the running trials are the latest ones, as in a study under way
            study.tell(trial, rng.uniform(0.2, 1.5))
        fill(study, distributions, size - len(running), rng)
        running = [study.ask(distributions) for _ in range(RUNNING)]

        asked: list[float] = []
        told: list[float] = []
        for _ in range(samples):
            started = time.perf_counter()
            trial = study.ask(distributions)
            asked.append(time.perf_counter() - started)
            started = time.perf_counter()
            study.tell(trial, rng.uniform(0.2, 1.5))
            told.append(time.perf_counter() - started)
        asked_in_pass: list[float] = []
        for _ in range(samples):
            started = time.perf_counter()
            with one_pass():
                trial = in_pass.ask(distributions)
            asked_in_pass.append(time.perf_counter() - started)
            in_pass.tell(trial, rng.uniform(0.2, 1.5))
        active = {t.number for t in running}
        progress = _timed(lambda: scheduler.progress(active), samples)
        outcome = _timed(lambda: scheduler.outcome(active), samples)
        plan_times = []
        for _ in range(max(3, samples // 4)):
            started = time.perf_counter()
            plan = scheduler.plan(active, 1)
            plan_times.append(time.perf_counter() - started)
            for number in plan.launch:  # as a worker would: it finishes at once
                study.tell(number, rng.uniform(0.2, 1.5))
        plan_pass_times = []
        for _ in range(max(3, samples // 4)):
            started = time.perf_counter()
            with one_pass():
                plan = pass_scheduler.plan(active, 1)
            plan_pass_times.append(time.perf_counter() - started)
            for number in plan.launch:
                in_pass.tell(number, rng.uniform(0.2, 1.5))
        status = build_status({}, scheduler.progress(active), scheduler.outcome(active), max_trials=spec.trials.max,
                              optuna_name="default.scale", generation=1)
        row = {"finished": size, "running": RUNNING, "ask": _percentiles(asked), "tell": _percentiles(told),
               "ask_in_pass": _percentiles(asked_in_pass), "progress": progress, "outcome": outcome,
               "plan": _percentiles(plan_times), "plan_in_pass": _percentiles(plan_pass_times),
               "status_bytes": len(json.dumps(status, separators=(",", ":")))}
        rows.append(row)
        print(f"  {size:6d} finished, {RUNNING} running: ask {row['ask']['median_ms']:6.1f}/{row['ask']['p95_ms']:6.1f} ms"
              f"  tell {row['tell']['median_ms']:5.1f}/{row['tell']['p95_ms']:5.1f}  progress "
              f"{row['progress']['median_ms']:6.1f}  outcome {row['outcome']['median_ms']:6.1f}  plan "
              f"{row['plan']['median_ms']:6.1f}/{row['plan']['p95_ms']:6.1f} ms; in a pass: ask "
              f"{row['ask_in_pass']['median_ms']:6.1f}/{row['ask_in_pass']['p95_ms']:6.1f} plan "
              f"{row['plan_in_pass']['median_ms']:6.1f}/{row['plan_in_pass']['p95_ms']:6.1f} ms  status {row['status_bytes']} B",
              flush=True)
    return rows


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["# Scale: one study's Optuna and scheduler costs", "",
             f"PostgreSQL, TPE through DistinctSampler, {RUNNING} trials RUNNING; median / p95 of "
             f"{results['samples']} calls (ms).", "",
             "| finished trials | ask | ask in a pass | tell | progress() | outcome() | plan(1 slot) | plan in a pass | "
             "status (bytes) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['finished']:,} | {r['ask']['median_ms']:.1f} / {r['ask']['p95_ms']:.1f} | "
                     f"{r['ask_in_pass']['median_ms']:.1f} / {r['ask_in_pass']['p95_ms']:.1f} | "
                     f"{r['tell']['median_ms']:.1f} / {r['tell']['p95_ms']:.1f} | "
                     f"{r['progress']['median_ms']:.1f} / {r['progress']['p95_ms']:.1f} | "
                     f"{r['outcome']['median_ms']:.1f} / {r['outcome']['p95_ms']:.1f} | "
                     f"{r['plan']['median_ms']:.1f} / {r['plan']['p95_ms']:.1f} | "
                     f"{r['plan_in_pass']['median_ms']:.1f} / {r['plan_in_pass']['p95_ms']:.1f} | {r['status_bytes']:,} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--sizes", default=None, help="finished-trial counts, comma-separated")
    parser.add_argument("--samples", type=int, default=None, help="calls per measure (default 40, quick 8)")
    parser.add_argument("--storage", default=None, help="an Optuna RDB URL (default: a throwaway PostgreSQL)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("100,300" if args.quick else "1000,5000,10000")).split(",")]
    samples = args.samples or (8 if args.quick else 40)
    out = args.out or ROOT / "bench" / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    server = None
    url = args.storage
    if url is None:
        from tests.services import start_postgres, stop_postgres

        server = start_postgres()
        url = server.create_database("scale")
    started = time.monotonic()
    try:
        rows = measure(sizes, samples, url)
    finally:
        if server is not None:
            stop_postgres(server)
    results = {"quick": args.quick, "samples": samples, "rows": rows, "seconds": time.monotonic() - started}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "results.md")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
