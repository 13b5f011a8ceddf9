"""The HPOStudy spec: the examples parse, bad manifests are refused in one line naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from strata.families import check_space_fits_input
from strata.spec import SpecError, StudySpec, load_study_file, parse_spec, parse_study, spec_to_json

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))

# A valid manifest that each bad case below breaks in exactly one place.
VALID: dict[str, Any] = {
    "apiVersion": "hpo.strata.dev/v1alpha1",
    "kind": "HPOStudy",
    "metadata": {"name": "spec-test"},
    "spec": {
        "searchSpace": {
            "convLayers": {"type": "int", "low": 1, "high": 3},
            "filters": {"type": "categorical", "choices": [18, 32]},
            "learningRate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
        "trials": {"max": 8, "parallel": 2},
        "training": {"inputSize": 16, "subsetSize": 200, "epochs": 1},
    },
}


DELETE = object()


def manifest(**changes: Any) -> dict[str, Any]:
    """VALID with fields set by path (`spec__trials__max=0` sets spec.trials.max); DELETE removes one."""
    document = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = document
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return document


# --- the shipped examples ------------------------------------------------------------------------


def test_there_are_examples_to_check():
    assert {p.name for p in EXAMPLES} >= {"fashion-quick.yaml", "paper-small.yaml", "paper-large.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses_and_fits_its_input(path):
    study = load_study_file(path)

    assert study.name == path.stem
    check_space_fits_input(study.spec)


@pytest.mark.parametrize("name, size", [("paper-small", 168), ("paper-large", 756)])
def test_the_papers_grids_have_the_papers_sizes(name, size):
    spec = load_study_file(EXAMPLES[0].parent / f"{name}.yaml").spec

    assert spec.sampler.name == "grid"
    assert spec.grid_size() == size
    grid = spec.grid()
    assert len(grid) == size
    assert len({tuple(sorted(point.items())) for point in grid}) == size  # every point distinct
    assert spec.trials.max == size


def test_the_valid_manifest_of_this_file_is_accepted():
    assert parse_study(manifest()).spec.trials.max == 8


# --- bad manifests -------------------------------------------------------------------------------

BAD = [
    ("unknown parameter type", dict(spec__searchSpace__filters={"type": "integer", "low": 8, "high": 32}),
     "spec.searchSpace.filters.type", "integer"),
    ("unknown parameter name", dict(spec__searchSpace__dropout={"type": "float", "low": 0.0, "high": 0.5}),
     "spec.searchSpace", "dropout"),
    ("negative trials.max", dict(spec__trials={"max": -3}), "spec.trials.max", "greater than or equal to 1"),
    ("zero trials.max", dict(spec__trials={"max": 0}), "spec.trials.max", "greater than or equal to 1"),
    ("parallel above max", dict(spec__trials={"max": 2, "parallel": 3}), "spec.trials", "parallel"),
    ("int low above high", dict(spec__searchSpace__filters={"type": "int", "low": 32, "high": 16}),
     "spec.searchSpace.filters", "low"),
    ("float low above high", dict(spec__searchSpace__learningRate={"type": "float", "low": 0.1, "high": 0.01}),
     "spec.searchSpace.learningRate", "low"),
    ("log float with low 0", dict(spec__searchSpace__learningRate={"type": "float", "low": 0.0, "high": 0.1, "log": True}),
     "spec.searchSpace.learningRate", "log"),
    ("log float with negative low",
     dict(spec__searchSpace__learningRate={"type": "float", "low": -0.1, "high": 0.1, "log": True}),
     "spec.searchSpace.learningRate", "log"),
    ("log int with low 0", dict(spec__searchSpace__filters={"type": "int", "low": 0, "high": 64, "log": True}),
     "spec.searchSpace.filters", "log"),
    ("even kernelSize", dict(spec__searchSpace__kernelSize={"type": "categorical", "choices": [3, 4]}),
     "spec.searchSpace", "kernelSize"),
    ("bad fcLayout choice", dict(spec__searchSpace__fcLayout={"type": "categorical", "choices": ["500-250", "wide"]}),
     "spec.searchSpace", "fcLayout"),
    ("unknown sampler", dict(spec__sampler={"name": "bayes"}), "spec.sampler.name", "tpe"),
    ("unknown pruner", dict(spec__pruner={"name": "asha"}), "spec.pruner.name", "median"),
    ("typo in a spec field", dict(spec__trails={"max": 3}), "spec.trails", "unknown field"),
    ("typo in a nested field", dict(spec__trials={"max": 3, "maxFailled": 1}), "spec.trials.maxFailled",
     "unknown field"),
    ("wrong apiVersion", dict(apiVersion="hpo.strata.dev/v1"), "apiVersion", "v1alpha1"),
    ("wrong kind", dict(kind="Study"), "kind", "HPOStudy"),
    ("uppercase metadata.name", dict(metadata={"name": "My_Study"}), "metadata.name", "My_Study"),
    ("metadata.name too long", dict(metadata={"name": "a" * 64}), "metadata.name", "63"),
    ("grid over a float range without step", dict(spec__sampler={"name": "grid"}),
     "spec", "searchSpace.learningRate is a float range without step"),
    ("validationSplit 1.5", dict(spec__training={"validationSplit": 1.5}), "spec.training.validationSplit", "less than 1"),
    ("parameter without a type", dict(spec__searchSpace__filters={"low": 8, "high": 32}),
     "spec.searchSpace.filters", "type"),
    ("empty search space", dict(spec__searchSpace={}), "spec.searchSpace", "at least 1"),
    ("missing trials", dict(spec__trials=DELETE), "spec.trials", "required"),
    ("val_loss maximized", dict(spec__objective={"metric": "val_loss", "direction": "maximize", "goal": 0.3}),
     "spec.objective", "direction maximize contradicts metric val_loss, which is minimized"),
    ("val_accuracy minimized", dict(spec__objective={"metric": "val_accuracy", "direction": "minimize"}),
     "spec.objective", "contradicts metric val_accuracy"),
    ("negative val_loss goal", dict(spec__objective={"goal": -1}), "spec.objective", ">= 0"),
    ("val_accuracy goal above 1", dict(spec__objective={"metric": "val_accuracy", "goal": 80}),
     "spec.objective", "in [0, 1]"),
    ("memory limit 'lots'", dict(spec__trainer={"resources": {"limits": {"memory": "lots"}}}),
     "spec.trainer.resources.limits.memory", "'lots' is not a quantity"),
    ("a fractional quantity number", dict(spec__trainer={"resources": {"requests": {"cpu": 0.5}}}),
     "spec.trainer.resources.requests.cpu", "'500m'"),
    ("request above limit",
     dict(spec__trainer={"resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "4Gi"}}}),
     "spec.trainer.resources", "requests.memory (8Gi) must not exceed limits.memory (4Gi)"),
    ("unknown resource", dict(spec__trainer={"resources": {"limits": {"gpu": "1"}}}),
     "spec.trainer.resources.limits", "key 'gpu' is not a container resource"),
    ("nodeSelector key", dict(spec__trainer={"nodeSelector": {"node pool": "a"}}),
     "spec.trainer.nodeSelector", "key 'node pool' is not a qualified name"),
    ("nodeSelector value", dict(spec__trainer={"gpu": {"nodeSelector": {"pool": "a" * 64}}}),
     "spec.trainer.gpu.nodeSelector.pool", "is not a label value"),
    ("Exists with a value", dict(spec__trainer={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
     "spec.trainer.tolerations.0", "operator Exists takes no value"),
    ("tolerationSeconds without NoExecute", dict(spec__trainer={"tolerations": [
        {"key": "k", "operator": "Exists", "tolerationSeconds": 5}]}),
     "spec.trainer.tolerations.0", "tolerationSeconds needs effect NoExecute"),
    ("toleration without key", dict(spec__trainer={"tolerations": [{"value": "v"}]}),
     "spec.trainer.tolerations.0", "needs operator Exists"),
    ("image with a space", dict(spec__trainer={"image": "my image"}), "spec.trainer.image", "container image"),
    ("Secret name", dict(spec__storage={"databaseSecret": {"name": "My_DB", "key": "url"}}),
     "spec.storage.databaseSecret.name", "DNS subdomain"),
    ("Secret key", dict(spec__storage={"databaseSecret": {"name": "db", "key": "a/b"}}),
     "spec.storage.databaseSecret.key", "Secret key"),
    ("a key with a newline stays one line", dict(spec__trials={"max": 3, "pa\nrallel": 1}),
     "spec.trials.pa\\nrallel", "unknown field"),
]


@pytest.mark.parametrize("changes, field, detail", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_a_bad_manifest_is_refused_with_one_line_naming_the_field(changes, field, detail):
    with pytest.raises(SpecError) as raised:
        parse_study(manifest(**changes))

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{field}: "), message
    assert detail in message, message


def test_a_union_tag_does_not_leak_into_the_field_path():
    with pytest.raises(SpecError) as raised:
        parse_study(manifest(spec__searchSpace__filters={"type": "int", "low": 32, "high": 16}))

    assert str(raised.value) == "spec.searchSpace.filters: low (32) must not exceed high (16)"


def test_a_bare_spec_is_refused_under_the_spec_prefix_too():
    with pytest.raises(SpecError, match=r"^spec\.trials\.max: "):
        parse_spec({**VALID["spec"], "trials": {"max": 0}})


def test_a_study_file_that_is_not_yaml_or_has_no_study_names_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")

    with pytest.raises(SpecError, match="broken.yaml: not valid YAML"):
        load_study_file(broken)
    with pytest.raises(SpecError, match="other.yaml: expected exactly one HPOStudy document, found 0"):
        load_study_file(other)
    with pytest.raises(SpecError, match="missing.yaml: cannot read study file"):
        load_study_file(tmp_path / "missing.yaml")


# --- round trip and input fit --------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_spec_to_json_round_trips_through_parse_spec(path):
    spec = load_study_file(path).spec

    encoded = spec_to_json(spec)

    assert isinstance(parse_spec(encoded), StudySpec)
    assert parse_spec(encoded) == spec
    assert "searchSpace" in encoded and "search_space" not in encoded  # the manifest's camelCase


def test_spec_to_json_round_trips_every_optional_section():
    spec = parse_study(manifest(
        spec__objective={"metric": "val_accuracy", "goal": 0.9},
        spec__sampler={"name": "tpe", "seed": 3, "startupTrials": 2},
        spec__pruner={"name": "hyperband", "minResource": 1, "reductionFactor": 3},
        spec__reuse={"freeze": False, "minDonorEpochs": 2},
        spec__storage={"checkpoints": "s3://bucket/prefix", "s3Endpoint": "http://minio:9000"},
        spec__suspend=True,
    )).spec

    assert parse_spec(spec_to_json(spec)) == spec
    assert spec.objective.resolved_direction == "maximize"


def test_six_conv_layers_do_not_fit_a_16x16_input():
    document = manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 6})
    spec = StudySpec.model_validate(document["spec"])  # the model alone: parse_spec would refuse it

    with pytest.raises(SpecError, match=r"^spec\.searchSpace\.convLayers: 6 conv layers pool a 16x16 input"):
        check_space_fits_input(spec)


@pytest.mark.parametrize("parse", [parse_study, lambda m: parse_spec(m["spec"])], ids=["parse_study", "parse_spec"])
def test_a_network_too_deep_for_its_input_is_refused_at_validation(parse):
    """The operator reports InvalidSpec for it, as `strata run` refuses it: parse_spec checks the fit."""
    too_deep = manifest(spec__searchSpace__convLayers={"type": "categorical", "choices": [1, 5]})
    native = manifest(spec__training={"epochs": 1}, spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 5})

    with pytest.raises(SpecError, match=r"^spec\.searchSpace\.convLayers: 5 conv layers pool a 16x16 input"):
        parse(too_deep)
    with pytest.raises(SpecError, match=r"^spec\.searchSpace\.convLayers: 5 conv layers pool a 28x28 input"):
        parse(native)  # fashion-mnist's own 28x28
    parse(manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 10**12, "step": 10**12}))  # 1


def test_a_huge_int_range_is_checked_without_listing_it():
    with pytest.raises(SpecError, match=r"^spec\.searchSpace: 'kernelSize' must be odd"):
        parse_study(manifest(spec__searchSpace__kernelSize={"type": "int", "low": 1, "high": 10**15}))
    with pytest.raises(SpecError, match=r"conv layers pool"):
        parse_study(manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 10**15}))


def test_spec_and_architecture_import_without_torch_and_in_either_order():
    import subprocess
    import sys

    for first, second in (("strata.spec", "strata.families"), ("strata.families", "strata.spec")):
        code = (f"import sys, {first}, {second}; "
                "heavy = [m for m in ('torch', 'torchvision', 'numpy', 'optuna') if m in sys.modules]; "
                "assert not heavy, heavy")
        subprocess.run([sys.executable, "-c", code], check=True)


def test_four_conv_layers_still_fit_a_16x16_input():
    spec = parse_study(manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 4})).spec

    check_space_fits_input(spec)  # 16 -> 8 -> 4 -> 2 -> 1


def test_every_attr_name_follows_the_one_scheme():
    # Results a person reads: plain snake_case; Strata's bookkeeping: strata.snake_case.
    import re

    from strata import scheduler, study

    names = {name: value for module in (study, scheduler) for name, value in vars(module).items()
             if (name.startswith("ATTR_") or name == "SPEC_ATTR") and isinstance(value, str)}
    assert len(names) >= 30
    for constant, value in names.items():
        assert re.fullmatch(r"(strata\.)?[a-z][a-z0-9]*(_[a-z0-9]+)*", value), (constant, value)
    people = {v for v in names.values() if not v.startswith("strata.")}
    assert {"train_seconds", "reused_layers", "queued_seconds", "seconds_saved_estimate", "fail_reason"} <= people
