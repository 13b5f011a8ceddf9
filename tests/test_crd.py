"""The HPOStudy CRD and the spec model accept and reject the same manifests.

No API server can run here, so this file does what one does, by the rules of its source:

* Creating the CRD (kubernetes/apiextensions-apiserver pkg/apis/apiextensions/validation/validation.go,
  pkg/apiserver/schema/defaulting/validation.go ValidateDefaults): every ``default`` must validate
  against the schema node it sits on (with kube-openapi's validator, then that node's CEL rules) and
  be pruned (no field the node does not declare); defaults are never looked for under
  additionalProperties (forbidden there). ``check_crd`` below; the generated CRD must pass it.
* kube-openapi's validator (kubernetes/kube-openapi pkg/validation/validate/schema.go,
  type.go, validator.go basicCommonValidator): a null value runs only the type check (it passes
  only where the node is ``nullable`` or has no type) and the enum check (an enum never contains
  null, so null fails any enum even when nullable). ``to_json_schema`` encodes exactly that for
  jsonschema: nullable adds "null" to the type, never to an enum. int-or-string is the types
  integer and string (pkg/apiserver/validation/validation.go ConvertJSONSchemaProps). Patterns are
  RE2 (``$`` is the end of the text; Python's ``$`` also matches before a final newline, so the
  emulator writes it ``\\Z``).
* Admitting an object, in the API server's order: prune unknown fields
  (pkg/apiserver/schema/pruning), delete the nulls of non-nullable fields without a default
  (defaulting/prunenulls.go PruneNonNullableNullsWithoutDefaults: map entries only, list items
  stay), apply defaults (defaulting/algorithm.go Default: a property's default where the key is
  missing or a non-nullable null, then recursing into the value, so defaults nest), validate
  against the schema, then evaluate every ``x-kubernetes-validations`` rule (only on an object
  that passed the schema). ``admit`` below.
* CEL: each rule the generator emits has its meaning written out below as Python (CEL_RULES; a
  test fails when crd.py grows a rule this file does not know), and cel-python (a real CEL
  engine, RE2 for matches()) checks those meanings on every table manifest.

Known, deliberate divergences (each has a table that pins it):
* unknown fields: the model refuses them (extra="forbid"); an API server *prunes* them (and
  ``kubectl apply`` with its default ``--validate=strict`` refuses them before that). The operator
  never sees one on a real cluster; in the emulator (no pruning) it reports InvalidSpec.
* MODEL_ONLY: rules the schema cannot express (per-parameter values such as an odd kernelSize,
  requests <= limits across quantity units, whole extended resources, the deepest network fitting
  the input, a null categorical choice): a cluster stores such a manifest and the operator marks
  it InvalidSpec.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
import yaml

from strata import crd
from strata.crd import PLURAL, build_crd
from strata.spec import (FAMILY_PARAMETERS, PARAMETER_NAME_PATTERN, TRAINING_PARAMETERS, QUALIFIED_NAME_LENGTHS, QUALIFIED_NAME_MAX, QUALIFIED_NAME_PATTERN,
                         RESOURCE_NAME_LENGTHS, RESOURCE_NAME_PATTERN, SpecError, parse_spec)
from tests.k8s.fixtures import k8s_api, kubectl  # noqa: F401  (kubectl explain against the emulator)
from tests.test_spec import DELETE, VALID, manifest  # one valid manifest, changed in one place per case

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD = build_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]


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


def _field_schema(schema: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    """getSchemaForField: the property's schema, else additionalProperties', else none."""
    if schema is None:
        return None
    if key in (schema.get("properties") or {}):
        return schema["properties"][key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def prune_nulls(value: Any, schema: dict[str, Any] | None) -> Any:
    """PruneNonNullableNullsWithoutDefaults: delete null map entries whose schema is neither nullable
    nor defaulted (they are left to Default); list items are never deleted."""
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            sub = _field_schema(schema, key)
            if item is None and sub is not None and not sub.get("nullable") and "default" not in sub:
                continue
            result[key] = prune_nulls(item, sub)
        return result
    if isinstance(value, list):
        items = schema.get("items") if schema else None
        return [prune_nulls(item, items) for item in value]
    return value


def apply_defaults(value: Any, schema: dict[str, Any] | None) -> Any:
    """Default (algorithm.go): a missing or non-nullable null property gets its default, deep-copied;
    then every value is defaulted by its own schema (so a defaulted object gets its nested defaults)."""
    if schema is None:
        return value
    if isinstance(value, dict):
        result = dict(value)
        properties = schema.get("properties") or {}
        for key, sub in properties.items():
            if "default" in sub and (key not in result or (result[key] is None and not sub.get("nullable"))):
                result[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key in list(result):
            if key in properties:
                result[key] = apply_defaults(result[key], properties[key])
            elif isinstance(extra, dict):
                if result[key] is None and not extra.get("nullable"):
                    result[key] = copy.deepcopy(extra.get("default"))
                result[key] = apply_defaults(result[key], extra)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        return [apply_defaults(copy.deepcopy(items.get("default")) if item is None and not items.get("nullable")
                               else item, items) for item in value]
    return value


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 as kube-openapi validates it -> JSON Schema 2020-12 for jsonschema.

    nullable -> "null" added to the type, never to an enum (a null fails any enum); boolean
    exclusive bounds -> numeric ones; int-or-string -> integer or string; RE2's final ``$`` -> ``\\Z``.
    """
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
        elif key == "pattern":
            out[key] = value[:-1] + r"\Z" if value.endswith("$") else value
        else:
            out[key] = copy.deepcopy(value)
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if node.get(exclusive) is True:
            out[exclusive] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    return out


_ROOT_VALIDATOR = jsonschema.Draft202012Validator(to_json_schema(SCHEMA))


def schema_errors(value: Any, schema: dict[str, Any]) -> list[str]:
    validator = _ROOT_VALIDATOR if schema is SCHEMA else jsonschema.Draft202012Validator(to_json_schema(schema))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(value)]


# The meaning of every CEL rule crd.py emits. has(self.f): the field is set (no null reaches CEL:
# nothing in the spec is nullable, so nulls are pruned or defaulted before the rules run).
def _has(obj: dict[str, Any], field: str) -> bool:
    return obj.get(field) is not None


def _integral(x: float) -> bool:
    return float(x) == float(int(x))


def _re2(pattern: str, text: str) -> bool:
    """RE2's matches() with an anchored pattern: the whole text (no final-newline leeway)."""
    return re.fullmatch(pattern, text) is not None


def _family_meaning(family: str) -> Callable[[dict[str, Any]], bool]:
    def holds(s: dict[str, Any]) -> bool:
        if ((s.get("model") or {}).get("family") or "paper-cnn") != family:
            return True
        if family == "custom":
            return all(_re2(PARAMETER_NAME_PATTERN, k) for k in s["searchSpace"])
        return all(k in FAMILY_PARAMETERS[family] or k in TRAINING_PARAMETERS for k in s["searchSpace"])
    return holds


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
    "!('fcLayout' in self) || !('fcLayers' in self || 'fcUnits' in self)":
        lambda s: "fcLayout" not in s or not ("fcLayers" in s or "fcUnits" in s),
    # trials
    "!has(self.parallel) || self.parallel <= self.max":
        lambda s: not _has(s, "parallel") or s["parallel"] <= s["max"],
    # objective: the direction follows the metric, the goal is a value the metric can take
    "!has(self.direction) || (self.direction == 'minimize') == (!has(self.metric) || self.metric == 'val_loss')":
        lambda s: (not _has(s, "direction")
                   or (s["direction"] == "minimize") == (s.get("metric", "val_loss") == "val_loss")),
    "!has(self.goal) || self.goal >= 0.0":
        lambda s: not _has(s, "goal") or s["goal"] >= 0.0,
    "!has(self.goal) || !has(self.metric) || self.metric != 'val_accuracy' || self.goal <= 1.0":
        lambda s: not _has(s, "goal") or not _has(s, "metric") or s["metric"] != "val_accuracy" or s["goal"] <= 1.0,
    # nodeSelector maps: qualified-name keys
    f"self.all(k, k.matches('{QUALIFIED_NAME_PATTERN}') && k.matches('{QUALIFIED_NAME_LENGTHS}'))":
        lambda s: all(_re2(QUALIFIED_NAME_PATTERN, k) and _re2(QUALIFIED_NAME_LENGTHS, k) for k in s),
    # requests and limits: container resource names
    f"self.all(k, k.matches('{RESOURCE_NAME_PATTERN}') && k.matches('{RESOURCE_NAME_LENGTHS}') && "
    "!k.startsWith('requests.'))":
        lambda s: all(_re2(RESOURCE_NAME_PATTERN, k) and _re2(RESOURCE_NAME_LENGTHS, k)
                      and not k.startswith("requests.") for k in s),
    # a toleration, and its key
    "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')":
        lambda s: bool(s.get("key")) or s.get("operator") == "Exists",
    "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''":
        lambda s: s.get("operator") != "Exists" or not s.get("value"),
    "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')":
        lambda s: not _has(s, "tolerationSeconds") or s.get("effect") == "NoExecute",
    f"self == '' || self.matches('{QUALIFIED_NAME_LENGTHS}')":
        lambda s: s == "" or _re2(QUALIFIED_NAME_LENGTHS, s),
    # spec: the parameter names each model family reads (paper-cnn when unset)
    **{crd._family_rule(family)["rule"]: _family_meaning(family) for family in FAMILY_PARAMETERS},
    # model, dataset, training
    "(has(self.family) && self.family == 'custom') == has(self.entryPoint)":
        lambda s: (s.get("family") == "custom") == _has(s, "entryPoint"),
    "!has(self.name) || !(self.name in ['imagefolder', 'npz']) || (has(self.path) && self.path != '')":
        lambda s: s.get("name") not in ("imagefolder", "npz") or bool(s.get("path")),
    "!has(self.channels) || (has(self.name) && self.name in ['imagefolder', 'npz'])":
        lambda s: not _has(s, "channels") or s.get("name") in ("imagefolder", "npz"),
    "!(has(self.nesterov) && self.nesterov && has(self.optimizer) && self.optimizer == 'sgd' && "
    "has(self.momentum) && self.momentum == 0.0)":
        lambda s: not (s.get("nesterov") is True and s.get("optimizer") == "sgd" and _has(s, "momentum")
                       and s["momentum"] == 0.0),
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


def stored_form(document: Any, schema: dict[str, Any] = SCHEMA) -> Any:
    """The object after the API server's mutating steps, in its order: prune, prune nulls, default."""
    return apply_defaults(prune_nulls(prune(copy.deepcopy(document), schema), schema), schema)


def admit(document: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """(the object as stored, []) or (None, errors): what `kubectl apply` would get from a cluster."""
    stored = stored_form(document)
    errors = schema_errors(stored, SCHEMA)
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


# --- creating the CRD: what the API server checks of the schema itself ---------------------------


def defaults(schema: dict[str, Any], path: str = "", under_additional: bool = False
             ) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(path, node, whether it is under additionalProperties) for every node with a default."""
    if "default" in schema:
        yield path or "<root>", schema, under_additional
    for name, sub in (schema.get("properties") or {}).items():
        yield from defaults(sub, f"{path}.{name}", under_additional)
    if isinstance(schema.get("items"), dict):
        yield from defaults(schema["items"], f"{path}[]", under_additional)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from defaults(schema["additionalProperties"], f"{path}{{}}", True)


def check_crd(schema: dict[str, Any]) -> list[str]:
    """ValidateDefaults over a whole schema: each default validates against its own node (schema, then
    its CEL rules) and is pruned; none under additionalProperties. [] when the CRD can be created."""
    problems = []
    for path, node, under_additional in defaults(schema):
        value = node["default"]
        if under_additional:
            problems.append(f"{path}: a default under additionalProperties is forbidden")
            continue
        if prune(copy.deepcopy(value), node) != value:
            problems.append(f"{path}.default: must not have unknown fields")
        errors = schema_errors(value, node)
        problems += [f"{path}.default: {e}" for e in errors]
        if not errors:
            problems += [f"{path}.default: {e}" for e in cel_failures(value, node)]
    return problems


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path or "<root>", node
        for name, sub in (node.get("properties") or {}).items():
            yield from _walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from _walk(node[key], f"{path}.{key}")


def test_the_crd_passes_the_api_servers_checks_of_its_defaults():
    assert check_crd(SCHEMA) == []
    assert [p for p, _, _ in defaults(SPEC_SCHEMA)], "the spec has defaults to check"


def test_no_node_is_nullable_beside_an_enum_and_nothing_in_the_spec_is_nullable():
    assert [p for p, n in _walk(SCHEMA) if n.get("nullable") and "enum" in n] == []
    assert [p for p, n in _walk(SPEC_SCHEMA) if "nullable" in n] == []
    assert "null" not in json.dumps([n["default"] for _, n, _ in defaults(SCHEMA)])


def test_the_emulator_has_kube_openapis_null_and_enum_semantics():
    enum = {"type": "string", "enum": ["minimize", "maximize"]}
    assert schema_errors(None, enum)  # not nullable: null fails the type
    assert schema_errors(None, {**enum, "nullable": True})  # nullable: null still fails the enum
    assert schema_errors(None, {"type": "string", "nullable": True}) == []
    assert schema_errors(None, {"x-kubernetes-preserve-unknown-fields": True}) == []  # no type: null passes
    assert schema_errors(None, {"x-kubernetes-int-or-string": True})
    assert schema_errors("ok\n", {"type": "string", "pattern": "^ok$"})  # RE2: $ is the end of the text
    int_or_string = {"x-kubernetes-int-or-string": True}
    assert schema_errors(0.5, int_or_string) and not schema_errors(2.0, int_or_string)  # 2.0 is an integer


def test_the_old_generators_null_default_is_refused_at_crd_creation():
    """What the API server said of the CRD before: spec.objective's default had direction: null."""
    objective = copy.deepcopy(SPEC_SCHEMA["properties"]["objective"])
    objective["default"] = {"metric": "val_loss", "direction": None, "goal": None}
    objective["properties"]["direction"]["nullable"] = True
    assert check_crd(objective) != []
    extra = {"type": "object", "additionalProperties": {"type": "string", "default": "x"}}
    assert check_crd(extra) == ["{}: a default under additionalProperties is forbidden"]
    unpruned = {"type": "object", "properties": {"a": {"type": "object", "default": {"b": 1}, "properties": {}}}}
    assert check_crd(unpruned) == [".a.default: must not have unknown fields"]


def test_admission_prunes_nulls_then_defaults_in_the_api_servers_order():
    schema = {"type": "object", "properties": {
        "a": {"type": "integer", "default": 1},
        "b": {"type": "string"},
        "c": {"type": "object", "default": {}, "properties": {"d": {"type": "integer", "default": 2}}},
        "m": {"type": "object", "additionalProperties": {"type": "string"}},
        "l": {"type": "array", "items": {"type": "string"}}}}
    document = {"a": None, "b": None, "m": {"x": None, "y": "z"}, "l": [None, "w"], "unknown": 3}
    assert stored_form(document, schema) == {"a": 1, "c": {"d": 2}, "m": {"y": "z"}, "l": [None, "w"]}
    assert schema_errors(stored_form(document, schema), schema)  # the null list item fails


# --- CEL cost: the API server refuses a CRD whose rules may cost too much -------------------------
# apiextensions validation.go: StaticEstimatedCostLimit 1e7 per rule (times the rule's cardinality:
# the product of maxItems/maxProperties above it, cel_validation.go), StaticEstimatedCRDCostLimit 1e8
# in all. cel-go prices matches() at (string length x 0.1) x (regex length x 0.25). This estimate is
# coarse and on the safe side: it exists to catch a rule over an unbounded list, map or string.
RULE_BASE_COST = 100
MAP_KEY_SIZE = QUALIFIED_NAME_MAX  # keys have no maxLength in a schema; the estimator sizes them small


def _estimated_cost(rule: str, node: dict[str, Any]) -> float:
    iterations = 1
    for target in re.findall(r"(self(?:\.\w+)?)\.all\(", rule):
        sub = node if target == "self" else node["properties"][target.split(".")[1]]
        assert "maxProperties" in sub or "maxItems" in sub, f"{rule}: iterates an unbounded {target}"
        iterations *= sub.get("maxProperties", sub.get("maxItems"))
    matches = 0.0
    for target, pattern in re.findall(r"(\w+(?:\.\w+)?)\.matches\('([^']*)'\)", rule):
        if target == "k":
            size = MAP_KEY_SIZE
        elif target == "self":
            size = node.get("maxLength")
        else:
            size = node["properties"][target.split(".")[1]].get("maxLength")
        assert size is not None, f"{rule}: matches() on {target}, a string without maxLength"
        matches += math.ceil(size * 0.1) * math.ceil(len(pattern) * 0.25)
    return (RULE_BASE_COST + matches) * iterations


def _rule_cardinalities(node: dict[str, Any], cardinality: int | None = 1, path: str = ""):
    for rule in node.get("x-kubernetes-validations", []):
        yield path or "<root>", rule["rule"], node, cardinality
    bound = node.get("maxItems", node.get("maxProperties"))
    below = None if cardinality is None or bound is None else cardinality * bound
    for name, sub in (node.get("properties") or {}).items():
        yield from _rule_cardinalities(sub, cardinality, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _rule_cardinalities(node[key], below, f"{path}.{key}")


def test_every_cel_rule_is_bounded_within_the_api_servers_cost_limits():
    total = 0.0
    for path, rule, node, cardinality in _rule_cardinalities(SCHEMA):
        assert cardinality is not None, f"{path}: a rule under a list or map without maxItems/maxProperties"
        cost = _estimated_cost(rule, node) * cardinality
        assert cost <= 1e7, (path, rule, cost)
        total += cost
    assert total <= 1e8, total


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


def trainer(**fields: Any) -> dict[str, Any]:
    return manifest(spec__trainer=fields)


def resources(requests: dict[str, Any] | None = None, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    return trainer(resources={**({"requests": requests} if requests is not None else {}),
                              **({"limits": limits} if limits is not None else {})})


def toleration(**fields: Any) -> dict[str, Any]:
    return trainer(tolerations=[fields])


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
    "resource quantities as numbers": resources({"cpu": 1}, {"cpu": 2, "memory": "4Gi"}),
    "a whole float quantity": resources({"cpu": 1.0}, {"cpu": 2.0}),
    "quantities in every form": resources({"cpu": "500m", "memory": "1.5G", "ephemeral-storage": "1e3"},
                                          {"cpu": ".5", "memory": "2Gi", "ephemeral-storage": "+2k"}),
    "an extended resource requested as limited": resources({"example.com/fpga": "1"}, {"example.com/fpga": 1}),
    "hugepages with memory": resources({"hugepages-2Mi": "64Mi", "memory": "1Gi"},
                                       {"hugepages-2Mi": "64Mi", "memory": "2Gi"}),
    "no requests at all": resources({}, {"cpu": "1"}),
    "qualified nodeSelector keys and label values": trainer(nodeSelector={
        "kubernetes.io/arch": "amd64", "node.example.com/pool": "gpu_a-1.x", "empty": "", "A_b.c-9": "Z"}),
    "toleration with NoExecute seconds": toleration(key="node.kubernetes.io/unreachable", operator="Exists",
                                                    effect="NoExecute", tolerationSeconds=300),
    "toleration of every taint": toleration(operator="Exists"),
    "toleration with Equal and an empty value": toleration(key="spot", value="", effect="PreferNoSchedule"),
    "secret names that are DNS subdomains": manifest(spec__storage={"databaseSecret": {"name": "db.prod-1",
                                                                                         "key": ".url_2-x"},
                                                                    "objectStoreSecret": "s3.creds"}),
    "an image with a registry and digest": trainer(image="registry.example.com:5000/strata/trainer@sha256:abc"),
    "val_accuracy goal 1": manifest(spec__objective={"metric": "val_accuracy", "goal": 1}),
    "val_loss goal 0": manifest(spec__objective={"metric": "val_loss", "direction": "minimize", "goal": 0}),
    "a 253-character secret name": manifest(spec__storage={"databaseSecret": {"name": ".".join(["a" * 63] * 4)[:253],
                                                                              "key": "k"}}),
    "the longest timeoutSeconds": manifest(spec__trials={"max": 8, "timeoutSeconds": 2**31 - 1 - 60}),
}

# Explicit nulls, as a real API server takes them: nothing in the spec is nullable, so a null field
# without a default is deleted (PruneNonNullableNullsWithoutDefaults) and one with a default gets it
# (Default); the model reads a null as unset. A null list item stays and fails the item's type.
NULLS_ACCEPTED = {
    "direction: null": manifest(spec__objective={"metric": "val_loss", "direction": None}),
    "goal: null": manifest(spec__objective={"goal": None}),
    "metric: null (defaulted)": manifest(spec__objective={"metric": None, "direction": "minimize"}),
    "objective: null (defaulted)": manifest(spec__objective=None),
    "effect: null in a toleration": toleration(key="k", operator="Exists", effect=None),
    "key and value null in a toleration": toleration(key=None, operator="Exists", value=None),
    "operator: null in a toleration (defaulted to Equal)": toleration(key="k", operator=None, value="v"),
    "trials.parallel: null (defaulted to 1)": manifest(spec__trials={"max": 8, "parallel": None}),
    "trials.timeoutSeconds: null": manifest(spec__trials={"max": 8, "timeoutSeconds": None}),
    "training: null (defaulted)": manifest(spec__training=None),
    "training.dataset.path: null": manifest(spec__training={"dataset": {"name": "mnist", "path": None}}),
    "sampler.seed: null": manifest(spec__sampler={"name": "tpe", "seed": None}),
    "suspend: null (defaulted to false)": manifest(spec__suspend=None),
    "storage.databaseSecret: null": manifest(spec__storage={"databaseSecret": None}),
    "trainer.image: null": trainer(image=None),
    "a null nodeSelector entry (deleted)": trainer(nodeSelector={"pool": None, "zone": "a"}),
    "a null resource request (deleted)": resources({"cpu": None}, {"cpu": "2"}),
    "requests: null (the model's default)": trainer(resources={"requests": None, "limits": {"cpu": "2"}}),
    "a null searchSpace entry (deleted)": manifest(spec__searchSpace__kernelSize=None),
    "a float step: null": manifest(spec__searchSpace__learningRate={"type": "float", "low": 0.1, "high": 0.2,
                                                                    "step": None}),
}

NULLS_REJECTED = {
    "a null toleration in the list": trainer(tolerations=[None]),
    "a null gpu toleration in the list": trainer(gpu={"tolerations": [{"key": "a", "operator": "Exists"}, None]}),
    "trials: null (required)": manifest(spec__trials=None),
    "trials.max: null (required)": manifest(spec__trials={"max": None}),
    "searchSpace: null (required)": manifest(spec__searchSpace=None),
    "parameter type: null": manifest(spec__searchSpace__convLayers={"type": None, "low": 1, "high": 3}),
    "parameter low: null": manifest(spec__searchSpace__convLayers={"type": "int", "low": None, "high": 3}),
    "the only parameter null (an empty searchSpace)": manifest(spec__searchSpace={"convLayers": None}),
    "databaseSecret.key: null (required)": manifest(spec__storage={"databaseSecret": {"name": "db", "key": None}}),
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
    "timeoutSeconds past activeDeadlineSeconds' int32": manifest(spec__trials={"max": 8, "timeoutSeconds": 2**31}),
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
    # the objective: a direction against the metric, a goal it cannot reach
    "val_loss maximized": manifest(spec__objective={"metric": "val_loss", "direction": "maximize", "goal": 0.3}),
    "val_accuracy minimized": manifest(spec__objective={"metric": "val_accuracy", "direction": "minimize"}),
    "default metric maximized": manifest(spec__objective={"direction": "maximize"}),
    "negative val_loss goal": manifest(spec__objective={"metric": "val_loss", "goal": -0.1}),
    "val_accuracy goal 1.5": manifest(spec__objective={"metric": "val_accuracy", "goal": 1.5}),
    "val_accuracy goal in percent": manifest(spec__objective={"metric": "val_accuracy", "goal": 90}),
    # what a pod cannot have: quantities
    "memory limit 'lots'": resources(limits={"memory": "lots"}),
    "an empty quantity": resources({"cpu": ""}),
    "a quantity with a space": resources(limits={"memory": "2 Gi"}),
    "a negative quantity string": resources({"cpu": "-1"}),
    "a negative quantity number": resources({"cpu": -1}),
    "a fractional quantity number": resources({"cpu": 0.5}),
    "a quantity with a lowercase binary suffix": resources(limits={"memory": "2gi"}),
    "a quantity that is a bool": resources({"cpu": True}),
    # resource names
    "an unknown standard resource": resources({"gpu": "1"}, {"gpu": "1"}),
    "a resource name with a space": resources(limits={"nvidia gpu": "1"}),
    "a requests. prefix": resources({"requests.nvidia.com/gpu": "1"}),
    "an uppercase resource": resources({"CPU": "1"}),
    "a resource map too long": resources(limits={f"example.com/r{i}": "1" for i in range(17)}),
    # nodeSelector
    "nodeSelector key with a space": trainer(nodeSelector={"my pool": "a"}),
    "nodeSelector key with two slashes": trainer(nodeSelector={"a/b/c": "a"}),
    "nodeSelector key name of 64": trainer(nodeSelector={"k" * 64: "a"}),
    "nodeSelector key prefix of 254": trainer(nodeSelector={".".join(["a" * 63] * 4)[:252] + "aa/k": "a"}),
    "nodeSelector key with an uppercase prefix": trainer(nodeSelector={"Example.com/pool": "a"}),
    "nodeSelector value of 64": trainer(nodeSelector={"pool": "v" * 64}),
    "nodeSelector value ending in a dash": trainer(nodeSelector={"pool": "gpu-"}),
    "nodeSelector value with a slash": trainer(nodeSelector={"pool": "a/b"}),
    "nodeSelector value is a number": trainer(nodeSelector={"pool": 1}),
    "gpu nodeSelector key invalid": trainer(gpu={"nodeSelector": {"-gpu": "a100"}}),
    "nodeSelector with 65 labels": trainer(nodeSelector={f"k{i}": "v" for i in range(65)}),
    # tolerations
    "toleration key invalid": toleration(key="bad key", operator="Exists"),
    "toleration key name of 64": toleration(key="k" * 64, operator="Exists"),
    "toleration value invalid": toleration(key="k", value="not ok"),
    "toleration value of 64": toleration(key="k", value="v" * 64),
    "operator Exists with a value": toleration(key="k", operator="Exists", value="v"),
    "a toleration without key and Equal": toleration(value="v"),
    "a toleration without key, operator defaulted": toleration(effect="NoSchedule"),
    "tolerationSeconds without an effect": toleration(key="k", operator="Exists", tolerationSeconds=60),
    "tolerationSeconds with NoSchedule": toleration(key="k", operator="Exists", effect="NoSchedule",
                                                    tolerationSeconds=60),
    "bad enum: toleration effect": toleration(key="k", operator="Exists", effect="NoEvict"),
    "33 tolerations": trainer(tolerations=[{"key": f"k{i}", "operator": "Exists"} for i in range(33)]),
    "gpu toleration without key": trainer(gpu={"tolerations": [{"value": "x"}]}),
    # image, service account, Secrets
    "an empty image": trainer(image=""),
    "an image with a space": trainer(image="trainer: 1"),
    "an image with a trailing newline": trainer(image="trainer:1\n"),
    "an uppercase serviceAccountName": trainer(serviceAccountName="Trainer"),
    "a serviceAccountName with an underscore": trainer(serviceAccountName="my_sa"),
    "an empty serviceAccountName": trainer(serviceAccountName=""),
    "an uppercase Secret name": manifest(spec__storage={"databaseSecret": {"name": "DB", "key": "url"}}),
    "a Secret name of 254": manifest(spec__storage={"databaseSecret": {"name": "a" * 254, "key": "url"}}),
    "a Secret key with a slash": manifest(spec__storage={"databaseSecret": {"name": "db", "key": "a/b"}}),
    "a Secret key '..'": manifest(spec__storage={"databaseSecret": {"name": "db", "key": ".."}}),
    "a Secret key starting with '..'": manifest(spec__storage={"databaseSecret": {"name": "db", "key": "..url"}}),
    "a Secret key of 254": manifest(spec__storage={"databaseSecret": {"name": "db", "key": "k" * 254}}),
    "an empty Secret key": manifest(spec__storage={"databaseSecret": {"name": "db", "key": ""}}),
    "an objectStoreSecret with a slash": manifest(spec__storage={"objectStoreSecret": "ns/s3"}),
}

# The model refuses these and a cluster stores them (see the module docstring): pinned both ways.
UNKNOWN_FIELDS = {
    "unknown spec field": manifest(spec__maxTrials=8),
    "unknown trials field": manifest(spec__trials__parralel=2),
    "unknown parameter field": manifest(spec__searchSpace__convLayers={"type": "int", "low": 1, "high": 3, "lo": 1}),
    "unknown toleration field": toleration(key="k", operator="Exists", effects="NoSchedule"),
}
# name -> (manifest, the field the model's message names): what the schema cannot express.
MODEL_ONLY: dict[str, tuple[dict[str, Any], str]] = {
    "even kernelSize": (manifest(spec__searchSpace__kernelSize={"type": "categorical", "choices": [4]}),
                        "spec.searchSpace"),
    "unknown optimizer": (manifest(spec__searchSpace__optimizer={"type": "categorical", "choices": ["nadam"]}),
                          "spec.searchSpace"),
    "fcLayout that is not a layout": (manifest(spec__searchSpace__fcLayout={"type": "categorical",
                                                                            "choices": ["big"]}), "spec.searchSpace"),
    "zero filters": (manifest(spec__searchSpace__filters={"type": "int", "low": 0, "high": 8}), "spec.searchSpace"),
    "a null categorical choice": (manifest(spec__searchSpace__filters={"type": "categorical", "choices": [8, None]}),
                                  "spec.searchSpace.filters.choices.1"),
    "a network too deep for its input": (manifest(spec__searchSpace__convLayers={"type": "int", "low": 1,
                                                                                 "high": 5}),
                                         "spec.searchSpace.convLayers"),
    "a cpu request above its limit": (resources({"cpu": "3"}, {"cpu": "2"}), "spec.trainer.resources"),
    "a memory request above its limit across units": (resources({"memory": "2G"}, {"memory": "1900Mi"}),
                                                      "spec.trainer.resources"),
    "a limit below the default request": (resources(limits={"cpu": "500m", "memory": "4Gi"}),
                                          "spec.trainer.resources"),
    "an extended resource requested without a limit": (resources({"example.com/fpga": "1"}, {}),
                                                       "spec.trainer.resources"),
    "an extended resource requested below its limit": (resources({"example.com/fpga": "1"}, {"example.com/fpga": "2"}),
                                                       "spec.trainer.resources"),
    "a fractional extended resource": (resources({}, {"example.com/fpga": "500m"}), "spec.trainer.resources"),
    "hugepages without cpu or memory": (resources({"hugepages-2Mi": "2Mi"}, {"hugepages-2Mi": "2Mi"}),
                                        "spec.trainer.resources"),
    "nvidia.com/gpu in resources with gpu.enabled": (trainer(resources={"limits": {"cpu": "2", "nvidia.com/gpu": 1}},
                                                             gpu={"enabled": True}), "spec.trainer"),
}
# Pydantic's lax mode would coerce these; the model validates strictly, as the schema does.
LAX_MODEL = {
    "trials.max as a numeric string": manifest(spec__trials__max="8"),
    "suspend as a word": manifest(spec__suspend="yes"),
    "sampler seed as a string": manifest(spec__sampler={"seed": "7"}),
}
BOTH_ACCEPT = {**ACCEPTED, **NULLS_ACCEPTED}
BOTH_REJECT = {**REJECTED, **NULLS_REJECTED}


def test_the_table_is_big_enough():
    assert len(BOTH_ACCEPT) + len(BOTH_REJECT) + len(UNKNOWN_FIELDS) + len(MODEL_ONLY) >= 150
    assert len(ACCEPTED) >= len(EXAMPLES) + 3 and len(EXAMPLES) >= 3
    assert len(NULLS_ACCEPTED) >= 15 and len(NULLS_REJECTED) >= 5


@pytest.mark.parametrize("document", BOTH_ACCEPT.values(), ids=BOTH_ACCEPT.keys())
def test_both_accept(document):
    stored, errors = admit(document)
    assert stored is not None, errors
    assert model_accepts(document["spec"]) == (True, "")
    # What the operator reads on a cluster (pruned and defaulted) means the same as the manifest.
    assert model_accepts(stored["spec"]) == (True, "")
    assert parse_spec(stored["spec"]) == parse_spec(document["spec"])


@pytest.mark.parametrize("document", BOTH_REJECT.values(), ids=BOTH_REJECT.keys())
def test_both_reject(document):
    stored, errors = admit(document)
    accepted, message = model_accepts(document.get("spec"))
    assert stored is None, "the CRD schema accepts it"
    assert errors
    assert not accepted, "the model accepts it"
    assert message.startswith("spec") and len(message.splitlines()) == 1, message  # one line naming the field


def test_explicit_nulls_are_stored_as_a_real_api_server_stores_them():
    def stored(name: str) -> dict[str, Any]:
        return admit(NULLS_ACCEPTED[name])[0]["spec"]

    assert stored("trials.parallel: null (defaulted to 1)")["trials"] == {"max": 8, "parallel": 1, "maxFailed": 3,
                                                                         "retries": 1}
    assert "direction" not in stored("direction: null")["objective"]
    assert stored("objective: null (defaulted)")["objective"] == {"metric": "val_loss"}
    assert stored("effect: null in a toleration")["trainer"]["tolerations"] == [{"key": "k", "operator": "Exists"}]
    defaulted = stored("operator: null in a toleration (defaulted to Equal)")["trainer"]["tolerations"][0]
    assert defaulted["operator"] == "Equal"
    assert stored("a null nodeSelector entry (deleted)")["trainer"]["nodeSelector"] == {"zone": "a"}
    assert "kernelSize" not in stored("a null searchSpace entry (deleted)")["searchSpace"]
    assert stored("suspend: null (defaulted to false)")["suspend"] is False
    assert admit(NULLS_REJECTED["a null toleration in the list"])[1] == [
        "spec.trainer.tolerations.0: None is not of type 'object'"]


@pytest.mark.parametrize("document", UNKNOWN_FIELDS.values(), ids=UNKNOWN_FIELDS.keys())
def test_unknown_fields_are_refused_by_the_model_and_pruned_by_a_cluster(document):
    accepted, message = model_accepts(document["spec"])
    assert not accepted and message.endswith("unknown field"), message
    stored, errors = admit(document)
    assert stored is not None, errors
    unpruned = apply_defaults(prune_nulls(copy.deepcopy(document["spec"]), SPEC_SCHEMA), SPEC_SCHEMA)
    assert stored["spec"] != unpruned  # the field is gone
    assert model_accepts(stored["spec"]) == (True, "")


@pytest.mark.parametrize("document, field", MODEL_ONLY.values(), ids=MODEL_ONLY.keys())
def test_what_the_schema_cannot_express_lives_in_the_model_only(document, field):
    stored, errors = admit(document)
    assert stored is not None, f"the CRD now checks this too: move the case to REJECTED ({errors})"
    accepted, message = model_accepts(document["spec"])
    assert not accepted and message.startswith(f"{field}: "), message


@pytest.mark.parametrize("document", LAX_MODEL.values(), ids=LAX_MODEL.keys())
def test_values_of_the_wrong_json_type_are_refused_by_both(document):
    stored, _ = admit(document)
    assert stored is None
    assert not model_accepts(document["spec"])[0]


def test_the_api_server_defaults_do_not_add_fields_the_model_refuses():
    # Defaults inside a parameter would apply to every type (log: false on a categorical parameter).
    parameter = SPEC_SCHEMA["properties"]["searchSpace"]["additionalProperties"]
    assert not [k for k, v in parameter["properties"].items() if "default" in v]
    # Every default the API server fills in is what the model itself assumes.
    defaulted = stored_form(VALID)["spec"]
    assert parse_spec(defaulted) == parse_spec(VALID["spec"])
    assert defaulted["trainer"]["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"},
                                                 "limits": {"cpu": "2", "memory": "4Gi"}}


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
    documents = {**BOTH_ACCEPT, **BOTH_REJECT, **UNKNOWN_FIELDS, **{k: d for k, (d, _) in MODEL_ONLY.items()}}
    verdicts = []
    for name, document in documents.items():
        stored = stored_form(document)
        if not schema_errors(stored, SCHEMA):
            verdicts += [(name, *v) for v in cel_verdicts(stored, SCHEMA)]

    disagreements = [(name, rule, cel) for name, rule, cel, ours in verdicts if cel != ours]
    assert not disagreements, disagreements
    assert {rule for _, rule, _, _ in verdicts} == set(CEL_RULES)  # every rule was evaluated
    refused = {rule for _, rule, cel, _ in verdicts if not cel}
    assert len(refused) >= 16, f"only these rules ever refused a table manifest: {refused}"


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


def test_kubectl_get_shows_phase_completed_running_best_reused_and_age_and_more_with_o_wide():
    columns = VERSION["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == ["Phase", "Completed", "Running", "Best",
                                                                     "Reused", "Age"]
    assert [c["name"] for c in columns if c.get("priority") == 1] == ["Metric", "Sampler", "Reuse", "Saved",
                                                                      "Message"]
    assert {c["name"]: c["jsonPath"] for c in columns} == {
        "Phase": ".status.phase", "Completed": ".status.completed", "Running": ".status.trials.running",
        "Best": ".status.best.display", "Reused": ".status.reuse.trials", "Age": ".metadata.creationTimestamp",
        "Metric": ".spec.objective.metric", "Sampler": ".spec.sampler.name", "Reuse": ".status.reuse.rate",
        "Saved": ".status.reuse.secondsSaved", "Message": ".status.message"}
    assert {c["name"]: c["type"] for c in columns}["Age"] == "date"
    assert {c["name"]: c["type"] for c in columns}["Best"] == "string"  # 0.4383, not 0.43829917907714844


def test_kubectl_shows_best_to_4_digits_and_o_wide_shows_what_the_study_is_doing(kubectl, k8s_api):
    from strata.kube.builders import build_status
    from strata.scheduler import Best, Outcome, Progress

    kubectl("apply", "-f", str(ROOT / "crds" / "hpostudy.yaml"))
    manifest = yaml.safe_load((ROOT / "examples" / "fashion-quick.yaml").read_text())
    manifest["metadata"]["name"] = "shown"
    k8s_api.create("hpostudies", manifest)
    progress = Progress(complete=3, finished=3, running=2, configs=5, reused_trials=2,
                        best=Best(1, 0.43829917907714844, {"convLayers": 2}))
    outcome = Outcome(False, "Running", "TrialsRunning", "3 of 8 trials finished, 2 running; best 0.4383 (trial 1)")
    status = build_status({}, progress, outcome, max_trials=8, optuna_name="default.shown", generation=1)
    k8s_api.patch("hpostudies", "shown", {"status": status}, subresource="status")

    header, row = kubectl("get", "hpostudy", "shown").stdout.splitlines()
    assert row.split() == ["shown", "Running", "3/8", "2", "0.4383", "2", row.split()[-1]]
    header, row = kubectl("get", "hpostudy", "shown", "-o", "wide").stdout.splitlines()
    assert header.split()[-5:] == ["METRIC", "SAMPLER", "REUSE", "SAVED", "MESSAGE"]
    assert row.split()[7:12] == ["val_loss", manifest["spec"].get("sampler", {}).get("name", "tpe"), "67%", "0",
                                 "3"]
    assert row.endswith("3 of 8 trials finished, 2 running; best 0.4383 (trial 1)")


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
        assert schema_errors(stored_form(written, schema), schema) == []
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


def test_no_two_different_fields_share_a_description():
    # "Turn the feature on." for two unrelated fields tells kubectl explain's reader nothing. The
    # same text is fine only for the same structure reached twice (a toleration's fields under
    # trainer.tolerations and trainer.gpu.tolerations).
    import collections

    seen: dict[str, set[str]] = collections.defaultdict(set)

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if isinstance(node.get("description"), str):
            seen[node["description"]].add(path.split(".")[-1] if ".tolerations[]." in path else path)
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[]")

    walk(SCHEMA, "")
    shared = {text: paths for text, paths in seen.items() if len(paths) > 1}
    assert not shared, shared
