"""`strata run | status | best`: the same study file on one machine, on embedded defaults.

    strata run study.yaml [--storage URL] [--checkpoints DIR|s3://bucket] [--workers N] [--json] [--report out.json]
    strata status study.yaml | --storage URL --study NAME  [--json]
    strata best   study.yaml | --storage URL --study NAME  [--json]
    strata report study.yaml | --storage URL --study NAME  [--out DIR]

Bad input is one line on stderr naming the field, exit code 2, and nothing written. What a person
reads (the live display, the tables) is strata.console; --json prints the report's shape instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from strata.console import ProgressDisplay, TrialEvents, best_lines, print_summary
from strata.spec import HPOStudy, SpecError, load_study_file

EXIT_OK, EXIT_STUDY_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    pass


def default_storage_url(study_file: Path, name: str) -> str:
    return f"journal://{study_file.resolve().parent / (name + '.optuna.journal')}"


def default_checkpoints(study_file: Path, name: str) -> str:
    return str(study_file.resolve().parent / f"{name}.checkpoints")


def check_dataset_available(study: HPOStudy) -> None:
    """Fail before anything is written when the dataset is plainly missing (local paths only)."""
    dataset = study.spec.training.dataset
    path = dataset.path
    if path and path.startswith("s3://"):
        return
    if not path:
        if dataset.name == "fashion-mnist":
            path = "/usr/share/datasets/fashion-mnist"
        elif dataset.name == "mnist":
            path = os.environ.get("STRATA_MNIST_DIR", "")
        if not path:
            raise UsageError(f"spec.training.dataset.path: no default location for {dataset.name}; set a path")
    if not Path(path).exists():
        hint = " (apt-get install dataset-fashion-mnist)" if dataset.name == "fashion-mnist" else ""
        raise UsageError(f"spec.training.dataset.path: {path} does not exist{hint}")


def check_data_once(spec, storage_url: str, name: str, checker=None) -> dict | None:
    """The data check the operator runs in a pod (strata_trainer.datacheck), here before anything is
    written: in a warm worker (`checker`, WarmWorkerExecutor.check_data) or in this process; skipped
    when the study already holds a good verdict for this data."""
    if os.environ.get("STRATA_DATA_CHECK", "true").lower() in ("0", "false", "no", "off"):
        return None
    from strata.study import ATTR_DATA_CHECK, StorageError, data_check_key, load_study

    existing = not storage_url.startswith("journal://") or Path(storage_url[len("journal://"):]).exists()
    if existing:
        try:
            verdict = load_study(name, storage_url)[0].user_attrs.get(ATTR_DATA_CHECK)
            if isinstance(verdict, dict) and verdict.get("key") == data_check_key(spec) and verdict.get("ok"):
                return None
        except (StorageError, SpecError):
            pass  # no such study yet (or unreachable: reported when it is opened)
    if checker is not None:
        try:
            verdict = checker(spec)
        except RuntimeError as error:
            raise UsageError(f"spec.training: the data check could not run: {error}") from None
    else:
        from strata.executors import DEFAULT_TRAINER_MODULE, trainer_module

        if trainer_module() != DEFAULT_TRAINER_MODULE:
            return None  # another trainer (the stand-in) does not load data the way this check would
        try:
            from strata_trainer.datacheck import verdict_for
        except ImportError:  # an operator-only install has no trainer: its trials would say it
            return None
        verdict = verdict_for(spec)
    if not verdict["ok"]:
        raise UsageError(f"spec.training: {verdict['message']}")
    return verdict


def _resolve(args: argparse.Namespace) -> tuple[HPOStudy | None, str, str]:
    """(study, storage URL, study name) from a study file and/or --storage/--study."""
    study = None
    if getattr(args, "study_file", None):
        study = load_study_file(args.study_file)
    name = getattr(args, "study", None) or (study.name if study else None)
    if not name:
        raise UsageError("give a study file or --study NAME")
    storage = args.storage or (study and study.spec.storage.optuna_url) or None
    if storage and "://" not in storage and Path(storage).is_file():  # a journal file, as optuna's CLI takes it
        storage = f"journal://{Path(storage).resolve()}"
    if not storage:
        if not study:
            raise UsageError("give a study file or --storage URL")
        storage = default_storage_url(Path(args.study_file), name)
    return study, storage, name


def refuse_changed_spec(spec, name: str, storage, args: argparse.Namespace) -> None:
    """A study file changed since the study last ran: refuse, saying what changed, unless asked not to.

    Trials trained under another model, search space or training would be ranked together with the
    new ones. Changes that keep trials comparable (more trials, parallelism, timeouts, storage,
    placement, the sampler, the pruner, the goal) pass: see strata.spec.RESUMABLE_CHANGES."""
    from strata.spec import parse_spec, spec_changes, spec_to_json
    from strata.study import stored_spec

    before = stored_spec(name, storage)
    if before is None or getattr(args, "allow_spec_change", False):
        return
    try:
        before = spec_to_json(parse_spec(before))  # the defaults of this version on both sides
    except SpecError:
        pass
    changes = spec_changes(before, spec_to_json(spec))
    if changes:
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise UsageError(
            f"{args.study_file} changed since study {name} last ran ({shown}); its {len(changes)} changed "
            f"setting(s) would mix trials trained differently. Run it as a new study (another metadata.name), "
            f"or pass --allow-spec-change to go on with the new settings")


# --- run ---------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from strata.families import check_space_fits_input
    from strata.executors import LocalProcessExecutor, trainer_module
    from strata.workers import WarmWorkerExecutor
    from strata.objectstore import ObjectStoreError, open_object_store
    from strata.redaction import redact
    from strata.registry import LayerRegistry
    from strata.runner import run_loop
    from strata.scheduler import TrialScheduler
    from strata.study import StorageError, create_or_load_study, open_storage, optuna_cli_storage

    command_started = time.monotonic()  # the report's wall time is the whole command's
    study, storage_url, name = _resolve(args)
    assert study is not None
    spec = study.spec
    if args.workers is not None:
        if args.workers < 1:
            raise UsageError(f"--workers: must be at least 1, got {args.workers}")
        spec = spec.model_copy(update={"trials": spec.trials.model_copy(update={"parallel": args.workers})})
    if args.per_trial_processes:
        spec = spec.model_copy(update={"execution": spec.execution.model_copy(update={"mode": "perTrial"})})
    check_space_fits_input(spec)
    check_dataset_available(study)
    checkpoints = args.checkpoints or spec.storage.checkpoints or default_checkpoints(Path(args.study_file), name)
    cores = os.cpu_count() or 1
    parallel = spec.trials.parallel
    log_dir = Path(args.logs or Path(args.study_file).resolve().parent / f"{name}.logs")
    # Trials on this machine share their frozen-prefix outputs (trainer: strata_trainer.features).
    features = os.environ.get("STRATA_FEATURE_CACHE_DIR") or \
        str(Path(args.study_file).resolve().parent / f"{name}.features")
    threads, env = max(1, cores // parallel), {"STRATA_FEATURE_CACHE_DIR": features}
    try:
        trainer_module()
    except ValueError as error:  # before any worker starts: one line, nothing written
        raise UsageError(str(error)) from None
    executor: WarmWorkerExecutor | LocalProcessExecutor
    if spec.execution.mode == "warmWorkers":
        # Started first: the workers import torch while this process checks the inputs, and the
        # data check runs in one of them (which keeps the dataset for its first trial).
        executor = WarmWorkerExecutor(storage_url, name, checkpoints, log_dir, threads, parallel, env=env)
        executor.warm_up()
    else:
        executor = LocalProcessExecutor(storage_url, name, checkpoints, log_dir, threads, env=env)
    try:
        try:  # a registry that cannot take a checkpoint would silently cost every trial its reuse
            store = open_object_store(checkpoints, spec.storage.s3_endpoint)
            store.check_writable()
            registry = LayerRegistry(store)
        except ObjectStoreError as error:
            raise UsageError(f"--checkpoints: {checkpoints} is not writable: {error}") from None
        data_verdict = check_data_once(spec, storage_url, name,
                                       executor.check_data if isinstance(executor, WarmWorkerExecutor) else None)
        try:  # last check: a journal file is created on open
            storage = open_storage(storage_url)
        except StorageError as error:
            raise UsageError(f"--storage: {error}") from None
        refuse_changed_spec(spec, name, storage, args)
    except BaseException:
        executor.stop_all()  # nothing was written: the workers' output was held in memory
        executor.close()
        raise
    if isinstance(executor, WarmWorkerExecutor):
        executor.keep_logs()
    # The trainer reads the spec from the study, with the checkpoint location made explicit.
    spec = spec.model_copy(update={"storage": spec.storage.model_copy(update={"checkpoints": checkpoints})})
    optuna_study = create_or_load_study(spec, name, storage)
    if data_verdict is not None:
        from strata.study import ATTR_DATA_CHECK

        optuna_study.set_user_attr(ATTR_DATA_CHECK, data_verdict)
    scheduler = TrialScheduler(optuna_study, spec, registry)

    events = TrialEvents(optuna_study, spec.objective.metric, log_path=executor.log_path)
    display = ProgressDisplay(name, spec.trials.max, events, quiet=args.quiet)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    kind = "warm worker(s)" if spec.execution.mode == "warmWorkers" else "process(es) per trial"
    print(f"study {name}: storage {redact(storage_url)}, checkpoints {checkpoints}, {parallel} {kind}, logs {log_dir}\n"
          f"  follow it: optuna-dashboard {optuna_cli_storage(storage_url)}", file=sys.stderr)
    try:
        outcome = run_loop(scheduler, executor, parallel, stop=stop, on_progress=display.update)
    finally:
        display.close()
        executor.close()
        signal.signal(signal.SIGINT, previous)
    wall = time.monotonic() - command_started
    report = build_report(optuna_study, scheduler, outcome.phase, wall)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_summary(report, sys.stdout)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    if outcome.phase == "Interrupted":
        print(f"interrupted: run `strata run {args.study_file}` again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.phase == "Failed":
        print(f"study failed: {outcome.message}", file=sys.stderr)
        return EXIT_STUDY_FAILED
    return EXIT_OK


def build_report(optuna_study, scheduler, phase: str, wall_seconds: float | None = None) -> dict[str, Any]:
    from strata.study import (
        ATTR_DONOR_TRIAL, ATTR_EPOCHS_RUN, ATTR_FEATURE_CACHE, ATTR_MODEL, ATTR_REUSED_LAYERS, ATTR_SECONDS_SAVED,
        ATTR_QUEUED_SECONDS, ATTR_SHARED_FEATURES, ATTR_TEST_ACCURACY, attr_time, ATTR_TEST_SECONDS, ATTR_TRAIN_SECONDS, ATTR_TRAINING_STARTED,
    )

    progress = scheduler.progress()
    trials = []
    for t in optuna_study.get_trials(deepcopy=False):
        trials.append({
            "number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "reused_layers": int(t.user_attrs.get(ATTR_REUSED_LAYERS) or 0),
            "donor_trial": t.user_attrs.get(ATTR_DONOR_TRIAL),
            "train_seconds": t.user_attrs.get(ATTR_TRAIN_SECONDS),
            "model": t.user_attrs.get(ATTR_MODEL),
            "test_accuracy": t.user_attrs.get(ATTR_TEST_ACCURACY),
            "test_seconds": t.user_attrs.get(ATTR_TEST_SECONDS),
            "epochs_run": t.user_attrs.get(ATTR_EPOCHS_RUN),
            "feature_cache": t.user_attrs.get(ATTR_FEATURE_CACHE),
            "shared_features": t.user_attrs.get(ATTR_SHARED_FEATURES),
            "seconds_saved": t.user_attrs.get(ATTR_SECONDS_SAVED),
            "started_at": round(t.datetime_start.timestamp(), 3) if t.datetime_start else None,  # epoch seconds
            "training_started": attr_time(t.user_attrs.get(ATTR_TRAINING_STARTED)),  # epoch seconds
            "queued_seconds": t.user_attrs.get(ATTR_QUEUED_SECONDS),
            "finished_at": round(t.datetime_complete.timestamp(), 3) if t.datetime_complete else None,
        })
    best = progress.best
    return {
        "study": optuna_study.study_name,
        "phase": phase,
        "metric": scheduler.spec.objective.metric,
        "direction": scheduler.spec.objective.resolved_direction,
        "best": best_as_json(best) if best else None,
        "summary": {
            "complete": progress.complete, "pruned": progress.pruned, "failed": progress.failed,
            "reused_trials": progress.reused_trials, "reused_layers": progress.reused_layers,
            "reuse_rate": round(progress.reuse_rate, 4), "seconds_saved_estimate": round(progress.seconds_saved, 2),
            "shared_feature_hits": sum(1 for t in trials if t["shared_features"] == "hit"),
            "registry_load_failures": progress.registry_load_failures,
            "registry_publish_failures": progress.registry_publish_failures,
            "wall_seconds": round(wall_seconds, 2) if wall_seconds is not None else None,
        },
        "trials": trials,
    }


def best_as_json(best) -> dict[str, Any]:
    """The best trial as `strata best`, `status --json` and the report show it."""
    return {"number": best.number, "value": best.value, "params": best.params, "model": best.model,
            "test_accuracy": best.test_accuracy}


# --- status / best -----------------------------------------------------------------------------


def _load_for_reading(args: argparse.Namespace):
    from strata.scheduler import TrialScheduler
    from strata.study import StorageError, load_study

    _, storage_url, name = _resolve(args)
    if storage_url.startswith("journal://") and not Path(storage_url[len("journal://"):]).exists():
        raise UsageError(f"no study storage at {storage_url}: run the study first")
    try:
        optuna_study, spec = load_study(name, storage_url)
    except StorageError as error:
        raise UsageError(str(error)) from None
    return optuna_study, TrialScheduler(optuna_study, spec, None)


def cmd_status(args: argparse.Namespace) -> int:
    optuna_study, scheduler = _load_for_reading(args)
    outcome = scheduler.outcome()
    report = build_report(optuna_study, scheduler, outcome.phase)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_summary(report, sys.stdout)
    return EXIT_OK


def cmd_best(args: argparse.Namespace) -> int:
    optuna_study, scheduler = _load_for_reading(args)
    best = scheduler.progress().best
    if best is None:
        print("no completed trial yet", file=sys.stderr)
        return EXIT_STUDY_FAILED
    if args.json:
        print(json.dumps(best_as_json(best), indent=2))
    else:
        for line in best_lines(best_as_json(best), scheduler.spec.objective.metric):
            print(line)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from strata.plots import PlotsUnavailable, write_report

    optuna_study, scheduler = _load_for_reading(args)
    report = build_report(optuna_study, scheduler, scheduler.outcome().phase)
    name = optuna_study.study_name
    out = Path(args.out or (Path(args.study_file).resolve().parent / f"{name}.report" if args.study_file
                            else f"{name}.report"))
    try:
        written = write_report(report, out, optuna_study)
    except PlotsUnavailable as error:
        raise UsageError(str(error)) from None
    for path in written:
        print(path)
    return EXIT_OK


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("strata")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Hyperparameter optimisation with layer reuse: "
                                     "run an HPOStudy file on this machine, or read a study's results.")
    parser.add_argument("--version", action="version", version=f"strata {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,status,best,report}")
    run = sub.add_parser("run", help="run a study file on this machine",
                         description="Run a study file on this machine, on embedded defaults: a journal file and "
                                     "a checkpoint folder next to it. Run it again to resume.")
    run.add_argument("study_file", help="the HPOStudy manifest (YAML), the same file kubectl applies")
    run.add_argument("--storage", metavar="URL",
                     help="Optuna storage: a database URL, journal:///path or a journal file's path "
                          "(default: spec.storage.optunaUrl, else a journal file next to the study)")
    run.add_argument("--checkpoints", metavar="DIR|s3://BUCKET/PREFIX",
                     help="layer registry: a directory or s3://bucket/prefix (default: spec.storage.checkpoints, "
                          "else a folder next to the study)")
    run.add_argument("--workers", type=int, metavar="N", help="trials at once (default: spec.trials.parallel)")
    run.add_argument("--per-trial-processes", action="store_true",
                     help="run each trial in a fresh process (isolation) instead of warm workers "
                          "(spec.execution.mode: perTrial)")
    run.add_argument("--report", metavar="FILE", help="also write the JSON report (as --json prints it) to FILE")
    run.add_argument("--logs", metavar="DIR", help="directory for trial logs (default: next to the study)")
    run.add_argument("--quiet", action="store_true", help="no live progress and no per-trial lines on stderr")
    run.add_argument("--json", action="store_true", help="print the final report as JSON instead of the table")
    run.add_argument("--allow-spec-change", action="store_true",
                     help="go on with a study whose model, search space, training or reuse settings changed "
                          "since it last ran (its earlier trials were trained under the old settings)")
    run.set_defaults(func=cmd_run)
    for name, func, text in (("status", cmd_status, "show a study's trials and summary"),
                             ("best", cmd_best, "show the best trial")):
        p = _reading(sub, name, text, f"{text[0].upper()}{text[1:]}, by study file or by --storage and --study.")
        p.add_argument("--json", action="store_true", help="print JSON (the report's shape) instead of text")
        p.set_defaults(func=func)
    report = _reading(sub, "report", "draw a study's plots (PNG) and a page that shows them",
                      "Draw a study's plots: best value over wall time, each trial's waiting and training, time "
                      "saved by reuse, values and times by reused layers, and Optuna's history and slice plots; PNG "
                      "files and an index.html.")
    report.add_argument("--out", metavar="DIR", help="where to write (default: NAME.report/ next to the study file)")
    report.set_defaults(func=cmd_report)
    return parser


def _reading(sub, name: str, text: str, description: str) -> argparse.ArgumentParser:
    """A command that reads a study: by its file, or by --storage and --study."""
    p = sub.add_parser(name, help=text, description=description)
    p.add_argument("study_file", nargs="?", help="the HPOStudy manifest the study ran from")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL or journal file (default: the study "
                                                    "file's storage)")
    p.add_argument("--study", metavar="NAME", help="the study's name in the storage (default: the study "
                                                   "file's metadata.name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("STRATA_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:
        # `strata status --json | head`: the reader left. Python would print a traceback flushing stdout
        # at exit; point stdout at /dev/null instead and end as a process killed by SIGPIPE reads.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (SpecError, UsageError) as error:
        print(f"strata: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # storage and store errors reach the user as one line
        from strata.objectstore import ObjectStoreError
        from strata.study import StorageError

        if isinstance(error, (StorageError, ObjectStoreError)):
            print(f"strata: {error}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
