"""Property-based fuzzing of the spec: mutations of valid manifests never crash the model, its errors
are one line naming a field, and whatever the model accepts a cluster (tests/test_crd.py's emulation
of the API server) admits too, storing an object that parses to the same spec.

The documents are JSON-like (what an API server can receive): valid manifests with one to four
mutations each: a value replaced by another JSON value (wrong types, nulls, huge and negative
numbers, unicode, deep nesting), a key deleted, added (a known field name elsewhere in the spec or
junk) or misspelt, a value moved to another place. derandomize=True keeps CI stable.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.spec import FIELD_DOCS, KNOWN_PARAMETERS, QUALIFIED_NAME_PATTERN, SpecError, parse_spec
from tests.test_crd import ACCEPTED, FULL, NULLS_ACCEPTED, SPEC_SCHEMA, admit
from tests.test_spec import VALID

BASES = [copy.deepcopy(d["spec"]) for d in (VALID, FULL, *ACCEPTED.values(), *NULLS_ACCEPTED.values())]
FIELD_NAMES = sorted({*FIELD_DOCS, *KNOWN_PARAMETERS, "int", "float", "categorical"})


def _enums(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        yield from node.get("enum", [])
        for value in node.values():
            yield from _enums(value)
    elif isinstance(node, list):
        for value in node:
            yield from _enums(value)


INTERESTING = [
    *sorted(set(_enums(SPEC_SCHEMA)), key=str),
    "", " ", "\n", "null", "true", "8", "8.0", "-1", "1", "0.5", "500m", "2Gi", "2 Gi", "1e3", "1.5G", "lots", "+1",
    ".5", "5.", "1E", "1e-3", "2gi", "-0", "nvidia.com/gpu", "kubernetes.io/arch", "requests.cpu", "hugepages-2Mi",
    "a" * 63, "a" * 64, "b" * 254, "ünïcødé", "日本語", "\u2028", "a\nb", "s3://", "s3://bucket/x", "My_Study",
    "val_loss", "val_accuracy", "minimize", "maximize", "Exists", "Equal", "NoExecute", ".", "..", "..x",
    0, 1, -1, 2, 3, 8, 0.0, -0.0, 0.5, 1.0, 1.5, 8.0, 1e-300, -1e300, 1e300, 2**31 - 1, 2**31, 2**63, -(2**63) - 1,
    10**30, True, False, None,
]

scalars = st.one_of(
    st.sampled_from(INTERESTING),
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)),
                                               children, max_size=4)),
    max_leaves=10,
)


def _nested(depth: int, leaf: Any, as_list: bool) -> Any:
    for _ in range(depth):
        leaf = [leaf] if as_list else {"a": leaf}
    return leaf


deep_values = st.builds(_nested, st.integers(min_value=20, max_value=200), scalars, st.booleans())


def _places(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every (path) of a value inside the document, the root included."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _places(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _places(item, (*path, i))


def _get(document: Any, path: tuple) -> Any:
    for part in path:
        document = document[part]
    return document


def _similar(value: Any) -> st.SearchStrategy:
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(st.integers(min_value=-3, max_value=70), st.integers(min_value=-(2**64), max_value=2**64),
                         st.sampled_from([0, 1, 2**31 - 61, 2**31 - 60, 2**63 - 1, 2**63]))
    if isinstance(value, float):
        return st.one_of(st.floats(min_value=-2, max_value=2), st.floats(allow_nan=False, allow_infinity=False),
                         st.sampled_from([0.0, 1.0, -0.0, 1e-12, 0.999999]))
    if isinstance(value, str):
        return st.one_of(st.sampled_from([x for x in INTERESTING if isinstance(x, str)]), st.text(max_size=70),
                         st.from_regex(r"[a-z0-9][-a-z0-9.]{0,20}[a-z0-9]", fullmatch=True))
    if isinstance(value, list):
        return st.lists(st.sampled_from(value) if value else json_values, max_size=6)
    if isinstance(value, dict):  # the same keys, some values changed
        return st.fixed_dictionaries({k: st.one_of(st.just(v), _similar_leaf(v)) for k, v in value.items()})
    return json_values


def _similar_leaf(value: Any) -> st.SearchStrategy:
    return json_values if isinstance(value, (dict, list)) else _similar(value)


@st.composite
def mutated_specs(draw) -> Any:
    holder = {"spec": copy.deepcopy(draw(st.sampled_from(BASES)))}
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        places = [("spec", *p) for p in _places(holder["spec"])]
        if isinstance(holder["spec"], dict) and holder["spec"] and draw(st.integers(0, 19)):
            section = draw(st.sampled_from(sorted(holder["spec"], key=str)))  # each section as likely
            places = [p for p in places if len(p) > 1 and p[1] == section]
        path = draw(st.sampled_from(places))
        parent, key = _get(holder, path[:-1]), path[-1]
        target = parent[key]
        operation = draw(st.sampled_from(["similar", "similar", "similar", "replace", "null", "delete", "add",
                                          "rename", "move", "deep"]))
        if path == ("spec",) and operation in ("delete", "rename", "similar"):
            continue
        if operation == "similar":  # a value of the same JSON type: the boundaries of valid values
            parent[key] = draw(_similar(target))
        elif operation == "replace":
            parent[key] = draw(json_values)
        elif operation == "null":
            parent[key] = None
        elif operation == "deep":
            parent[key] = draw(deep_values)
        elif operation == "delete" and isinstance(parent, dict):
            del parent[key]
        elif operation == "add" and isinstance(target, dict):
            target[draw(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10)))] = draw(json_values)
        elif operation == "add" and isinstance(target, list):
            target.append(draw(json_values))
        elif operation == "rename" and isinstance(parent, dict) and isinstance(key, str) and key:
            cut = draw(st.integers(min_value=0, max_value=len(key) - 1))
            parent[key[:cut] + key[cut + 1:] + draw(st.sampled_from(["", "s", "_", "S"]))] = parent.pop(key)
        elif operation == "move":
            parent[key] = copy.deepcopy(_get(holder, draw(st.sampled_from(places))))
    return holder["spec"]


FIELD_MESSAGE = re.compile(r"^spec(\.[^\n]+)?: \S")


def check(spec: Any) -> bool:
    """The properties, for one document; True when the model accepted it."""
    try:
        parsed = parse_spec(spec)
    except SpecError as error:
        message = str(error)
        assert len(message.splitlines()) == 1 and "\n" not in message, message
        assert FIELD_MESSAGE.match(message), message
        return False
    stored, errors = admit({"apiVersion": "hpo.strata.dev/v1alpha1", "kind": "HPOStudy",
                            "metadata": {"name": "fuzz"}, "spec": spec})
    assert stored is not None, ("the model accepts what the CRD refuses", errors)
    assert parse_spec(stored["spec"]) == parsed, "the stored object means another spec"
    return True


@settings(max_examples=800, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_specs())
def test_the_model_fails_only_with_one_line_naming_a_field_and_what_it_accepts_a_cluster_admits(spec):
    check(spec)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_value_as_a_spec_is_a_spec_error_or_a_spec(value):
    try:
        parse_spec(value)
    except SpecError as error:
        assert FIELD_MESSAGE.match(str(error)) and len(str(error).splitlines()) == 1, str(error)


# --- documents drawn from the CRD's own shape: every field, near and past its bounds --------------


def from_schema(node: dict[str, Any], depth: int = 0) -> st.SearchStrategy:
    """Values for a schema node: mostly of its type and near its bounds, sometimes anything."""
    if depth > 6:
        return scalars
    if node.get("x-kubernetes-int-or-string"):
        return st.one_of(st.from_regex(node["pattern"], fullmatch=True) if "pattern" in node else st.text(),
                         st.integers(min_value=-2, max_value=2**40), st.floats(min_value=-1, max_value=4),
                         st.sampled_from(["lots", "", "2 Gi", "-1", "0.5", "1e3", "500m"]))
    kind = node.get("type")
    if kind == "object":
        properties = node.get("properties") or {}
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            keys = st.one_of(st.sampled_from(["cpu", "memory", "ephemeral-storage", "hugepages-2Mi", "nvidia.com/gpu",
                                              "example.com/fpga", "requests.cpu", "gpu", "kubernetes.io/arch",
                                              "pool", "a/b/c", "", "k" * 64, *KNOWN_PARAMETERS]),
                             st.from_regex(QUALIFIED_NAME_PATTERN, fullmatch=True), st.text(max_size=10))
            return st.dictionaries(keys, from_schema(extra, depth + 1), max_size=4)
        required = set(node.get("required", []))
        fields = {k: from_schema(v, depth + 1) for k, v in properties.items()}
        optional = {k: s for k, s in fields.items() if k not in required}
        return st.fixed_dictionaries({k: fields[k] for k in required}, optional=optional)
    if kind == "array":
        return st.lists(from_schema(node.get("items") or {}, depth + 1), max_size=3)
    if kind == "string":
        options = [st.sampled_from(node["enum"])] * 4 if "enum" in node else []
        if "pattern" in node:
            options += [st.from_regex(node["pattern"], fullmatch=True)] * 3
        options += [st.sampled_from([x for x in INTERESTING if isinstance(x, str)]), st.text(max_size=20)]
        return st.one_of(*options)
    if kind == "integer":
        low, high = node.get("minimum", -5), node.get("maximum", 2**40)
        return st.one_of(st.integers(min_value=low - 1, max_value=low + 40), st.integers(min_value=low, max_value=high),
                         st.sampled_from([high, high + 1, 2**63, -(2**63) - 1]))
    if kind == "number":
        return st.one_of(st.floats(min_value=-1.5, max_value=2.5), st.integers(min_value=-2, max_value=3),
                         st.floats(allow_nan=False, allow_infinity=False))
    if kind == "boolean":
        return st.booleans()
    return scalars  # preserve-unknown-fields: categorical choices


SCHEMA_DRAWN = st.one_of(*(st.builds(lambda base, section, value: {**base, section: value}, st.sampled_from(BASES[:2]),
                                      st.just(section), from_schema(node))
                           for section, node in SPEC_SCHEMA["properties"].items()))


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(SCHEMA_DRAWN)
def test_sections_drawn_from_the_schema_meet_the_same_properties(spec):
    check(spec)
