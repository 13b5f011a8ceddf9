"""`python -m strata_trainer --storage URL --study NAME --trial N`: run one asked trial and tell Optuna.

`--check-data` instead of `--trial N` checks the study's dataset once (strata_trainer.datacheck).
`--worker` runs trial after trial as assigned on stdin (strata_trainer.worker).

Exit codes: 0 complete, 3 pruned, 1 failed (told to Optuna as FAIL), 2 bad arguments or storage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from strata.spec import SpecError
from strata.study import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m strata_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("STRATA_STORAGE_URL"),
                        help="Optuna storage URL (default: $STRATA_STORAGE_URL)")
    parser.add_argument("--study", help="Optuna study name")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--trial", type=int, help="trial number, already asked by the scheduler")
    what.add_argument("--worker", action="store_true",
                      help="a warm worker: run the trials assigned on stdin, one JSON line each")
    what.add_argument("--serve", metavar="POD",
                      help="a worker pod: run the study's trials the operator assigns to POD")
    parser.add_argument("--slots", type=int, default=1, help="with --serve: trials at once (trialsPerGpu)")
    what.add_argument("--check-data", action="store_true",
                      help="load the study's dataset as its trials would and record the verdict in the study")
    parser.add_argument("--checkpoints", default=os.environ.get("STRATA_CHECKPOINTS"),
                        help="layer registry location (default: the spec's storage.checkpoints)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.storage:
        print("strata_trainer: --storage or STRATA_STORAGE_URL is required", file=sys.stderr)
        return 2
    if not args.worker and not args.study:
        print("strata_trainer: --study is required with --trial, --check-data and --serve", file=sys.stderr)
        return 2
    if args.worker:
        from strata_trainer.worker import main as worker_main

        return worker_main(args.storage)
    if args.serve:
        from strata.redaction import register_secret
        from strata_trainer.podworker import serve_pod

        register_secret(args.storage)
        return serve_pod(args.storage, args.study, args.serve, args.slots)
    from strata_trainer.trial import EXIT_USAGE, run_trial  # torch import after argument checks

    try:
        if args.check_data:
            from strata.study import load_study
            from strata_trainer.datacheck import check_data

            check_data(*load_study(args.study, args.storage))
            return 0  # the verdict is in the study, good or bad
        return run_trial(args.storage, args.study, args.trial, args.checkpoints)
    except (StorageError, SpecError) as error:
        print(f"strata_trainer: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
