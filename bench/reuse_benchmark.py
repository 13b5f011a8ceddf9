"""Reproduce Castro et al.'s layer-reuse experiment (section 4) on this machine, three arms interleaved.

    python bench/reuse_benchmark.py                      # SMALL space, 1,500 Fashion-MNIST images
    python bench/reuse_benchmark.py --space large        # LARGE space (756 configurations)
    python bench/reuse_benchmark.py --cifar /data/cifar10
    python bench/reuse_benchmark.py --quick              # a few minutes at most: checks it runs (CI)

Part 1, the grid: every configuration of the space in the order the product's TrialScheduler gives
a grid study (smaller depths first, shuffled within a depth), and for each one the three arms of
bench/arms.py in a rotating order, in this one process, so machine noise hits them alike.
Part 2, the practical claim: TPE searches with a fixed trial budget, with and without reuse, driven
by the product's TrialScheduler over an in-memory Optuna study; trials train in this process
(strata_trainer.training.train called directly, no trainer subprocess, so no process start cost).

Writes results.json, results.md, fig_time.png, fig_val_loss.png, table2_epochs.md/png and
tpe_claim.png into --out (default bench/results/<timestamp>).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Before torch starts OpenMP: with other processes on the cores, spinning worker threads made
# 2-thread trainings 5-15x slower here (measured: 43-67 s against 12-18 s passive, 6-15 s 1 thread).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import optuna  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from bench import report  # noqa: E402
from bench.arms import BASELINE, PAPER, STRATA, ArmRun, TrainingSetup, train_baseline, train_paper, train_strata  # noqa: E402
from strata.families import architecture_from_params, check_space_fits_input  # noqa: E402
from strata.objectstore import LocalFolderStore  # noqa: E402
from strata.registry import LayerRegistry  # noqa: E402
from strata.scheduler import TrialScheduler  # noqa: E402
from strata.spec import Sampler, StudySpec, Trials, parse_study  # noqa: E402
from strata.study import (  # noqa: E402
    ATTR_DONOR_FOR, ATTR_EPOCHS_RUN, ATTR_FAIL_REASON, ATTR_REUSED_LAYERS, ATTR_TRAIN_SECONDS, create_or_load_study,
)
from strata_trainer.data import load_dataset  # noqa: E402
from strata_trainer.features import SharedFeatureStore  # noqa: E402
from strata_trainer.resources import memory_limit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {"small": ROOT / "examples" / "paper-small.yaml", "large": ROOT / "examples" / "paper-large.yaml"}
SPEEDUP_TARGET = 2.0
# --quick: 6 configurations (each depth x 2 FC layouts), 2 epochs, 400 images, one short TPE seed.
QUICK_SPACE = {
    "convLayers": {"type": "int", "low": 1, "high": 3},
    "learningRate": {"type": "categorical", "choices": [0.001]},
    "filters": {"type": "categorical", "choices": [18]},
    "kernelSize": {"type": "categorical", "choices": [3]},
    "fcLayout": {"type": "categorical", "choices": ["250", "500-50"]},
    "batchSize": {"type": "categorical", "choices": [40]},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", choices=sorted(EXAMPLES), default="small", help="the paper's search space")
    parser.add_argument("--subset", type=int, default=None, help="training images (stratified; default 1500, quick 400)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs from scratch (default 5, quick 2)")
    parser.add_argument("--epochs-when-reusing", type=int, default=None,
                        help="strata arm's epochs when it reuses a prefix (default: the example spec's; quick 1)")
    parser.add_argument("--early-stop-patience", type=int, default=None,
                        help="strata arm's early stop on rising validation loss (default: the example spec's, 1; "
                             "0 turns it off)")
    parser.add_argument("--cifar", metavar="PATH", help="CIFAR-10 (cifar-10-batches-py) instead of Fashion-MNIST")
    parser.add_argument("--seeds", type=int, default=None, help="TPE searches per arm (default 3, quick 1)")
    parser.add_argument("--tpe-trials", type=int, default=None, help="TPE trial budget; 0 skips part 2 (default 40, quick 6)")
    parser.add_argument("--grid-seed", type=int, default=0, help="shuffles the order within a depth")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="tiny grid and data: checks the benchmark runs, not speed")
    parser.add_argument("--from-runs", type=Path, metavar="RUNS_JSONL",
                        help="train nothing: summarise the runs.jsonl of an earlier (possibly unfinished) run into --out")
    args = parser.parse_args(argv)
    defaults = dict(subset=400, epochs=2, epochs_when_reusing=1, seeds=1, tpe_trials=6) if args.quick else \
        dict(subset=1500, epochs=5, epochs_when_reusing=None, seeds=3, tpe_trials=40)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    return args


def build_spec(args: argparse.Namespace) -> StudySpec:
    """The example study of the chosen space, with the benchmark's data, epochs and grid order."""
    document = yaml.safe_load(EXAMPLES[args.space].read_text())
    spec = document["spec"]
    training = spec["training"]
    training.update(subsetSize=args.subset, epochs=args.epochs)
    if args.epochs_when_reusing is not None:
        training["epochsWhenReusing"] = args.epochs_when_reusing
    if args.early_stop_patience is not None:
        training["earlyStopPatience"] = args.early_stop_patience
    if args.cifar:
        training["dataset"] = {"name": "cifar10", "path": args.cifar}
        training.pop("inputSize", None)
    if args.quick:
        spec["searchSpace"] = QUICK_SPACE
    size = 1
    for param in spec["searchSpace"].values():
        size *= len(param["choices"]) if param["type"] == "categorical" else param["high"] - param["low"] + 1
    spec["sampler"] = {"name": "grid", "seed": args.grid_seed}
    # One process runs the trials one at a time; a diverging configuration must not end the grid.
    spec["trials"] = {"max": size, "parallel": 1, "maxFailed": size, "retries": 0}
    study = parse_study(document)
    check_space_fits_input(study.spec)
    return study.spec


def machine_info(threads: int) -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "torch": torch.__version__, "threads": threads,
            "python": platform.python_version(), "optuna": optuna.__version__,
            "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def params_key(params: dict[str, Any], depth: int) -> tuple:
    return tuple(sorted({**params, "convLayers": depth}.items()))


def record_trial(study: optuna.Study, number: int, run: ArmRun, donor_for: int | None = None) -> None:
    """Tell Optuna what the trainer would: the user attrs the scheduler reads, then the outcome."""
    trial = optuna.trial.Trial(study, study.get_trials(deepcopy=False)[number]._trial_id)
    trial.set_user_attr(ATTR_REUSED_LAYERS, run.reused_layers)
    trial.set_user_attr(ATTR_TRAIN_SECONDS, round(run.seconds, 3))
    trial.set_user_attr(ATTR_EPOCHS_RUN, run.epochs_run)
    if run.failed is not None:
        trial.set_user_attr(ATTR_FAIL_REASON, run.failed[:500])
        study.tell(number, state=TrialState.FAIL)
    else:
        trial.set_user_attr("val_loss", run.val_loss)
        study.tell(number, run.val_loss)


def warm_up(spec: StudySpec, setup: TrainingSetup) -> None:
    """One untimed epoch per depth, from scratch and with a cached frozen prefix: the first torch
    calls of a process pay one-time costs (seconds here) that would land on whichever arm ran first."""
    started = time.perf_counter()
    seen: set[int] = set()
    for params in spec.grid():
        arch = architecture_from_params(spec, params)
        if arch.depth in seen:
            continue
        seen.add(arch.depth)
        warm = spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": 1, "epochs_when_reusing": 1})})
        _, weights = train_baseline(arch, params, setup, 1)
        if arch.depth > 1:
            train_paper(arch, params, setup, 1, weights, "warm-up")
            train_strata(arch, params, setup, warm, None, study="warm-up", trial_number=0)
    log(f"warm-up: {time.perf_counter() - started:.1f}s (not counted)")


# --- part 1: the grid, three arms interleaved --------------------------------------------------


def run_grid(spec: StudySpec, setup: TrainingSetup, registry_dir: Path, runs_log: Path) -> tuple[list[ArmRun], float]:
    registry = LayerRegistry(LocalFolderStore(registry_dir))
    study = create_or_load_study(spec, "bench-grid", optuna.storages.InMemoryStorage())
    scheduler = TrialScheduler(study, spec, registry)
    epochs = spec.training.epochs
    total = spec.grid_size()
    baseline_weights: dict[tuple, tuple[bytes, str]] = {}
    runs: list[ArmRun] = []
    scheduling_seconds = 0.0
    index = 0
    with runs_log.open("w") as out:
        while True:
            started = time.perf_counter()
            plan = scheduler.plan((), 1)
            scheduling_seconds += time.perf_counter() - started
            if not plan.launch:
                break
            number = plan.launch[0]
            params = dict(study.get_trials(deepcopy=False)[number].params)
            arch = architecture_from_params(spec, params)
            depth = arch.depth
            arms = [BASELINE, PAPER, STRATA] if depth > 1 else [BASELINE, STRATA]
            shift = index % len(arms)
            done: dict[str, ArmRun] = {}
            for position, arm in enumerate(arms[shift:] + arms[:shift]):
                if arm == BASELINE:
                    run, weights = train_baseline(arch, params, setup, epochs)
                    baseline_weights[params_key(params, depth)] = (weights, arch.describe())
                elif arm == PAPER:
                    # Depth-ordered: the baseline run with n-1 layers finished in an earlier depth.
                    weights, label = baseline_weights[params_key(params, depth - 1)]
                    run = train_paper(arch, params, setup, epochs, weights, label)
                else:
                    run = train_strata(arch, params, setup, spec, registry, study="bench-grid", trial_number=number)
                    record_trial(study, number, run)
                run.extra["position"] = position  # rotated per configuration: no arm always runs first
                done[arm] = run
                runs.append(run)
                out.write(json.dumps(run.to_json()) + "\n")
            out.flush()
            index += 1
            log(f"{index:>3}/{total} {arch.describe():<45} " + "  ".join(
                f"{arm} {r.seconds:6.2f}s {report._f(r.val_loss, 4)}" + (f" (reuse {r.reused_layers}, {r.epochs_run} ep)"
                                                                        if r.reused_layers else "")
                for arm, r in done.items()))
    return runs, scheduling_seconds


# --- part 2: TPE with a fixed budget, with and without reuse -------------------------------------


@dataclass
class TpeSearch:
    """One Optuna TPE study driven by the product's TrialScheduler, trials trained in this process."""

    name: str
    spec: StudySpec
    registry: LayerRegistry | None
    study: optuna.Study = field(init=False)
    scheduler: TrialScheduler = field(init=False)
    seconds: float = 0.0  # this search's own wall time: scheduling, training, telling
    timeline: list[list[float | None]] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    idle_steps: int = 0

    def __post_init__(self) -> None:
        self.study = create_or_load_study(self.spec, f"bench-tpe-{self.name}", optuna.storages.InMemoryStorage())
        self.scheduler = TrialScheduler(self.study, self.spec, self.registry)
        self.timeline.append([0.0, None])

    def step(self, setup: TrainingSetup) -> None:
        """What one turn of strata.runner.run_loop does with one slot, the trial run in-process."""
        started = time.perf_counter()
        if self.scheduler.outcome(()).finished:
            self.done = True
            return
        plan = self.scheduler.plan((), 1)
        for number in plan.launch:
            frozen = self.study.get_trials(deepcopy=False)[number]
            arch = architecture_from_params(self.spec, frozen.params)
            run = train_strata(arch, dict(frozen.params), setup, self.spec, self.registry,
                               study=self.study.study_name, trial_number=number)
            record_trial(self.study, number, run)
            self.trials.append({"number": number, "label": run.label, "depth": run.depth, "seconds": run.seconds,
                                "val_loss": run.val_loss, "reused_layers": run.reused_layers,
                                "epochs_run": run.epochs_run, "failed": run.failed,
                                "donor_for": frozen.user_attrs.get(ATTR_DONOR_FOR)})
        self.seconds += time.perf_counter() - started
        self.idle_steps = 0 if plan.launch else self.idle_steps + 1
        if self.idle_steps > 2:  # nothing to launch and not finished: never spin
            self.done = True
        values = [t.value for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        self.timeline.append([round(self.seconds, 3), min(values) if values else None])

    def summary(self) -> dict[str, Any]:
        values = [t["val_loss"] for t in self.trials if t["val_loss"] is not None]
        return {"trials": len(self.study.get_trials(deepcopy=False)), "trained": len(self.trials),
                "seconds": self.seconds, "best_val_loss": min(values) if values else None,
                "reused": sum(1 for t in self.trials if t["reused_layers"]),
                "donor_trials": sum(1 for t in self.trials if t["donor_for"] is not None),
                "timeline": self.timeline, "runs": self.trials}


def tpe_spec(spec: StudySpec, seed: int, trials: int, reuse: bool) -> StudySpec:
    return spec.model_copy(update={
        "sampler": Sampler(name="tpe", seed=seed),
        "trials": Trials(max=trials, parallel=1, max_failed=trials, retries=0),
        "reuse": spec.reuse.model_copy(update={"enabled": reuse}),
    })


def run_tpe(spec: StudySpec, setup: TrainingSetup, workdir: Path, seeds: int, trials: int,
            grid_best: float | None) -> list[dict[str, Any]]:
    results = []
    for seed in range(seeds):
        searches = {
            "no-reuse": TpeSearch("no-reuse", tpe_spec(spec, seed, trials, reuse=False), None),
            "reuse": TpeSearch("reuse", tpe_spec(spec, seed, trials, reuse=True),
                               LayerRegistry(LocalFolderStore(workdir / f"registry-tpe-{seed}"))),
        }
        seed_setup = replace(setup, shared_features=SharedFeatureStore(workdir / f"features-tpe-{seed}"))
        order = ["no-reuse", "reuse"] if seed % 2 == 0 else ["reuse", "no-reuse"]
        # Alternate trial by trial, so noise on this machine hits both searches alike.
        while not all(s.done for s in searches.values()):
            for name in order:
                if not searches[name].done:
                    searches[name].step(seed_setup)
        arms = {name: s.summary() for name, s in searches.items()}
        target = arms["no-reuse"]["best_val_loss"]
        results.append({
            "seed": seed,
            "arms": arms,
            "no_reuse_best": target,
            "time_to_no_reuse_best": {n: report.time_to_reach(a["timeline"], target) for n, a in arms.items()},
            "time_to_grid_best": {n: report.time_to_reach(a["timeline"], grid_best) for n, a in arms.items()},
        })
        log(f"TPE seed {seed}: " + "; ".join(
            f"{n} {a['seconds']:.1f}s best {report._f(a['best_val_loss'], 4)} ({a['reused']} reused)"
            for n, a in arms.items()))
    return results


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall_started = time.perf_counter()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = build_spec(args)
    machine = machine_info(args.threads)
    command = "python bench/reuse_benchmark.py" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)
                                                   if (sys.argv[1:] if argv is None else argv) else "")

    data_started = time.perf_counter()
    data = load_dataset(spec.training, spec.storage.s3_endpoint)
    log(f"dataset {data.source}: {len(data.train)} train + {len(data.val)} val images {data.input_shape} "
        f"in {time.perf_counter() - data_started:.1f}s; grid of {spec.grid_size()} configurations, {args.threads} threads")
    setup = TrainingSetup(data=data, device=torch.device("cpu"), seed=spec.training.seed,
                          memory_limit=memory_limit(), spill_dir=tempfile.gettempdir())

    if args.from_runs:
        records = [json.loads(line) for line in args.from_runs.read_text().splitlines() if line.strip()]
        arms, seeds, scheduling_seconds, grid_seconds, tpe_seconds = report.summarise(records), [], 0.0, 0.0, 0.0
        args.tpe_trials = 0
    else:
        warm_up(spec, setup)
        with tempfile.TemporaryDirectory(prefix="strata-bench-") as workdir:
            grid_started = time.perf_counter()
            # Each search starts with an empty machine-wide feature folder, as a new study on a new machine would.
            grid_setup = replace(setup, shared_features=SharedFeatureStore(Path(workdir) / "features-grid"))
            runs, scheduling_seconds = run_grid(spec, grid_setup, Path(workdir) / "registry-grid",
                                                args.out / "runs.jsonl")
            grid_seconds = time.perf_counter() - grid_started
            records = [r.to_json() for r in runs]
            arms = report.summarise(records)
            grid_best = arms[BASELINE]["whole_search"]["best_val_loss"]
            tpe_started = time.perf_counter()
            seeds = run_tpe(spec, setup, Path(workdir), args.seeds, args.tpe_trials, grid_best) if args.tpe_trials else []
            tpe_seconds = time.perf_counter() - tpe_started

    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        "meta": {
            "command": command, "quick": args.quick, "space": args.space, "machine": machine,
            "dataset": {"source": data.source, "subset": spec.training.subset_size, "train": len(data.train),
                        "val": len(data.val), "input_shape": list(data.input_shape)},
            "grid": ", ".join(f"{name} {len(p.values())}" for name, p in spec.search_space.items()),
            "grid_size": spec.grid_size(), "grid_configs_run": sum(1 for r in records if r["arm"] == STRATA),
            "partial_from": str(args.from_runs) if args.from_runs else None,
            "epochs": spec.training.epochs, "epochs_when_reusing": spec.training.epochs_when_reusing,
            "patience": spec.training.early_stop_patience, "grid_seed": args.grid_seed,
            "scheduling_seconds": scheduling_seconds, "grid_seconds": grid_seconds, "tpe_seconds": tpe_seconds,
            "wall_seconds": time.perf_counter() - wall_started,
        },
        "arms": arms,
        "targets": report.targets(arms, SPEEDUP_TARGET),
        "table2": report.table2(records),
        "tpe": {"trials": args.tpe_trials, "seeds": seeds, "summary": report.tpe_summary(seeds) if seeds else None},
        "runs": records,
    }
    write_outputs(result, args.out)
    log(f"done in {result['meta']['wall_seconds']:.0f}s: {args.out}")
    print(report.results_table(arms), flush=True)
    return 0


def write_outputs(result: dict[str, Any], out: Path) -> None:
    records = result["runs"]
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out / "results.md").write_text(report.results_markdown(result))
    (out / "table2_epochs.md").write_text(report.table2_markdown(result["table2"]) + "\n")
    report.box_plot(records, "seconds", "training time per configuration (s)",
                    "Training time, multi-layer configurations", str(out / "fig_time.png"))
    report.box_plot(records, "val_loss", "best validation loss",
                    "Validation loss, multi-layer configurations", str(out / "fig_val_loss.png"))
    report.table2_plot(result["table2"], str(out / "table2_epochs.png"))
    report.tpe_plot(result["tpe"]["seeds"], result["arms"][BASELINE]["whole_search"]["best_val_loss"],
                    str(out / "tpe_claim.png"))


if __name__ == "__main__":
    sys.exit(main())
