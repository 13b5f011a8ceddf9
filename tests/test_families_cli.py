"""Non-paper families through `strata run`: a ResNet depth search that reuses the stem and first blocks,
every built-in family training, reusing and publishing, and the custom-model example end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from strata.objectstore import open_object_store
from strata.registry import LayerRegistry
from tests.test_cli import STRATA, needs_fashion_mnist, write_study

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "custom-model"


def run(study_file: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 400) -> dict[str, Any]:
    import subprocess

    report = study_file.parent / "report.json"
    result = subprocess.run([str(STRATA), "run", str(study_file), "--report", str(report), *args],
                            cwd=study_file.parent, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    return {"report": json.loads(report.read_text()), "stdout": result.stdout}


@needs_fashion_mnist
def test_a_resnet_depth_search_reuses_the_stem_and_first_blocks_and_reports_test_accuracy(tmp_path):
    study_file = write_study(
        tmp_path, name="resnets",
        model={"family": "resnet"},
        searchSpace={"depth": {"type": "categorical", "choices": [8, 14]},
                     "learningRate": {"type": "categorical", "choices": [0.01]}},
        sampler={"name": "grid"},
        trials={"max": 2, "parallel": 1},
        training={"subsetSize": 200, "inputSize": 16, "epochs": 1, "earlyStopPatience": 0, "optimizer": "sgd",
                  "weightDecay": 0.0005, "schedule": {"kind": "cosine"}, "device": "cpu"})
    result = run(study_file)
    report = result["report"]
    by_depth = {t["params"]["depth"]: t for t in report["trials"]}

    assert report["phase"] == "Succeeded" and set(by_depth) == {8, 14}
    assert by_depth[8]["reused_layers"] == 0 and by_depth[8]["model"] == "resnet-8"
    assert by_depth[14]["reused_layers"] == 2  # the stem and stage 1's first block: ResNet-8's first 2 units
    assert by_depth[14]["donor_trial"] == by_depth[8]["number"]
    assert by_depth[14]["feature_cache"] == "float32"
    # scored on Fashion-MNIST's own 10,000 test images: the first trial, then any that beat the best so far
    assert 0.0 <= by_depth[8]["test_accuracy"] <= 1.0
    assert (by_depth[14]["test_accuracy"] is not None) == (by_depth[14]["value"] <= by_depth[8]["value"])
    best = report["best"]
    assert best["test_accuracy"] == by_depth[best["params"]["depth"]]["test_accuracy"]
    assert f"test accuracy {best['test_accuracy']:.4f}" in result["stdout"]
    registry = LayerRegistry(open_object_store(str(tmp_path / "resnets.checkpoints")))
    assert registry.usage("resnets")[0] == 4 + 5  # ResNet-8: its 4 prefixes; ResNet-14 (7 units): the 5 longer than 2


@needs_fashion_mnist
@pytest.mark.parametrize("family, space", [
    ("vgg", {"groups": {"type": "categorical", "choices": [1, 2]}, "width": {"type": "categorical", "choices": [8]},
             "layersPerGroup": {"type": "categorical", "choices": [1]}}),
    ("mobilenetv2", {"stages": {"type": "categorical", "choices": [2, 3]},
                     "widthMultiplier": {"type": "categorical", "choices": [0.25]}}),
])
def test_every_built_in_family_trains_reuses_and_publishes_through_strata_run(tmp_path, family, space):
    study_file = write_study(
        tmp_path, name=family, model={"family": family}, searchSpace=space, sampler={"name": "grid"},
        trials={"max": 2, "parallel": 1},
        training={"subsetSize": 200, "inputSize": 16, "epochs": 1, "earlyStopPatience": 0, "device": "cpu",
                  "evaluateTest": False, "augmentation": {"horizontalFlip": True}})
    report = run(study_file)["report"]
    shallow, deep = sorted(report["trials"], key=lambda t: t["number"])

    assert report["phase"] == "Succeeded"
    assert shallow["reused_layers"] == 0 and deep["reused_layers"] >= 1
    assert deep["feature_cache"] == "off"  # augmentation: each epoch sees new inputs, nothing to cache
    assert all(t["test_accuracy"] is None for t in report["trials"])  # evaluateTest: false


def copy_example(tmp_path: Path, **spec_changes: Any) -> Path:
    document = yaml.safe_load((EXAMPLE / "study.yaml").read_text())
    document["spec"].update(spec_changes)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(document))
    return study_file


@needs_fashion_mnist
def test_the_custom_model_example_runs_end_to_end_and_its_blocks_are_reused(tmp_path):
    study_file = copy_example(tmp_path, searchSpace={"blocksPerStage": {"type": "categorical", "choices": [1, 2]},
                                                     "width": {"type": "categorical", "choices": [8]}},
                              sampler={"name": "grid"}, trials={"max": 2, "parallel": 1})
    result = run(study_file, env={"PYTHONPATH": str(EXAMPLE)})
    trials = result["report"]["trials"]

    assert result["report"]["phase"] == "Succeeded", trials
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[0]["reused_layers"] == 0 and trials[1]["reused_layers"] == 2  # the stem and the first block
    assert trials[1]["model"].startswith("my_models.nets:build(")


@needs_fashion_mnist
def test_a_custom_model_that_cannot_be_built_fails_its_trial_once_with_the_reason(tmp_path):
    study_file = copy_example(tmp_path, searchSpace={"width": {"type": "categorical", "choices": [0]}},
                              trials={"max": 1, "parallel": 1, "maxFailed": 0, "retries": 2})
    import subprocess

    result = subprocess.run([str(STRATA), "run", str(study_file), "--report", str(tmp_path / "r.json")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(EXAMPLE)})
    report = json.loads((tmp_path / "r.json").read_text())

    assert result.returncode != 0 and report["phase"] == "Failed"
    assert len(report["trials"]) == 1  # a configuration that cannot be built is not retried
    from tests.test_cli import journal_trials

    trial = journal_trials(study_file, "custom-model")[0]
    assert "width must be positive" in trial.user_attrs["fail_reason"]
    assert not list((tmp_path / "custom-model.checkpoints").rglob("*.pt"))


# --- the user's own data through strata run ----------------------------------------------------------


def write_images(root: Path, classes: int = 3, per_class: int = 16) -> Path:
    """Noise PNGs of sizes 10-40 px, a zip of class folders with a test/ folder beside train/."""
    import zipfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "images"
    for split, count in (("train", per_class), ("test", 4)):
        for c in range(classes):
            (folder / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                size = int(rng.integers(10, 40))
                # a class-dependent brightness, so there is something to learn
                pixels = np.clip(rng.normal(60 + 60 * c, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / split / f"class{c}" / f"{i}.png")
    archive = root / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder))
    shutil.rmtree(folder)
    return archive


def write_arrays(path: Path, classes: int, n: int = 90) -> Path:
    import numpy as np

    rng = np.random.default_rng(1)
    y = np.arange(n) % classes
    x = np.clip(rng.normal(40 + 50 * y[:, None, None], 25, (n, 12, 12)), 0, 255).astype(np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    return path


@pytest.mark.parametrize("kind", ["imagefolder", "npz"])
def test_the_users_own_images_train_reuse_and_report_test_accuracy_through_strata_run(tmp_path, kind):
    path = write_images(tmp_path) if kind == "imagefolder" else write_arrays(tmp_path / "arrays.npz", classes=3)
    study_file = write_study(
        tmp_path / "study", name=kind,
        searchSpace={"convLayers": {"type": "int", "low": 1, "high": 2}},
        sampler={"name": "grid"}, trials={"max": 2, "parallel": 1},
        training={"dataset": {"name": kind, "path": str(path), "channels": 1 if kind == "npz" else 3},
                  "inputSize": 16, "epochs": 1, "earlyStopPatience": 0, "device": "cpu"})
    report = run(study_file)["report"]
    deeper = max(report["trials"], key=lambda t: t["params"]["convLayers"])

    assert report["phase"] == "Succeeded" and deeper["reused_layers"] == 1
    assert 0 <= report["best"]["test_accuracy"] <= 1  # the test/ folder, or x_test


def test_a_class_count_that_changes_under_a_study_fails_the_next_trial_naming_the_data(tmp_path):
    arrays = write_arrays(tmp_path / "arrays.npz", classes=3)
    study_file = write_study(
        tmp_path / "study", name="drift", searchSpace={"convLayers": {"type": "categorical", "choices": [1, 2]}},
        sampler={"name": "grid"}, trials={"max": 1, "parallel": 1, "maxFailed": 0},
        training={"dataset": {"name": "npz", "path": str(arrays), "channels": 1}, "inputSize": 16, "epochs": 1,
                  "device": "cpu"})
    run(study_file)
    write_arrays(arrays, classes=4)  # the data changes under the study
    document = yaml.safe_load(study_file.read_text())
    document["spec"]["trials"]["max"] = 2
    study_file.write_text(yaml.safe_dump(document))
    import subprocess

    result = subprocess.run([str(STRATA), "run", str(study_file), "--report", str(tmp_path / "r.json")],
                            cwd=study_file.parent, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "r.json").read_text())

    assert result.returncode != 0 and report["phase"] == "Failed"
    from tests.test_cli import journal_trials

    failed = journal_trials(study_file, "drift")[1]
    assert f"{arrays}: 4 classes, but this study's earlier trials had 3" in failed.user_attrs["fail_reason"]
    registry = LayerRegistry(open_object_store(str(study_file.parent / "drift.checkpoints")))
    assert registry.usage("drift")[0] == 1  # only the first trial's prefix: the failed one published nothing
