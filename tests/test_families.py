"""Model families: one staged abstraction (stem, stages of blocks, head) that reuse, freezing and the
feature cache work on; torch-free architectures the scheduler reads, torch modules the trainer builds
from the same description, and the training options the papers use."""

from __future__ import annotations

import math
from typing import Any

import pytest

from strata.families import FAMILIES, architecture_from_params, family_for
from strata.spec import SpecError, parse_spec

torch = pytest.importorskip("torch")
from strata_trainer.models import StagedModel, build_model, initialize  # noqa: E402
from strata_trainer.training import augment, make_optimizer, make_schedule  # noqa: E402

BUILT_IN = {
    "paper-cnn": [{"convLayers": 1}, {"convLayers": 3, "filters": 8, "fcLayout": "none"}],
    "vgg": [{"groups": 3, "layersPerGroup": 1, "width": 8}, {"layersPerGroup": "1-1-2-2-2", "width": 8}],
    "resnet": [{"depth": 8}, {"depth": 20, "widthMultiplier": 0.5}],
    "mobilenetv2": [{"widthMultiplier": 0.25, "stages": 3}, {"widthMultiplier": 0.5}],
}


def spec_for(family: str, search_space: dict[str, Any] | None = None, dataset: str = "cifar10",
             reuse_unit: str = "blocks", **training: Any):
    space = search_space or {"learningRate": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}
    return parse_spec({"model": {"family": family, "reuseUnit": reuse_unit}, "searchSpace": space,
                       "trials": {"max": 4}, "training": {"dataset": {"name": dataset}, **training}})


def built(family: str, params: dict[str, Any], reuse_unit: str = "blocks", seed: int = 0, **spec_kw):
    spec = spec_for(family, reuse_unit=reuse_unit, **spec_kw)
    arch = architecture_from_params(spec, params)
    torch.manual_seed(seed)
    return arch, build_model(arch, 10, spec.model)


CASES = [(family, params, unit) for family, options in BUILT_IN.items() for params in options
         for unit in ("blocks", "stages")]


@pytest.mark.parametrize("family, params, reuse_unit", CASES)
def test_every_unit_outputs_the_shape_its_torch_free_description_declares(family, params, reuse_unit):
    arch, model = built(family, params, reuse_unit)
    x = torch.randn(2, *arch.input_shape)

    assert isinstance(model, StagedModel) and model.depth == arch.depth and sum(arch.stage_sizes) == arch.depth
    model.eval()
    with torch.no_grad():
        for k in range(arch.depth + 1):
            assert tuple(model.features(x, 0, k).shape[1:]) == arch.feature_shape(k), f"after {k} units"
        assert model(x).shape == (2, 10)
        k = arch.depth // 2
        assert torch.allclose(model(model.features(x, 0, k), start=k), model(x), atol=1e-5)


def test_the_cifar_resnets_have_the_papers_depths_widths_and_parameter_counts():
    for depth, parameters in ((20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6)):
        arch, model = built("resnet", {"depth": depth})
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) + 1 == depth  # 6n 3x3 convs in blocks + the stem, plus the classifier
        assert arch.feature_shape(arch.depth) == (64, 8, 8)
        assert math.isclose(sum(p.numel() for p in model.parameters()), parameters, rel_tol=0.06)


def test_vgg_16_bn_sized_for_32x32_has_13_conv_bn_layers_and_pools_to_one_pixel():
    arch, model = built("vgg", {})
    assert arch.label == "vgg-16-bn" and arch.depth == 13 and arch.stage_sizes == (2, 2, 3, 3, 3)
    assert arch.feature_shape(arch.depth) == (512, 1, 1)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 13


def test_mobilenetv2_uses_torchvisions_inverted_residuals_and_keeps_4x4_maps_for_32x32_inputs():
    from torchvision.models.mobilenetv2 import InvertedResidual

    arch, model = built("mobilenetv2", {})
    assert sum(isinstance(m, InvertedResidual) for m in model.units) == 17
    assert arch.feature_shape(arch.depth) == (320, 4, 4)


# --- prefix signatures ---------------------------------------------------------------------------


def test_resnet_32_shares_resnet_20s_stem_and_first_three_blocks_and_loads_them():
    spec = spec_for("resnet")
    shallow, deep = (architecture_from_params(spec, {"depth": d}) for d in (20, 32))

    assert deep.common_prefix(shallow) == 4  # stem + stage 1's three blocks; block 4 differs (stride, width)
    assert deep.prefix_signature(4).key == shallow.prefix_signature(4).key
    assert deep.prefix_signature(5).key != shallow.prefix_signature(5).key
    torch.manual_seed(1)
    donor = build_model(shallow, 10, spec.model)
    model = build_model(deep, 10, spec.model)
    model.load_prefix(donor.prefix_state(4), 4)
    for name, tensor in donor.prefix_state(4).items():
        assert torch.equal(model.prefix_state(4)[name], tensor)
    with pytest.raises(ValueError, match="do not fit"):
        model.load_prefix(donor.prefix_state(5), 5)


@pytest.mark.parametrize("family, params", [(f, p[0]) for f, p in BUILT_IN.items()])
def test_equal_signatures_are_load_compatible_and_every_difference_changes_the_key(family, params):
    arch, model = built(family, params)
    _, other = built(family, params, seed=5)
    k = max(1, arch.depth - 1)
    other.load_prefix(model.prefix_state(k), k)  # equal signatures: the tensors fit exactly

    key = arch.prefix_signature(k).key
    own_images = parse_spec({"model": {"family": family}, "trials": {"max": 1},
                             "searchSpace": {"learningRate": {"type": "float", "low": 0.01, "high": 0.1}},
                             "training": {"dataset": {"name": "imagefolder", "path": "/data/a"}}})
    different = [architecture_from_params(spec_for(family, dataset="cifar100"), params),
                 architecture_from_params(spec_for(family, inputSize=64), params),
                 architecture_from_params(own_images, params)]
    for changed in different:
        assert changed.prefix_signature(min(k, changed.depth)).key != key
    other_families = [architecture_from_params(spec_for(f), p[0]) for f, p in BUILT_IN.items() if f != family]
    assert all(a.prefix_signature(1).key != arch.prefix_signature(1).key for a in other_families)


def test_the_paper_families_keys_are_the_registrys_keys_of_before():
    """Registries written before families existed stay valid: the paper CNN's keys did not change."""
    arch = architecture_from_params(spec_for("paper-cnn", dataset="fashion-mnist"), {"convLayers": 2})
    assert arch.prefix_signature(1).key == "d1-5dc5b4f9ec17a98ad7410a89"  # what strata 0.1 computed for it


def test_a_width_change_changes_every_units_signature():
    spec = spec_for("resnet")
    narrow, wide = (architecture_from_params(spec, {"depth": 8, "widthMultiplier": w}) for w in (1.0, 2.0))
    assert narrow.common_prefix(wide) == 0


# --- freezing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["resnet", "vgg", "mobilenetv2"])
def test_a_frozen_prefix_with_batch_norm_keeps_its_running_statistics_and_weights(family):
    arch, model = built(family, BUILT_IN[family][0])
    k = max(1, arch.depth // 2)
    model.freeze_prefix(k)
    before = {name: t.clone() for name, t in model.prefix_state(k).items()}
    trainable_before = sum(p.numel() for p in model.trainable_parameters())
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(8, *arch.input_shape)), torch.arange(8) % 10).backward()
        optimizer.step()

    after = model.prefix_state(k)
    assert all(torch.equal(after[name], before[name]) for name in before), "weights or BN statistics moved"
    assert not any(m.training for unit in model.units[:k] for m in unit.modules())
    assert trainable_before == sum(p.numel() for unit in model.units[k:] for p in unit.parameters()) + \
        sum(p.numel() for p in model.head.parameters())


def test_trainable_parameters_shrink_with_each_frozen_unit():
    arch, model = built("resnet", {"depth": 14})
    counts = []
    for k in range(arch.depth + 1):
        _, fresh = built("resnet", {"depth": 14})
        fresh.freeze_prefix(k)
        counts.append(sum(p.numel() for p in fresh.trainable_parameters()))
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)


# --- validation of what cannot be built ------------------------------------------------------------


@pytest.mark.parametrize("family, space, training, message", [
    ("resnet", {"depth": {"type": "categorical", "choices": [20, 21]}}, {}, "spec.searchSpace.depth: resnet depth "
                                                                            "must be 6n+2"),
    ("resnet", {"widthMultiplier": {"type": "float", "low": 0.01, "high": 1.0}}, {},
     "spec.searchSpace.widthMultiplier: widthMultiplier 0.01 rounds"),
    ("vgg", {"groups": {"type": "int", "low": 1, "high": 5}}, {"inputSize": 16}, "spec.searchSpace.groups:"),
    ("vgg", {"layersPerGroup": {"type": "categorical", "choices": ["2-2"]}}, {},
     "spec.searchSpace.layersPerGroup: layersPerGroup '2-2' gives 2 counts for 5 groups"),
    ("mobilenetv2", {"stages": {"type": "int", "low": 1, "high": 8}}, {}, "spec.searchSpace.stages: mobilenetv2 has"),
    ("paper-cnn", {"convLayers": {"type": "int", "low": 1, "high": 6}}, {}, "spec.searchSpace.convLayers:"),
])
def test_a_space_whose_extremes_cannot_build_is_refused_at_validation_naming_the_parameter(family, space, training,
                                                                                           message):
    with pytest.raises(SpecError) as raised:
        parse_spec({"model": {"family": family}, "searchSpace": space, "trials": {"max": 2},
                    "training": {"dataset": {"name": "cifar10"}, **training}})
    assert str(raised.value).startswith(message), str(raised.value)


@pytest.mark.parametrize("document, message", [
    ({"model": {"family": "resnet"}, "searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 2}}},
     "spec.searchSpace: unknown parameter 'convLayers' for model family resnet"),
    ({"model": {"family": "custom"}, "searchSpace": {"width": {"type": "int", "low": 1, "high": 2}}},
     "spec.model: family custom needs entryPoint"),
    ({"model": {"family": "vgg", "entryPoint": "a.b:c"}, "searchSpace": {"width": {"type": "int", "low": 8, "high": 9}}},
     "spec.model: entryPoint is only for family custom"),
    ({"model": {"family": "custom", "entryPoint": "not an entry"}, "searchSpace": {"w": {"type": "int", "low": 1,
                                                                                     "high": 2}}},
     "spec.model.entryPoint: 'not an entry' is not an entry point"),
    ({"searchSpace": {"momentum": {"type": "float", "low": 0.5, "high": 1.0}}},
     "spec.searchSpace: 'momentum' values must be numbers in [0, 1)"),
    ({"searchSpace": {"optimizer": {"type": "categorical", "choices": ["adamw", "lamb"]}}},
     "spec.searchSpace: 'optimizer' must be one of adam, adamw, sgd, rmsprop"),
    ({"searchSpace": {"filters": {"type": "int", "low": 8, "high": 9}},
      "training": {"dataset": {"name": "imagefolder"}}}, "spec.training.dataset: dataset imagefolder needs a path"),
])
def test_model_and_training_mistakes_are_refused_with_one_line_naming_the_field(document, message):
    with pytest.raises(SpecError) as raised:
        parse_spec({"trials": {"max": 2}, **document})
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_custom_family_reads_any_parameter_name_and_skips_reuse_aware_ordering():
    spec = parse_spec({"model": {"family": "custom", "entryPoint": "my_models.nets:build"},
                       "searchSpace": {"blocksPerStage": {"type": "int", "low": 1, "high": 3},
                                       "learningRate": {"type": "float", "low": 0.001, "high": 0.01}},
                       "trials": {"max": 2}})
    arch = architecture_from_params(spec, {"blocksPerStage": 2, "learningRate": 0.003})
    assert arch.config == {"blocksPerStage": 2} and arch.training.learning_rate == 0.003 and arch.units == ()
    assert family_for(spec).smaller(spec, {"blocksPerStage": 2}) is None


def test_the_families_registry_names_every_family_the_spec_offers():
    from strata.spec import MODEL_FAMILIES
    from strata_trainer.models import BUILDERS

    assert set(FAMILIES) == set(MODEL_FAMILIES) and set(BUILDERS) == set(MODEL_FAMILIES) - {"custom"}


# --- training options ------------------------------------------------------------------------------


def options_for(params: dict[str, Any], **training: Any):
    return architecture_from_params(spec_for("resnet", **training), {"depth": 8, **params}).training


@pytest.mark.parametrize("params, kind, expected", [
    ({"optimizer": "sgd"}, torch.optim.SGD, {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0}),
    ({"optimizer": "sgd", "nesterov": True, "momentum": 0.8, "weightDecay": 5e-4}, torch.optim.SGD,
     {"momentum": 0.8, "nesterov": True, "weight_decay": 5e-4}),
    ({"optimizer": "adamw", "weightDecay": 0.05}, torch.optim.AdamW, {"weight_decay": 0.05}),
    ({"optimizer": "rmsprop"}, torch.optim.RMSprop, {"momentum": 0.0}),
    ({}, torch.optim.Adam, {"weight_decay": 0.0, "lr": 1e-3}),
])
def test_the_optimizer_follows_the_search_space_then_spec_training(params, kind, expected):
    optimizer = make_optimizer(options_for(params), [torch.nn.Parameter(torch.zeros(1))])
    assert type(optimizer) is kind
    for name, value in expected.items():
        assert optimizer.param_groups[0][name] == value, name


def test_step_decay_multiplies_the_rate_at_each_milestone_and_cosine_anneals_to_zero():
    step = options_for({}, learningRate=0.1, schedule={"kind": "step", "milestones": [2, 4], "gamma": 0.1})
    cosine = options_for({"lrSchedule": "cosine"}, learningRate=0.1)
    for options, epochs, expected in ((step, 5, [0.1, 0.1, 0.01, 0.01, 0.001]),
                                      (cosine, 4, [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05,
                                                   0.1 * (1 + math.cos(3 * math.pi / 4)) / 2])):
        optimizer = make_optimizer(options, [torch.nn.Parameter(torch.zeros(1))])
        schedule = make_schedule(options, optimizer, epochs)
        rates = []
        for _ in range(epochs):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert rates == pytest.approx(expected)
    assert make_schedule(options_for({}), make_optimizer(options_for({}), [torch.nn.Parameter(torch.zeros(1))]), 3) \
        is None


def test_augmentation_crops_and_flips_each_image_reproducibly():
    options = options_for({"randomCropPadding": 4, "horizontalFlip": True})
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    first = augment(x, options, torch.Generator().manual_seed(3))
    again = augment(x, options, torch.Generator().manual_seed(3))

    assert first.shape == x.shape and torch.equal(first, again) and not torch.equal(first, x)
    plain = options_for({})
    assert not plain.augments and options.augments


def test_he_initialisation_gives_conv_weights_the_fan_out_variance():
    arch, model = built("resnet", {"depth": 8})
    initialize(model, "he")
    conv = model.units[1].conv1
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.15)
    assert arch.training.initialization == "default"
    assert architecture_from_params(spec_for("resnet"), {"initialization": "he"}).training.initialization == "he"


def test_only_a_trial_that_beats_the_best_so_far_is_scored_on_the_test_split(tmp_path):
    import optuna

    from strata_trainer.trial import is_best_so_far

    for metric, values, expected in (("val_loss", [0.5, 0.7, 0.4], [True, False, True]),
                                     ("val_accuracy", [0.5, 0.4, 0.9], [True, False, True])):
        spec = parse_spec({"objective": {"metric": metric}, "trials": {"max": 3},
                           "searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 2}}})
        study = optuna.create_study(direction=spec.objective.resolved_direction)
        verdicts = []
        for value in values:
            verdicts.append(is_best_so_far(study, spec, value))
            study.add_trial(optuna.trial.create_trial(value=value))
        assert verdicts == expected, metric
