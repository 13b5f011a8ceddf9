"""The layer registry: prefix signatures, publishing donors, choosing one, and refusing bad checkpoints.

Registry tests run on both object stores (a folder, and S3 over HTTP) through the object_store fixture.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

import pytest

from strata.families import ConvLayerSpec, architecture_from_params
from strata.objectstore import ObjectNotFound, ObjectStoreError, open_object_store
from strata.registry import CorruptCheckpoint, LayerRegistry
from strata.spec import StudySpec, parse_spec

# The paper's biggest SMALL-space network, on Fashion-MNIST padded to 32x32.
BIGGEST = {"convLayers": 3, "filters": 18, "kernelSize": 3, "fcLayout": "500-250"}


def study_spec(dataset: str = "fashion-mnist", input_size: int | None = 32) -> StudySpec:
    training: dict[str, Any] = {"dataset": {"name": dataset}}
    if input_size is not None:
        training["inputSize"] = input_size
    return parse_spec({"searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 3}},
                       "trials": {"max": 10}, "training": training})


def signature(k: int = 2, spec: StudySpec | None = None, **params: Any):
    return architecture_from_params(spec or study_spec(), {**BIGGEST, **params}).prefix_signature(k)


# --- architectures of the paper's SMALL space -----------------------------------------------------


def test_the_biggest_small_space_network_has_three_18_filter_conv_layers_on_one_channel():
    arch = architecture_from_params(study_spec(), BIGGEST)

    assert arch.input_shape == (1, 32, 32)
    assert arch.units == (
        ConvLayerSpec(in_channels=1, out_channels=18, kernel=3, padding=1),
        ConvLayerSpec(in_channels=18, out_channels=18, kernel=3, padding=1),
        ConvLayerSpec(in_channels=18, out_channels=18, kernel=3, padding=1),
    )
    assert arch.head["fc_units"] == (500, 250)
    assert [arch.feature_shape(k) for k in (1, 2, 3)] == [(18, 16, 16), (18, 8, 8), (18, 4, 4)]
    assert arch.num_classes == 10


def test_a_one_layer_network_with_a_5x5_kernel_and_no_hidden_fc_layer():
    arch = architecture_from_params(study_spec(), {"convLayers": 1, "filters": 6, "kernelSize": 5, "fcLayout": "none"})

    assert arch.units == (ConvLayerSpec(in_channels=1, out_channels=6, kernel=5, padding=2),)
    assert arch.head["fc_units"] == ()
    assert arch.feature_shape(1) == (6, 16, 16)


def test_fc_layers_and_units_give_equal_hidden_layers_and_defaults_fill_the_rest():
    arch = architecture_from_params(study_spec(), {"convLayers": 2, "fcLayers": 2, "fcUnits": 100})

    assert arch.head["fc_units"] == (100, 100)
    assert [(c.in_channels, c.out_channels, c.kernel) for c in arch.units] == [(1, 18, 3), (18, 18, 3)]
    assert (arch.training.learning_rate, arch.training.batch_size, arch.training.optimizer) == (1e-3, 32, "adam")


def test_without_input_size_fashion_mnist_keeps_its_native_28x28():
    arch = architecture_from_params(study_spec(input_size=None), BIGGEST)

    assert arch.input_shape == (1, 28, 28)
    assert arch.feature_shape(3) == (18, 3, 3)


@pytest.mark.parametrize("k", [0, 4])
def test_a_prefix_longer_than_the_network_or_empty_is_refused(k):
    with pytest.raises(ValueError, match="prefix length"):
        architecture_from_params(study_spec(), BIGGEST).prefix_signature(k)


# --- prefix signature keys ----------------------------------------------------------------------------


def test_conv_layers_alone_decide_the_key_not_fc_learning_rate_batch_or_optimizer():
    other_head = signature(fcLayout="none", learningRate=0.1, batchSize=256, optimizer="sgd")

    assert other_head.key == signature().key
    assert other_head == signature()


def test_the_first_k_layers_of_a_deeper_network_share_the_shallower_networks_key():
    assert signature(k=2, convLayers=3).key == signature(k=2, convLayers=2).key


def test_the_key_is_path_safe_and_stable_across_releases():
    # Changing how keys are computed orphans every registry already written: pin one.
    assert signature(k=2).key == "d2-5eeb93419df54ef3bb81532f"
    assert re.fullmatch(r"d[0-9]+-[0-9a-f]{24}", signature(k=1).key)


@pytest.mark.parametrize("different", [
    pytest.param(lambda: signature(filters=12), id="filters"),
    pytest.param(lambda: signature(kernelSize=5), id="kernel"),
    pytest.param(lambda: signature(spec=study_spec(dataset="mnist")), id="dataset"),
    pytest.param(lambda: signature(spec=study_spec(input_size=64)), id="input-size"),
    pytest.param(lambda: signature(k=3), id="depth"),
    pytest.param(lambda: signature(k=1), id="shallower"),
])
def test_anything_that_changes_the_conv_weights_changes_the_key(different):
    assert different().key != signature().key


def test_a_dataset_with_other_channels_changes_the_first_layer_and_the_key():
    cifar = signature(spec=study_spec(dataset="cifar10"))

    assert cifar.layers[0].in_channels == 3
    assert cifar.key != signature().key


# --- publishing and finding donors, on both stores ------------------------------------------------------


def publish(registry: LayerRegistry, sig, trial: int, val_loss: float, epochs: int = 5, study: str = "fmnist",
            weights: bytes | None = None):
    return registry.publish(sig, weights if weights is not None else f"weights of trial {trial}".encode(),
                            study=study, trial_number=trial, val_loss=val_loss, epochs=epochs)


def test_a_published_prefix_is_a_donor_and_the_lowest_val_loss_is_the_best(object_store):
    registry, sig = LayerRegistry(object_store), signature()
    for trial, loss in [(0, 0.61), (1, 0.42), (2, 0.55)]:
        publish(registry, sig, trial, loss)

    assert sorted(d.trial_number for d in registry.donors(sig)) == [0, 1, 2]
    best = registry.best_donor(sig)
    assert (best.trial_number, best.val_loss, best.study) == (1, 0.42, "fmnist")
    assert best.signature_key == sig.key and best.depth == 2
    assert registry.load_weights(best) == b"weights of trial 1"


def test_a_registry_without_donors_for_a_signature_has_no_best_donor(object_store):
    registry = LayerRegistry(object_store)
    publish(registry, signature(k=1), 0, 0.3)

    assert registry.donors(signature(k=2)) == []
    assert registry.best_donor(signature(k=2)) is None
    assert not registry.has_donor(signature(k=2))


def test_min_epochs_leaves_out_under_trained_donors(object_store):
    registry, sig = LayerRegistry(object_store), signature()
    publish(registry, sig, 0, val_loss=0.2, epochs=1)  # best loss, but barely trained
    publish(registry, sig, 1, val_loss=0.4, epochs=5)

    assert registry.best_donor(sig, min_epochs=1).trial_number == 0
    assert registry.best_donor(sig, min_epochs=3).trial_number == 1
    assert registry.best_donor(sig, min_epochs=6) is None
    assert not registry.has_donor(sig, min_epochs=6)


def test_donors_with_a_nan_loss_or_excluded_entries_are_not_chosen(object_store):
    registry, sig = LayerRegistry(object_store), signature()
    diverged = publish(registry, sig, 0, val_loss=math.nan)
    first = publish(registry, sig, 1, val_loss=0.3)
    publish(registry, sig, 2, val_loss=0.5)

    assert registry.best_donor(sig).trial_number == 1
    assert registry.best_donor(sig, exclude={first.entry}).trial_number == 2
    assert registry.best_donor(sig, exclude={first.entry}).entry != diverged.entry


def test_the_signature_is_stored_beside_its_donors(object_store):
    sig = signature()
    publish(LayerRegistry(object_store), sig, 0, 0.5)

    stored = json.loads(object_store.get_bytes(f"layers/{sig.key}/signature.json"))
    assert stored == sig.canonical()


def test_weights_written_without_meta_json_are_invisible(object_store):
    registry, sig = LayerRegistry(object_store), signature()
    # A trainer that crashed after uploading weights but before committing meta.json.
    object_store.put_bytes(f"layers/{sig.key}/fmnist-t7/weights.pt", b"uncommitted weights")

    assert registry.donors(sig) == []
    assert registry.best_donor(sig) is None

    publish(registry, sig, 8, 0.9)
    assert [d.trial_number for d in registry.donors(sig)] == [8]


def test_unreadable_meta_json_is_skipped_with_a_warning(object_store, caplog):
    registry, sig = LayerRegistry(object_store), signature()
    publish(registry, sig, 0, 0.5)
    object_store.put_bytes(f"layers/{sig.key}/fmnist-t1/weights.pt", b"w")
    object_store.put_bytes(f"layers/{sig.key}/fmnist-t1/meta.json", b"{not json")

    with caplog.at_level(logging.WARNING, logger="strata.registry"):
        donors = registry.donors(sig)

    assert [d.trial_number for d in donors] == [0]
    assert "fmnist-t1/meta.json" in caplog.text


def test_load_weights_refuses_weights_that_do_not_match_their_sha256(object_store):
    registry = LayerRegistry(object_store)
    donor = publish(registry, signature(), 0, 0.5, weights=b"\x00trained weights\xff")
    object_store.put_bytes(donor.weights_key, b"\x00trained weightz\xff")  # same size, one byte changed

    with pytest.raises(CorruptCheckpoint, match="sha256") as raised:
        registry.load_weights(donor)
    assert isinstance(raised.value, ObjectStoreError)


def test_load_weights_of_a_deleted_donor_raises_object_not_found(object_store):
    registry = LayerRegistry(object_store)
    donor = publish(registry, signature(), 0, 0.5)
    object_store.delete(donor.weights_key)

    with pytest.raises(ObjectNotFound):
        registry.load_weights(donor)


def test_usage_counts_weight_objects_and_their_bytes(object_store):
    registry = LayerRegistry(object_store)
    assert registry.usage() == (0, 0)

    publish(registry, signature(k=1), 0, 0.5, weights=b"a" * 100)
    publish(registry, signature(k=2), 0, 0.5, weights=b"b" * 250)
    publish(registry, signature(k=2), 1, 0.4, weights=b"c" * 50)

    assert registry.usage() == (3, 400)


def test_usage_of_a_study_counts_only_what_it_published(object_store):
    registry = LayerRegistry(object_store)
    publish(registry, signature(k=1), 0, 0.5, study="ns.a", weights=b"a" * 100)
    publish(registry, signature(k=2), 0, 0.5, study="ns.a", weights=b"b" * 250)
    publish(registry, signature(k=2), 0, 0.4, study="ns.a-tpe", weights=b"c" * 50)  # starts like "ns.a-t"

    assert registry.usage(study="ns.a") == (2, 350)
    assert registry.usage(study="ns.a-tpe") == (1, 50)
    assert registry.usage(study="ns.other") == (0, 0)
    assert registry.usage() == (3, 400)


def test_removing_a_study_deletes_its_entries_and_keeps_the_others(object_store):
    registry = LayerRegistry(object_store)
    publish(registry, signature(k=1), 0, 0.5, study="ns.a")
    publish(registry, signature(k=2), 1, 0.3, study="ns.a")
    kept = publish(registry, signature(k=2), 0, 0.4, study="ns.a-tpe")

    assert registry.remove_study("ns.a") == 2

    assert registry.best_donor(signature(k=2)) == kept
    assert registry.best_donor(signature(k=1)) is None
    assert [info.key for info in object_store.list("layers/") if not info.key.endswith("signature.json")] == \
        sorted([f"{kept.entry}/meta.json", kept.weights_key])
    assert LayerRegistry(object_store).remove_study("ns.a") == 0


def test_two_registries_on_the_same_store_see_each_others_donors(store_location, object_store):
    trainer_a = LayerRegistry(object_store)
    trainer_b = LayerRegistry(open_object_store(store_location))
    sig = signature()

    publish(trainer_a, sig, 0, 0.5, study="study-a")
    publish(trainer_b, sig, 0, 0.3, study="study-b")

    for registry in (trainer_a, trainer_b):
        assert sorted(d.study for d in registry.donors(sig)) == ["study-a", "study-b"]
        best = registry.best_donor(sig)
        assert best.study == "study-b"
        assert registry.load_weights(best) == b"weights of trial 0"


class CrashBeforeMeta:
    """The store as a trainer sees it when it dies after uploading weights, before committing meta.json."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith("/meta.json"):
            raise ObjectStoreError("simulated crash before meta.json")
        self.store.put_bytes(key, data)


# Bug (reported): a retried trial republishes under the same entry, so its weights overwrite the
# committed ones before its meta.json does; a crash in between leaves a visible donor whose weights
# no longer match its sha256 (and concurrent readers see CorruptCheckpoint in that window).
def test_a_crash_while_republishing_a_trial_keeps_the_committed_donor_loadable(object_store):
    registry, sig = LayerRegistry(object_store), signature()
    publish(registry, sig, 3, 0.5, weights=b"first attempt")

    with pytest.raises(ObjectStoreError, match="simulated crash"):
        publish(LayerRegistry(CrashBeforeMeta(object_store)), sig, 3, 0.4, weights=b"second attempt")

    assert registry.load_weights(registry.best_donor(sig)) == b"first attempt"


class CountingReads:
    """The store, counting the objects read (GET) by key."""

    def __init__(self, store):
        self.store, self.reads = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def get_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return self.store.get_bytes(key)


def test_repeated_lookups_read_each_donors_metadata_once_and_still_see_new_and_removed_donors(object_store):
    reader, writer, sig = LayerRegistry(CountingReads(object_store)), LayerRegistry(object_store), signature()
    for trial, loss in [(0, 0.61), (1, 0.42)]:
        publish(writer, sig, trial, loss)

    for _ in range(5):
        assert reader.best_donor(sig).trial_number == 1
    assert len(reader.store.reads) == 2  # one meta.json each, not one per lookup

    publish(writer, sig, 2, 0.30)  # another trainer's newer donor is seen at the next lookup
    assert reader.best_donor(sig).trial_number == 2
    assert len(reader.store.reads) == 3

    best = reader.best_donor(sig)
    object_store.delete(f"{best.entry}/meta.json")  # an operator cleaning the bucket
    assert reader.best_donor(sig).trial_number == 1
