"""The HPOStudy spec: one typed model shared by the CLI, the scheduler, the trainer and the CRD.

A study file and a Kubernetes manifest have the same shape:

    apiVersion: hpo.strata.dev/v1alpha1
    kind: HPOStudy
    metadata: {name: fashion-quick}
    spec: {objective: ..., searchSpace: ..., trials: ..., training: ..., reuse: ..., storage: ...}

Field names are camelCase in YAML (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

import itertools
import json
import re
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_origin

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic.alias_generators import to_camel

API_GROUP = "hpo.strata.dev"
API_VERSION = "v1alpha1"
KIND = "HPOStudy"

# Hyperparameters every family reads: how a trial trains (they override spec.training's values).
TRAINING_PARAMETERS = {
    "learningRate": "optimizer learning rate",
    "batchSize": "minibatch size",
    "optimizer": "adam, adamw, sgd or rmsprop",
    "momentum": "momentum of sgd and rmsprop (default 0.9 for sgd, 0 for rmsprop)",
    "nesterov": "Nesterov momentum for sgd (true or false)",
    "weightDecay": "L2 weight decay (decoupled for adamw)",
    "lrSchedule": "learning-rate schedule: none, step (decay at spec.training.schedule.milestones) or cosine",
    "initialization": "weight initialisation: default (PyTorch's) or he (Kaiming normal, fan-out)",
    "randomCropPadding": "augmentation: random crop after zero-padding by this many pixels (0 = off)",
    "horizontalFlip": "augmentation: random horizontal flip (true or false)",
}
# Parameters of each model family's structure (see strata.families).
FAMILY_PARAMETERS: dict[str, dict[str, str]] = {
    "paper-cnn": {
        "convLayers": "number of conv blocks (3x3 conv, ReLU, 2x2 max-pool)",
        "filters": "filters of every conv layer (one count shared by all layers, as in the paper)",
        "kernelSize": "conv kernel size (odd; same padding)",
        "fcLayout": "FC hidden layers as a dash-separated string of units, e.g. '500-250'; 'none' for no hidden layer",
        "fcLayers": "number of FC hidden layers (used with fcUnits when fcLayout is absent)",
        "fcUnits": "units of every FC hidden layer (used with fcLayers)",
    },
    "vgg": {
        "groups": "conv groups (1-5), each ending in a 2x2 max-pool (default 5)",
        "layersPerGroup": "conv-BN-ReLU layers per group: one count for every group, or one per group as a "
                          "dash-separated string ('1-1-2-2-2' is VGG-11, '2-2-3-3-3' VGG-16, the default)",
        "width": "channels of the first group, doubled by each further group up to 8x (default 64)",
    },
    "resnet": {
        "depth": "6n+2 (8, 14, 20, 32, 44, 56, ...): three stages of n basic blocks (default 20)",
        "widthMultiplier": "scales the stage widths 16, 32, 64 (default 1.0)",
    },
    "mobilenetv2": {
        "widthMultiplier": "scales every layer's channels, rounded to multiples of 8 (default 1.0)",
        "stages": "how many of MobileNetV2's 7 inverted-residual stages (1-7, default 7)",
    },
    "custom": {},  # the user's function reads whatever its search space names
}
MODEL_FAMILIES = tuple(FAMILY_PARAMETERS)
# Every name a built-in family reads (the CRD's list; strata.families checks the family's own).
KNOWN_PARAMETERS = {**{name: doc for params in FAMILY_PARAMETERS.values() for name, doc in params.items()},
                    **TRAINING_PARAMETERS}
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LR_SCHEDULES = ("none", "step", "cosine")
INITIALIZATIONS = ("default", "he")
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "npz")
USER_DATASETS = ("imagefolder", "npz")  # the user's own images: channels and size come from the spec
PARAMETER_NAME_PATTERN = "^[A-Za-z][A-Za-z0-9_]{0,62}$"  # a custom family's parameter names
ENTRY_POINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# The direction each metric is optimised in and the values it can take (lowest, highest).
METRIC_DIRECTIONS = {"val_loss": "minimize", "val_accuracy": "maximize"}
METRIC_RANGES: dict[str, tuple[float, float | None]] = {"val_loss": (0.0, None), "val_accuracy": (0.0, 1.0)}

# --- what Kubernetes accepts in a pod (k8s.io/apimachinery/pkg/util/validation, api/resource) ------
# Written for RE2 (the API server's and CEL's engine) and Python's re alike: no look-around, and no
# backslash except IMAGE_PATTERN's \t\n\v\f\r (the same in both; it is no CEL rule), so that the
# texts go into CEL string literals unescaped. The model matches them whole (re.fullmatch); the CRD
# carries the same texts as patterns and CEL rules (strata.crd).
_DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = f"{_DNS_LABEL}([.]{_DNS_LABEL})*"
_NAME_PART = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
DNS_SUBDOMAIN_PATTERN = f"^{_SUBDOMAIN}$"  # Secret and service account names; at most 253
DNS_SUBDOMAIN_MAX = 253
QUALIFIED_NAME_PATTERN = f"^({_SUBDOMAIN}/)?{_NAME_PART}$"  # label keys, taint keys: [prefix/]name
QUALIFIED_NAME_LENGTHS = "^([^/]{1,253}/)?[^/]{1,63}$"  # prefix at most 253, name at most 63
QUALIFIED_NAME_MAX = 253 + 1 + 63
LABEL_VALUE_PATTERN = f"^({_NAME_PART})?$"  # at most 63; may be empty
LABEL_VALUE_MAX = 63
# A Secret key (IsConfigMapKey): [-._a-zA-Z0-9]+, not '.', not '..' and not starting with '..'.
SECRET_KEY_PATTERN = "^([-_a-zA-Z0-9][-._a-zA-Z0-9]*|[.][-_a-zA-Z0-9][-._a-zA-Z0-9]*)$"
SECRET_KEY_MAX = 253
# resource.Quantity without a sign: 1, 0.5, .5, 500m, 2Gi, 1e3, 1.5G (negative quantities are refused).
QUANTITY_PATTERN = "^[+]?([0-9]+([.][0-9]*)?|[.][0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
# A container resource: a standard one, or an extended resource with a domain (nvidia.com/gpu). The
# prefix is at most 244 so that requests.<name> stays a qualified name (IsExtendedResourceName).
RESOURCE_NAME_PATTERN = (f"^(cpu|memory|ephemeral-storage|hugepages-[0-9]+([KMGTPE]i|[kMGTPE])?|"
                         f"{_SUBDOMAIN}/{_NAME_PART})$")
RESOURCE_NAME_LENGTHS = "^([^/]{1,244}/)?[^/]{1,63}$"
IMAGE_PATTERN = r"^[^ \t\n\v\f\r]+$"  # a container image: not empty, no whitespace
DNS_LABEL_PATTERN = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # volume names; at most 63
ENV_NAME_PATTERN = "^[-._a-zA-Z][-._a-zA-Z0-9]*$"  # a container env var name (Kubernetes' C-identifier-ish rule)
ABSOLUTE_PATH_PATTERN = "^/[^:]*$"
MAX_MAP_ENTRIES = 64  # nodeSelector maps (bounds the CEL cost of checking their keys)
MAX_RESOURCES = 16  # entries of requests / limits
MAX_TOLERATIONS = 32
# activeDeadlineSeconds (timeoutSeconds + 60, see strata.kube.builders) is an int32.
MAX_TIMEOUT_SECONDS = 2**31 - 1 - 60
INT64_MAX = 2**63 - 1


class SpecError(ValueError):
    """A user error in a study file or manifest; the message names the field."""


def _shown(value: Any, limit: int = 60) -> str:
    """A user's value in a one-line message: quoted, escaped, cut."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def _one_line(text: str) -> str:
    """No line breaks or control characters (a key or value may hold them): escaped as repr does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Model(BaseModel):
    # Strict: "8" is not an int and "yes" not a bool, as for the API server's schema validation.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              strict=True)

    @model_validator(mode="before")
    @classmethod
    def _as_the_api_server_reads_it(cls, data: Any) -> Any:
        """A null means unset, and an integer field takes 8.0 as 8, as on a cluster.

        The CRD declares nothing nullable, so the API server deletes a null field (or map entry) that
        has no default and replaces one that has a default by the default (a null list item stays, and
        fails). Dropping nulls here gives the model's own defaults: the same values.
        """
        if not isinstance(data, dict):
            return data
        converted = {key: value for key, value in data.items() if value is not None}
        for name, field in cls.model_fields.items():
            for key in {name, field.alias}:
                value = converted.get(key)
                if field.annotation in (int, Optional[int]) and isinstance(value, float) and value.is_integer():
                    converted[key] = int(value)
                elif get_origin(field.annotation) is dict and isinstance(value, dict):
                    converted[key] = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict)
                                          else v) for k, v in value.items() if v is not None}
        return converted


def _checked(pattern: str, what: str, max_length: int | None = None, lengths: str | None = None):
    def check(value: str) -> str:
        if ((max_length is not None and len(value) > max_length) or not re.fullmatch(pattern, value)
                or (lengths is not None and not re.fullmatch(lengths, value))):
            raise ValueError(f"{_shown(value)} is not {what}")
        return value
    return check


def _schema(pattern: str, max_length: int | None = None) -> dict[str, Any]:
    return {"pattern": pattern, **({"maxLength": max_length} if max_length is not None else {})}


_SUBDOMAIN_WHAT = "a DNS subdomain name (lowercase letters, digits, '-' and '.', at most 253)"
_QUALIFIED_WHAT = ("a qualified name ([prefix/]name: name at most 63 of A-Za-z0-9 with -_. inside, prefix a DNS "
                   "subdomain)")
_LABEL_VALUE_WHAT = "a label value (at most 63 of A-Za-z0-9 with -_. inside, or empty)"
DnsSubdomain = Annotated[str, AfterValidator(_checked(DNS_SUBDOMAIN_PATTERN, _SUBDOMAIN_WHAT, DNS_SUBDOMAIN_MAX)),
                         Field(json_schema_extra=_schema(DNS_SUBDOMAIN_PATTERN, DNS_SUBDOMAIN_MAX))]
LabelValue = Annotated[str, AfterValidator(_checked(LABEL_VALUE_PATTERN, _LABEL_VALUE_WHAT, LABEL_VALUE_MAX)),
                       Field(json_schema_extra=_schema(LABEL_VALUE_PATTERN, LABEL_VALUE_MAX))]
SecretKey = Annotated[str, AfterValidator(_checked(
    SECRET_KEY_PATTERN, "a Secret key ([-._a-zA-Z0-9]+, at most 253, not '.' and not starting with '..')",
    SECRET_KEY_MAX)), Field(json_schema_extra=_schema(SECRET_KEY_PATTERN, SECRET_KEY_MAX))]
Image = Annotated[str, AfterValidator(_checked(IMAGE_PATTERN, "a container image (not empty, no whitespace)")),
                  Field(json_schema_extra=_schema(IMAGE_PATTERN))]
check_qualified_name = _checked(QUALIFIED_NAME_PATTERN, _QUALIFIED_WHAT, QUALIFIED_NAME_MAX, QUALIFIED_NAME_LENGTHS)
_check_resource_name = _checked(
    RESOURCE_NAME_PATTERN, "a container resource (cpu, memory, ephemeral-storage, hugepages-<size> or an extended "
    "resource with a domain, like nvidia.com/gpu)", None, RESOURCE_NAME_LENGTHS)


def _qualified_keys(value: dict[str, Any]) -> dict[str, Any]:
    for key in value:
        try:
            check_qualified_name(key)
        except ValueError as error:
            raise ValueError(f"key {error}") from None
    return value


# Marks for the CRD generator (strata.crd): which CEL rule checks the keys of a map.
KEYS_QUALIFIED_NAMES = {"x-strata-keys": "qualifiedName"}
KEYS_RESOURCE_NAMES = {"x-strata-keys": "resourceName"}
NodeSelector = Annotated[dict[str, LabelValue],
                         Field(max_length=MAX_MAP_ENTRIES, json_schema_extra=KEYS_QUALIFIED_NAMES),
                         AfterValidator(_qualified_keys)]


# --- search space -----------------------------------------------------------------------------


class IntParam(_Model):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> "IntParam":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low < 1:
            raise ValueError("log scale needs low >= 1")
        if self.log and self.step != 1:
            raise ValueError("log scale cannot be combined with step")
        return self

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    @property
    def largest(self) -> int:
        """The highest value the range takes (high, or below it when step does not reach it)."""
        return self.low + (self.high - self.low) // self.step * self.step

    def representatives(self) -> list[int]:
        """Values that stand for the whole range in value checks (sign, parity): never a huge list."""
        return sorted({self.low, min(self.low + self.step, self.largest), self.largest})


class FloatParam(_Model):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "FloatParam":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log scale cannot be combined with step")
        return self

    def values(self) -> list[float]:
        if self.step is None:
            raise SpecError("a float range without step has no finite grid")
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


class CategoricalParam(_Model):
    type: Literal["categorical"]
    choices: list[Union[bool, int, float, str]] = Field(min_length=1)

    def values(self) -> list[Any]:
        return list(self.choices)


Parameter = Annotated[Union[IntParam, FloatParam, CategoricalParam], Field(discriminator="type")]


# --- the rest of the spec ---------------------------------------------------------------------


class Objective(_Model):
    metric: Literal["val_loss", "val_accuracy"] = "val_loss"
    direction: Literal["minimize", "maximize"] | None = None
    goal: float | None = None  # stop the study once a trial reaches this value

    @model_validator(mode="after")
    def _check(self) -> "Objective":
        natural = METRIC_DIRECTIONS[self.metric]
        if self.direction is not None and self.direction != natural:
            raise ValueError(f"direction {self.direction} contradicts metric {self.metric}, which is {natural}d")
        low, high = METRIC_RANGES[self.metric]
        if self.goal is not None and not (self.goal >= low and (high is None or self.goal <= high)):
            where = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
            raise ValueError(f"goal {self.goal!r} is outside what {self.metric} can reach ({where})")
        return self

    @property
    def resolved_direction(self) -> str:
        if self.direction:
            return self.direction
        return "minimize" if self.metric == "val_loss" else "maximize"

    def reached(self, value: float | None) -> bool:
        if self.goal is None or value is None:
            return False
        return value <= self.goal if self.resolved_direction == "minimize" else value >= self.goal


class Sampler(_Model):
    name: Literal["tpe", "random", "grid", "cmaes", "gp", "qmc"] = "tpe"
    seed: int | None = None
    startup_trials: int | None = Field(None, ge=0)  # random trials before TPE/GP model the space


class Pruner(_Model):
    name: Literal["none", "median", "successiveHalving", "hyperband"] = "none"
    startup_trials: int = Field(5, ge=0)
    warmup_steps: int = Field(1, ge=0)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)


class Trials(_Model):
    max: int = Field(ge=1)
    parallel: int = Field(1, ge=1)
    max_failed: int = Field(3, ge=0)  # the study fails once more trials than this have failed
    retries: int = Field(1, ge=0)  # re-runs of a trial whose process or pod failed
    timeout_seconds: int | None = Field(None, ge=1, le=MAX_TIMEOUT_SECONDS)  # per trial
    study_timeout_seconds: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "Trials":
        if self.parallel > self.max:
            raise ValueError(f"parallel ({self.parallel}) must not exceed max ({self.max})")
        return self


class Dataset(_Model):
    name: Literal["fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "npz"] = "fashion-mnist"
    # A directory, or s3://bucket/prefix in the checkpoint store's S3 endpoint; imagefolder also takes
    # a .tar, .tar.gz, .tgz or .zip archive, npz a .npz file. Empty: the default location for the
    # dataset (Debian's dataset-fashion-mnist for fashion-mnist).
    path: str | None = None
    channels: Literal[1, 3] | None = None  # imagefolder and npz: 3 (RGB, the default) or 1 (grayscale)

    @model_validator(mode="after")
    def _check(self) -> "Dataset":
        if self.name in USER_DATASETS and not self.path:
            raise ValueError(f"dataset {self.name} needs a path (a directory, an archive or s3://bucket/prefix)")
        if self.channels is not None and self.name not in USER_DATASETS:
            raise ValueError(f"channels is set by the {self.name} dataset itself; only imagefolder and npz take it")
        return self


class Schedule(_Model):
    """How the learning rate changes over a trial's epochs."""

    kind: Literal["none", "step", "cosine"] = "none"
    milestones: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, max_length=16)
    gamma: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "Schedule":
        if self.milestones != sorted(set(self.milestones)):
            raise ValueError("milestones must be increasing epochs")
        return self


class Augmentation(_Model):
    """Training-time augmentation; it turns the frozen-feature cache off (every epoch sees new inputs)."""

    random_crop_padding: int = Field(0, ge=0, le=32)
    horizontal_flip: bool = False


class Training(_Model):
    dataset: Dataset = Dataset()
    input_size: int | None = Field(None, ge=8, le=512)  # pad (or resize) images to this square size
    subset_size: int | None = Field(None, ge=20)  # stratified subset of the training images
    validation_split: float = Field(0.2, gt=0, lt=1)
    # Held out as the test split when the dataset has none (imagefolder without test/, npz without x_test).
    test_split: float | None = Field(None, gt=0, lt=1)
    evaluate_test: bool = True  # a trial that beats the study's best so far is scored on the test split
    epochs: int = Field(5, ge=1)
    epochs_when_reusing: int | None = Field(None, ge=1)  # the paper: reuse needs fewer epochs
    early_stop_patience: int = Field(1, ge=0)  # epochs of rising val loss before stopping; 0 = off
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Defaults of the training hyperparameters (a search-space parameter of the same name wins).
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    momentum: float | None = Field(None, ge=0, lt=1)  # default 0.9 for sgd, 0 for rmsprop
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = Schedule()
    initialization: Literal["default", "he"] = "default"
    augmentation: Augmentation = Augmentation()

    @model_validator(mode="after")
    def _check(self) -> "Training":
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class Model(_Model):
    """Which network family the study tunes (its structural parameters are in the search space)."""

    family: Literal["paper-cnn", "vgg", "resnet", "mobilenetv2", "custom"] = "paper-cnn"
    # custom: package.module:function returning a strata_trainer.models.StagedModel
    entry_point: str | None = Field(None, max_length=253, json_schema_extra={"pattern": ENTRY_POINT_PATTERN})
    # What a reused prefix is made of: the first k blocks (the stem counts as one), or the first k stages.
    reuse_unit: Literal["blocks", "stages"] = "blocks"

    @field_validator("entry_point")
    @classmethod
    def _check_entry_point(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(ENTRY_POINT_PATTERN, value):
            raise ValueError(f"{_shown(value)} is not an entry point like 'my_models.nets:build'")
        return value

    @model_validator(mode="after")
    def _check(self) -> "Model":
        if self.family == "custom" and not self.entry_point:
            raise ValueError("family custom needs entryPoint (package.module:function)")
        if self.family != "custom" and self.entry_point:
            raise ValueError(f"entryPoint is only for family custom, not {self.family}")
        return self


class Reuse(_Model):
    enabled: bool = True
    freeze: bool = True
    cache_frozen_features: bool = True
    reuse_aware_scheduling: bool = True
    min_donor_epochs: int = Field(1, ge=1)  # the paper: donors must be trained well


class Storage(_Model):
    # Optuna storage URL (postgresql+psycopg2://, sqlite:///, journal:///path). Empty: a journal
    # file next to the study file (local) or the operator's database (Kubernetes).
    optuna_url: str | None = None
    # Layer checkpoints: a directory, file:///dir or s3://bucket/prefix. Empty: a folder next to
    # the study file (local) or the operator's bucket (Kubernetes).
    checkpoints: str | None = None
    s3_endpoint: str | None = None  # e.g. http://minio:9000; credentials come from the environment
    # Kubernetes: credentials only through Secrets. The Optuna URL (with its password) from a key of
    # a Secret; the object store's keys from a Secret with `accessKey` and `secretKey`.
    database_secret: SecretKeyRef | None = None
    object_store_secret: DnsSubdomain | None = None
    keep_on_delete: bool = True  # keep the Optuna study and checkpoints when the HPOStudy is deleted

    @field_validator("checkpoints")
    @classmethod
    def _check_checkpoints(cls, value: str | None) -> str | None:
        if value and value.startswith("s3://") and len(value) <= len("s3://"):
            raise ValueError("s3:// checkpoints need a bucket name")
        return value


class SecretKeyRef(_Model):
    name: DnsSubdomain
    key: SecretKey


class Toleration(_Model):
    # As a pod takes it (k8s.io/kubernetes pkg/apis/core/validation validateTolerations).
    key: str | None = Field(None, max_length=QUALIFIED_NAME_MAX,  # empty, or a qualified name
                            json_schema_extra={"pattern": f"^({QUALIFIED_NAME_PATTERN[1:-1]})?$"})
    operator: Literal["Exists", "Equal"] = "Equal"
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str | None) -> str | None:
        return check_qualified_name(key) if key else key

    @model_validator(mode="after")
    def _check(self) -> "Toleration":
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without key matches every taint and needs operator Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


def _quantity(value: Any) -> Any:
    """Kubernetes quantities are int-or-string (`cpu: 1` and `cpu: "1"` alike); keep them as strings.

    A JSON number must be whole, as the CRD's int-or-string takes it: 0.5 is written "0.5" or "500m".
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        raise ValueError(f"a quantity given as a number must be whole, got {value!r}: write it as a string "
                         f"('{value!r}') or in milli-units ('{value * 1000:g}m')")
    return value


_SUFFIX_FACTORS: dict[str, Fraction] = {
    "": Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
    "P": Fraction(10**15), "E": Fraction(10**18),
    **{f"{p}i": Fraction(2 ** (10 * (i + 1))) for i, p in enumerate("KMGTPE")},
}


def quantity_value(text: str) -> Fraction:
    """The exact value of a quantity string ("500m" -> 1/2, "2Gi" -> 2147483648); ValueError if none."""
    match = re.fullmatch(r"[+]?([0-9]+(?:[.][0-9]*)?|[.][0-9]+)(.*)", text)
    if not match or not re.fullmatch(QUANTITY_PATTERN, text):
        raise ValueError(f"{_shown(text)} is not a quantity (like 1, 0.5, 500m, 2Gi, 1e3)")
    number, suffix = Fraction(Decimal(match.group(1))), match.group(2)
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        exponent = int(suffix[1:])
        if abs(exponent) > 1000:
            raise ValueError(f"{_shown(text)} is not a usable quantity (exponent out of range)")
        return number * Fraction(10) ** exponent
    return number * _SUFFIX_FACTORS[suffix]


def _check_quantity(text: str) -> str:
    quantity_value(text)
    return text


Quantity = Annotated[str, BeforeValidator(_quantity), AfterValidator(_check_quantity),
                     Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN,
                                              "minimum": 0})]


def _resource_names(value: dict[str, Any]) -> dict[str, Any]:
    for name in value:
        try:
            _check_resource_name(name)
        except ValueError as error:
            raise ValueError(f"key {error}") from None
        if name.startswith("requests."):
            raise ValueError(f"key {_shown(name)} is not a container resource (no 'requests.' prefix)")
    return value


ResourceMap = Annotated[dict[str, Quantity], Field(max_length=MAX_RESOURCES, json_schema_extra=KEYS_RESOURCE_NAMES),
                        AfterValidator(_resource_names)]


def is_extended_resource(name: str) -> bool:
    """A resource with a domain outside kubernetes.io (nvidia.com/gpu): whole numbers, never overcommitted."""
    return "/" in name and "kubernetes.io/" not in name


class Resources(_Model):
    # As a container takes them (k8s.io/kubernetes pkg/apis/core/validation ValidateResourceRequirements).
    requests: ResourceMap = Field(default_factory=lambda: {"cpu": "1", "memory": "2Gi"})
    limits: ResourceMap = Field(default_factory=lambda: {"cpu": "2", "memory": "4Gi"})

    @model_validator(mode="after")
    def _check(self) -> "Resources":
        for side in ("requests", "limits"):
            for name, text in getattr(self, side).items():
                if is_extended_resource(name) and quantity_value(text).denominator != 1:
                    raise ValueError(f"{side}.{name} ({text}) must be a whole number (an extended resource)")
        for name, text in self.requests.items():
            limit = self.limits.get(name)
            fixed = is_extended_resource(name) or name.startswith("hugepages-")  # not overcommittable
            if limit is None and fixed:
                raise ValueError(f"requests.{name} needs limits.{name} too (it cannot be overcommitted)")
            if limit is not None and quantity_value(text) > quantity_value(limit):
                raise ValueError(f"requests.{name} ({text}) must not exceed limits.{name} ({limit})")
            if limit is not None and fixed and quantity_value(text) != quantity_value(limit):
                raise ValueError(f"requests.{name} ({text}) must equal limits.{name} ({limit}) "
                                 "(it cannot be overcommitted)")
        names = set(self.requests) | set(self.limits)
        if any(n.startswith("hugepages-") for n in names) and not names & {"cpu", "memory"}:
            raise ValueError("hugepages need a cpu or memory request or limit")
        return self


class GpuPlacement(_Model):
    """Which trials go to GPU nodes: all of them when enabled, or those at least this large."""

    enabled: bool = False
    count: int = Field(1, ge=1)
    min_conv_layers: int | None = Field(None, ge=1)
    min_filters: int | None = Field(None, ge=1)
    node_selector: NodeSelector = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=MAX_TOLERATIONS)

    def wants(self, params: dict[str, Any]) -> bool:
        if not self.enabled:
            return False
        if self.min_conv_layers and int(params.get("convLayers", 1)) < self.min_conv_layers:
            return False
        if self.min_filters and int(params.get("filters", 18)) < self.min_filters:
            return False
        return True


GPU_RESOURCE = "nvidia.com/gpu"  # the limit strata.kube.builders gives GPU trials


# What the operator sets in every trainer pod: a user's env, volume or mount may not take these.
RESERVED_ENV_PREFIX = "STRATA_"
RESERVED_ENV = frozenset({"HOME", "OMP_WAIT_POLICY"})
RESERVED_VOLUMES = frozenset({"tmp", "features", "s3-token"})
RESERVED_MOUNTS = ("/tmp", "/var/cache/strata-features", "/var/run/secrets/strata")  # see strata.kube.builders
RESERVED_LABEL_PREFIXES = ("hpo.strata.dev/", "app.kubernetes.io/name", "app.kubernetes.io/managed-by")
MAX_EXTRA = 16  # extra env vars, volumes, mounts, pull secrets, spread constraints


_check_volume_name = _checked(DNS_LABEL_PATTERN, "a volume name (a DNS label)", 63)


class EnvVar(_Model):
    """An extra environment variable of the trainer container, as a container's env takes it."""

    name: Annotated[str, AfterValidator(_checked(ENV_NAME_PATTERN, "an environment variable name "
                                                 "([-._a-zA-Z][-._a-zA-Z0-9]*)", 256)),
                    Field(json_schema_extra=_schema(ENV_NAME_PATTERN, 256))]
    value: str | None = None
    value_from: dict[str, Any] | None = None  # secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef

    @model_validator(mode="after")
    def _check(self) -> "EnvVar":
        if self.name.startswith(RESERVED_ENV_PREFIX) or self.name in RESERVED_ENV:
            raise ValueError(f"{self.name} is set by the operator (STRATA_*, HOME and OMP_WAIT_POLICY are reserved)")
        if self.value is not None and self.value_from is not None:
            raise ValueError("give value or valueFrom, not both")
        return self


class VolumeMount(_Model):
    name: Annotated[str, AfterValidator(_check_volume_name), Field(json_schema_extra=_schema(DNS_LABEL_PATTERN, 63))]
    mount_path: Annotated[str, AfterValidator(_checked(ABSOLUTE_PATH_PATTERN, "an absolute path without ':'")),
                          Field(json_schema_extra=_schema(ABSOLUTE_PATH_PATTERN, 4096))]
    read_only: bool = False
    sub_path: str | None = Field(None, max_length=4096)


class FinishedPods(_Model):
    """When the operator removes a finished trial pod (its log is archived first, next to the layers)."""

    count: int | None = Field(20, ge=0)  # keep at most this many finished trial pods, the newest
    seconds: int | None = Field(3600, ge=0)  # and none that ended longer ago than this


def _check_label_keys(value: dict[str, Any]) -> dict[str, Any]:
    for key in value:
        if key.startswith(RESERVED_LABEL_PREFIXES):
            raise ValueError(f"label {key} is set by the operator")
    return value


class TrainerPod(_Model):
    """How trainer pods run on Kubernetes (ignored by `strata run`)."""

    image: Image | None = None  # default: the operator's configured trainer image
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account_name: DnsSubdomain | None = None
    resources: Resources = Resources()
    node_selector: NodeSelector = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=MAX_TOLERATIONS)
    gpu: GpuPlacement = GpuPlacement()
    image_pull_secrets: list[DnsSubdomain] = Field(default_factory=list, max_length=MAX_EXTRA)
    labels: Annotated[NodeSelector, AfterValidator(_check_label_keys)] = Field(default_factory=dict)
    annotations: Annotated[dict[str, str], Field(max_length=MAX_MAP_ENTRIES, json_schema_extra=KEYS_QUALIFIED_NAMES),
                           AfterValidator(_qualified_keys)] = Field(default_factory=dict)
    affinity: dict[str, Any] | None = None  # a pod's affinity, as Kubernetes takes it
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_EXTRA)
    priority_class_name: DnsSubdomain | None = None
    runtime_class_name: DnsSubdomain | None = None
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    volumes: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_EXTRA)  # as a pod's volumes
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=MAX_EXTRA)
    keep_finished_pods: FinishedPods = FinishedPods()

    @model_validator(mode="after")
    def _check(self) -> "TrainerPod":
        if self.gpu.enabled and GPU_RESOURCE in {**self.resources.requests, **self.resources.limits}:
            raise ValueError(f"with gpu.enabled, gpu.count sets {GPU_RESOURCE}: leave it out of resources")
        names = []
        for index, volume in enumerate(self.volumes):
            name = volume.get("name")
            try:
                _check_volume_name(name if isinstance(name, str) else "")
            except ValueError:
                raise ValueError(f"volumes[{index}].name: {_shown(name)} is not a volume name (a DNS label)") from None
            if name in RESERVED_VOLUMES or name in names:
                raise ValueError(f"volumes[{index}].name: {name} is "
                                 + ("taken by the operator's own volumes (tmp, features)" if name in RESERVED_VOLUMES
                                    else "given twice"))
            names.append(name)
        for index, mount in enumerate(self.volume_mounts):
            if mount.name not in names:
                raise ValueError(f"volumeMounts[{index}].name: no volume named {mount.name} in trainer.volumes")
            path = mount.mount_path.rstrip("/") or "/"
            if path == "/" or any(path == r or path.startswith(r + "/") for r in RESERVED_MOUNTS):
                raise ValueError(f"volumeMounts[{index}].mountPath: {mount.mount_path} is the operator's "
                                 "(/, /tmp and the feature cache are reserved)")
        return self


class Execution(_Model):
    """How trials run: in warm workers that run trial after trial, or each in a fresh process (pod)."""

    mode: Literal["warmWorkers", "perTrial"] = "warmWorkers"
    trials_per_gpu: int = Field(1, ge=1, le=8)  # a GPU worker runs this many small trials at once


class StudySpec(_Model):
    objective: Objective = Objective()
    model: Model = Model()
    search_space: dict[str, Parameter] = Field(min_length=1, max_length=64)
    sampler: Sampler = Sampler()
    pruner: Pruner = Pruner()
    trials: Trials
    training: Training = Training()
    reuse: Reuse = Reuse()
    storage: Storage = Storage()
    trainer: TrainerPod = TrainerPod()
    execution: Execution = Execution()
    suspend: bool = False

    @field_validator("search_space")
    @classmethod
    def _check_space(cls, space: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        model = info.data.get("model") or Model()
        known = {**FAMILY_PARAMETERS[model.family], **TRAINING_PARAMETERS}
        for name, param in space.items():
            if model.family == "custom" and name not in known:
                if not re.fullmatch(PARAMETER_NAME_PATTERN, name):
                    raise ValueError(f"parameter name {_shown(name)} must be a letter then letters, digits or _ "
                                     "(at most 63)")
                continue  # the user's function reads it
            if name not in known:
                raise ValueError(f"unknown parameter '{name}' for model family {model.family} "
                                 f"(known: {', '.join(known)})")
            _check_parameter_values(name, param)
        if "fcLayout" in space and ("fcLayers" in space or "fcUnits" in space):
            raise ValueError("use either fcLayout or fcLayers/fcUnits, not both")
        return space

    @model_validator(mode="after")
    def _check_grid(self) -> "StudySpec":
        if self.sampler.name == "grid":
            for name, param in self.search_space.items():
                if isinstance(param, FloatParam) and param.step is None:
                    raise ValueError(f"sampler grid needs finite parameters: searchSpace.{name} is a float range without step")
        return self

    def grid(self) -> list[dict[str, Any]]:
        """Every configuration of a finite search space, in declaration order."""
        names = list(self.search_space)
        values = [self.search_space[n].values() for n in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]

    def grid_size(self) -> int:
        size = 1
        for param in self.search_space.values():
            size *= len(param.values())
        return size


_POSITIVE_INTS = ("convLayers", "filters", "kernelSize", "batchSize", "fcUnits", "groups", "width", "depth", "stages")
_BOOLEANS = ("nesterov", "horizontalFlip")
_CHOICES = {"optimizer": OPTIMIZERS, "lrSchedule": LR_SCHEDULES, "initialization": INITIALIZATIONS}


def _check_parameter_values(name: str, param: Any) -> None:
    if isinstance(param, FloatParam):
        values = [param.low, param.high]
    elif isinstance(param, IntParam):
        values = param.representatives()
    else:
        values = param.values()
    for value in values:
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if name in _POSITIVE_INTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"'{name}' values must be positive integers, got {value!r}")
        if name == "kernelSize" and value % 2 == 0:
            raise ValueError(f"'kernelSize' must be odd (same padding), got {value}")
        if name in ("fcLayers", "randomCropPadding") and (isinstance(value, bool) or not isinstance(value, int)
                                                          or value < 0):
            raise ValueError(f"'{name}' values must be integers >= 0, got {value!r}")
        if name in ("learningRate", "widthMultiplier") and (not number or value <= 0):
            raise ValueError(f"'{name}' values must be positive numbers, got {value!r}")
        if name == "weightDecay" and (not number or value < 0):
            raise ValueError(f"'weightDecay' values must be numbers >= 0, got {value!r}")
        if name == "momentum" and (not number or not 0 <= value < 1):
            raise ValueError(f"'momentum' values must be numbers in [0, 1), got {value!r}")
        if name in _BOOLEANS and not isinstance(value, bool):
            raise ValueError(f"'{name}' values must be true or false, got {value!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(f"'{name}' must be one of {', '.join(_CHOICES[name])}, got {value!r}")
        if name == "fcLayout":
            parse_fc_layout(value)
        if name == "layersPerGroup":
            parse_group_layout(value)


def parse_group_layout(value: Any) -> tuple[int, ...]:
    """VGG layers per group: 2 -> (2,) (every group), '2-2-3-3-3' -> one count per group."""
    if isinstance(value, bool) or (isinstance(value, int) and value < 1):
        raise ValueError(f"'layersPerGroup' choice {value!r} is not a count or a layout like '2-2-3-3-3'")
    if isinstance(value, int):
        return (value,)
    try:
        counts = tuple(int(part) for part in str(value).strip().split("-"))
    except ValueError:
        raise ValueError(f"'layersPerGroup' choice {value!r} is not a count or a layout like '2-2-3-3-3'") from None
    if any(c < 1 for c in counts) or len(counts) > 5:
        raise ValueError(f"'layersPerGroup' choice {value!r} needs 1-5 positive counts")
    return counts


def parse_fc_layout(value: Any) -> tuple[int, ...]:
    """'500-250' -> (500, 250); 'none' or '' -> ()."""
    if isinstance(value, bool):
        raise ValueError(f"'fcLayout' choice {value!r} is not a layout like '500-250'")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"'fcLayout' choice {value!r} is not a layout like '500-250'")
        return (value,)
    text = str(value).strip().lower()
    if text in ("", "none"):
        return ()
    try:
        units = tuple(int(part) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"'fcLayout' choice {value!r} is not a layout like '500-250'") from None
    if any(u < 1 for u in units):
        raise ValueError(f"'fcLayout' choice {value!r} has non-positive units")
    return units


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME_RE.match(name) or len(name) > 63:
            raise ValueError(f"'{name}' is not a valid name (lowercase letters, digits and '-', at most 63)")
        return name


class HPOStudy(BaseModel):
    """A whole manifest: apiVersion, kind, metadata and spec."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: Metadata
    spec: StudySpec

    @field_validator("api_version")
    @classmethod
    def _check_api(cls, value: str) -> str:
        if value != f"{API_GROUP}/{API_VERSION}":
            raise ValueError(f"must be {API_GROUP}/{API_VERSION}")
        return value

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, value: str) -> str:
        if value != KIND:
            raise ValueError(f"must be {KIND}")
        return value

    @property
    def name(self) -> str:
        return self.metadata.name


def format_validation_error(error: ValidationError, root: str = "") -> str:
    """The first problem as one line that names the field, e.g. 'spec.trials.max: ...'."""
    first = error.errors()[0]
    loc = [_one_line(str(part)) if str(part) else "''" for part in first["loc"]
           if not str(part).startswith(("function-", "tagged-union")) and str(part) != "[key]"]
    # Pydantic names union members by their tag (searchSpace.<name>.<tag>); keep the user's path only.
    loc = [part for i, part in enumerate(loc)
           if not (part in ("int", "float", "categorical") and i >= 2 and loc[i - 2] in ("searchSpace", "search_space"))]
    msg = first["msg"]
    if len(loc) >= 2 and loc[-1] in ("bool", "int", "float", "str") and loc[-2].isdigit():  # a choice's union
        loc, msg = loc[:-1], "a choice must be a boolean, a number or a string"
    path = ".".join(([root] if root else []) + loc)
    if first["type"] == "union_tag_invalid":
        ctx = first.get("ctx", {})
        msg = f"unknown parameter type {ctx.get('tag')!r} (expected {ctx.get('expected_tags')})"
        path = path.removesuffix(".type") + ".type" if path else "type"
    elif first["type"] == "union_tag_not_found":
        msg = "parameter needs a 'type' (int, float or categorical)"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field"
    msg = _one_line(msg.removeprefix("Value error, "))
    return f"{path}: {msg}" if path else msg


def parse_study(document: Any) -> HPOStudy:
    """Validate a parsed manifest; raises SpecError with a one-line message."""
    if not isinstance(document, dict):
        raise SpecError("a study file must be a YAML mapping with apiVersion, kind, metadata and spec")
    try:
        study = HPOStudy.model_validate(document)
    except ValidationError as error:
        raise SpecError(format_validation_error(error)) from None
    _check_whole_spec(study.spec)
    return study


def parse_spec(spec: Any) -> StudySpec:
    """Validate a bare spec (the operator gets one from the custom resource)."""
    try:
        parsed = StudySpec.model_validate(spec)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, root="spec")) from None
    _check_whole_spec(parsed)
    return parsed


def _check_whole_spec(spec: StudySpec) -> None:
    """What only the parsed spec shows: the deepest network must fit the input (SpecError otherwise)."""
    from strata.families import check_space_fits_input  # torch-free; it imports this module

    check_space_fits_input(spec)


def load_study_file(path: str | Path) -> HPOStudy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read study file ({error.strerror})") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({error})") from None
    studies = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(studies) != 1:
        raise SpecError(f"{path}: expected exactly one {KIND} document, found {len(studies)}")
    return parse_study(studies[0])


def spec_to_json(spec: StudySpec) -> dict[str, Any]:
    """The spec as the manifest spells it (camelCase), for Optuna user attrs and the CRD."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


# What a study may change between runs without mixing unlike trials: how many run and how long,
# where they run and are stored, and how the next one is chosen or stopped early. Everything else
# (the model, the search space, the training, reuse) changes what a trial's value means.
RESUMABLE_CHANGES = ("trials", "storage", "trainer", "execution", "suspend", "sampler", "pruner", "objective.goal")


def spec_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The settings that changed a trial's meaning between two specs (as spec_to_json spells them),
    each as `path: old -> new`; empty if the only changes are RESUMABLE_CHANGES."""
    changes: list[str] = []

    def walk(path: str, old: Any, new: Any) -> None:
        if any(path == safe or path.startswith(safe + ".") for safe in RESUMABLE_CHANGES):
            return
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new), key=str):
                walk(f"{path}.{key}" if path else str(key), old.get(key), new.get(key))
        elif old != new:
            changes.append(f"{path}: {_short(old)} -> {_short(new)}")
    walk("", before, after)
    return changes


def _short(value: Any) -> str:
    text = "(unset)" if value is None else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


# Descriptions of every spec field, by its manifest name (the CRD's `kubectl explain` text).
FIELD_DOCS: dict[str, str] = {
    "objective": "What the study optimises.",
    "metric": "Per-epoch validation metric the trainer reports: val_loss or val_accuracy.",
    "direction": "minimize or maximize; must agree with the metric (val_loss is minimized, val_accuracy maximized), "
                 "which is also the default.",
    "goal": "Stop the study once a trial reaches this metric value: at least 0 for val_loss, within [0, 1] for "
            "val_accuracy.",
    "searchSpace": "Hyperparameters by name, each an int, float or categorical parameter: the model family's "
                   "(paper-cnn: convLayers, filters, kernelSize, fcLayout, fcLayers, fcUnits; vgg: groups, "
                   "layersPerGroup, width; resnet: depth, widthMultiplier; mobilenetv2: widthMultiplier, stages; "
                   "custom: any name its function reads) and the training ones (learningRate, batchSize, optimizer, "
                   "momentum, nesterov, weightDecay, lrSchedule, initialization, randomCropPadding, horizontalFlip).",
    "type": "Parameter type: int, float or categorical.",
    "low": "Lowest value (int and float parameters).",
    "high": "Highest value, inclusive (int and float parameters).",
    "step": "Step between values (int: default 1; float: optional, makes the range finite).",
    "log": "Sample on a log scale (needs low > 0).",
    "choices": "Values of a categorical parameter.",
    "sampler": "Optuna sampler that proposes trials.",
    "name": "Name.",
    "seed": "Random seed, for reproducible studies.",
    "startupTrials": "Trials before the sampler or pruner starts modelling.",
    "pruner": "Optuna pruner that stops unpromising trials from their per-epoch values.",
    "warmupSteps": "Epochs a trial runs before it can be pruned.",
    "minResource": "Minimum epochs for successive halving and hyperband.",
    "reductionFactor": "Reduction factor for successive halving and hyperband.",
    "trials": "How many trials, how many at once, and how failures are handled.",
    "max": "Trials that count towards the study (retries of a failed trial do not).",
    "parallel": "Trials running at once (trainer pods or local processes).",
    "maxFailed": "The study fails once more trial attempts than this have failed.",
    "retries": "Re-runs of a trial whose pod or process failed (crash, OOM, eviction, lost pod).",
    "timeoutSeconds": "Wall-clock limit of one trial; a trial past it is stopped and failed (at most 2147483587: "
                      "the pod's activeDeadlineSeconds is this plus 60, an int32).",
    "studyTimeoutSeconds": "Wall-clock limit of the whole study.",
    "training": "How each trial trains its network.",
    "dataset": "Training data: fashion-mnist, mnist, cifar10 or cifar100 (torchvision's format), imagefolder (one "
               "folder per class of PNG or JPEG images, optionally under train/ and test/) or npz (arrays x_train, "
               "y_train and optionally x_test, y_test), from a path or s3://.",
    "path": "Directory, archive (.tar, .tar.gz, .tgz, .zip: imagefolder), .npz file (npz) or s3://bucket/prefix "
            "holding the dataset.",
    "channels": "imagefolder and npz: 3 (RGB, the default) or 1 (grayscale); images are converted to it.",
    "testSplit": "Fraction of the training images held out as the test split when the dataset has none "
                 "(imagefolder without test/, npz without x_test).",
    "evaluateTest": "Score a complete trial's best-epoch weights on the test split when it beats every earlier "
                    "trial's value (so the study's best trial always has a test accuracy); never used to choose "
                    "trials.",
    "optimizer": "Optimizer: adam, adamw, sgd or rmsprop (a searchSpace.optimizer parameter overrides it).",
    "learningRate": "Learning rate (a searchSpace.learningRate parameter overrides it).",
    "batchSize": "Minibatch size (a searchSpace.batchSize parameter overrides it).",
    "momentum": "Momentum of sgd and rmsprop in [0, 1); default 0.9 for sgd, 0 for rmsprop.",
    "nesterov": "Nesterov momentum (sgd).",
    "weightDecay": "Weight decay (L2 penalty; decoupled for adamw).",
    "schedule": "Learning-rate schedule over a trial's epochs (searchSpace.lrSchedule overrides its kind).",
    "kind": "none, step (multiply by gamma at each milestone epoch) or cosine (annealed to 0 over the epochs).",
    "milestones": "step: epochs after which the learning rate is multiplied by gamma (increasing).",
    "gamma": "step: the factor, in (0, 1].",
    "initialization": "default (PyTorch's) or he (Kaiming normal for conv and linear weights).",
    "augmentation": "Random crop with padding and horizontal flip at training time. The frozen prefix's outputs "
                    "are then not cached (each epoch sees new inputs); a frozen prefix still saves its backward "
                    "pass and optimizer state.",
    "randomCropPadding": "Pad by this many pixels and crop back at a random offset (0 = off).",
    "horizontalFlip": "Flip half the images left-right.",
    "model": "The network family the study tunes: paper-cnn (the paper's CNN), vgg, resnet, mobilenetv2 or custom "
             "(the user's function).",
    "family": "paper-cnn, vgg (conv-BN-ReLU groups), resnet (CIFAR ResNet-6n+2), mobilenetv2 (inverted residuals "
              "for small inputs) or custom.",
    "entryPoint": "custom: package.module:function(params, input_shape, num_classes) returning a "
                  "strata_trainer.models.StagedModel; the package must be installed in the trainer image.",
    "reuseUnit": "What a reused prefix is made of: blocks (the default: the stem and the first blocks, so a deeper "
                 "network takes a shallower one's first blocks) or stages (whole stages only).",
    "inputSize": "Pad (or downscale) images to this square size, e.g. 32 for Fashion-MNIST at CIFAR size; "
                 "imagefolder and npz images are resized to it (default 32).",
    "subsetSize": "Train on a deterministic stratified subset of this many images.",
    "validationSplit": "Fraction of the (subset of the) training images held out for validation.",
    "epochs": "Epochs per trial trained from scratch.",
    "epochsWhenReusing": "Epochs per trial that reuses trained layers (they need fewer).",
    "earlyStopPatience": "Stop a trial after this many epochs of rising validation loss; 0 disables.",
    "device": "auto (a GPU when the pod has one), cpu or cuda.",
    "reuse": "Layer reuse: take trained conv prefixes from earlier trials.",
    "enabled": "Turn the feature on.",
    "freeze": "Freeze reused layers (no gradients, no optimizer state); false fine-tunes them.",
    "cacheFrozenFeatures": "Compute the frozen prefix's outputs once per trial instead of every epoch.",
    "reuseAwareScheduling": "Order trials so donors are trained before the trials that reuse them.",
    "minDonorEpochs": "Only reuse layers from donors trained at least this many epochs.",
    "storage": "Where the Optuna study and the layer checkpoints live.",
    "optunaUrl": "Optuna storage URL without credentials (prefer databaseSecret on Kubernetes).",
    "checkpoints": "Layer registry location: a directory or s3://bucket/prefix.",
    "s3Endpoint": "S3/MinIO endpoint URL, e.g. http://minio:9000.",
    "databaseSecret": "Secret key holding the Optuna storage URL (with its password).",
    "key": "Key in the Secret: [-._a-zA-Z0-9]+, at most 253 characters, not '.' and not starting with '..'.",
    "objectStoreSecret": "Secret (a DNS subdomain name) with accessKey and secretKey for the S3/MinIO checkpoint "
                         "store.",
    "keepOnDelete": "Keep the Optuna study and the checkpoints when the HPOStudy is deleted; false deletes the "
                    "study and the checkpoints it published (other studies' donors stay).",
    "trainer": "Trainer pods: image, resources and CPU/GPU placement.",
    "image": "Trainer image, not empty and without whitespace (default: the operator's configured image).",
    "imagePullPolicy": "Image pull policy of trainer pods.",
    "serviceAccountName": "Service account of trainer pods (a DNS subdomain name, at most 253 characters).",
    "resources": "Resource requests and limits of trainer pods (threads and cache follow the limits). Names: cpu, "
                 "memory, ephemeral-storage, hugepages-<size> or an extended resource with a domain; values: "
                 "Kubernetes quantities (1, 0.5, 500m, 2Gi, 1e3). Each request at most its limit; extended "
                 "resources and hugepages are whole and requested as much as limited; with gpu.enabled, "
                 "nvidia.com/gpu comes from gpu.count.",
    "requests": "Resource requests, e.g. cpu: '1', memory: 2Gi (at most 16, each at most its limit).",
    "limits": "Resource limits, e.g. cpu: '2', memory: 4Gi (at most 16).",
    "nodeSelector": "Node labels trainer pods must match (at most 64): keys are qualified names ([prefix/]name), "
                    "values label values (at most 63 of A-Za-z0-9 with -_. inside, or empty).",
    "tolerations": "Tolerations of trainer pods (at most 32).",
    "operator": "Toleration operator: Exists or Equal; a toleration without key needs Exists, and Exists takes no "
                "value.",
    "value": "Toleration value (a label value) that operator Equal matches.",
    "effect": "Taint effect to tolerate.",
    "tolerationSeconds": "How long a NoExecute taint is tolerated (only with effect NoExecute).",
    "imagePullSecrets": "Secrets (names, in the study's namespace) the kubelet pulls the trainer image with.",
    "labels": "Extra labels of trainer pods, e.g. kueue.x-k8s.io/queue-name or cost labels (at most 64; the "
              "operator's own hpo.strata.dev/* and app.kubernetes.io/name and managed-by are reserved).",
    "annotations": "Extra annotations of trainer pods, e.g. sidecar.istio.io/inject: 'false' (at most 64).",
    "affinity": "Affinity of trainer pods (node, pod and pod anti-affinity), as a pod's spec.affinity takes it.",
    "topologySpreadConstraints": "Topology spread constraints of trainer pods, as a pod takes them (at most 16).",
    "priorityClassName": "PriorityClass of trainer pods (a DNS subdomain name).",
    "runtimeClassName": "RuntimeClass of trainer pods, e.g. nvidia or gvisor (a DNS subdomain name).",
    "env": "Extra environment variables of the trainer container, each with value or valueFrom (at most 64; "
           "STRATA_*, HOME and OMP_WAIT_POLICY are the operator's).",
    "valueFrom": "Where the variable's value comes from: secretKeyRef, configMapKeyRef, fieldRef or "
                 "resourceFieldRef, as a container's env takes it.",
    "volumes": "Extra volumes of trainer pods, as a pod's spec.volumes takes them, e.g. a dataset PVC (at most 16; "
               "the names tmp and features are the operator's).",
    "volumeMounts": "Where the trainer container mounts the extra volumes (at most 16; not /, /tmp or the "
                    "feature cache).",
    "mountPath": "Absolute path in the container (no ':').",
    "keepFinishedPods": "When finished trial pods are removed (perTrial mode): each pod's log is first copied "
                        "next to the layer checkpoints (logs/NAMESPACE.NAME/trial-0000N.log; the study's `logs` "
                        "attr names the folder); a pod is kept while the registry cannot take it. Unset count and seconds: keep all.",
    "readOnly": "Mount it read-only.",
    "subPath": "Mount only this path inside the volume.",
    "gpu": "Send trials to GPU nodes: all when enabled, or only those at least minConvLayers deep / minFilters wide.",
    "count": "GPUs per trial pod (nvidia.com/gpu).",
    "minConvLayers": "paper-cnn: only trials with at least this many conv layers go to GPU nodes.",
    "minFilters": "paper-cnn: only trials with at least this many filters go to GPU nodes.",
    "suspend": "Pause the study: running trials finish, no new ones start.",
    "execution": "How trials run: warm workers (one long-lived process, or pod, per parallel slot, running trial "
                 "after trial without starting Python and torch again) or a fresh process or pod per trial.",
    "mode": "warmWorkers (default: no per-trial start-up) or perTrial (each trial in its own process or pod: the "
            "most isolation, for model code that may leak state).",
    "trialsPerGpu": "Trials a GPU worker runs at once on its GPU (1-8): small trials that use a fraction of a GPU "
                    "share it instead of each taking a whole GPU.",
}
