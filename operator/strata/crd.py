"""The HPOStudy CRD, generated from the spec model: `python -m strata.crd > crds/hpostudy.yaml`.

Pydantic's JSON schema becomes a structural openAPIV3Schema: references inlined, the parameter
union merged into one object with CEL rules, descriptions from spec.FIELD_DOCS on every field.

Nothing in the spec is nullable and no default holds a null: an API server refuses a CRD whose
default fails its own schema (a null fails every enum, nullable or not: kube-openapi's
basicCommonValidator), and it deletes a null of a non-nullable field without a default from every
incoming object (or replaces it by the default), so a null in a manifest means unset, which is what
the model's None means. Map keys are checked by CEL (`self.all(k, k.matches(...))`) with the
patterns of strata.spec; every map, list and string a rule iterates or matches is bounded
(maxProperties, maxItems, maxLength) so that the API server's cost estimate stays within its limits.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from strata.spec import (API_GROUP, API_VERSION, FAMILY_PARAMETERS, FIELD_DOCS, KIND, METRIC_RANGES,
                         PARAMETER_NAME_PATTERN, QUALIFIED_NAME_LENGTHS, TRAINING_PARAMETERS, USER_DATASETS, QUALIFIED_NAME_PATTERN, RESOURCE_NAME_LENGTHS, RESOURCE_NAME_PATTERN,
                         StudySpec)

PLURAL, SINGULAR, SHORT = "hpostudies", "hpostudy", ["hpo"]

# low, high and step are CEL doubles: literals are written as doubles and integrality as
# x == double(int(x)), since CEL's type checker may refuse mixed int/double comparisons.
PARAMETER_RULES = [
    {"rule": "self.type != 'categorical' || has(self.choices)", "message": "a categorical parameter needs choices"},
    {"rule": "self.type == 'categorical' || (has(self.low) && has(self.high))",
     "message": "int and float parameters need low and high"},
    {"rule": "self.type == 'categorical' || !has(self.choices)", "message": "only categorical parameters take choices"},
    {"rule": "self.type != 'categorical' || (!has(self.low) && !has(self.high) && !has(self.step) && !has(self.log))",
     "message": "categorical parameters take no low, high, step or log"},
    {"rule": "!has(self.low) || !has(self.high) || self.low <= self.high", "message": "low must not exceed high"},
    {"rule": "!has(self.log) || !self.log || !has(self.low) || self.low > 0.0", "message": "log scale needs low > 0"},
    {"rule": "!has(self.log) || !self.log || !has(self.step) || (self.type == 'int' && self.step == 1.0)",
     "message": "log scale cannot be combined with step"},
    {"rule": "self.type != 'int' || ((!has(self.low) || self.low == double(int(self.low))) && "
             "(!has(self.high) || self.high == double(int(self.high))))",
     "message": "int parameters need integer low and high"},
    {"rule": "!has(self.step) || self.step > 0.0", "message": "step must be positive"},
    {"rule": "self.type != 'int' || !has(self.step) || self.step == double(int(self.step))",
     "message": "int parameters need an integer step"},
]
MAX_PARAMETERS = 64  # bounds the CEL cost of iterating the search space (a custom family names its own)
SEARCH_SPACE_RULES = [
    {"rule": "!('fcLayout' in self) || !('fcLayers' in self || 'fcUnits' in self)",
     "message": "use either fcLayout or fcLayers/fcUnits, not both"},
]


def _family_rule(family: str) -> dict[str, str]:
    """The parameter names a family reads (paper-cnn is the default when spec.model.family is unset)."""
    if family == "paper-cnn":
        guard = "(has(self.model) && has(self.model.family) && self.model.family != 'paper-cnn')"
    else:
        guard = f"!has(self.model) || !has(self.model.family) || self.model.family != '{family}'"
    if family == "custom":
        return {"rule": f"{guard} || self.searchSpace.all(k, k.matches('{PARAMETER_NAME_PATTERN}'))",
                "message": "a custom family's parameter names start with a letter, then letters, digits or _ "
                           "(at most 63)"}
    known = [*FAMILY_PARAMETERS[family], *TRAINING_PARAMETERS]
    return {"rule": f"{guard} || self.searchSpace.all(k, k in [" + ", ".join(f"'{n}'" for n in known) + "])",
            "message": f"unknown parameter for model family {family} (known: {', '.join(known)})"}


FAMILY_RULES = [_family_rule(family) for family in FAMILY_PARAMETERS]
_USER_DATASETS = "[" + ", ".join(f"'{name}'" for name in USER_DATASETS) + "]"
MODEL_RULES = [
    {"rule": "(has(self.family) && self.family == 'custom') == has(self.entryPoint)",
     "message": "entryPoint (package.module:function) is needed by family custom, and only by it"}]
DATASET_RULES = [
    {"rule": f"!has(self.name) || !(self.name in {_USER_DATASETS}) || (has(self.path) && self.path != '')",
     "message": "imagefolder and npz datasets need a path (a directory, an archive or s3://bucket/prefix)"},
    {"rule": f"!has(self.channels) || (has(self.name) && self.name in {_USER_DATASETS})",
     "message": "only imagefolder and npz datasets take channels"}]
TRAINING_RULES = [
    {"rule": "!(has(self.nesterov) && self.nesterov && has(self.optimizer) && self.optimizer == 'sgd' && "
             "has(self.momentum) && self.momentum == 0.0)",
     "message": "nesterov needs momentum > 0"}]
# The keys of a map, by the mark strata.spec puts on it (x-strata-keys). CEL's matches() is RE2, like
# the API server's patterns; the spec's patterns need no escaping inside a CEL string literal.
KEY_RULES = {
    "qualifiedName": {
        "rule": f"self.all(k, k.matches('{QUALIFIED_NAME_PATTERN}') && k.matches('{QUALIFIED_NAME_LENGTHS}'))",
        "message": "keys must be qualified names ([prefix/]name: name at most 63 of A-Za-z0-9 with -_. inside, "
                   "prefix a DNS subdomain of at most 253)"},
    "resourceName": {
        "rule": f"self.all(k, k.matches('{RESOURCE_NAME_PATTERN}') && k.matches('{RESOURCE_NAME_LENGTHS}') && "
                "!k.startsWith('requests.'))",
        "message": "keys must be container resources: cpu, memory, ephemeral-storage, hugepages-<size> or an "
                   "extended resource with a domain, like nvidia.com/gpu"},
}
TOLERATION_RULES = [
    {"rule": f"self == '' || self.matches('{QUALIFIED_NAME_LENGTHS}')",  # on the key: the pattern checks the rest
     "message": "a taint key's name is at most 63 characters and its prefix at most 253"},
]
TOLERATION_ITEM_RULES = [
    {"rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
     "message": "a toleration without key matches every taint and needs operator Exists"},
    {"rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
     "message": "operator Exists takes no value"},
    {"rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
     "message": "tolerationSeconds needs effect NoExecute"},
]
# CEL doubles: a goal of 1 (a JSON integer) is 1.0 to CEL, as the schema types goal a number.
_ACCURACY_HIGH = METRIC_RANGES["val_accuracy"][1]
OBJECTIVE_RULES = [
    {"rule": "!has(self.direction) || "
             "(self.direction == 'minimize') == (!has(self.metric) || self.metric == 'val_loss')",
     "message": "direction contradicts the metric: val_loss is minimized, val_accuracy maximized"},
    {"rule": "!has(self.goal) || self.goal >= 0.0",
     "message": "goal must be at least 0 (val_loss and val_accuracy are)"},
    {"rule": "!has(self.goal) || !has(self.metric) || self.metric != 'val_accuracy' || "
             f"self.goal <= {_ACCURACY_HIGH!r}",
     "message": "a val_accuracy goal must be within [0, 1]"},
]


def _without_nulls(value: Any) -> Any:
    """A default as the API server must get it: no null anywhere (a null fails an enum)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value if v is not None]
    return value


# Where one manifest name means different things (FIELD_DOCS is keyed by the name alone).
CONTEXT_DOCS = {
    ("tolerations", "key"): "Taint key the toleration matches (a qualified name); empty with operator Exists matches "
                            "every taint.",
    ("databaseSecret", "name"): "Name of the Secret (a DNS subdomain name), in the study's namespace.",
    ("sampler", "name"): "Sampler: tpe, random, grid, cmaes, gp or qmc.",
    ("pruner", "name"): "Pruner: none, median, successiveHalving or hyperband.",
    ("dataset", "name"): "Dataset: fashion-mnist, mnist, cifar10, cifar100, imagefolder or npz.",
    ("pruner", "startupTrials"): "Trials that finish before the pruner starts pruning.",
    ("sampler", "startupTrials"): "Random trials before the sampler starts modelling (tpe, gp).",
    ("keepFinishedPods", "count"): "Keep at most this many finished trial pods, the newest (unset: no limit).",
    ("keepFinishedPods", "seconds"): "Remove a finished trial pod this many seconds after it ended (unset: never "
                                     "by age).",
    ("env", "name"): "Name of the environment variable ([-._a-zA-Z][-._a-zA-Z0-9]*).",
    ("env", "value"): "Its value (or give valueFrom).",
    ("volumeMounts", "name"): "Name of a volume in trainer.volumes.",
    ("sampler", "seed"): "Seed of the sampler: the same seed proposes the same configurations, for reproducible "
                         "studies (unset: a fresh seed each run).",
    ("training", "seed"): "Seed of every trial's weight initialisation, data order and subset (the validation split "
                          "is fixed by it too), so trials differ only in their hyperparameters.",
    ("reuse", "enabled"): "Reuse trained layers: a trial starts from the deepest matching prefix an earlier trial "
                          "trained (false: every trial trains from scratch, as a plain HPO study does).",
    ("gpu", "enabled"): "Send trials to GPU nodes: those at least minConvLayers deep or minFilters wide (neither "
                        "set: every trial), with gpu.count GPUs each; the others stay on CPU nodes.",
    ("gpu", "nodeSelector"): "Node labels a GPU trial's pod must match, added to trainer.nodeSelector (at most 64; "
                             "empty: the operator's configured GPU pool).",
    ("gpu", "tolerations"): "Tolerations of GPU trials' pods, added to trainer.tolerations (at most 32; empty: the "
                            "operator's configured GPU pool's).",
}


def _structural(node: Any, defs: dict[str, Any], name: str | None = None) -> Any:
    """name: the nearest property name above this node (array items and map values keep it)."""
    if isinstance(node, list):
        return [_structural(n, defs, name) for n in node]
    if not isinstance(node, dict):
        return node
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**copy.deepcopy(target), **node}
    if "oneOf" in node and "discriminator" in node:
        return _merged_parameter(node, defs)
    if "anyOf" in node:
        variants = node.pop("anyOf")
        options = [o for o in variants if o.get("type") != "null"]
        if len(options) == 1:  # Optional[X]: X, not nullable (a null is pruned: unset, the model's None)
            node = {**_structural(options[0], defs, name), **node}
        else:  # a union of scalars (categorical choices): any JSON value
            node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("additionalProperties") is True:  # a free-form Kubernetes object (affinity, a volume)
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    node.pop("title", None)
    node.pop("discriminator", None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)  # int-or-string has no type of its own
    if "x-strata-keys" in node:
        node.setdefault("x-kubernetes-validations", []).append(copy.deepcopy(KEY_RULES[node.pop("x-strata-keys")]))
    # JSON Schema's numeric exclusive bounds become OpenAPI 3.0's minimum + boolean (once: an Optional
    # field's merged anyOf node may come through here twice).
    if not isinstance(node.get("exclusiveMinimum", True), bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if not isinstance(node.get("exclusiveMaximum", True), bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"], defs, name)
    if "items" in node:
        node["items"] = _structural(node["items"], defs, name)
    if "properties" in node:
        node["properties"] = {k: _described(_structural(v, defs, k), k, name) for k, v in node["properties"].items()}
    if node.get("default") is None:
        node.pop("default", None)
    else:
        node["default"] = _without_nulls(node["default"])
    return node


def _described(node: dict[str, Any], name: str, parent: str | None) -> dict[str, Any]:
    if (parent, name) in CONTEXT_DOCS:
        node["description"] = CONTEXT_DOCS[parent, name]
    elif name in FIELD_DOCS:
        node["description"] = FIELD_DOCS[name]
    return node


def _merged_parameter(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Structural schemas allow no oneOf of objects: one object with every field, CEL per type."""
    properties: dict[str, Any] = {}
    for option in node["oneOf"]:
        variant = _structural(option, defs)
        for key, value in variant.get("properties", {}).items():
            if key == "type":
                continue
            if key in ("low", "high", "step"):
                value = {"type": "number", "description": FIELD_DOCS[key]}
            # No defaults: the API server would add them to every variant (log: false on a
            # categorical parameter, which the model refuses); the model defaults per type.
            value = {k: v for k, v in value.items() if k != "default"}
            properties.setdefault(key, value)
    properties["type"] = {"type": "string", "enum": ["int", "float", "categorical"], "description": FIELD_DOCS["type"]}
    properties["choices"] = {"type": "array", "minItems": 1, "description": FIELD_DOCS["choices"],
                             "items": {"x-kubernetes-preserve-unknown-fields": True}}
    return {"type": "object", "required": ["type"], "properties": properties,
            "x-kubernetes-validations": PARAMETER_RULES}


def spec_schema() -> dict[str, Any]:
    schema = StudySpec.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    result = _structural(schema, defs)
    result["description"] = ("Desired state of a hyperparameter study over a model family (the paper's CNN, VGG, "
                             "ResNet, MobileNetV2 or the user's own).")
    search_space = result["properties"]["searchSpace"]
    search_space["maxProperties"] = MAX_PARAMETERS
    search_space["x-kubernetes-validations"] = SEARCH_SPACE_RULES
    trials = result["properties"]["trials"]
    trials["x-kubernetes-validations"] = [
        {"rule": "!has(self.parallel) || self.parallel <= self.max", "message": "parallel must not exceed max"}]
    result["properties"]["objective"]["x-kubernetes-validations"] = copy.deepcopy(OBJECTIVE_RULES)
    trainer = result["properties"]["trainer"]["properties"]
    for tolerations in (trainer["tolerations"], trainer["gpu"]["properties"]["tolerations"]):
        tolerations["items"]["x-kubernetes-validations"] = copy.deepcopy(TOLERATION_ITEM_RULES)
        tolerations["items"]["properties"]["key"]["x-kubernetes-validations"] = copy.deepcopy(TOLERATION_RULES)
    result["properties"]["model"]["x-kubernetes-validations"] = copy.deepcopy(MODEL_RULES)
    training = result["properties"]["training"]
    training["x-kubernetes-validations"] = copy.deepcopy(TRAINING_RULES)
    training["properties"]["dataset"]["x-kubernetes-validations"] = copy.deepcopy(DATASET_RULES)
    result["x-kubernetes-validations"] = copy.deepcopy(FAMILY_RULES) + [
        {"rule": "!has(self.sampler) || !has(self.sampler.name) || self.sampler.name != 'grid' || "
                 "self.searchSpace.all(k, self.searchSpace[k].type != 'float' || has(self.searchSpace[k].step))",
         "message": "sampler grid needs finite parameters: float ranges need a step"}]
    return result


STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Observed state: phase, conditions, trial counts, the best trial, reuse totals.",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "phase": {"type": "string", "description": "Pending, Running, Suspended, Succeeded, Failed, Invalid or Error."},
        "message": {"type": "string", "description": "Human-readable state."},
        "observedGeneration": {"type": "integer", "description": "The spec generation this status reflects."},
        "optunaStudy": {"type": "string", "description": "Name of the Optuna study."},
        "completed": {"type": "string", "description": "Finished trials of max, e.g. 7/20."},
        "trials": {"type": "object", "description": "Trial counts by state.", "properties": {
            "max": {"type": "integer", "description": "spec.trials.max when this status was written."},
            "complete": {"type": "integer", "description": "Trials that finished with a value."},
            "pruned": {"type": "integer", "description": "Trials the pruner stopped early."},
            "failed": {"type": "integer", "description": "Failed attempts, retried or not (they count towards maxFailed)."},
            "retried": {"type": "integer", "description": "Attempts that re-ran a failed trial's configuration."},
            "running": {"type": "integer", "description": "Trials with a trainer pod running now."},
            "waiting": {"type": "integer", "description": "Asked trials waiting for a donor or a free slot."},
            "finished": {"type": "integer", "description": "Configurations done: complete, pruned or failed for good."}}},
        "best": {"type": "object", "nullable": True, "description": "The best trial so far.", "properties": {
            "number": {"type": "integer", "description": "Optuna trial number."},
            "value": {"type": "number", "description": "Its objective value."},
            "display": {"type": "string", "description": "Its objective value to 4 significant digits, as "
                                                         "`kubectl get` shows it (BEST)."},
            "testAccuracy": {"type": "number", "description": "Accuracy of its best-epoch weights on the held-out "
                                                              "test split (trials are chosen on validation only)."},
            "model": {"type": "string", "description": "Its network, e.g. resnet-20."},
            "params": {"type": "object", "description": "Its hyperparameters, as strings.",
                       "additionalProperties": {"type": "string"}}}},
        "reuse": {"type": "object", "description": "What layer reuse did for this study.", "properties": {
            "trials": {"type": "integer", "description": "Finished trials that reused trained layers."},
            "layers": {"type": "integer", "description": "Conv layers those trials reused, in total."},
            "secondsSaved": {"type": "number", "description": "Estimated training seconds saved by reuse."},
            "rate": {"type": "string", "description": "Share of finished trials that reused layers, e.g. 40%."}}},
        "conditions": {"type": "array",
                       "description": "Ready, Running, Complete, Failed and Degraded (a dependency is down: which, "
                                      "since when) conditions.",
                       "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                       "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                 "required": ["type", "status"],
                                 "properties": {
                                     "type": {"type": "string",
                                              "description": "Ready, Running, Complete, Failed or Degraded."},
                                     "status": {"type": "string", "description": "True, False or Unknown."},
                                     "reason": {"type": "string", "description": "Why, in one CamelCase word."},
                                     "message": {"type": "string", "description": "Why, for people."},
                                     "lastTransitionTime": {"type": "string", "format": "date-time",
                                                            "description": "When status last changed."},
                                     "observedGeneration": {"type": "integer",
                                                            "description": "The spec generation it reflects."}}}},
    },
}


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "shortNames": SHORT,
                      "listKind": f"{KIND}List", "categories": ["strata"]},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Completed", "type": "string", "jsonPath": ".status.completed"},
                    {"name": "Running", "type": "integer", "jsonPath": ".status.trials.running"},
                    {"name": "Best", "type": "string", "jsonPath": ".status.best.display",
                     "description": "The best trial's objective value, to 4 significant digits."},
                    {"name": "Reused", "type": "integer", "jsonPath": ".status.reuse.trials",
                     "description": "Finished trials that reused trained layers."},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    # -o wide
                    {"name": "Metric", "type": "string", "jsonPath": ".spec.objective.metric", "priority": 1},
                    {"name": "Sampler", "type": "string", "jsonPath": ".spec.sampler.name", "priority": 1},
                    {"name": "Reuse", "type": "string", "jsonPath": ".status.reuse.rate", "priority": 1,
                     "description": "Share of finished trials that reused layers."},
                    {"name": "Saved", "type": "number", "jsonPath": ".status.reuse.secondsSaved", "priority": 1,
                     "description": "Estimated training seconds saved by reuse."},
                    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1,
                     "description": "What the study is doing, or why it stopped."},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A hyperparameter optimisation study whose trials reuse trained conv layers.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string", "description": "hpo.strata.dev/v1alpha1."},
                        "kind": {"type": "string", "description": "HPOStudy."},
                        "metadata": {"type": "object", "description": "Standard object metadata."},
                        "spec": spec_schema(),
                        "status": STATUS_SCHEMA,
                    },
                }},
            }],
        },
    }


def main() -> None:
    sys.stdout.write("# Generated by `python -m strata.crd` from operator/strata/spec.py: do not edit.\n")
    yaml.safe_dump(build_crd(), sys.stdout, sort_keys=False, width=120)


if __name__ == "__main__":
    main()
