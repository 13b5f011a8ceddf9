"""`python -m strata.kube`: which namespaces the environment hands to `kopf run` (kopf is not started)."""

from __future__ import annotations

import pytest

pytest.importorskip("kopf")

from strata.kube.__main__ import kopf_args, watched_namespaces  # noqa: E402


@pytest.mark.parametrize("env, expected", [
    ({"STRATA_NAMESPACES": "a,b"}, ["--namespace", "a", "--namespace", "b"]),
    ({"STRATA_NAMESPACES": "a"}, ["--namespace", "a"]),
    ({"STRATA_NAMESPACE": "x"}, ["--namespace", "x"]),
    ({}, ["--all-namespaces"]),
    ({"STRATA_NAMESPACES": " a , ,b,, "}, ["--namespace", "a", "--namespace", "b"]),
    ({"STRATA_NAMESPACES": "a,b,a"}, ["--namespace", "a", "--namespace", "b"]),
    ({"STRATA_NAMESPACE": "  x  "}, ["--namespace", "x"]),
], ids=["list", "one-in-list", "single", "neither", "whitespace-and-empty-items", "repeat", "single-padded"])
def test_kopf_args_names_each_namespace_once_or_all_of_them(env: dict[str, str], expected: list[str]) -> None:
    assert kopf_args(env) == expected


def test_the_list_wins_over_the_single_namespace() -> None:
    assert kopf_args({"STRATA_NAMESPACES": "a,b", "STRATA_NAMESPACE": "x"}) == ["--namespace", "a", "--namespace", "b"]


@pytest.mark.parametrize("blank", ["", " ", ",", " , ,"])
def test_a_blank_setting_means_every_namespace_or_falls_back(blank: str) -> None:
    assert kopf_args({"STRATA_NAMESPACES": blank}) == ["--all-namespaces"]
    assert kopf_args({"STRATA_NAMESPACE": blank}) == ["--all-namespaces"]
    assert kopf_args({"STRATA_NAMESPACES": blank, "STRATA_NAMESPACE": "x"}) == ["--namespace", "x"]


def test_no_argument_carries_a_comma() -> None:
    """Kopf reads `--namespace a,b` as a pattern, not as names: with scanning off it would serve nothing."""
    args = kopf_args({"STRATA_NAMESPACES": "team-a,team-b,team-c"})
    assert not [a for a in args if "," in a]
    assert watched_namespaces({"STRATA_NAMESPACES": "team-a,team-b,team-c"}) == ["team-a", "team-b", "team-c"]


def test_main_passes_the_namespaces_to_kopf_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf.cli

    from strata.kube import __main__ as entrypoint

    captured: list[str] = []
    monkeypatch.setattr(kopf.cli, "main", lambda: captured.extend(entrypoint.sys.argv))
    monkeypatch.setattr(entrypoint.sys, "argv", ["python -m strata.kube", "--verbose"])
    monkeypatch.delenv("STRATA_NAMESPACE", raising=False)
    monkeypatch.setenv("STRATA_NAMESPACES", "a,b")
    entrypoint.main()
    assert captured[:5] == ["kopf", "run", "-m", "strata.kube.handlers", "--standalone"]
    assert captured[-5:] == ["--namespace", "a", "--namespace", "b", "--verbose"]
    assert "--all-namespaces" not in captured
