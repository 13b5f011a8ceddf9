"""The study's data, checked once before its first trial: `python -m strata_trainer --study S --check-data`.

A missing dataset path, a subset larger than the dataset or a malformed file used to surface only
inside a trial pod, one failed trial after another. The operator (and `strata run`) runs this once
per study and data settings, where the trials would run (the trainer image, its volumes, its S3
credentials), and reads the verdict from the study: user attr `strata.data_check`, keyed by the
settings it checked (strata.study.data_check_key), so a changed dataset is checked again.
"""

from __future__ import annotations

import logging
from typing import Callable

import optuna

from strata.spec import StudySpec
from strata.study import ATTR_DATA_CHECK, data_check_key
from strata_trainer.data import DatasetError, DatasetSplits, load_dataset

log = logging.getLogger("strata.trainer")


def verdict_for(spec: StudySpec, load: Callable[[StudySpec], DatasetSplits] | None = None) -> dict:
    """Load the study's splits as a trial would: {"key", "ok", "message", ...} (nothing recorded).

    `load` is how the trials load them (a warm worker keeps what it loaded for its first trial)."""
    verdict: dict = {"key": data_check_key(spec)}
    try:
        data = load(spec) if load else load_dataset(spec.training, spec.storage.s3_endpoint)
    except DatasetError as error:
        verdict.update(ok=False, message=str(error))
    else:
        test = len(data.test) if data.test is not None else 0
        verdict.update(ok=True, train=len(data.train), validation=len(data.val), test=test, classes=data.num_classes,
                       message=f"{data.source}: {len(data.train)} training and {len(data.val)} validation images, "
                               f"{data.num_classes} classes, {f'{test} test images' if test else 'no test split'}, "
                               f"input {'x'.join(map(str, data.input_shape))}")
    return verdict


def check_data(study: optuna.Study, spec: StudySpec) -> dict:
    """The verdict, recorded in the study for the operator to read."""
    verdict = verdict_for(spec)
    study.set_user_attr(ATTR_DATA_CHECK, verdict)
    (log.info if verdict["ok"] else log.error)("data check: %s", verdict["message"])
    return verdict
