"""Realistic user mistakes in HPOStudy manifests, for the fault campaign and the e2e tests.

BAD_MANIFESTS: name -> a whole HPOStudy document (metadata.name is the case's name, so they can all
be applied side by side), each VALID of tests/test_spec.py broken in one place, as a user would.
EXPECTED_FIELDS: name -> the field path the model's one-line error names (the message starts with
"<field>: "). For a manifest on a cluster, a path under spec is what the operator's InvalidSpec
message names; apiVersion and metadata.name are checked by parse_study (strata run) only.
REFUSED_AT_ADMISSION: the names whose manifest the CRD schema itself refuses at `kubectl apply`
(schema or CEL, as tests/test_crd.py's admit emulates a real API server); the others reach the
operator, which reports InvalidSpec, except a misspelt field name: the API server prunes it, so the
study runs without it (kubectl apply's default --validate=strict refuses it first). Two are refused by the API
server for another reason: a metadata.name that is not a DNS subdomain (ObjectMeta validation) and
an apiVersion the server does not serve; they are marked NOT_AN_HPOSTUDY_ON_A_CLUSTER.
"""

from __future__ import annotations

from typing import Any

from tests.test_spec import DELETE, manifest


def _trainer(**fields: Any) -> dict[str, Any]:
    return {"spec__trainer": fields}


# name -> (changes to VALID, the field the error names, the CRD refuses it at admission)
_CASES: dict[str, tuple[dict[str, Any], str, bool]] = {
    # typos of field names
    "typo-trails": ({"spec__trials": DELETE, "spec__trails": {"max": 8}}, "spec.trials", True),
    "typo-maxfailled": ({"spec__trials": {"max": 8, "maxFailled": 1}}, "spec.trials.maxFailled", False),
    "typo-search-space-key": ({"spec__searchSpace__convLayer": {"type": "int", "low": 1, "high": 3}},
                              "spec.searchSpace", True),
    "typo-learning-rate": ({"spec__searchSpace__learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}},
                           "spec.searchSpace", True),
    "typo-node-selector": (_trainer(nodeSelecter={"pool": "gpu"}), "spec.trainer.nodeSelecter", False),
    # wrong types
    "max-is-a-word": ({"spec__trials": {"max": "four"}}, "spec.trials.max", True),
    "max-is-a-numeric-string": ({"spec__trials": {"max": "10"}}, "spec.trials.max", True),
    "suspend-is-a-word": ({"spec__suspend": "yes"}, "spec.suspend", True),
    "search-space-is-a-list": ({"spec__searchSpace": [{"type": "int", "low": 1, "high": 3}]}, "spec.searchSpace",
                               True),
    # counts
    "parallel-zero": ({"spec__trials": {"max": 8, "parallel": 0}}, "spec.trials.parallel", True),
    "negative-retries": ({"spec__trials": {"max": 8, "retries": -1}}, "spec.trials.retries", True),
    "parallel-above-max": ({"spec__trials": {"max": 2, "parallel": 4}}, "spec.trials", True),
    "timeout-zero": ({"spec__trials": {"max": 8, "timeoutSeconds": 0}}, "spec.trials.timeoutSeconds", True),
    "validation-split-percent": ({"spec__training": {"validationSplit": 20}}, "spec.training.validationSplit", True),
    "input-size-four": ({"spec__training": {"inputSize": 4}}, "spec.training.inputSize", True),
    "epochs-zero": ({"spec__training": {"epochs": 0}}, "spec.training.epochs", True),
    "gpu-count-zero": (_trainer(gpu={"enabled": True, "count": 0}), "spec.trainer.gpu.count", True),
    # missing or empty
    "missing-trials": ({"spec__trials": DELETE}, "spec.trials", True),
    "empty-search-space": ({"spec__searchSpace": {}}, "spec.searchSpace", True),
    "null-toleration": (_trainer(tolerations=[None]), "spec.trainer.tolerations.0", True),
    # names
    "name-of-64": ({"metadata": {"name": "n" * 64}}, "metadata.name", False),
    "name-uppercase": ({"metadata": {"name": "My_Study"}}, "metadata.name", False),
    "api-version-v1": ({"apiVersion": "hpo.strata.dev/v1"}, "apiVersion", False),
    "unknown-sampler": ({"spec__sampler": {"name": "bayesian"}}, "spec.sampler.name", True),
    "unknown-pruner": ({"spec__pruner": {"name": "asha"}}, "spec.pruner.name", True),
    "unknown-dataset": ({"spec__training": {"dataset": {"name": "fashion_mnist"}}}, "spec.training.dataset.name",
                        True),
    "device-gpu": ({"spec__training": {"device": "gpu"}}, "spec.training.device", True),
    "metric-accuracy": ({"spec__objective": {"metric": "accuracy"}}, "spec.objective.metric", True),
    # parameters
    "parameter-type-integer": ({"spec__searchSpace__filters": {"type": "integer", "low": 8, "high": 32}},
                               "spec.searchSpace.filters.type", True),
    "parameter-without-type": ({"spec__searchSpace__filters": {"low": 8, "high": 32}}, "spec.searchSpace.filters",
                               True),
    "low-above-high": ({"spec__searchSpace__convLayers": {"type": "int", "low": 3, "high": 1}},
                       "spec.searchSpace.convLayers", True),
    "log-from-zero": ({"spec__searchSpace__learningRate": {"type": "float", "low": 0, "high": 0.1, "log": True}},
                      "spec.searchSpace.learningRate", True),
    "categorical-without-choices": ({"spec__searchSpace__filters": {"type": "categorical"}},
                                    "spec.searchSpace.filters.choices", True),
    "even-kernel-size": ({"spec__searchSpace__kernelSize": {"type": "categorical", "choices": [3, 4]}},
                         "spec.searchSpace", False),
    "optimizer-nadam": ({"spec__searchSpace__optimizer": {"type": "categorical", "choices": ["adam", "nadam"]}},
                        "spec.searchSpace", False),
    "resnet-depth-not-6n-plus-2": ({"spec__model": {"family": "resnet"},
                                    "spec__searchSpace": {"depth": {"type": "categorical", "choices": [20, 21]}}},
                                   "spec.searchSpace.depth", False),
    "custom-without-entry-point": ({"spec__model": {"family": "custom"}}, "spec.model", True),
    "paper-parameter-for-resnet": ({"spec__model": {"family": "resnet"}}, "spec.searchSpace", True),
    "imagefolder-without-path": ({"spec__training__dataset": {"name": "imagefolder"}}, "spec.training.dataset",
                                 True),
    "fc-layout-and-fc-layers": ({"spec__searchSpace__fcLayout": {"type": "categorical", "choices": ["500"]},
                                 "spec__searchSpace__fcLayers": {"type": "int", "low": 1, "high": 2}},
                                "spec.searchSpace", True),
    "grid-over-a-float-range": ({"spec__sampler": {"name": "grid"}}, "spec", True),
    "too-deep-for-the-input": ({"spec__searchSpace__convLayers": {"type": "int", "low": 1, "high": 6}},
                               "spec.searchSpace.convLayers", False),
    # the objective
    "loss-maximized": ({"spec__objective": {"metric": "val_loss", "direction": "maximize", "goal": 0.3}},
                       "spec.objective", True),
    "accuracy-goal-in-percent": ({"spec__objective": {"metric": "val_accuracy", "goal": 90}}, "spec.objective",
                                 True),
    "negative-loss-goal": ({"spec__objective": {"goal": -0.5}}, "spec.objective", True),
    # what a pod cannot have
    "memory-lots": (_trainer(resources={"limits": {"cpu": "2", "memory": "lots"}}),
                    "spec.trainer.resources.limits.memory", True),
    "memory-with-a-space": (_trainer(resources={"limits": {"memory": "2 Gi"}}),
                            "spec.trainer.resources.limits.memory", True),
    "memory-lowercase-gi": (_trainer(resources={"limits": {"memory": "4gi"}}),
                            "spec.trainer.resources.limits.memory", True),
    "negative-cpu": (_trainer(resources={"requests": {"cpu": "-1"}}), "spec.trainer.resources.requests.cpu", True),
    "fractional-cpu-number": (_trainer(resources={"requests": {"cpu": 0.5}}), "spec.trainer.resources.requests.cpu",
                              True),
    "request-above-limit": (_trainer(resources={"requests": {"memory": "8Gi"}, "limits": {"memory": "4Gi"}}),
                            "spec.trainer.resources", False),
    "limit-below-default-request": (_trainer(resources={"limits": {"cpu": "500m", "memory": "4Gi"}}),
                                    "spec.trainer.resources", False),
    "resource-gpu": (_trainer(resources={"limits": {"gpu": 1}}), "spec.trainer.resources.limits", True),
    "gpu-in-resources-and-gpu-enabled": (_trainer(resources={"limits": {"cpu": "2", "nvidia.com/gpu": 1}},
                                                  gpu={"enabled": True}), "spec.trainer", False),
    "node-selector-key-with-space": (_trainer(nodeSelector={"node pool": "gpu"}), "spec.trainer.nodeSelector", True),
    "node-selector-value-of-64": (_trainer(nodeSelector={"pool": "p" * 64}), "spec.trainer.nodeSelector.pool", True),
    "node-selector-value-is-a-bool": (_trainer(gpu={"nodeSelector": {"gpu": True}}),
                                      "spec.trainer.gpu.nodeSelector.gpu", True),
    "exists-with-a-value": (_trainer(tolerations=[{"key": "spot", "operator": "Exists", "value": "true"}]),
                            "spec.trainer.tolerations.0", True),
    "toleration-seconds-no-schedule": (_trainer(tolerations=[{"key": "spot", "operator": "Exists",
                                                              "effect": "NoSchedule", "tolerationSeconds": 60}]),
                                       "spec.trainer.tolerations.0", True),
    "toleration-without-key": (_trainer(gpu={"tolerations": [{"value": "present", "effect": "NoSchedule"}]}),
                               "spec.trainer.gpu.tolerations.0", True),
    "toleration-key-with-space": (_trainer(tolerations=[{"key": "dedicated to", "operator": "Exists"}]),
                                  "spec.trainer.tolerations.0.key", True),
    "image-with-a-space": (_trainer(image="ghcr.io/strata-hpo/trainer: 0.1.0"), "spec.trainer.image", True),
    "image-empty": (_trainer(image=""), "spec.trainer.image", True),
    "service-account-uppercase": (_trainer(serviceAccountName="Trainer"), "spec.trainer.serviceAccountName", True),
    "secret-name-underscore": ({"spec__storage": {"databaseSecret": {"name": "strata_db", "key": "url"}}},
                               "spec.storage.databaseSecret.name", True),
    "secret-key-with-slash": ({"spec__storage": {"databaseSecret": {"name": "strata-db", "key": "db/url"}}},
                              "spec.storage.databaseSecret.key", True),
    "object-store-secret-namespaced": ({"spec__storage": {"objectStoreSecret": "strata/strata-s3"}},
                                       "spec.storage.objectStoreSecret", True),
    "checkpoints-without-bucket": ({"spec__storage": {"checkpoints": "s3://"}}, "spec.storage.checkpoints", False),
}


def _document(name: str, changes: dict[str, Any]) -> dict[str, Any]:
    document = manifest(metadata={"name": name}, **{k: v for k, v in changes.items() if k != "metadata"})
    if "metadata" in changes:
        document["metadata"] = dict(changes["metadata"])
    return document


BAD_MANIFESTS: dict[str, dict[str, Any]] = {name: _document(name, changes) for name, (changes, _, _) in _CASES.items()}
EXPECTED_FIELDS: dict[str, str] = {name: field for name, (_, field, _) in _CASES.items()}
REFUSED_AT_ADMISSION: frozenset[str] = frozenset(name for name, (_, _, refused) in _CASES.items() if refused)
NOT_AN_HPOSTUDY_ON_A_CLUSTER: frozenset[str] = frozenset({"name-uppercase", "api-version-v1"})
