"""Every manifest of tests/bad_manifests.py is refused by the model in one line naming its field, and
the CRD schema refuses exactly those marked REFUSED_AT_ADMISSION (the rest reach the operator)."""

from __future__ import annotations

import re

import pytest

from strata.spec import SpecError, parse_spec, parse_study
from tests.bad_manifests import BAD_MANIFESTS, EXPECTED_FIELDS, NOT_AN_HPOSTUDY_ON_A_CLUSTER, REFUSED_AT_ADMISSION
from tests.test_crd import admit


def test_there_are_at_least_40_realistic_mistakes_with_distinct_applyable_names():
    assert len(BAD_MANIFESTS) >= 40
    assert set(EXPECTED_FIELDS) == set(BAD_MANIFESTS) and REFUSED_AT_ADMISSION <= set(BAD_MANIFESTS)
    for name, document in BAD_MANIFESTS.items():
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        if not EXPECTED_FIELDS[name].startswith(("metadata", "apiVersion")):
            assert document["metadata"]["name"] == name


@pytest.mark.parametrize("name", BAD_MANIFESTS)
def test_the_model_refuses_it_in_one_line_naming_the_field(name):
    field = EXPECTED_FIELDS[name]
    with pytest.raises(SpecError) as raised:
        parse_study(BAD_MANIFESTS[name])
    message = str(raised.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{field}: "), message
    if field.startswith("spec"):  # what the operator says: the same message from the bare spec
        with pytest.raises(SpecError) as from_spec:
            parse_spec(BAD_MANIFESTS[name].get("spec"))
        assert str(from_spec.value) == message


@pytest.mark.parametrize("name", BAD_MANIFESTS)
def test_the_crd_schema_refuses_at_admission_exactly_those_recorded(name):
    stored, errors = admit(BAD_MANIFESTS[name])
    if name in REFUSED_AT_ADMISSION:
        assert stored is None, f"the CRD admits {name}: drop it from REFUSED_AT_ADMISSION"
    else:
        assert stored is not None, f"the CRD refuses {name} ({errors}): add it to REFUSED_AT_ADMISSION"
        if name in NOT_AN_HPOSTUDY_ON_A_CLUSTER or EXPECTED_FIELDS[name].startswith("metadata"):
            return
        with pytest.raises(SpecError) as raised:
            parse_study(BAD_MANIFESTS[name])
        if str(raised.value).endswith(": unknown field"):
            parse_spec(stored["spec"])  # pruned by the API server: the operator never sees it
        else:
            with pytest.raises(SpecError):  # what the operator reads is still refused: InvalidSpec
                parse_spec(stored["spec"])


def test_most_mistakes_are_refused_at_kubectl_apply():
    assert len(REFUSED_AT_ADMISSION) >= 0.7 * len(BAD_MANIFESTS)
