"""Frozen-prefix outputs shared by the trials of one machine (strata_trainer.features).

Trials reusing the same donor on the same data compute the same frozen outputs; the first stores
them in a folder and the next ones read them. Real Fashion-MNIST, real files; the store may only
ever make a trial faster: a wrong, corrupt or unwritable entry is a miss, never a wrong result.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from strata.spec import Training
from strata_trainer.data import DatasetSplits, load_dataset
from strata_trainer.features import SharedFeatureStore
from strata_trainer.training import TrainResult
from tests.test_trainer import ENOUGH_MEMORY, INPUT, make_arch, seeded_cnn, train, train_reusing, val_losses

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fashion() -> DatasetSplits:
    return load_dataset(Training(subset_size=400, input_size=INPUT))


@pytest.fixture(scope="module")
def donor_state(fashion) -> dict[str, torch.Tensor]:
    donor = seeded_cnn(make_arch(1), seed=1)
    train(donor, fashion, frozen_layers=0, epochs=1, patience=0, seed=1, device=CPU, cache_features=False)
    return donor.prefix_state(1)


def reusing(data: DatasetSplits, donor: dict[str, torch.Tensor], store: SharedFeatureStore | None,
            **options) -> TrainResult:
    options.setdefault("memory_limit", ENOUGH_MEMORY)
    return train_reusing(data, donor, 1, epochs=2, cache_features=True, shared_features=store, **options)[1]


def entries(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def test_a_second_trial_on_the_same_donor_reads_the_first_ones_outputs_and_trains_identically(
        fashion, donor_state, tmp_path):
    store = SharedFeatureStore(tmp_path)

    private = reusing(fashion, donor_state, None)
    first = reusing(fashion, donor_state, store)
    stored = entries(tmp_path)
    second = reusing(fashion, donor_state, store)

    assert (private.shared_features, first.shared_features, second.shared_features) == ("", "stored", "hit")
    assert len(stored) == 2 and all(name.endswith(".npy") for name in stored)  # train and validation split
    assert entries(tmp_path) == stored
    assert val_losses(first) == val_losses(private) and val_losses(second) == val_losses(private)


def test_a_caller_whose_report_stops_training_still_learns_the_cache_outcome(fashion, donor_state, tmp_path):
    store, info = SharedFeatureStore(tmp_path), {}
    reusing(fashion, donor_state, store)

    class Stop(Exception):
        """Any exception from report, as optuna.TrialPruned is."""

    def stop(epoch):
        raise Stop

    with pytest.raises(Stop):
        reusing(fashion, donor_state, store, report=stop, cache_info=info)

    assert info == {"feature_cache": "float32", "shared_features": "hit"}


def test_other_weights_or_other_images_never_get_the_stored_outputs(fashion, donor_state, tmp_path):
    store = SharedFeatureStore(tmp_path)
    reusing(fashion, donor_state, store)
    other_donor = {name: tensor + 0.01 for name, tensor in donor_state.items()}
    other_images = load_dataset(Training(subset_size=300, input_size=INPUT))

    by_other_donor = reusing(fashion, other_donor, store)
    on_other_images = reusing(other_images, donor_state, store)

    assert (by_other_donor.shared_features, on_other_images.shared_features) == ("stored", "stored")
    assert val_losses(by_other_donor) == val_losses(reusing(fashion, other_donor, None))
    assert len(entries(tmp_path)) == 6


def test_the_disk_cache_reads_the_shared_file_in_place_and_leaves_no_private_copy(fashion, donor_state, tmp_path):
    store, spill = SharedFeatureStore(tmp_path / "shared"), tmp_path / "spill"
    spill.mkdir()

    first = reusing(fashion, donor_state, store, memory_limit=1, spill_dir=str(spill))
    second = reusing(fashion, donor_state, store, memory_limit=1, spill_dir=str(spill))

    assert (first.feature_cache, second.feature_cache) == ("disk", "disk")
    assert (first.shared_features, second.shared_features) == ("stored", "hit")
    assert val_losses(second) == val_losses(first)
    assert list(spill.iterdir()) == []
    assert all(np.load(path, mmap_mode="r").dtype == np.float16 for path in (tmp_path / "shared").iterdir())


def test_a_truncated_entry_is_dropped_and_recomputed(fashion, donor_state, tmp_path):
    store = SharedFeatureStore(tmp_path)
    expected = reusing(fashion, donor_state, store)
    for path in tmp_path.iterdir():
        path.write_bytes(path.read_bytes()[:1000])

    result = reusing(fashion, donor_state, store)

    assert result.shared_features == "stored"
    assert val_losses(result) == val_losses(expected)
    assert all(path.stat().st_size > 1000 for path in tmp_path.iterdir())


def test_an_entry_of_the_wrong_shape_is_dropped_not_used(fashion, donor_state, tmp_path):
    store = SharedFeatureStore(tmp_path)
    expected = reusing(fashion, donor_state, store)
    for path in tmp_path.iterdir():
        np.save(path, np.zeros((3, 18, 8, 8), dtype=np.float32))

    result = reusing(fashion, donor_state, store)

    assert result.shared_features == "stored"
    assert val_losses(result) == val_losses(expected)


def test_an_unwritable_store_only_costs_the_sharing(fashion, donor_state, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")

    result = reusing(fashion, donor_state, SharedFeatureStore(not_a_folder))

    assert result.shared_features == "private"
    assert val_losses(result) == val_losses(reusing(fashion, donor_state, None))


def test_the_folder_keeps_to_its_size_by_removing_the_least_recently_used(tmp_path):
    store = SharedFeatureStore(tmp_path, max_bytes=3 * (8000 + 128))
    for index, key in enumerate(["a", "b", "c"]):
        array, partial = store.new_file(key, (1000, 2), np.dtype(np.float32))
        array[:] = index
        assert store.commit(key, array, partial)
        os.utime(store.path(key), (time.time() - 100 + index, time.time() - 100 + index))
    assert store.load("a", (1000, 2), np.dtype(np.float32)) is not None  # a read: "a" is now the most recent

    array, partial = store.new_file("d", (1000, 2), np.dtype(np.float32))
    array[:] = 3
    store.commit("d", array, partial)

    assert entries(tmp_path) == ["a.npy", "c.npy", "d.npy"]
    assert store.load("d", (1000, 2), np.dtype(np.float32))[0, 0] == 3


def test_a_reader_never_sees_a_partly_written_entry(tmp_path):
    store = SharedFeatureStore(tmp_path)
    array, partial = store.new_file("k", (10,), np.dtype(np.float32))

    assert store.load("k", (10,), np.dtype(np.float32)) is None
    store.commit("k", array, partial)
    assert store.load("k", (10,), np.dtype(np.float32)) is not None
    assert entries(tmp_path) == ["k.npy"]
