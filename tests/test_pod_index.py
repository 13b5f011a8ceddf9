"""The watch-fed pod index (strata.kube.pod_index) and the study wake-ups (strata.kube.driver)."""

from __future__ import annotations

import asyncio

import pytest

from strata.kube import builders
from strata.kube.api import KubeApi
from strata.kube.driver import StudyDriver, Wakeups, on_pod_event
from strata.kube.pod_index import IndexedKubeApi, PodIndex, slim
from tests.k8s.fixtures import k8s_api  # noqa: F401

STUDY = "fates"


def pod(name: str, version: int | None, phase: str = "Running", study: str = STUDY, **annotations: str) -> dict:
    meta = {"name": name, "namespace": "default", "labels": {builders.LABEL_STUDY: study},
            "annotations": dict(annotations), "managedFields": [{"big": "x" * 100}]}
    if version is not None:
        meta["resourceVersion"] = str(version)
    return {"metadata": meta, "spec": {"containers": [{"name": "trainer"}]}, "status": {"phase": phase}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def synced_index(clock: Clock | None = None) -> PodIndex:
    index = PodIndex(resync_seconds=60, clock=clock or Clock())
    index.replace("default", STUDY, [], started=index.clock())
    return index


def test_a_study_is_listed_for_real_first_and_again_after_the_resync_time():
    clock = Clock()
    index = PodIndex(resync_seconds=60, clock=clock)
    assert index.pods("default", STUDY) is None  # never listed: the caller lists
    index.replace("default", STUDY, [pod("a", 5)], started=clock())
    assert [p["metadata"]["name"] for p in index.pods("default", STUDY)] == ["a"]
    clock.now += 61
    assert index.pods("default", STUDY) is None


def test_studies_listed_together_list_again_spread_over_the_last_quarter_of_the_resync_time():
    clock = Clock()
    index = PodIndex(resync_seconds=100, clock=clock)
    studies = [f"s{i:03d}" for i in range(100)]  # all first listed at the same moment (an operator's start)
    for name in studies:
        index.replace("default", name, [], started=clock())
    due_at = {}
    for step in range(0, 101):
        clock.now = 100.0 + step
        for name in studies:
            if name not in due_at and index.pods("default", name) is None:
                due_at[name] = step
    assert sorted(due_at) == studies  # every study lists again within the resync time
    assert min(due_at.values()) >= 75 and len(set(due_at.values())) > 15, due_at  # not all in one second


def test_the_newest_resource_version_wins_so_a_late_watch_event_cannot_undo_the_operators_patch():
    index = synced_index()
    index.observe("ADDED", pod("a", 5, "Running"))
    index.put(pod("a", 9, "Succeeded", **{builders.ANNOTATION_REPORTED: "true"}))  # the patch's answer
    assert index.observe("MODIFIED", pod("a", 7, "Succeeded")) is False  # sent before the patch
    (kept,) = index.pods("default", STUDY)
    assert kept["metadata"]["annotations"] == {builders.ANNOTATION_REPORTED: "true"}


def test_only_what_a_reconcile_reads_is_kept():
    kept = slim(pod("a", 5))
    assert "spec" not in kept and "managedFields" not in kept["metadata"]
    assert kept["status"] == {"phase": "Running"} and kept["metadata"]["labels"] == {builders.LABEL_STUDY: STUDY}


def test_phase_changes_and_deletions_matter_other_changes_do_not():
    index = synced_index()
    assert index.observe("ADDED", pod("a", 1, "Pending")) is True  # a new pod
    assert index.observe("MODIFIED", pod("a", 2, "Pending")) is False  # same phase
    assert index.observe("MODIFIED", pod("a", 3, "Succeeded")) is True
    assert index.observe("DELETED", pod("a", 4, "Succeeded")) is True
    assert index.pods("default", STUDY) == []


def test_the_answer_to_a_delete_never_brings_back_a_pod_the_watch_saw_go():
    index = synced_index()
    index.observe("ADDED", pod("a", 1))
    index.observe("DELETED", pod("a", 3))
    index.put(pod("a", 2))  # the delete's answer, slower than the watch
    assert index.pods("default", STUDY) == []
    index.put(pod("a", 8))  # a new pod of that name (a trial pod replaced) is a new object
    assert len(index.pods("default", STUDY)) == 1


def test_a_list_keeps_what_was_written_after_it_began():
    clock = Clock()
    index = synced_index(clock)
    started = clock()
    clock.now += 1
    index.put(pod("new", 10))  # created while the list was on its way
    merged = index.replace("default", STUDY, [pod("old", 3)], started=started)
    assert sorted(p["metadata"]["name"] for p in merged) == ["new", "old"]
    clock.now += 1
    stale = index.replace("default", STUDY, [pod("old", 3)], started=clock())
    assert [p["metadata"]["name"] for p in stale] == ["old"]  # gone from a list begun after it was seen


def test_the_indexed_api_lists_once_then_answers_from_the_watch_and_its_own_writes(k8s_api):
    api = KubeApi(k8s_api.kubernetes_client())
    index = PodIndex()
    indexed = IndexedKubeApi(api, index)
    selector = builders.study_selector(STUDY)
    assert indexed.list_pods("default", selector) == []
    created = indexed.create_pod({"apiVersion": "v1", "kind": "Pod",
                                  "metadata": {"name": "p1", "namespace": "default",
                                               "labels": {builders.LABEL_STUDY: STUDY}},
                                  "spec": {"containers": [{"name": "c", "image": "x"}]}})
    assert created and created["metadata"]["resourceVersion"]
    assert [p["metadata"]["name"] for p in indexed.list_pods("default", selector)] == ["p1"]
    indexed.annotate_pod("default", "p1", {builders.ANNOTATION_REPORTED: "true"})
    (seen,) = indexed.list_pods("default", selector)
    assert seen["metadata"]["annotations"][builders.ANNOTATION_REPORTED] == "true"
    assert api.calls["pods", "list"] == 1  # one real list; the rest came from the index
    assert indexed.list_pods("default", "app=other") == [] and api.calls["pods", "list"] == 2  # other selectors: the API


def test_secrets_are_kept_for_the_cache_time_and_a_missing_key_is_read_again(k8s_api):
    from tests.e2e.conftest import secret

    k8s_api.create("secrets", secret("db", {"url": "postgresql://a"}))
    api = KubeApi(k8s_api.kubernetes_client(), secret_seconds=30)
    assert api.read_secret_key("default", "db", "url") == "postgresql://a"
    assert api.read_secret_key("default", "db", "url") == "postgresql://a"
    assert api.calls["secrets", "get"] == 1
    k8s_api.patch("secrets", "db", {"data": {"other": "cG9kLWluZGV4LXRlc3QtdmFsdWU="}})
    assert api.read_secret_key("default", "db", "other") == "pod-index-test-value"  # a key not kept: read again at once
    assert api.calls["secrets", "get"] == 2
    fresh = KubeApi(k8s_api.kubernetes_client(), secret_seconds=0)
    fresh.read_secret_key("default", "db", "url")
    fresh.read_secret_key("default", "db", "url")
    assert fresh.calls["secrets", "get"] == 2  # 0: no cache


def test_a_pod_event_that_matters_wakes_only_its_own_study():
    async def scenario() -> tuple[bool, bool, int]:
        wakeups = Wakeups()
        mine, other = wakeups.register("default", STUDY), wakeups.register("default", "other")
        index = synced_index()
        on_pod_event(index, wakeups, "ADDED", pod("a", 1, "Running"))
        mine.clear()
        on_pod_event(index, wakeups, "MODIFIED", pod("a", 2, "Running"))  # nothing changed that matters
        quiet = not mine.is_set()
        on_pod_event(index, wakeups, "MODIFIED", pod("a", 3, "Succeeded"))
        return quiet, mine.is_set() and not other.is_set(), wakeups.woken
    quiet, woken, count = asyncio.run(scenario())
    assert quiet and woken and count == 2


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_reconcile_settings_name_the_variable(value):
    with pytest.raises(ValueError, match="STRATA_RECONCILE_SECONDS"):
        StudyDriver.from_env(None, None, Wakeups(), env={"STRATA_RECONCILE_SECONDS": value})


def test_a_pass_reads_the_studys_trials_once_and_again_only_after_its_own_writes(tmp_path):
    """PassSnapshot in one_pass(): get_all_trials served from the pass's first read until the pass writes;
    another process's change shows at the next pass; outside a pass every read goes to the storage."""
    import optuna
    from optuna.trial import TrialState

    from strata.study import PassSnapshot, one_pass, open_storage

    class Counting:
        def __init__(self, storage):
            self.storage, self.reads = storage, 0

        def __getattr__(self, name):
            return getattr(self.storage, name)

        def get_all_trials(self, *args, **kwargs):
            self.reads += 1
            return self.storage.get_all_trials(*args, **kwargs)

    url = f"journal://{tmp_path / 's.journal'}"
    counting = Counting(open_storage(url))
    study = optuna.create_study(study_name="s", storage=PassSnapshot(counting))
    other = optuna.load_study(study_name="s", storage=open_storage(url))  # another process: a trainer
    study.enqueue_trial({"x": 1.0})
    with one_pass():
        first = study.get_trials(deepcopy=False)
        assert study.get_trials(states=(TrialState.WAITING,)) == first and counting.reads == 1
        other.tell(other.ask({"x": optuna.distributions.FloatDistribution(0, 2)}), 0.5)
        assert len(study.get_trials()) == 1 and counting.reads == 1  # a snapshot within the pass
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})  # the pass writes
        trials = study.get_trials(deepcopy=False)
        # read again, all of it: the other's trial (the enqueued one) and this pass's
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
        assert trials[0].params == {"x": 1.0} and trial.number == 1
        reads = counting.reads
        study.get_trials()
        assert counting.reads == reads
    study.get_trials()
    study.get_trials()
    assert counting.reads == reads + 2  # outside a pass: no snapshot


def test_a_pass_keeps_the_trials_it_creates_as_it_writes_them_and_reads_none_of_them_back(tmp_path):
    """A trial asked in a pass is read from the storage once (when created); its params and attrs as
    the pass writes them come back from the pass, equal to what the storage then holds."""
    import optuna

    from strata.study import PassSnapshot, one_pass, open_storage, read_trial

    class Counting:
        def __init__(self, storage):
            self.storage, self.calls = storage, []

        def __getattr__(self, name):
            attr = getattr(self.storage, name)
            if name.startswith("get_"):
                def counted(*args, **kwargs):
                    self.calls.append(name)
                    return attr(*args, **kwargs)
                return counted
            return attr

    url = f"journal://{tmp_path / 's.journal'}"
    counting = Counting(open_storage(url))
    study = optuna.create_study(study_name="s", storage=PassSnapshot(counting))
    space = {"x": optuna.distributions.FloatDistribution(0, 2), "n": optuna.distributions.IntDistribution(1, 4)}
    study.tell(study.ask(space), 1.0)
    with one_pass():
        assert len(study.get_trials(deepcopy=False)) == 1
        counting.calls.clear()
        trial = study.ask(space)
        trial.set_user_attr("strata.pod", "s-trial-1")
        study._storage.set_trial_system_attr(trial._trial_id, "key", ("a", 1))
        seen = read_trial(study, trial.number)
        listed = study.get_trials(deepcopy=False)
        assert counting.calls.count("get_trial") == 1 and "get_all_trials" not in counting.calls, counting.calls
        assert seen.params == trial.params and set(seen.params) == {"x", "n"}
        assert seen.user_attrs["strata.pod"] == "s-trial-1" and seen.system_attrs["key"] == ["a", 1]
        assert [t.number for t in listed] == [0, 1] and listed[1].params == trial.params
        study.tell(trial, 0.5)  # a state: the pass reads again
        assert study.get_trials(deepcopy=False)[1].state == optuna.trial.TrialState.COMPLETE
    stored = optuna.load_study(study_name="s", storage=open_storage(url)).trials[1]
    assert (stored.params, stored.user_attrs["strata.pod"], stored.system_attrs["key"]) == (
        seen.params, "s-trial-1", ["a", 1])
