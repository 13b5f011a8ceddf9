"""The trainer: the paper's CNN family, frozen reused prefixes, the feature cache, checkpoints,
donor lookup in the layer registry, and one trial end to end as the process a pod runs.

Real services only: Fashion-MNIST from the Debian package, the registry on a folder and on S3 over
HTTP, Optuna on PostgreSQL, and `python -m strata_trainer` as a subprocess where the process itself
matters (its exit code, its environment); elsewhere its main() or run_trial() in-process, to spare
a torch start-up per trial.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch

from strata.families import Architecture, architecture_from_params
from strata.objectstore import ObjectStore, open_object_store
from strata.registry import DonorMeta, LayerRegistry
from strata.scheduler import TrialScheduler
from strata.spec import StudySpec, Training, parse_spec
from strata.study import create_or_load_study, distributions
from strata_trainer.__main__ import main as trainer_main
from strata_trainer.checkpoints import prefix_from_bytes, prefix_to_bytes
from strata_trainer.data import DatasetSplits, load_dataset
from strata_trainer.models import StagedModel, build_model
from strata_trainer.resources import configure_threads, cpu_limit, memory_limit
from strata_trainer.training import TrainResult, choose_cache_mode, train
from strata_trainer.trial import (
    EXIT_COMPLETE, EXIT_FAILED, EXIT_PRUNED, EXIT_USAGE, find_reusable_prefix, open_registry, publish_prefixes,
    run_trial,
)
from tests.services import free_port, wait_for

CPU = torch.device("cpu")
FC_LAYOUTS = {"500-250": (500, 250), "none": (), "50": (50,)}  # the paper's family: 0-2 hidden FC layers
INPUT = 16  # Fashion-MNIST area-downscaled to 16x16: three conv blocks still leave 2x2 features
ENOUGH_MEMORY = 1 << 40  # a memory limit under which every cache fits in float32


def make_spec(*, input_size: int = INPUT, dataset: str = "fashion-mnist", search_space: dict | None = None,
              checkpoints: str | None = None, pruner: dict | None = None, epochs: int = 2) -> StudySpec:
    document: dict[str, Any] = {
        "searchSpace": search_space or {"convLayers": {"type": "int", "low": 1, "high": 3}},
        "trials": {"max": 20},
        "training": {"dataset": {"name": dataset}, "inputSize": input_size, "subsetSize": 400, "epochs": epochs,
                     "earlyStopPatience": 0, "seed": 0, "device": "cpu"},
    }
    if checkpoints:
        document["storage"] = {"checkpoints": checkpoints}
    if pruner:
        document["pruner"] = pruner
    return parse_spec(document)


def make_arch(conv_layers: int, *, filters: int = 18, fc_layout: str = "50",
              spec: StudySpec | None = None) -> Architecture:
    return architecture_from_params(spec or make_spec(), {"convLayers": conv_layers, "filters": filters,
                                                          "fcLayout": fc_layout})


def make_model(conv_layers: int, **kwargs: Any) -> StagedModel:
    return build_model(make_arch(conv_layers, **kwargs), 10)


def seeded_cnn(arch: Architecture, seed: int) -> StagedModel:
    torch.manual_seed(seed)
    return build_model(arch, 10)


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name} differs"


def val_losses(result: TrainResult) -> list[float]:
    return [epoch.val_loss for epoch in result.epochs]


@pytest.fixture(scope="module")
def fashion() -> DatasetSplits:
    """400 real Fashion-MNIST images at 16x16: 320 to train on, 80 to validate."""
    return load_dataset(Training(subset_size=400, input_size=INPUT))


@pytest.fixture
def restore_torch_threads():
    """The trainer sets torch's thread count from STRATA_CPU_LIMIT; give the test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train_reusing(data: DatasetSplits, donor_state: dict[str, torch.Tensor], frozen: int, *, conv_layers: int = 2,
                  epochs: int = 2, seed: int = 7, **options: Any) -> tuple[StagedModel, TrainResult]:
    """A network whose first `frozen` blocks are the donor's, trained as a reusing trial trains it."""
    model = seeded_cnn(make_arch(conv_layers), seed)
    model.load_prefix(donor_state, frozen)
    model.freeze_prefix(frozen)
    options.setdefault("cache_features", False)
    result = train(model, data, frozen_layers=frozen, epochs=epochs, patience=0, seed=0, device=CPU, **options)
    return model, result


# --- the paper's CNN family ---------------------------------------------------------------------


@pytest.mark.parametrize("fc_layout", FC_LAYOUTS)
@pytest.mark.parametrize("conv_layers", [1, 2, 3])
def test_every_network_of_the_family_maps_a_batch_of_images_to_ten_logits(conv_layers, fc_layout):
    arch = make_arch(conv_layers, fc_layout=fc_layout, spec=make_spec(input_size=32))
    model = build_model(arch, 10)

    assert model(torch.randn(5, 1, 32, 32)).shape == (5, 10)
    blocks = [(b[0].in_channels, b[0].out_channels, b[0].kernel_size, b[0].padding) for b in model.units]
    assert blocks == [(1, 18, (3, 3), (1, 1))] + [(18, 18, (3, 3), (1, 1))] * (conv_layers - 1)
    flat = 18 * (32 >> conv_layers) ** 2
    widths = [flat, *FC_LAYOUTS[fc_layout], 10]
    linear = [(m.in_features, m.out_features) for m in model.head if isinstance(m, torch.nn.Linear)]
    assert linear == list(zip(widths, widths[1:]))


def test_a_colour_dataset_feeds_three_channels_into_the_first_conv_block_only():
    model = build_model(make_arch(3, filters=32, spec=make_spec(dataset="cifar10", input_size=32)), 10)

    assert [(b[0].in_channels, b[0].out_channels) for b in model.units] == [(3, 32), (32, 32), (32, 32)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("input_size", [16, 28, 32])
def test_feature_shape_is_the_shape_of_the_tensor_after_k_conv_blocks(input_size):
    arch = make_arch(3, spec=make_spec(input_size=input_size))
    model = build_model(arch, 10)
    x = torch.randn(3, 1, input_size, input_size)

    for k in range(4):
        assert tuple(model.features(x, 0, k).shape) == (3, *arch.feature_shape(k)), f"after {k} blocks"


@pytest.mark.parametrize("k", [1, 2])
def test_forward_from_the_features_of_k_blocks_equals_the_forward_from_the_image(k):
    model = seeded_cnn(make_arch(3, fc_layout="500-250"), seed=3).eval()
    x = torch.randn(4, 1, INPUT, INPUT)

    with torch.no_grad():
        assert torch.equal(model(model.features(x, 0, k), start=k), model(x))


# --- freezing a reused prefix -------------------------------------------------------------------


@pytest.mark.parametrize("conv_layers,frozen", [(2, 1), (3, 2)])
def test_a_frozen_prefix_keeps_the_donors_weights_bit_for_bit_while_the_rest_learns(fashion, conv_layers, frozen):
    donor = seeded_cnn(make_arch(frozen), seed=1)
    train(donor, fashion, frozen_layers=0, epochs=1, patience=0, seed=1, device=CPU, cache_features=False)
    donor_state = donor.prefix_state(frozen)
    model = seeded_cnn(make_arch(conv_layers), seed=2)
    model.load_prefix(donor_state, frozen)
    model.freeze_prefix(frozen)
    frozen_params = {id(p) for p in model.units[:frozen].parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters()} - frozen_params
    result = train(model, fashion, frozen_layers=frozen, epochs=2, patience=0, seed=0, device=CPU,
                   cache_features=False)

    assert_same_tensors(model.prefix_state(frozen), donor_state)
    assert_same_tensors({k: v for k, v in result.best_prefix_state.items() if int(k.split(".")[0]) < frozen}, donor_state)
    for p in model.units[:frozen].parameters():
        assert p.requires_grad is False and p.grad is None  # never in a backward pass, so never in the optimizer
    assert not any(block.training for block in model.units[:frozen])  # stays in eval mode through model.train()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    expected = [name for name, p in model.named_parameters() if id(p) not in frozen_params]
    assert changed == expected


# --- the frozen-feature cache -------------------------------------------------------------------


@pytest.fixture(scope="module")
def donor_state(fashion) -> dict[str, torch.Tensor]:
    """A trained one-layer donor's conv block."""
    donor = seeded_cnn(make_arch(1), seed=1)
    train(donor, fashion, frozen_layers=0, epochs=1, patience=0, seed=1, device=CPU, cache_features=False)
    return donor.prefix_state(1)


@pytest.fixture(scope="module")
def float32_cached(fashion, donor_state) -> TrainResult:
    return train_reusing(fashion, donor_state, 1, epochs=3, cache_features=True, memory_limit=ENOUGH_MEMORY)[1]


def test_cached_float32_features_train_like_recomputing_the_frozen_prefix(fashion, donor_state, float32_cached):
    _, recomputed = train_reusing(fashion, donor_state, 1, epochs=3, cache_features=False)

    assert (recomputed.feature_cache, float32_cached.feature_cache) == ("off", "float32")
    np.testing.assert_allclose(val_losses(float32_cached), val_losses(recomputed), rtol=1e-4)
    np.testing.assert_allclose([e.train_loss for e in float32_cached.epochs],
                               [e.train_loss for e in recomputed.epochs], rtol=1e-4)


def test_nothing_is_cached_without_a_frozen_prefix(fashion):
    result = train(seeded_cnn(make_arch(2), 0), fashion, frozen_layers=0, epochs=1, patience=0, seed=0, device=CPU,
                   cache_features=True, memory_limit=ENOUGH_MEMORY)

    assert result.feature_cache == "off"


def test_the_cache_falls_from_float32_to_float16_to_disk_as_the_memory_limit_shrinks():
    model = build_model(make_arch(3), 10)
    images = 100
    float32_bytes = images * 18 * 8 * 8 * 4  # one block on 16x16: 18 maps of 8x8 per image
    # The cache may take half the limit; the rest is for the model and the batches.
    assert choose_cache_mode(model, 1, images, 2 * float32_bytes) == "float32"
    assert choose_cache_mode(model, 1, images, 2 * float32_bytes - 2) == "float16"
    assert choose_cache_mode(model, 1, images, float32_bytes) == "float16"
    assert choose_cache_mode(model, 1, images, float32_bytes - 2) == "disk"
    assert choose_cache_mode(model, 1, images, 1) == "disk"
    # Two blocks pool to a quarter of the features: the same limit holds them in float32.
    assert choose_cache_mode(model, 2, images, float32_bytes // 2) == "float32"


@pytest.mark.parametrize("mode", ["float16", "disk"])
def test_half_precision_and_disk_caches_train_close_to_the_float32_cache(fashion, donor_state, float32_cached,
                                                                        mode, tmp_path):
    float32_bytes = (len(fashion.train) + len(fashion.val)) * 18 * 8 * 8 * 4
    limit = {"float16": float32_bytes, "disk": float32_bytes // 4}[mode]

    _, result = train_reusing(fashion, donor_state, 1, epochs=3, cache_features=True, memory_limit=limit,
                              spill_dir=str(tmp_path))

    assert result.feature_cache == mode
    np.testing.assert_allclose(val_losses(result), val_losses(float32_cached), rtol=2e-2)


def test_the_disk_cache_is_a_file_in_the_spill_dir_only_while_the_trial_trains(fashion, donor_state, tmp_path):
    during: list[list[str]] = []

    _, result = train_reusing(fashion, donor_state, 1, cache_features=True, memory_limit=1, spill_dir=str(tmp_path),
                              report=lambda epoch: during.append(sorted(p.name for p in tmp_path.iterdir())))

    assert result.feature_cache == "disk"
    assert len(during[0]) == 2 and all(name.startswith("strata-features-") for name in during[0])  # train, val
    assert list(tmp_path.iterdir()) == []


def test_a_pruned_trial_leaves_no_disk_cache_behind(fashion, donor_state, tmp_path):
    def prune(epoch):
        raise optuna.TrialPruned(f"pruned at epoch {epoch.epoch}")

    try:
        train_reusing(fashion, donor_state, 1, cache_features=True, memory_limit=1, spill_dir=str(tmp_path),
                      report=prune)
        pytest.fail("the report callback's TrialPruned must stop training")
    except optuna.TrialPruned:
        pass  # not `pytest.raises`: its ExceptionInfo would keep the training frame (and the cache) alive

    assert list(tmp_path.iterdir()) == []


# --- checkpoints --------------------------------------------------------------------------------


class RunsAShellCommand:
    """Pickles as a call to os.system: what a hostile weights.pt in a shared bucket could hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def code_executing_checkpoint(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"0.0.weight": RunsAShellCommand(f"touch {marker}")}, buffer)
    return buffer.getvalue()


def test_a_prefix_survives_the_round_trip_through_bytes():
    state = seeded_cnn(make_arch(3), seed=5).prefix_state(2)

    loaded = prefix_from_bytes(prefix_to_bytes(state))

    assert sorted(loaded) == ["0.0.bias", "0.0.weight", "1.0.bias", "1.0.weight"]
    assert_same_tensors(loaded, state)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = code_executing_checkpoint(marker)

    with pytest.raises(ValueError, match="weights-only"):
        prefix_from_bytes(payload)
    assert not marker.exists()

    # The payload is live: an unrestricted load would have run the command.
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_bytes_that_are_not_a_checkpoint_are_refused_with_a_value_error(damage):
    good = prefix_to_bytes(seeded_cnn(make_arch(1), seed=0).prefix_state(1))
    data = {"garbage": b"not a checkpoint" * 10, "truncated": good[: len(good) // 2], "empty": b""}[damage]

    with pytest.raises(ValueError):
        prefix_from_bytes(data)


@pytest.mark.parametrize("content", [[torch.zeros(3)], {"0.0.weight": 1}])
def test_a_checkpoint_that_is_not_a_state_dict_of_tensors_is_refused(content):
    buffer = io.BytesIO()
    torch.save(content, buffer)

    with pytest.raises(ValueError, match="state dict of tensors"):
        prefix_from_bytes(buffer.getvalue())


def test_a_prefix_with_other_shapes_is_refused_and_the_network_keeps_its_weights():
    model = seeded_cnn(make_arch(2, filters=18), seed=0)
    before = model.prefix_state(2)
    narrower = seeded_cnn(make_arch(2, filters=8), seed=1).prefix_state(2)

    with pytest.raises(ValueError, match=r"prefix tensor 0\.0\.bias: shape \(8,\) != \(18,\)"):
        model.load_prefix(narrower, 2)
    assert_same_tensors(model.prefix_state(2), before)


def test_a_prefix_of_another_depth_is_refused_by_its_keys():
    model = build_model(make_arch(3), 10)

    with pytest.raises(ValueError, match="prefix keys"):
        model.load_prefix(seeded_cnn(make_arch(1), seed=0).prefix_state(1), 2)


# --- finding a donor in the layer registry ------------------------------------------------------


def publish(registry: LayerRegistry, k: int, *, seed: int, val_loss: float, epochs: int = 3,
            trial: int | None = None) -> tuple[DonorMeta, dict[str, torch.Tensor]]:
    """A k-layer prefix (weights from `seed`) published as trial `trial` (default: the seed) of study s."""
    state = seeded_cnn(make_arch(k), seed).prefix_state(k)
    meta = registry.publish(make_arch(k).prefix_signature(k), prefix_to_bytes(state), study="s",
                            trial_number=seed if trial is None else trial, val_loss=val_loss, epochs=epochs)
    return meta, state


@pytest.fixture
def registry(object_store: ObjectStore) -> LayerRegistry:
    return LayerRegistry(object_store)


def tamper(store: ObjectStore, donor: DonorMeta) -> None:
    """Overwrite a committed donor's weights behind the registry's back (a valid file, another sha)."""
    store.put_bytes(donor.weights_key, prefix_to_bytes(seeded_cnn(make_arch(donor.depth), 99).prefix_state(donor.depth)))


def test_the_longest_reusable_prefix_below_the_networks_depth_wins_and_its_best_donor(registry):
    publish(registry, 1, seed=1, val_loss=0.2)
    publish(registry, 2, seed=2, val_loss=0.5)
    _, best_two = publish(registry, 2, seed=3, val_loss=0.4)
    publish(registry, 3, seed=4, val_loss=0.1)  # a whole network is never reused, however good

    reused = find_reusable_prefix(registry, make_model(3), min_epochs=1)

    assert (reused.layers, reused.donor.trial_number, reused.donor.val_loss) == (2, 3, 0.4)
    assert_same_tensors(reused.state, best_two)
    # A two-layer network may only reuse one layer.
    shallower = find_reusable_prefix(registry, make_model(2), min_epochs=1)
    assert (shallower.layers, shallower.donor.trial_number) == (1, 1)
    # Another filter count is another signature: nothing to reuse.
    assert find_reusable_prefix(registry, make_model(3, filters=32), 1) is None
    assert find_reusable_prefix(registry, make_model(1), 1) is None


def test_donors_trained_fewer_epochs_than_required_are_passed_over(registry):
    publish(registry, 1, seed=1, val_loss=0.6, epochs=5)
    publish(registry, 2, seed=2, val_loss=0.3, epochs=1)
    publish(registry, 2, seed=3, val_loss=0.4, epochs=3)

    assert find_reusable_prefix(registry, make_model(3), min_epochs=1).donor.trial_number == 2
    assert find_reusable_prefix(registry, make_model(3), min_epochs=2).donor.trial_number == 3
    only_one_layer = find_reusable_prefix(registry, make_model(3), min_epochs=4)
    assert (only_one_layer.layers, only_one_layer.donor.trial_number) == (1, 1)
    assert find_reusable_prefix(registry, make_model(3), min_epochs=6) is None


def test_a_tampered_donor_is_refused_for_the_next_best(registry, object_store, caplog):
    best, _ = publish(registry, 2, seed=2, val_loss=0.3)
    _, second = publish(registry, 2, seed=3, val_loss=0.4)
    tamper(object_store, best)

    reused = find_reusable_prefix(registry, make_model(3), min_epochs=1)

    assert (reused.layers, reused.donor.trial_number) == (2, 3)
    assert_same_tensors(reused.state, second)
    assert f"refusing {best.entry}" in caplog.text and "sha256" in caplog.text


def test_when_every_donor_of_a_length_is_corrupt_a_shorter_prefix_is_reused(registry, object_store):
    _, one = publish(registry, 1, seed=1, val_loss=0.9)
    for seed in (2, 3):
        tamper(object_store, publish(registry, 2, seed=seed, val_loss=0.1 * seed)[0])

    reused = find_reusable_prefix(registry, make_model(3), min_epochs=1)

    assert reused.layers == 1
    assert_same_tensors(reused.state, one)


def test_when_every_donor_is_corrupt_the_trial_reuses_nothing(registry, object_store):
    for k, seed in ((1, 1), (2, 2), (2, 3)):
        tamper(object_store, publish(registry, k, seed=seed, val_loss=0.5)[0])

    assert find_reusable_prefix(registry, make_model(3), min_epochs=1) is None


def test_a_donor_whose_weights_would_run_code_is_refused_for_the_next_best(registry, tmp_path, caplog):
    # Published through the registry, so its sha256 matches: only the weights-only load stands in the way.
    marker = tmp_path / "pwned"
    hostile = registry.publish(make_arch(2).prefix_signature(2), code_executing_checkpoint(marker), study="s",
                               trial_number=66, val_loss=0.01, epochs=3)
    _, honest = publish(registry, 2, seed=3, val_loss=0.4)

    reused = find_reusable_prefix(registry, make_model(3), min_epochs=1)

    assert not marker.exists()
    assert (reused.layers, reused.donor.trial_number) == (2, 3)
    assert_same_tensors(reused.state, honest)
    assert f"refusing {hostile.entry}" in caplog.text


def closed_port_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # free a moment ago: nothing listens there


def test_an_unreachable_s3_store_opens_no_registry_and_reuses_nothing(monkeypatch, caplog):
    monkeypatch.setenv("STRATA_S3_ENDPOINT", closed_port_endpoint())
    started = time.monotonic()

    assert open_registry(make_spec(checkpoints="s3://strata-layers"), None) is None
    assert "layer registry unreachable" in caplog.text
    caplog.clear()
    # A store that goes away after the registry was opened: the lookup gives up, it does not raise.
    gone = LayerRegistry(open_object_store("s3://strata-layers/prefix", create=False))
    assert find_reusable_prefix(gone, make_model(3), min_epochs=1) is None
    assert "layer registry unreachable" in caplog.text
    assert time.monotonic() - started < 10  # bounded retries: seconds, not minutes


# --- publishing a trained network's prefixes ----------------------------------------------------


@pytest.mark.parametrize("reused", [0, 1, 2])
def test_a_trained_network_publishes_each_prefix_longer_than_the_one_it_reused(registry, reused):
    arch = make_arch(3)
    trained = seeded_cnn(arch, seed=4)

    count = publish_prefixes(registry, arch, trained.prefix_state(3), reused, study="s", trial=7, val_loss=0.5,
                             epochs=2)

    assert count == 3 - reused
    for k in range(1, 4):
        donors = registry.donors(arch.prefix_signature(k))
        if k <= reused:
            assert donors == [], f"the {k}-layer prefix is the donor's, already published"
            continue
        assert [(d.depth, d.study, d.trial_number, d.val_loss, d.epochs) for d in donors] == [(k, "s", 7, 0.5, 2)]
        fresh = build_model(make_arch(k), 10)
        fresh.load_prefix(prefix_from_bytes(registry.load_weights(donors[0])), k)
        assert_same_tensors(fresh.prefix_state(k), trained.prefix_state(k))


# --- resources ----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit,threads", [("1.5", 2), ("1", 1), ("0.25", 1), ("4", 4)])
def test_the_pods_cpu_limit_rounds_up_to_whole_torch_threads(monkeypatch, restore_torch_threads, limit, threads):
    monkeypatch.setenv("STRATA_CPU_LIMIT", limit)

    assert cpu_limit() == threads
    assert configure_threads() == threads
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("limit,expected", [("2147483648", 2 << 30), ("1.5e9", 1_500_000_000)])
def test_the_memory_limit_is_read_in_bytes_from_strata_memory_limit(monkeypatch, limit, expected):
    monkeypatch.setenv("STRATA_MEMORY_LIMIT", limit)

    assert memory_limit() == expected


# --- one trial end to end: python -m strata_trainer on PostgreSQL and S3 ------------------------

E2E_SPACE = {
    "convLayers": {"type": "int", "low": 1, "high": 2},
    "filters": {"type": "categorical", "choices": [18]},
    "fcLayout": {"type": "categorical", "choices": ["50"]},
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    "learningRate": {"type": "categorical", "choices": [1e-3, 1e-6, 1e9]},
}
GOOD = {"convLayers": 1, "filters": 18, "fcLayout": "50", "optimizer": "adam", "learningRate": 1e-3}


def new_study(spec: StudySpec, url: str, name: str = "fashion-e2e") -> optuna.Study:
    return create_or_load_study(spec, name, url)


def ask(study: optuna.Study, spec: StudySpec, **params: Any) -> int:
    """Ask a trial with these params, as the scheduler does: it is RUNNING, waiting for its trainer."""
    study.enqueue_trial(params)
    return study.ask(distributions(spec)).number


def run_trainer(url: str, study: str, number: int, workdir: Path, **env: str) -> subprocess.CompletedProcess:
    """The trainer as a pod runs it: one process, one CPU, the spill dir in workdir."""
    env = {**os.environ, "STRATA_CPU_LIMIT": "1", "STRATA_SPILL_DIR": str(workdir), "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run([sys.executable, "-m", "strata_trainer", "--storage", url, "--study", study,
                           "--trial", str(number)], env=env, cwd=workdir, capture_output=True, text=True, timeout=180)


def trial(url: str, study: str, number: int) -> optuna.trial.FrozenTrial:
    return optuna.load_study(study_name=study, storage=url).trials[number]


def test_trials_run_as_processes_reuse_a_donors_layer_publish_and_never_train_twice(postgres_url, s3_bucket,
                                                                                   tmp_path, caplog):
    spec = make_spec(search_space=E2E_SPACE, checkpoints=s3_bucket)
    study = new_study(spec, postgres_url)
    registry = LayerRegistry(open_object_store(s3_bucket))

    donor_number = ask(study, spec, **GOOD)
    run = run_trainer(postgres_url, "fashion-e2e", donor_number, tmp_path)

    assert run.returncode == EXIT_COMPLETE, run.stderr[-3000:]
    donor = trial(postgres_url, "fashion-e2e", donor_number)
    assert donor.state == optuna.trial.TrialState.COMPLETE
    assert donor.user_attrs["reused_layers"] == 0 and donor.user_attrs["donor_trial"] is None
    assert donor.user_attrs["epochs_run"] == 2 and donor.user_attrs["feature_cache"] == "off"
    assert donor.user_attrs["train_seconds"] > 0
    assert donor.value == pytest.approx(min(donor.intermediate_values.values()))
    one_layer = make_arch(1, spec=spec).prefix_signature(1)
    [published] = registry.donors(one_layer)
    assert (published.study, published.trial_number, published.epochs) == ("fashion-e2e", donor_number, 2)
    donor_weights = prefix_from_bytes(registry.load_weights(published))

    # A deeper network with the same filters reuses the donor's layer, frozen; a pod's tiny memory
    # limit sends its feature cache to the spill dir.
    deeper_number = ask(study, spec, **{**GOOD, "convLayers": 2})
    run = run_trainer(postgres_url, "fashion-e2e", deeper_number, tmp_path, STRATA_MEMORY_LIMIT="1")

    assert run.returncode == EXIT_COMPLETE, run.stderr[-3000:]
    deeper = trial(postgres_url, "fashion-e2e", deeper_number)
    assert deeper.state == optuna.trial.TrialState.COMPLETE
    assert (deeper.user_attrs["reused_layers"], deeper.user_attrs["donor_trial"]) == (1, donor_number)
    assert deeper.user_attrs["donor_study"] == "fashion-e2e"
    assert deeper.user_attrs["feature_cache"] == "disk"
    assert deeper.user_attrs["seconds_saved_estimate"] >= 0
    assert len(registry.donors(one_layer)) == 1  # the reused layer is not published again
    [two_layers] = registry.donors(make_arch(2, spec=spec).prefix_signature(2))
    assert two_layers.trial_number == deeper_number
    deeper_weights = prefix_from_bytes(registry.load_weights(two_layers))
    assert_same_tensors({k: v for k, v in deeper_weights.items() if k.startswith("0.")}, donor_weights)
    assert list(tmp_path.iterdir()) == []  # the disk cache is gone from the spill dir

    # A re-delivered pod finds the trial finished: it exits as the trial ended, without training.
    caplog.set_level(logging.INFO, logger="strata.trainer")
    assert trainer_main(["--storage", postgres_url, "--study", "fashion-e2e", "--trial", str(deeper_number)]) == 0
    assert f"trial {deeper_number} is already COMPLETE" in caplog.text
    again = trial(postgres_url, "fashion-e2e", deeper_number)
    assert again.user_attrs == deeper.user_attrs and again.datetime_complete == deeper.datetime_complete
    assert len(registry.donors(make_arch(2, spec=spec).prefix_signature(2))) == 1


def test_a_trial_whose_loss_diverges_is_told_fail_with_the_reason(postgres_url, monkeypatch, restore_torch_threads):
    # SGD at a learning rate of 1e9 overflows the weights in the first epoch: the val loss is NaN.
    # In-process (the function `python -m strata_trainer` exits with) to spare a torch start-up.
    spec = make_spec(search_space=E2E_SPACE)
    study = new_study(spec, postgres_url)
    number = ask(study, spec, **{**GOOD, "optimizer": "sgd", "learningRate": 1e9})
    monkeypatch.setenv("STRATA_CPU_LIMIT", "1")

    assert trainer_main(["--storage", postgres_url, "--study", "fashion-e2e", "--trial", str(number)]) == EXIT_FAILED

    failed = trial(postgres_url, "fashion-e2e", number)
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("FloatingPointError: validation loss is nan at epoch 1")


def test_a_trial_far_behind_the_median_is_pruned_and_exits_3(postgres_url, tmp_path, restore_torch_threads,
                                                             monkeypatch):
    # The median pruner compares epoch 1 with the completed trial's epoch 1: a good Adam run reaches
    # ~1.8 on these 400 images, SGD at 1e-6 barely moves from ln(10) = 2.30. (SGD at 0.5 is not a
    # reliable loser: its first epoch can match Adam's before it diverges.)
    spec = make_spec(search_space=E2E_SPACE, pruner={"name": "median", "startupTrials": 0, "warmupSteps": 0})
    study = new_study(spec, postgres_url)
    monkeypatch.setenv("STRATA_CPU_LIMIT", "1")
    good = ask(study, spec, **GOOD)
    assert run_trial(postgres_url, "fashion-e2e", good) == EXIT_COMPLETE  # in-process: saves a torch start
    slow = ask(study, spec, **{**GOOD, "optimizer": "sgd", "learningRate": 1e-6})

    run = run_trainer(postgres_url, "fashion-e2e", slow, tmp_path)

    assert run.returncode == EXIT_PRUNED, run.stderr[-3000:]
    pruned = trial(postgres_url, "fashion-e2e", slow)
    assert pruned.state == optuna.trial.TrialState.PRUNED
    good_first = trial(postgres_url, "fashion-e2e", good).intermediate_values[1]
    assert pruned.intermediate_values[1] > good_first and list(pruned.intermediate_values) == [1]
    assert pruned.user_attrs["epochs_run"] == 1
    assert pruned.user_attrs["feature_cache"] == "off"  # recorded for pruned trials too (nothing frozen here)


def test_a_pruned_trial_that_reused_layers_counts_the_seconds_they_saved(postgres_url, tmp_path, restore_torch_threads,
                                                                         monkeypatch):
    # A 2-layer SGD trial at 1e-6 reuses the finished 1-layer trial's conv layer and is pruned at
    # epoch 1: it ran only that epoch, so it is credited with what the frozen layer saved in it
    # (against a from-scratch trial pruned at the same epoch), and the study's total includes it.
    spec = make_spec(search_space=E2E_SPACE, checkpoints=str(tmp_path / "layers"),
                     pruner={"name": "median", "startupTrials": 0, "warmupSteps": 0})
    study = new_study(spec, postgres_url)
    monkeypatch.setenv("STRATA_CPU_LIMIT", "1")
    monkeypatch.setenv("STRATA_SPILL_DIR", str(tmp_path))
    assert run_trial(postgres_url, "fashion-e2e", ask(study, spec, **GOOD)) == EXIT_COMPLETE
    slow = ask(study, spec, **{**GOOD, "convLayers": 2, "optimizer": "sgd", "learningRate": 1e-6})

    assert run_trial(postgres_url, "fashion-e2e", slow) == EXIT_PRUNED

    pruned = trial(postgres_url, "fashion-e2e", slow)
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.user_attrs["reused_layers"] == 1
    assert pruned.user_attrs["epochs_run"] == 1 and pruned.user_attrs["seconds_saved_estimate"] > 0
    assert pruned.user_attrs["seconds_saved_estimate"] < 3 * pruned.user_attrs["train_seconds"]
    progress = TrialScheduler(study, spec, None).progress()
    assert progress.seconds_saved == pytest.approx(pruned.user_attrs["seconds_saved_estimate"])


def test_with_the_layer_store_unreachable_a_trial_trains_from_scratch(postgres_url, monkeypatch, caplog,
                                                                      restore_torch_threads):
    monkeypatch.setenv("STRATA_S3_ENDPOINT", closed_port_endpoint())
    monkeypatch.setenv("STRATA_CPU_LIMIT", "1")
    spec = make_spec(search_space=E2E_SPACE, checkpoints="s3://strata-layers/prefix", epochs=1)
    study = new_study(spec, postgres_url)
    number = ask(study, spec, **{**GOOD, "convLayers": 2})

    assert run_trial(postgres_url, "fashion-e2e", number) == EXIT_COMPLETE

    done = trial(postgres_url, "fashion-e2e", number)
    assert done.state == optuna.trial.TrialState.COMPLETE
    assert (done.user_attrs["reused_layers"], done.user_attrs["feature_cache"]) == (0, "off")
    assert "layer registry unreachable" in caplog.text


def test_a_trial_another_worker_finishes_meanwhile_keeps_that_result_and_exit_code(postgres_url, monkeypatch, caplog,
                                                                                   restore_torch_threads):
    # Two trainers for one trial (a pod re-delivered while the first still runs): whoever tells
    # Optuna first wins; the other stops at its next report and exits as the trial ended.
    monkeypatch.setenv("STRATA_CPU_LIMIT", "1")
    spec = make_spec(search_space=E2E_SPACE, epochs=200)
    study = new_study(spec, postgres_url)
    number = ask(study, spec, **GOOD)

    with ThreadPoolExecutor(1) as pool:
        trainer = pool.submit(run_trial, postgres_url, "fashion-e2e", number)
        wait_for(lambda: trial(postgres_url, "fashion-e2e", number).intermediate_values or trainer.done(),
                 timeout=60, message="the trainer's first epoch")
        assert not trainer.done(), f"the trainer ended before the other worker told: exit {trainer.result()}"
        study.tell(number, 0.123)  # the other worker
        exit_code = trainer.result(timeout=60)

    assert exit_code == EXIT_COMPLETE
    told = trial(postgres_url, "fashion-e2e", number)
    assert told.state == optuna.trial.TrialState.COMPLETE and told.value == 0.123
    assert "fail_reason" not in told.user_attrs
    assert len(told.intermediate_values) < 200  # it stopped instead of training on
    assert "finished (COMPLETE) by another worker" in caplog.text


def test_a_trial_the_scheduler_has_not_asked_is_a_usage_error(postgres_url):
    spec = make_spec(search_space=E2E_SPACE)
    study = new_study(spec, postgres_url)
    study.enqueue_trial(GOOD)  # WAITING: nobody asked it

    assert trainer_main(["--storage", postgres_url, "--study", "fashion-e2e", "--trial", "0"]) == EXIT_USAGE
    assert trial(postgres_url, "fashion-e2e", 0).state == optuna.trial.TrialState.WAITING


def test_an_unknown_study_is_a_usage_error(postgres_url, capsys):
    new_study(make_spec(search_space=E2E_SPACE), postgres_url)

    assert trainer_main(["--storage", postgres_url, "--study", "no-such-study", "--trial", "0"]) == EXIT_USAGE
    assert "no study named 'no-such-study'" in capsys.readouterr().err
