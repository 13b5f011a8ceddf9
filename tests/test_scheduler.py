"""The scheduler on real Optuna storages and a real layer registry, with trainers simulated.

Nothing trains here: a simulated trainer publishes its conv prefixes to the registry (as
strata_trainer.trial does, with stand-in bytes for weights) and tells Optuna its value. What the
sampler proposes next is fixed with Optuna's own enqueue_trial, the way a user pins a trial.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from strata.families import architecture_from_params
from strata.objectstore import open_object_store
from strata.registry import LayerRegistry
from strata.runner import step
from strata.scheduler import ATTR_DUPLICATE_OF, ATTR_FAIL_KIND, ATTR_STARTED, Plan, TrialScheduler
from strata.spec import StudySpec, parse_spec
from strata.study import ATTR_ATTEMPT, ATTR_DONOR_FOR, ATTR_FAIL_REASON, ATTR_RETRY_OF, create_or_load_study

SPACE = {
    "convLayers": {"type": "int", "low": 1, "high": 3},
    "learningRate": {"type": "categorical", "choices": [0.001, 0.01]},
    "batchSize": {"type": "categorical", "choices": [32, 64]},
}
DEEP = {"convLayers": 3, "learningRate": 0.01, "batchSize": 64}


def study_spec(**sections: Any) -> StudySpec:
    spec: dict[str, Any] = {
        "searchSpace": SPACE,
        "sampler": {"name": "random", "seed": 0},
        "trials": {"max": 6, "parallel": 2, "maxFailed": 3, "retries": 1},
        "training": {"inputSize": 16},
    }
    spec.update(sections)
    return parse_spec(spec)


def with_depth(params: dict[str, Any], depth: int) -> dict[str, Any]:
    return {**params, "convLayers": depth}


class SimulatedStudy:
    """A TrialScheduler, the workers it launched (by number), and trainers that act instantly."""

    def __init__(self, spec: StudySpec, storage: optuna.storages.BaseStorage | str, layers: Path,
                 name: str = "sched"):
        self.spec = spec
        self.study = create_or_load_study(spec, name, storage)
        self.registry = LayerRegistry(open_object_store(str(layers)))
        self.scheduler = TrialScheduler(self.study, spec, self.registry)
        self.active: set[int] = set()
        self.launched_with_donor: dict[int, bool] = {}  # trial -> its (n-1)-prefix was published at launch
        self.makers_at_launch: dict[int, list[int]] = {}  # trial -> running trials still training that prefix

    # what the sampler proposes, what the scheduler decides

    def sampler_proposes(self, params: dict[str, Any]) -> None:
        self.study.enqueue_trial(params)

    def plan(self, free_slots: int | None = None) -> Plan:
        if free_slots is None:
            free_slots = max(0, self.scheduler.spec.trials.parallel - len(self.active))
        plan = self.scheduler.plan(self.active, free_slots)
        for number in plan.launch:
            params, depth = self.params(number), self.params(number)["convLayers"]
            self.launched_with_donor[number] = depth == 1 or self.has_prefix(params, depth - 1)
            self.makers_at_launch[number] = [] if self.launched_with_donor[number] else [
                u for u in sorted(self.active) if self.params(u)["convLayers"] >= depth - 1
                and self.signature(self.params(u), depth - 1) == self.signature(params, depth - 1)]
            self.active.add(number)
        return plan

    def outcome(self):
        return self.scheduler.outcome(self.active)

    # simulated trainers

    def complete(self, number: int, value: float = 0.5) -> None:
        """Train: publish every prefix, then tell Optuna (publish before tell, as the trainer does)."""
        params = self.params(number)
        arch = architecture_from_params(self.spec, params)
        for k in range(1, arch.depth + 1):
            self.registry.publish(arch.prefix_signature(k), f"trial {number} prefix {k}".encode(),
                                  study=self.study.study_name, trial_number=number, val_loss=value, epochs=1)
        self.study.tell(number, value)
        self.active.discard(number)

    def trainer_reports_failure(self, number: int, reason: str = "ValueError: loss is nan") -> None:
        trial = optuna.trial.Trial(self.study, self.trial(number)._trial_id)
        trial.set_user_attr(ATTR_FAIL_REASON, reason)
        self.study.tell(number, state=TrialState.FAIL)
        self.active.discard(number)

    def worker_dies(self, number: int, kind: str = "infrastructure") -> None:
        self.scheduler.fail_attempt(number, "trainer exited with code -9 (OOMKilled)", kind=kind)
        self.active.discard(number)

    def run_to_end(self, max_steps: int = 200) -> None:
        """Plan, then let the oldest running trial finish, until the study ends; a stall fails."""
        for _ in range(max_steps):
            if self.outcome().finished:
                return
            plan = self.plan()
            if not plan.launch and not self.active:
                # the plan may have ended the study itself (a repeated configuration told its result)
                assert self.outcome().finished, f"stalled: nothing runs and nothing starts ({plan.waiting})"
                return
            number = min(self.active)
            self.complete(number, value=0.1 * (number % 7) + 0.2)
        pytest.fail(f"study did not end in {max_steps} steps")

    # reading

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials()

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        return self.trials()[number]

    def params(self, number: int) -> dict[str, Any]:
        return self.trial(number).params

    def configs(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.trials() if ATTR_RETRY_OF not in t.user_attrs]

    def signature(self, params: dict[str, Any], depth: int):
        return architecture_from_params(self.spec, params).prefix_signature(depth)

    def has_prefix(self, params: dict[str, Any], depth: int) -> bool:
        return self.registry.has_donor(self.signature(params, depth))


@pytest.fixture
def simulate(tmp_path):
    """Make a SimulatedStudy on an in-memory storage (or the one given) with a registry in tmp_path."""
    def make(spec: StudySpec, storage: optuna.storages.BaseStorage | str | None = None) -> SimulatedStudy:
        return SimulatedStudy(spec, storage or optuna.storages.InMemoryStorage(), tmp_path / "layers")
    return make


# --- reuse-aware scheduling ------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_deep_proposal_without_donors_waits_for_an_enqueued_donor_chain(simulate, sampler):
    sim = simulate(study_spec(sampler={"name": sampler, "seed": 1}))
    sim.sampler_proposes(DEEP)

    plan = sim.plan(free_slots=1)

    assert [t.params for t in sim.trials()] == [DEEP, with_depth(DEEP, 2), with_depth(DEEP, 1)]
    assert plan.launch == [2]
    assert plan.waiting == {0: "waits for donor trial 1", 1: "waits for donor trial 2"}
    assert sim.trial(1).user_attrs[ATTR_DONOR_FOR] == 0
    assert sim.trial(2).user_attrs[ATTR_DONOR_FOR] == 1
    # the one that starts is RUNNING; the two that wait are parked in Optuna's WAITING, params kept
    assert [t.state for t in sim.trials()] == [TrialState.WAITING, TrialState.WAITING, TrialState.RUNNING]


def test_each_trial_of_the_chain_starts_once_its_donor_has_published(simulate):
    sim = simulate(study_spec(trials={"max": 3, "parallel": 1}))  # a budget of the chain alone
    sim.sampler_proposes(DEEP)
    assert sim.plan(free_slots=1).launch == [2]

    still = sim.plan(free_slots=1)  # the 1-layer donor is running: nothing else may start
    assert still.launch == []
    assert still.waiting == {0: "waits for trial 1 to publish its 2-unit prefix",
                             1: "waits for trial 2 to publish its 1-unit prefix"}

    sim.complete(2)
    after_first = sim.plan(free_slots=1)
    assert after_first.launch == [1]
    assert after_first.waiting[0] == "waits for trial 1 to publish its 2-unit prefix"

    sim.complete(1)
    assert sim.plan(free_slots=1).launch == [0]
    assert sim.launched_with_donor == {2: True, 1: True, 0: True}


@pytest.mark.parametrize("storage", ["memory", "journal", "postgresql"])
def test_a_trial_that_waits_for_its_donor_is_parked_so_optunas_duration_is_its_run_time(simulate, storage,
                                                                                       tmp_path, request):
    url = {"memory": None, "journal": f"journal://{tmp_path / 'study.optuna.journal'}"}.get(storage) \
        or request.getfixturevalue("postgres_url")
    sim = simulate(study_spec(trials={"max": 3, "parallel": 1}), url)
    sim.sampler_proposes(with_depth(DEEP, 2))
    assert sim.plan(free_slots=1).launch == [1]  # the donor, asked and started in one pass

    # While it waits, trial 0 is Optuna's WAITING (the dashboard shows it so), params kept, and
    # counted as waiting and towards the budget; a plain ask (a new proposal) never takes it.
    waiting = sim.trial(0)
    assert waiting.state == TrialState.WAITING and waiting.params == with_depth(DEEP, 2)
    progress = sim.scheduler.progress(sim.active)
    assert (progress.waiting, progress.running, progress.configs) == (1, 1, 2)
    assert sim.scheduler.plan(sim.active, free_slots=0).waiting == {0: "no free slot"}
    assert sim.trial(0).state == TrialState.WAITING  # nothing written for a trial still parked
    time.sleep(0.6)
    sim.complete(1)
    asked_new = sim.scheduler.study.ask(sim.scheduler._distributions)
    assert asked_new.number == 2 and sim.trial(0).state == TrialState.WAITING
    sim.study.tell(2, 0.7)

    before_start = datetime.datetime.now()
    assert sim.plan(free_slots=1).launch == [0]
    started = sim.trial(0)
    assert started.state == TrialState.RUNNING  # what the trainer requires
    assert started.datetime_start >= before_start - datetime.timedelta(milliseconds=50)  # the clock restarted
    assert started.user_attrs["queued_seconds"] >= 0.6  # the wait, kept apart
    assert "queued_seconds" not in sim.trial(1).user_attrs
    sim.complete(0)
    done = sim.trial(0)
    assert (done.datetime_complete - done.datetime_start).total_seconds() < 0.5  # Optuna's duration: the run


def test_a_trial_asked_by_a_pass_that_ended_before_starting_it_restarts_its_clock_when_it_starts(simulate):
    sim = simulate(study_spec(trials={"max": 3, "parallel": 1}))
    sim.sampler_proposes(with_depth(DEEP, 1))
    asked = sim.scheduler.study.ask(sim.scheduler._distributions)  # RUNNING, no worker: the pass was cut
    time.sleep(0.6)
    before_start = datetime.datetime.now()
    assert sim.plan(free_slots=1).launch == [asked.number]
    started = sim.trial(asked.number)
    assert started.state == TrialState.RUNNING
    assert started.datetime_start >= before_start - datetime.timedelta(milliseconds=50)
    assert started.user_attrs["queued_seconds"] >= 0.6


def test_a_parked_trial_that_repeats_a_finished_one_or_outlives_the_study_is_told(simulate):
    shallow = with_depth(DEEP, 1)
    sim = simulate(study_spec(trials={"max": 8, "parallel": 2}))
    sim.sampler_proposes(shallow)
    assert sim.plan(free_slots=1).launch == [0]
    sim.sampler_proposes(shallow)  # the sampler repeats a configuration under way
    assert sim.plan(free_slots=1).waiting[1] == "repeats trial 0, which is under way"
    assert sim.trial(1).state == TrialState.WAITING
    sim.complete(0, value=0.25)

    sim.plan(free_slots=1)  # trial 1 gets trial 0's result: set RUNNING again, then told
    repeat = sim.trial(1)
    assert (repeat.state, repeat.value, repeat.user_attrs[ATTR_DUPLICATE_OF]) == (TrialState.COMPLETE, 0.25, 0)

    sim.sampler_proposes(DEEP)
    sim.plan(free_slots=0)
    parked = [t for t in sim.trials() if t.state == TrialState.WAITING and t.params]
    assert parked and sim.active
    sim.scheduler.stop_waiting(sim.active, "study ended")
    for t in parked:
        failed = sim.trial(t.number)
        assert failed.state == TrialState.FAIL and failed.user_attrs[ATTR_FAIL_KIND] == "interrupted"


def test_a_deep_proposal_whose_donor_is_published_starts_at_once(simulate):
    sim = simulate(study_spec())
    sim.sampler_proposes(with_depth(DEEP, 2))
    assert sim.plan(free_slots=1).launch == [1]
    sim.complete(1)
    assert sim.plan(free_slots=1).launch == [0]
    sim.complete(0)
    sim.sampler_proposes(DEEP)

    plan = sim.plan(free_slots=1)

    assert plan.launch == [2]
    assert len(sim.trials()) == 3  # no donor enqueued: trial 0 published the 2-unit prefix


def test_a_deep_proposal_waits_for_a_running_trial_that_will_publish_its_prefix(simulate):
    sim = simulate(study_spec(trials={"max": 2, "parallel": 2}))
    sim.sampler_proposes(with_depth(DEEP, 1))
    assert sim.plan(free_slots=1).launch == [0]
    sim.sampler_proposes(with_depth(DEEP, 2))

    plan = sim.plan(free_slots=1)

    assert plan.launch == []
    assert plan.waiting == {1: "waits for trial 0 to publish its 1-unit prefix"}
    assert len(sim.trials()) == 2  # the running trial is the donor: none enqueued


@pytest.mark.parametrize("reuse", [{"reuseAwareScheduling": False}, {"enabled": False}],
                         ids=["reuse-aware-scheduling-off", "reuse-off"])
def test_without_reuse_aware_scheduling_a_deep_proposal_starts_at_once(simulate, reuse):
    sim = simulate(study_spec(reuse=reuse))
    sim.sampler_proposes(DEEP)
    sim.sampler_proposes(with_depth(DEEP, 2))

    plan = sim.plan(free_slots=2)

    assert plan.launch == [0, 1]
    assert plan.waiting == {}
    assert [t.params for t in sim.trials()] == [DEEP, with_depth(DEEP, 2)]


@pytest.mark.parametrize("parallel", [1, 3])
def test_a_random_study_never_starts_a_trial_while_its_prefix_is_still_being_trained(simulate, parallel):
    sim = simulate(study_spec(trials={"max": 10, "parallel": parallel}, sampler={"name": "random", "seed": 5}))

    sim.run_to_end()

    assert {number: makers for number, makers in sim.makers_at_launch.items() if makers} == {}
    assert len(sim.configs()) == 10
    assert all(t.state == TrialState.COMPLETE for t in sim.trials())
    assert any(sim.params(number)["convLayers"] > 1 for number in sim.launched_with_donor)  # the check ran


# --- grid ------------------------------------------------------------------------------------------


def test_grid_asks_smaller_depths_first_and_ends_after_exactly_the_grid(simulate):
    space = {"convLayers": SPACE["convLayers"], "learningRate": SPACE["learningRate"]}
    sim = simulate(study_spec(searchSpace=space, sampler={"name": "grid", "seed": 3},
                              trials={"max": 20, "parallel": 2}))

    sim.run_to_end()

    trials = sim.trials()
    assert len(trials) == sim.spec.grid_size() == 6
    assert sorted(tuple(sorted(t.params.items())) for t in trials) == \
        sorted(tuple(sorted(p.items())) for p in sim.spec.grid())
    depths = [t.params["convLayers"] for t in trials]
    assert depths == sorted(depths)
    assert all(sim.launched_with_donor.values()), sim.launched_with_donor
    outcome = sim.outcome()
    assert (outcome.finished, outcome.phase, outcome.reason) == (True, "Succeeded", "MaxTrialsReached")
    assert outcome.message == "6 of 6 trials finished"


def test_grid_smaller_than_trials_max_asks_nothing_more(simulate):
    sim = simulate(study_spec(searchSpace={"convLayers": {"type": "int", "low": 1, "high": 2}},
                              sampler={"name": "grid"}, trials={"max": 5, "parallel": 2}))
    sim.run_to_end()

    assert sim.plan(free_slots=2).launch == []
    assert len(sim.trials()) == 2


# --- budget ----------------------------------------------------------------------------------------


def test_donors_are_never_enqueued_beyond_trials_max(simulate):
    sim = simulate(study_spec(trials={"max": 2, "parallel": 1}))
    sim.sampler_proposes(DEEP)

    plan = sim.plan(free_slots=1)

    assert [t.params for t in sim.trials()] == [DEEP, with_depth(DEEP, 2)]
    assert plan.launch == [1]  # the budget has no room for its own donor: it trains from scratch
    assert plan.waiting == {0: "waits for donor trial 1"}
    sim.run_to_end()
    assert len(sim.trials()) == 2


def test_with_a_budget_of_one_a_deep_proposal_starts_without_a_donor(simulate):
    sim = simulate(study_spec(trials={"max": 1, "parallel": 1}))
    sim.sampler_proposes(DEEP)

    assert sim.plan(free_slots=1).launch == [0]
    assert len(sim.trials()) == 1


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_study_runs_exactly_trials_max_configurations(simulate, sampler):
    sim = simulate(study_spec(trials={"max": 7, "parallel": 2}, sampler={"name": sampler, "seed": 11}))

    sim.run_to_end()

    assert len(sim.configs()) == len(sim.trials()) == 7
    assert all(t.state == TrialState.COMPLETE for t in sim.trials())
    outcome = sim.outcome()
    assert (outcome.phase, outcome.reason) == ("Succeeded", "MaxTrialsReached")


# --- failures and retries --------------------------------------------------------------------------


def test_a_dead_worker_is_retried_with_the_same_params_up_to_retries_outside_the_budget(simulate):
    one_layer = with_depth(DEEP, 1)
    sim = simulate(study_spec(trials={"max": 1, "parallel": 1, "retries": 2, "maxFailed": 5}))
    sim.sampler_proposes(one_layer)
    assert sim.plan().launch == [0]

    sim.worker_dies(0)
    assert sim.plan().launch == [1]
    sim.worker_dies(1)
    assert sim.plan().launch == [2]
    sim.worker_dies(2)
    assert sim.plan().launch == []

    trials = sim.trials()
    assert [t.params for t in trials] == [one_layer] * 3
    assert [t.user_attrs.get(ATTR_RETRY_OF) for t in trials] == [None, 0, 0]
    assert [t.user_attrs.get(ATTR_ATTEMPT) for t in trials] == [None, 2, 3]
    assert [t.user_attrs[ATTR_FAIL_KIND] for t in trials] == ["infrastructure"] * 3
    assert len(sim.configs()) == 1
    assert sim.scheduler.progress().failed == 3


def test_a_successful_retry_finishes_its_configuration_without_taking_from_the_budget(simulate):
    sim = simulate(study_spec(trials={"max": 2, "parallel": 1, "retries": 1}))
    sim.sampler_proposes(with_depth(DEEP, 1))
    sim.plan()
    sim.worker_dies(0)
    assert sim.plan().launch == [1]
    sim.complete(1, value=0.3)

    progress = sim.scheduler.progress()
    assert (progress.configs, progress.finished, progress.failed) == (1, 1, 1)
    assert progress.best.number == 1
    sim.run_to_end()
    assert len(sim.trials()) == 3
    assert [t.number for t in sim.configs()] == [0, 2]  # the study still ran 2 configurations
    assert sim.outcome().reason == "MaxTrialsReached"


@pytest.mark.parametrize("fail", ["trainer reported", "timeout"])
def test_a_failure_the_trainer_reported_or_a_timeout_is_not_retried(simulate, fail):
    sim = simulate(study_spec(trials={"max": 1, "parallel": 1, "retries": 3}))
    sim.sampler_proposes(with_depth(DEEP, 1))
    sim.plan()

    if fail == "timeout":
        sim.worker_dies(0, kind="timeout")
    else:
        sim.trainer_reports_failure(0)

    assert sim.plan().launch == []
    assert len(sim.trials()) == 1
    assert sim.outcome().finished


def test_the_study_fails_once_more_trials_than_max_failed_have_failed(simulate):
    sim = simulate(study_spec(trials={"max": 6, "parallel": 3, "maxFailed": 1, "retries": 0}))
    for learning_rate, batch_size in ((0.01, 64), (0.01, 32), (0.001, 64)):
        sim.sampler_proposes({"convLayers": 1, "learningRate": learning_rate, "batchSize": batch_size})
    assert sim.plan().launch == [0, 1, 2]

    sim.trainer_reports_failure(min(sim.active))
    assert sim.outcome().phase == "Running"

    sim.trainer_reports_failure(min(sim.active))
    outcome = sim.outcome()
    assert (outcome.finished, outcome.phase, outcome.reason) == (True, "Failed", "FailureBudgetExceeded")
    assert outcome.stop_active  # the third trial is still running: the executor stops it
    assert outcome.message == "2 trial attempts failed, more than maxFailed=1"
    assert sim.plan(free_slots=3).launch == []


def test_a_study_whose_every_trial_failed_does_not_succeed(simulate):
    sim = simulate(study_spec(trials={"max": 2, "parallel": 2, "maxFailed": 5, "retries": 0}))
    sim.sampler_proposes(with_depth(DEEP, 1))
    sim.sampler_proposes({**with_depth(DEEP, 1), "batchSize": 32})
    assert sim.plan().launch == [0, 1]
    sim.trainer_reports_failure(0)
    sim.trainer_reports_failure(1)

    outcome = sim.outcome()

    assert (outcome.finished, outcome.phase, outcome.reason) == (True, "Failed", "MaxTrialsReached")
    assert outcome.message == "2 of 2 trials finished, none completed"


# --- how a study ends ------------------------------------------------------------------------------


class StepExecutor:
    """The executor side of strata.runner.step for a SimulatedStudy: which workers run, since when."""

    def __init__(self, sim: SimulatedStudy):
        self.sim = sim
        self.started: dict[int, float] = {}
        self.stopped: list[int] = []

    def start(self, number: int) -> None:
        self.sim.active.add(number)
        self.started[number] = time.time()

    def poll(self) -> list:
        return []

    def active(self) -> set[int]:
        return set(self.sim.active)

    def started_at(self, number: int) -> float:
        return self.started[number]

    def stop(self, number: int) -> None:
        self.sim.active.discard(number)
        self.stopped.append(number)

    def stop_all(self) -> None:
        for number in sorted(self.sim.active):
            self.stop(number)


def test_reaching_the_goal_stops_the_running_trials_and_ends_the_study(simulate):
    sim = simulate(study_spec(objective={"metric": "val_loss", "goal": 0.3}, trials={"max": 6, "parallel": 2}))
    executor = StepExecutor(sim)
    sim.sampler_proposes(with_depth(DEEP, 1))
    sim.sampler_proposes({**with_depth(DEEP, 1), "batchSize": 32})
    step(sim.scheduler, executor, 2)
    assert executor.active() == {0, 1}

    sim.complete(0, value=0.25)
    outcome, plan, _ = step(sim.scheduler, executor, 2)

    assert (outcome.finished, outcome.phase, outcome.reason) == (True, "Succeeded", "GoalReached")
    assert executor.stopped == [1] and plan.launch == []
    stopped = sim.trial(1)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs[ATTR_FAIL_KIND] == "interrupted"
    progress = sim.scheduler.progress()
    assert (progress.complete, progress.failed, progress.best.number) == (1, 0, 0)  # a stop is not a failure
    assert len(sim.trials()) == 2


def test_the_study_timeout_stops_running_trials_and_ends_the_study(simulate):
    sim = simulate(study_spec(trials={"max": 6, "parallel": 2, "studyTimeoutSeconds": 60}))
    executor = StepExecutor(sim)
    sim.sampler_proposes(with_depth(DEEP, 1))
    sim.sampler_proposes({**with_depth(DEEP, 1), "batchSize": 32})
    step(sim.scheduler, executor, 2)
    sim.complete(0, value=0.4)
    sim.study.set_user_attr(ATTR_STARTED, time.time() - 61)  # the study began 61 s ago

    outcome, plan, _ = step(sim.scheduler, executor, 2)

    assert (outcome.finished, outcome.phase, outcome.reason) == (True, "Succeeded", "StudyTimeout")
    assert outcome.message == "study timeout of 60s passed with 1 complete trials"
    assert executor.stopped == [1] and plan.launch == []
    assert sim.trial(1).state == TrialState.FAIL


def test_a_trial_past_its_timeout_is_stopped_failed_and_not_retried(simulate):
    sim = simulate(study_spec(trials={"max": 2, "parallel": 2, "retries": 3, "timeoutSeconds": 30}))
    executor = StepExecutor(sim)
    sim.sampler_proposes(with_depth(DEEP, 1))
    sim.sampler_proposes({**with_depth(DEEP, 1), "batchSize": 32})
    step(sim.scheduler, executor, 2)
    executor.started[0] -= 31  # trial 0 has run for 31 s, trial 1 just started

    outcome, plan, _ = step(sim.scheduler, executor, 2)

    assert executor.stopped == [0] and executor.active() == {1}
    timed_out = sim.trial(0)
    assert timed_out.state == TrialState.FAIL
    assert (timed_out.user_attrs[ATTR_FAIL_KIND], timed_out.user_attrs[ATTR_FAIL_REASON]) == \
        ("timeout", "trial exceeded timeoutSeconds=30")
    assert plan.launch == [] and outcome.phase == "Running"
    sim.complete(1)
    assert step(sim.scheduler, executor, 2)[0].finished
    assert len(sim.trials()) == 2  # no retry of the timed-out configuration


def test_a_value_short_of_the_goal_keeps_the_study_running(simulate):
    sim = simulate(study_spec(objective={"metric": "val_accuracy", "goal": 0.95}))
    sim.sampler_proposes(with_depth(DEEP, 1))
    sim.plan(free_slots=1)
    sim.complete(0, value=0.9)

    assert sim.outcome().reason == "TrialsRunning"


def test_a_suspended_study_starts_nothing_until_resumed(simulate):
    sim = simulate(study_spec(suspend=True))

    outcome = sim.outcome()
    assert (outcome.finished, outcome.phase, outcome.reason) == (False, "Suspended", "Suspended")
    assert sim.plan(free_slots=2) == Plan()
    assert sim.trials() == []

    sim.scheduler.update_spec(study_spec())
    assert sim.plan(free_slots=2).launch != []


def test_a_new_study_is_pending_until_a_trial_is_asked(simulate):
    sim = simulate(study_spec())

    assert sim.outcome().phase == "Pending"
    sim.plan()
    assert sim.outcome().phase == "Running"


# --- duplicates ------------------------------------------------------------------------------------


def test_a_repeated_configuration_gets_the_earlier_result_without_training(simulate):
    sim = simulate(study_spec(trials={"max": 3, "parallel": 1}))
    one_layer = with_depth(DEEP, 1)
    sim.sampler_proposes(one_layer)
    sim.plan()
    sim.complete(0, value=0.42)

    sim.sampler_proposes(one_layer)
    sim.sampler_proposes({**one_layer, "learningRate": 0.001})
    plan = sim.plan(free_slots=1)

    repeat = sim.trial(1)
    assert repeat.params == one_layer
    assert (repeat.state, repeat.value) == (TrialState.COMPLETE, 0.42)
    assert repeat.user_attrs[ATTR_DUPLICATE_OF] == 0
    assert plan.launch == [2]
    assert 1 not in sim.active


def test_a_configuration_proposed_while_it_is_still_training_waits_and_gets_that_result(simulate):
    sim = simulate(study_spec(trials={"max": 3, "parallel": 2}))
    one_layer = with_depth(DEEP, 1)
    sim.sampler_proposes(one_layer)
    sim.sampler_proposes(one_layer)
    plan = sim.plan()

    assert plan.launch == [0]
    assert "repeats trial 0" in plan.waiting[1]
    sim.complete(0, value=0.37)
    sim.plan()

    repeat = sim.trial(1)
    assert (repeat.state, repeat.value) == (TrialState.COMPLETE, 0.37)
    assert repeat.user_attrs[ATTR_DUPLICATE_OF] == 0
    assert 1 not in sim.active


# --- restarts --------------------------------------------------------------------------------------


@pytest.fixture(params=["journal", "postgresql"])
def storage_url(request, tmp_path) -> str:
    """A durable Optuna storage two schedulers can share: a journal file, or a real PostgreSQL."""
    if request.param == "journal":
        return f"journal://{tmp_path / 'study.optuna.journal'}"
    return request.getfixturevalue("postgres_url")


def test_a_restarted_scheduler_relaunches_trials_left_without_a_worker(simulate, storage_url):
    first = simulate(study_spec(trials={"max": 2, "parallel": 2}), storage_url)
    first.sampler_proposes(with_depth(DEEP, 1))
    first.sampler_proposes({**with_depth(DEEP, 1), "batchSize": 32})
    assert first.plan().launch == [0, 1]
    # the runner dies with both workers; the trials stay RUNNING in the storage

    second = simulate(study_spec(trials={"max": 2, "parallel": 2}), storage_url)
    plan = second.plan()

    assert plan.launch == [0, 1]
    assert len(second.trials()) == 2
    second.run_to_end()
    assert [t.state for t in second.trials()] == [TrialState.COMPLETE] * 2


def test_a_restart_in_the_middle_of_a_donor_chain_finishes_it_without_stalling(simulate, tmp_path):
    url = f"journal://{tmp_path / 'study.optuna.journal'}"
    spec = study_spec(trials={"max": 3, "parallel": 2})
    first = simulate(spec, url)
    first.sampler_proposes(DEEP)
    assert first.plan(free_slots=1).launch == [2]

    second = simulate(spec, url)
    plan = second.plan(free_slots=2)
    assert plan.launch == [2]
    assert set(plan.waiting) == {0, 1}

    second.run_to_end()
    assert [(t.number, t.state) for t in second.trials()] == [(n, TrialState.COMPLETE) for n in range(3)]
    assert second.launched_with_donor == {2: True, 1: True, 0: True}


def test_when_every_asked_trial_waits_and_nothing_runs_the_oldest_starts(simulate, tmp_path):
    # A waiting trial whose producer is RUNNING in the storage but has no worker: after a restart
    # with a single free slot, the chain must still move.
    spec = study_spec(trials={"max": 3, "parallel": 1})
    sim = simulate(spec, f"journal://{tmp_path / 'study.optuna.journal'}")
    sim.sampler_proposes(DEEP)
    sim.plan(free_slots=1)
    sim.active.clear()  # the worker of trial 2 is gone

    for _ in range(3):
        plan = sim.plan(free_slots=1)
        assert len(plan.launch) == 1, plan
        sim.complete(plan.launch[0])

    assert sim.outcome().finished
