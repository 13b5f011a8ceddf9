"""The HPOStudy CRD and the spec model accept and reject the same manifests.

No API server can run here, so this file admits each manifest as one would, in its order:
prune unknown fields, drop nulls the schema does not allow, apply the schema's defaults, validate
against the openAPIV3Schema (jsonschema, after converting the OpenAPI-isms) and evaluate every
``x-kubernetes-validations`` rule. No CEL library is installed (cel-python is not a dependency), so
each rule string the generator emits has its meaning written out below as Python; a test fails
when crd.py grows a rule this file does not know.

Known, deliberate divergences (each has a case below that pins it):
* unknown fields: the model refuses them (extra="forbid"); an API server *prunes* them (and
  ``kubectl apply`` with its default ``--validate=strict`` refuses them before that). The operator
  never sees one on a real cluster; in the emulator (no pruning) it reports InvalidSpec.
* per-parameter value rules (kernelSize odd, positive filters, optimizer names, fcLayout syntax)
  live in the model only: a cluster accepts such a manifest and the operator marks it InvalidSpec.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

from strata.crd import PLURAL, build_crd
from strata.spec import KNOWN_PARAMETERS, SpecError, parse_spec
from tests.k8s.fixtures import k8s_api, kubectl  # noqa: F401  (kubectl explain against the emulator)
from tests.test_spec import DELETE, VALID, manifest  # one valid manifest, changed in one place per case

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD = build_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


# --- what an API server does with a custom resource ---------------------------------------------


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """Structural pruning: drop fields the schema does not declare (unless it preserves them)."""
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        result = {}
        for key, item in value.items():
            if properties is not None and key in properties:
                result[key] = prune(item, properties[key])
            elif isinstance(extra, dict):
                result[key] = prune(item, extra)
            elif properties is None or schema.get("x-kubernetes-preserve-unknown-fields"):
                result[key] = item
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in value]
    return value


def default(value: Any, schema: dict[str, Any]) -> Any:
    """Nulls of non-nullable fields are dropped, then missing fields get the schema's default."""
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        result = dict(value)
        for key, sub in (schema.get("properties") or {}).items():
            if key in result and result[key] is None and not sub.get("nullable"):
                del result[key]
            if key not in result and "default" in sub:
                result[key] = copy.deepcopy(sub["default"])
            if key in result:
                result[key] = default(result[key], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            declared = schema.get("properties") or {}
            for key in result:
                if key not in declared:
                    result[key] = default(result[key], schema["additionalProperties"])
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [default(item, schema["items"]) for item in value]
    return value


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 -> JSON Schema 2020-12: nullable -> a "null" type, boolean exclusive bounds -> numbers."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "description"):
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert value is True, f"{key} must be OpenAPI's boolean form"
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = to_json_schema(value)
        else:
            out[key] = copy.deepcopy(value)
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if node.get(exclusive) is True:
            out[exclusive] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


# The meaning of every CEL rule crd.py emits. has(self.f): the field is set (and not null).
def _has(obj: dict[str, Any], field: str) -> bool:
    return obj.get(field) is not None


def _integral(x: float) -> bool:
    return float(x) == float(int(x))


_KNOWN_LIST = "[" + ", ".join(f"'{name}'" for name in KNOWN_PARAMETERS) + "]"
CEL_RULES: dict[str, Callable[[dict[str, Any]], bool]] = {
    # a parameter of searchSpace
    "self.type != 'categorical' || has(self.choices)":
        lambda s: s["type"] != "categorical" or _has(s, "choices"),
    "self.type == 'categorical' || (has(self.low) && has(self.high))":
        lambda s: s["type"] == "categorical" or (_has(s, "low") and _has(s, "high")),
    "self.type == 'categorical' || !has(self.choices)":
        lambda s: s["type"] == "categorical" or not _has(s, "choices"),
    "self.type != 'categorical' || (!has(self.low) && !has(self.high) && !has(self.step) && !has(self.log))":
        lambda s: s["type"] != "categorical" or not any(_has(s, f) for f in ("low", "high", "step", "log")),
    "!has(self.low) || !has(self.high) || self.low <= self.high":
        lambda s: not _has(s, "low") or not _has(s, "high") or s["low"] <= s["high"],
    "!has(self.log) || !self.log || !has(self.low) || self.low > 0.0":
        lambda s: not _has(s, "log") or not s["log"] or not _has(s, "low") or s["low"] > 0.0,
    "!has(self.log) || !self.log || !has(self.step) || (self.type == 'int' && self.step == 1.0)":
        lambda s: not _has(s, "log") or not s["log"] or not _has(s, "step") or (s["type"] == "int" and s["step"] == 1.0),
    "self.type != 'int' || ((!has(self.low) || self.low == double(int(self.low))) && "
    "(!has(self.high) || self.high == double(int(self.high))))":
        lambda s: s["type"] != "int" or ((not _has(s, "low") or _integral(s["low"]))
                                         and (not _has(s, "high") or _integral(s["high"]))),
    "!has(self.step) || self.step > 0.0":
        lambda s: not _has(s, "step") or s["step"] > 0.0,
    "self.type != 'int' || !has(self.step) || self.step == double(int(self.step))":
        lambda s: s["type"] != "int" or not _has(s, "step") or _integral(s["step"]),
    # searchSpace
    f"self.all(k, k in {_KNOWN_LIST})":
        lambda s: all(k in KNOWN_PARAMETERS for k in s),
    "!('fcLayout' in self) || !('fcLayers' in self || 'fcUnits' in self)":
        lambda s: "fcLayout" not in s or not ("fcLayers" in s or "fcUnits" in s),
    # trials
    "!has(self.parallel) || self.parallel <= self.max":
        lambda s: not _has(s, "parallel") or s["parallel"] <= s["max"],
    # spec
    "!has(self.sampler) || !has(self.sampler.name) || self.sampler.name != 'grid' || "
    "self.searchSpace.all(k, self.searchSpace[k].type != 'float' || has(self.searchSpace[k].step))":
        lambda s: (not _has(s, "sampler") or not _has(s["sampler"], "name") or s["sampler"]["name"] != "grid"
                   or all(p["type"] != "float" or _has(p, "step") for p in s["searchSpace"].values())),
}


def nodes_with_rules(value: Any, schema: dict[str, Any], path: str = ""):
    """(path, value, its schema node, rule) for every CEL rule that applies somewhere in the value."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path or "<root>", value, schema, rule
    if isinstance(value, dict):
        for key, item in value.items():
            sub = (schema.get("properties") or {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                yield from nodes_with_rules(item, sub, f"{path}.{key}" if path else key)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from nodes_with_rules(item, schema["items"], f"{path}[{i}]")


def cel_failures(value: Any, schema: dict[str, Any]) -> list[str]:
    return [f"{path}: {rule['message']}" for path, node, _, rule in nodes_with_rules(value, schema)
            if not CEL_RULES[rule["rule"]](node)]


VALIDATOR = jsonschema.Draft202012Validator(to_json_schema(SCHEMA))


def admit(document: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """(the object as stored, []) or (None, errors): what `kubectl apply` would get from a cluster."""
    stored = default(prune(copy.deepcopy(document), SCHEMA), SCHEMA)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in VALIDATOR.iter_errors(stored)]
    if errors:  # like the API server: CEL rules run only on values that passed the schema
        return None, errors
    errors = cel_failures(stored, SCHEMA)
    return (None, errors) if errors else (stored, [])


def model_accepts(spec: Any) -> tuple[bool, str]:
    try:
        parse_spec(spec)
        return True, ""
    except SpecError as error:
        return False, str(error)


# --- the table ----------------------------------------------------------------------------------

FULL = manifest(spec__objective={"metric": "val_accuracy", "direction": "maximize", "goal": 0.9},
                spec__searchSpace={"convLayers": {"type": "int", "low": 1, "high": 4, "step": 1},
                                   "kernelSize": {"type": "categorical", "choices": [3, 5]},
                                   "fcLayers": {"type": "int", "low": 0, "high": 2},
                                   "fcUnits": {"type": "categorical", "choices": [64, 128]},
                                   "learningRate": {"type": "float", "low": 0.001, "high": 0.01, "step": 0.001},
                                   "batchSize": {"type": "int", "low": 16, "high": 64, "log": True},
                                   "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}},
                spec__sampler={"name": "tpe", "seed": 3, "startupTrials": 2},
                spec__pruner={"name": "hyperband", "minResource": 1, "reductionFactor": 3},
                spec__trials={"max": 20, "parallel": 4, "maxFailed": 0, "retries": 0, "timeoutSeconds": 600,
                              "studyTimeoutSeconds": 3600},
                spec__training={"dataset": {"name": "mnist", "path": "s3://data/mnist"}, "inputSize": 32,
                                "subsetSize": 1000, "validationSplit": 0.25, "epochs": 3, "epochsWhenReusing": 2,
                                "earlyStopPatience": 0, "seed": 1, "device": "cpu"},
                spec__reuse={"enabled": True, "freeze": False, "minDonorEpochs": 2},
                spec__storage={"databaseSecret": {"name": "db", "key": "url"}, "checkpoints": "s3://layers/x",
                               "s3Endpoint": "http://minio:9000", "objectStoreSecret": "s3", "keepOnDelete": False},
                spec__trainer={"image": "trainer:1", "imagePullPolicy": "Always", "serviceAccountName": "t",
                               "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "2", "memory": "4Gi"}},
                               "nodeSelector": {"pool": "cpu"},
                               "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
                               "gpu": {"enabled": True, "count": 2, "minConvLayers": 3,
                                       "nodeSelector": {"gpu": "a100"},
                                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}},
                spec__suspend=True)

ACCEPTED = {
    **{f"example {p.stem}": yaml.safe_load(p.read_text()) for p in EXAMPLES},
    "minimal": VALID,
    "every field": FULL,
    "grid with a float step": manifest(spec__sampler={"name": "grid"},
                                       spec__searchSpace__learningRate={"type": "float", "low": 0.1, "high": 0.3,
                                                                        "step": 0.1}),
    "int given as a whole float": manifest(spec__searchSpace__convLayers={"type": "int", "low": 1.0, "high": 3}),
    "int log scale with step 1": manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 3,
                                                                         "log": True, "step": 1}),
    "resource quantities as numbers": manifest(spec__trainer={"resources": {"requests": {"cpu": 1},
                                                                           "limits": {"cpu": 2, "memory": "4Gi"}}}),
}

REJECTED = {
    # wrong types
    "trials.max is a word": manifest(spec__trials__max="four"),
    "trials is a number": manifest(spec__trials=8),
    "searchSpace is a list": manifest(spec__searchSpace=[{"type": "int", "low": 1, "high": 3}]),
    "trainer.image is a number": manifest(spec__trainer={"image": 5}),
    "resource limit is a list": manifest(spec__trainer={"resources": {"limits": {"cpu": [2]}}}),
    # names the model does not know
    "unknown sampler": manifest(spec__sampler={"name": "bayes"}),
    "unknown pruner": manifest(spec__pruner={"name": "patient"}),
    "unknown parameter type": manifest(spec__searchSpace__filters={"type": "bool", "choices": [1]}),
    "parameter without type": manifest(spec__searchSpace__filters={"choices": [1]}),
    "unknown parameter name": manifest(spec__searchSpace__depth={"type": "int", "low": 1, "high": 2}),
    "bad enum: metric": manifest(spec__objective={"metric": "accuracy"}),
    "bad enum: direction": manifest(spec__objective={"direction": "up"}),
    "bad enum: device": manifest(spec__training={"device": "tpu"}),
    "bad enum: toleration operator": manifest(spec__trainer={"tolerations": [{"key": "a", "operator": "In"}]}),
    # counts
    "trials.max 0": manifest(spec__trials__max=0),
    "negative parallel": manifest(spec__trials__parallel=-1),
    "negative maxFailed": manifest(spec__trials__maxFailed=-1),
    "negative retries": manifest(spec__trials__retries=-2),
    "parallel above max": manifest(spec__trials={"max": 2, "parallel": 3}),
    "epochs 0": manifest(spec__training={"epochs": 0}),
    "inputSize below 8": manifest(spec__training={"inputSize": 4}),
    "validationSplit 1": manifest(spec__training={"validationSplit": 1}),
    "validationSplit 0": manifest(spec__training={"validationSplit": 0}),
    "gpu count 0": manifest(spec__trainer={"gpu": {"enabled": True, "count": 0}}),
    # parameters
    "int low above high": manifest(spec__searchSpace__convLayers={"type": "int", "low": 3, "high": 1}),
    "float low above high": manifest(spec__searchSpace__learningRate={"type": "float", "low": 0.1, "high": 0.01}),
    "int parameter without low": manifest(spec__searchSpace__convLayers={"type": "int", "high": 3}),
    "int with a fractional bound": manifest(spec__searchSpace__convLayers={"type": "int", "low": 1.5, "high": 3}),
    "int step 0": manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 3, "step": 0}),
    "int fractional step": manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 3, "step": 0.5}),
    "float negative step": manifest(spec__searchSpace__learningRate={"type": "float", "low": 0.1, "high": 0.2,
                                                                      "step": -0.1}),
    "log with low 0": manifest(spec__searchSpace__learningRate={"type": "float", "low": 0, "high": 0.1, "log": True}),
    "log with negative low": manifest(spec__searchSpace__learningRate={"type": "float", "low": -1, "high": 1,
                                                                        "log": True}),
    "log with step": manifest(spec__searchSpace__learningRate={"type": "float", "low": 0.1, "high": 1, "log": True,
                                                                "step": 0.1}),
    "categorical without choices": manifest(spec__searchSpace__filters={"type": "categorical"}),
    "categorical with empty choices": manifest(spec__searchSpace__filters={"type": "categorical", "choices": []}),
    "categorical with a range": manifest(spec__searchSpace__filters={"type": "categorical", "choices": [8],
                                                                     "low": 1, "high": 2}),
    "categorical on a log scale": manifest(spec__searchSpace__filters={"type": "categorical", "choices": [8],
                                                                       "log": False}),
    "int with choices": manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 3, "choices": [1]}),
    "fcLayout and fcLayers": manifest(spec__searchSpace__fcLayout={"type": "categorical", "choices": ["50"]},
                                      spec__searchSpace__fcLayers={"type": "int", "low": 1, "high": 2}),
    "grid with a float range without step": manifest(spec__sampler={"name": "grid"}),
    "empty searchSpace": manifest(spec__searchSpace={}),
    # required fields
    "missing trials": manifest(spec__trials=DELETE),
    "missing trials.max": manifest(spec__trials={"parallel": 1}),
    "missing searchSpace": manifest(spec__searchSpace=DELETE),
    "missing spec": manifest(spec=DELETE),
    "databaseSecret without key": manifest(spec__storage={"databaseSecret": {"name": "db"}}),
}

# The model refuses these and a cluster stores them (see the module docstring): pinned both ways.
UNKNOWN_FIELDS = {
    "unknown spec field": manifest(spec__maxTrials=8),
    "unknown trials field": manifest(spec__trials__parralel=2),
    "unknown parameter field": manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 3, "lo": 1}),
}
MODEL_ONLY = {
    "even kernelSize": manifest(spec__searchSpace__kernelSize={"type": "categorical", "choices": [4]}),
    "unknown optimizer": manifest(spec__searchSpace__optimizer={"type": "categorical", "choices": ["adamw"]}),
    "fcLayout that is not a layout": manifest(spec__searchSpace__fcLayout={"type": "categorical", "choices": ["big"]}),
    "zero filters": manifest(spec__searchSpace__filters={"type": "int", "low": 0, "high": 8}),
}
# Pydantic's lax mode coerces these; the schema (rightly) refuses them. spec.py should validate
# strictly (e.g. StrictInt/StrictBool): until then they are expected failures.
LAX_MODEL = {
    "trials.max as a numeric string": manifest(spec__trials__max="8"),
    "suspend as a word": manifest(spec__suspend="yes"),
    "sampler seed as a string": manifest(spec__sampler={"seed": "7"}),
}


def test_the_table_is_big_enough():
    assert len(ACCEPTED) + len(REJECTED) + len(UNKNOWN_FIELDS) + len(MODEL_ONLY) >= 25
    assert len(ACCEPTED) >= len(EXAMPLES) + 3 and len(EXAMPLES) >= 3


@pytest.mark.parametrize("document", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_both_accept(document):
    stored, errors = admit(document)
    assert stored is not None, errors
    assert model_accepts(document["spec"]) == (True, "")
    # What the operator reads on a cluster (pruned and defaulted) means the same as the manifest.
    assert model_accepts(stored["spec"]) == (True, "")
    assert parse_spec(stored["spec"]) == parse_spec(document["spec"])


@pytest.mark.parametrize("document", REJECTED.values(), ids=REJECTED.keys())
def test_both_reject(document):
    stored, errors = admit(document)
    accepted, message = model_accepts(document.get("spec"))
    assert stored is None, "the CRD schema accepts it"
    assert errors
    assert not accepted, "the model accepts it"
    assert message.startswith("spec"), message  # the model's message names the field


@pytest.mark.parametrize("document", UNKNOWN_FIELDS.values(), ids=UNKNOWN_FIELDS.keys())
def test_unknown_fields_are_refused_by_the_model_and_pruned_by_a_cluster(document):
    accepted, message = model_accepts(document["spec"])
    assert not accepted and message.endswith("unknown field"), message
    stored, errors = admit(document)
    assert stored is not None, errors
    assert stored["spec"] != default(document["spec"], SCHEMA["properties"]["spec"])  # the field is gone
    assert model_accepts(stored["spec"]) == (True, "")


@pytest.mark.parametrize("document", MODEL_ONLY.values(), ids=MODEL_ONLY.keys())
def test_value_rules_of_named_parameters_live_in_the_model_only(document):
    stored, errors = admit(document)
    assert stored is not None, f"the CRD now checks this too: move the case to REJECTED ({errors})"
    accepted, message = model_accepts(document["spec"])
    assert not accepted and message.startswith("spec.searchSpace"), message


@pytest.mark.parametrize("document", LAX_MODEL.values(), ids=LAX_MODEL.keys())
def test_values_of_the_wrong_json_type_are_refused_by_both(document):
    stored, _ = admit(document)
    assert stored is None
    assert not model_accepts(document["spec"])[0]


def test_the_api_server_defaults_do_not_add_fields_the_model_refuses():
    # Defaults inside a parameter would apply to every type (log: false on a categorical parameter).
    parameter = SCHEMA["properties"]["spec"]["properties"]["searchSpace"]["additionalProperties"]
    assert not [k for k, v in parameter["properties"].items() if "default" in v]


# --- the rules this file evaluates are the rules the CRD has ------------------------------------


def _rules(node: Any) -> list[str]:
    if isinstance(node, list):
        return [r for n in node for r in _rules(n)]
    if not isinstance(node, dict):
        return []
    own = [v["rule"] for v in node.get("x-kubernetes-validations", [])]
    return own + [r for k, v in node.items() if k != "x-kubernetes-validations" for r in _rules(v)]


def test_every_cel_rule_of_the_crd_has_its_meaning_in_this_test():
    rules = _rules(SCHEMA)
    unknown = [r for r in rules if r not in CEL_RULES]
    assert not unknown, "crd.py has CEL rules this test cannot evaluate; add them to CEL_RULES:\n" + "\n".join(unknown)
    assert not set(CEL_RULES) - set(rules), "CEL_RULES has rules the CRD no longer has"


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """A JSON value typed as the API server types it for CEL: by the schema (a number is a double)."""
    from celpy import celtypes

    kind = schema.get("type")
    if isinstance(value, dict):
        properties, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        return celtypes.MapType({celtypes.StringType(k): to_cel(v, properties.get(k) or (extra if isinstance(extra, dict) else {}))
                                 for k, v in value.items()})
    if isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items") or {}) for v in value])
    if value is None:
        return None  # a nullable field set to null: CEL's null
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number" or isinstance(value, float):
        return celtypes.DoubleType(float(value))
    if isinstance(value, int):
        return celtypes.IntType(value)
    return celtypes.StringType(str(value))


def cel_verdicts(value: Any, schema: dict[str, Any]) -> list[tuple[str, bool, bool]]:
    """(rule, a real CEL engine's verdict, this file's CEL_RULES verdict) at every node with rules."""
    import celpy

    environment = celpy.Environment()
    found = []
    for _, node, node_schema, rule in nodes_with_rules(value, schema):
        verdict = environment.program(environment.compile(rule["rule"])).evaluate({"self": to_cel(node, node_schema)})
        assert not isinstance(verdict, Exception), (rule["rule"], verdict)
        found.append((rule["rule"], bool(verdict), CEL_RULES[rule["rule"]](node)))
    return found


def test_a_real_cel_engine_gives_every_rule_the_meaning_this_file_gives_it():
    """cel-python evaluates the CRD's rule texts on every table manifest the schema lets through to CEL."""
    documents = {**ACCEPTED, **REJECTED, **UNKNOWN_FIELDS, **MODEL_ONLY}
    verdicts = []
    for name, document in documents.items():
        stored = default(prune(copy.deepcopy(document), SCHEMA), SCHEMA)
        if not list(VALIDATOR.iter_errors(stored)):
            verdicts += [(name, *v) for v in cel_verdicts(stored, SCHEMA)]

    disagreements = [(name, rule, cel) for name, rule, cel, ours in verdicts if cel != ours]
    assert not disagreements, disagreements
    assert {rule for _, rule, _, _ in verdicts} == set(CEL_RULES)  # every rule was evaluated
    refused = {rule for _, rule, cel, _ in verdicts if not cel}
    assert len(refused) >= 8, f"only these rules ever refused a table manifest: {refused}"


@pytest.mark.parametrize("rule", _rules(SCHEMA))
def test_every_cel_rule_has_a_message_and_only_compares_like_types(rule):
    node_rules = {r["rule"]: r for r in _all_validations(SCHEMA)}
    assert node_rules[rule].get("message")
    # low, high and step are doubles: a bare integer literal next to them would not type-check.
    assert not re.search(r"self\.(low|high|step) *[<>=!]=? *\d+(?!\.)\b", rule), rule


def _all_validations(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, list):
        return [v for n in node for v in _all_validations(n)]
    if not isinstance(node, dict):
        return []
    return list(node.get("x-kubernetes-validations", [])) + [
        v for k, n in node.items() if k != "x-kubernetes-validations" for v in _all_validations(n)]


# --- documentation, generation, printing --------------------------------------------------------


def _undescribed(node: Any, path: str = "") -> list[str]:
    missing = []
    if isinstance(node, dict):
        for name, sub in (node.get("properties") or {}).items():
            where = f"{path}.{name}" if path else name
            if not str(sub.get("description", "")).strip():
                missing.append(where)
            missing += _undescribed(sub, where)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                missing += _undescribed(node[key], f"{path}[]" if key == "items" else f"{path}{{}}")
    return missing


def test_every_property_of_the_schema_has_a_description():
    assert SCHEMA.get("description")
    assert _undescribed(SCHEMA) == []


def test_shared_field_names_are_described_for_their_context():
    spec = SCHEMA["properties"]["spec"]["properties"]
    toleration = spec["trainer"]["properties"]["tolerations"]["items"]["properties"]
    assert "Secret" not in toleration["key"]["description"]
    assert "Secret" in spec["storage"]["properties"]["databaseSecret"]["properties"]["name"]["description"]
    assert spec["sampler"]["properties"]["name"]["description"] != "Name."


def test_the_checked_in_crd_is_the_generators_output(capsys):
    from strata.crd import main

    main()
    generated = capsys.readouterr().out
    assert (ROOT / "crds" / "hpostudy.yaml").read_text() == generated, \
        "crds/hpostudy.yaml is stale: python -m strata.crd > crds/hpostudy.yaml"
    assert (ROOT / "charts" / "strata" / "crds" / "hpostudy.yaml").read_text() == generated, \
        "the chart's CRD is stale: cp crds/hpostudy.yaml charts/strata/crds/hpostudy.yaml"
    assert yaml.safe_load(generated) == json.loads(json.dumps(CRD))


def test_kubectl_explain_shows_each_fields_type_and_description(kubectl):
    kubectl("apply", "-f", str(ROOT / "crds" / "hpostudy.yaml"))
    trials = SCHEMA["properties"]["spec"]["properties"]["trials"]["properties"]

    explained = kubectl("explain", "hpostudies.spec.trials").stdout
    field = kubectl("explain", "hpo.spec.trials.parallel").stdout

    assert re.search(r"GROUP:\s+hpo.strata.dev\nKIND:\s+HPOStudy\nVERSION:\s+v1alpha1", explained), explained
    for name in ("max", "parallel", "maxFailed", "retries"):
        assert re.search(rf"^  {name}\s+<integer>", explained, re.MULTILINE), explained
    assert " ".join(trials["max"]["description"].split()) in " ".join(explained.split())
    assert " ".join(trials["parallel"]["description"].split()) in " ".join(field.split())


def test_kubectl_applies_every_example_and_lists_them(kubectl):
    kubectl("apply", "-f", str(ROOT / "crds" / "hpostudy.yaml"))
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    names = sorted(yaml.safe_load(path.read_text())["metadata"]["name"] for path in examples)

    for path in examples:
        assert "created" in kubectl("apply", "-f", str(path)).stdout, path.name

    header, *rows = kubectl("get", "hpostudies").stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "COMPLETED", "RUNNING", "BEST", "REUSED", "AGE"]
    assert sorted(row.split()[0] for row in rows) == names and len(names) >= 3


def test_kubectl_get_shows_phase_completed_running_best_reused_and_age():
    columns = VERSION["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == ["Phase", "Completed", "Running", "Best", "Reused", "Age"]
    assert {c["name"]: c["jsonPath"] for c in columns} == {
        "Phase": ".status.phase", "Completed": ".status.completed", "Running": ".status.trials.running",
        "Best": ".status.best.value", "Reused": ".status.reuse.trials", "Age": ".metadata.creationTimestamp"}
    assert {c["name"]: c["type"] for c in columns}["Age"] == "date"


def test_the_crd_has_a_status_subresource_a_short_name_and_one_served_stored_version():
    names = CRD["spec"]["names"]
    assert CRD["metadata"]["name"] == f"{PLURAL}.hpo.strata.dev"
    assert names["shortNames"] == ["hpo"] and names["kind"] == "HPOStudy" and names["plural"] == PLURAL
    assert CRD["spec"]["scope"] == "Namespaced"
    assert [(v["name"], v["served"], v["storage"]) for v in CRD["spec"]["versions"]] == [("v1alpha1", True, True)]
    assert VERSION["subresources"] == {"status": {}}


def test_the_status_the_operator_writes_is_declared_whole_so_nothing_is_pruned_or_undescribed():
    from strata.kube.builders import build_status, invalid_status
    from strata.scheduler import Best, Outcome, Progress

    progress = Progress(complete=3, pruned=1, failed=2, retried=1, running=1, waiting=1, configs=6, finished=4,
                        best=Best(2, 0.41, {"convLayers": 2, "learningRate": 0.001}), reused_trials=2,
                        reused_layers=3, seconds_saved=12.34)
    status = build_status({}, progress, Outcome(False, "Running", "TrialsRunning", "4 of 8 trials finished"),
                          max_trials=8, optuna_name="ns.study", generation=2)
    schema = SCHEMA["properties"]["status"]
    for written in (status, invalid_status(status, "InvalidSpec", "spec.trials.max: bad", 3)):
        written = json.loads(json.dumps(written))
        assert prune(written, {**schema, "x-kubernetes-preserve-unknown-fields": False}) == written
        jsonschema.validate(written, to_json_schema(schema))
    assert set(schema["properties"]["trials"]["properties"]) == set(status["trials"])
    assert set(schema["properties"]["reuse"]["properties"]) == set(status["reuse"])


def test_the_schema_is_structural():
    """Every node has a type (or preserves unknown fields); no oneOf/anyOf/$ref left from pydantic."""
    def walk(node: Any, path: str) -> list[str]:
        problems = []
        if isinstance(node, dict):
            if not node.get("type") and not node.get("x-kubernetes-preserve-unknown-fields") \
                    and not node.get("x-kubernetes-int-or-string"):
                problems.append(f"{path}: no type")
            problems += [f"{path}: {k}" for k in ("oneOf", "anyOf", "allOf", "$ref", "const", "title") if k in node]
            for name, sub in (node.get("properties") or {}).items():
                problems += walk(sub, f"{path}.{name}")
            for key in ("items", "additionalProperties"):
                if isinstance(node.get(key), dict):
                    problems += walk(node[key], f"{path}.{key}")
        return problems

    assert walk(SCHEMA, "") == []
