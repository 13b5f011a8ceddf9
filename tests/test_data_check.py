"""The study's data is checked once, before its first trial pod (or trainer process).

The campaign found a missing dataset path and a subset larger than the dataset reported only by
trial pods, one failed trial at a time. Now the operator runs `python -m strata_trainer --check-data`
in one pod where the trials would run and reads its verdict from the study; `strata run` runs the
same check in-process before it writes anything.
"""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest

from strata.study import ATTR_DATA_CHECK, create_or_load_study, data_check_key
from strata.spec import parse_spec
from tests.k8s.fixtures import k8s_api  # noqa: F401
from tests.test_cli import STRATA, needs_fashion_mnist, tree, write_study
from tests.test_reconcile import Reconciler, terminated
from tests.test_reconcile_faults import condition, posted

SPACE = {"convLayers": {"type": "int", "low": 1, "high": 1},
         "learningRate": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}


def spec_with(**training):
    return parse_spec({"searchSpace": SPACE, "trials": {"max": 2},
                       "training": {"inputSize": 16, "subsetSize": 200, **training}})


# --- the trainer's half ------------------------------------------------------------------------


@needs_fashion_mnist
@pytest.mark.parametrize("training, ok, words", [
    ({}, True, "160 training and 40 validation images, 10 classes"),
    ({"subsetSize": 70_000}, False, "spec.training.subsetSize 70000 exceeds the 60000 training images"),
    ({"dataset": {"name": "fashion-mnist", "path": "/nonexistent/data"}}, False, "/nonexistent/data does not exist"),
    ({"dataset": {"name": "cifar10", "path": "/usr/share/datasets/fashion-mnist"}}, False, "no cifar-10-batches-py"),
])
def test_the_trainer_checks_the_data_once_and_records_its_verdict_in_the_study(tmp_path, training, ok, words):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = spec_with(**training)
    create_or_load_study(spec, "checked", url)

    run = subprocess.run([sys.executable, "-m", "strata_trainer", "--storage", url, "--study", "checked",
                          "--check-data"], capture_output=True, text=True, timeout=120,
                         env={"STRATA_CPU_LIMIT": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})

    assert run.returncode == 0, run.stderr[-2000:]
    verdict = optuna.load_study(study_name="checked", storage=url).user_attrs[ATTR_DATA_CHECK]
    assert verdict["key"] == data_check_key(spec) and verdict["ok"] is ok
    assert words in verdict["message"], verdict["message"]


def test_the_data_check_key_changes_with_the_data_settings_only():
    base = spec_with()
    assert data_check_key(base) == data_check_key(spec_with())
    assert data_check_key(base) != data_check_key(spec_with(subsetSize=300))
    assert data_check_key(base) != data_check_key(spec_with(dataset={"name": "mnist", "path": "/data"}))
    assert data_check_key(base) != data_check_key(spec_with(testSplit=0.1))
    npz = {"name": "npz", "path": "/data/set.npz"}
    assert data_check_key(spec_with(dataset=npz)) != data_check_key(spec_with(dataset={**npz, "channels": 1}))
    other_space = parse_spec({"searchSpace": {**SPACE, "batchSize": {"type": "categorical", "choices": [8]}},
                              "trials": {"max": 9}, "training": {"inputSize": 16, "subsetSize": 200}})
    assert data_check_key(other_space) == data_check_key(base)


# --- the operator's half -----------------------------------------------------------------------


@pytest.fixture
def checked(k8s_api, tmp_path):
    r = Reconciler(k8s_api, f"sqlite:///{tmp_path / 'optuna.db'}", check_data=True,
                   trials={"max": 2, "parallel": 2, "maxFailed": 5, "retries": 1},
                   training={"inputSize": 16, "subsetSize": 200})
    yield r
    r.close()


def data_check_pod(k8s_api, r: Reconciler):
    pods = k8s_api.list("pods", "default", labels="app.kubernetes.io/component=data-check")
    return pods[0] if pods else None


def record_verdict(r: Reconciler, ok: bool, message: str) -> None:
    """What the data check pod does: the verdict goes into the study, then the pod succeeds."""
    study = r.study()
    spec = parse_spec(r.spec)
    study.set_user_attr(ATTR_DATA_CHECK, {"key": data_check_key(spec), "ok": ok, "message": message})


def test_the_first_pod_of_a_study_checks_its_data_and_trials_start_once_it_passed(checked, k8s_api):
    checked.reconcile()

    pod = data_check_pod(k8s_api, checked)
    assert pod is not None and pod["spec"]["containers"][0]["args"][-1] == "--check-data"
    assert checked.pods() == {} and checked.status["phase"] == "Pending"
    assert condition(checked.status, "Running")["reason"] == "CheckingData"
    checked.reconcile()
    assert checked.pods() == {}  # still checking: no trial pod yet

    record_verdict(checked, True, "fashion-mnist: 160 training images")
    k8s_api.patch("pods", pod["metadata"]["name"], {"status": terminated("Succeeded", 0, "Completed")},
                  subresource="status")
    checked.reconcile()

    assert sorted(checked.pods()) == [0, 1]


def test_bad_data_is_one_invalid_data_condition_and_warning_and_no_trial_pod(checked, k8s_api):
    checked.reconcile()
    message = "spec.training.subsetSize 70000 exceeds the 60000 training images in /usr/share/datasets/fashion-mnist"
    record_verdict(checked, False, message)

    for _ in range(3):
        checked.reconcile()

    assert checked.status["phase"] == "Invalid" and checked.pods() == {}
    ready = condition(checked.status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidData")
    assert ready["message"] == f"spec.training: {message}"
    assert len(posted(k8s_api, "InvalidData")) == 1
    assert not checked.study().trials  # no trial was asked, none failed


def test_a_data_check_pod_that_keeps_failing_is_retried_a_few_times_then_reported(checked, k8s_api):
    checked.reconcile()
    for _ in range(4):
        pod = data_check_pod(k8s_api, checked)
        k8s_api.patch("pods", pod["metadata"]["name"], {"status": terminated("Failed", 1, "Error")},
                      subresource="status")
        checked.reconcile()
        checked.reconcile()

    assert checked.status["phase"] == "Error" and checked.pods() == {}
    assert condition(checked.status, "Ready")["reason"] == "DataCheckFailed"
    assert "failed 3 times" in checked.status["message"]
    assert len(posted(k8s_api, "DataCheckFailed")) == 1


def test_a_study_that_already_trained_before_data_checks_existed_is_not_held_back(checked):
    spec = parse_spec(checked.spec)
    study = create_or_load_study(spec, "default.fates", checked.storage_url)
    trial = study.ask()
    study.tell(trial, 0.5)

    checked.reconcile()

    assert 1 in checked.pods()


# --- strata run --------------------------------------------------------------------------------


@needs_fashion_mnist
def test_strata_run_refuses_a_subset_larger_than_the_dataset_before_writing_anything(tmp_path):
    study_file = write_study(tmp_path, training={"subsetSize": 70_000, "inputSize": 16, "epochs": 1})
    before = tree(tmp_path)

    result = subprocess.run([str(STRATA), "run", str(study_file)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["strata: spec.training: spec.training.subsetSize 70000 exceeds the 60000 training images in "
                     "/usr/share/datasets/fashion-mnist"], result.stderr
    assert tree(tmp_path) == before

