"""Restarts never replay a seeded sampler, and a study spends its budget on distinct configurations.

The campaign found a resumed `strata run` and every operator restart proposing earlier
configurations again (a seeded sampler rebuilt with the same seed starts its stream again). Here a
study is driven by the real scheduler on a real journal file (and PostgreSQL), with a fresh
scheduler, Study object and sampler after every few trials, as a restarted process would have.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from strata.sampling import DistinctSampler, params_key, trial_seed
from strata.study import build_sampler
from tests.test_scheduler import SPACE, SimulatedStudy, study_spec

SAMPLERS = ["tpe", "random", "qmc", "gp"]


def run_with_restarts(spec, url: str, layers: Path, restart_every: int | None) -> list[dict]:
    """Run the study to its end, starting a new process's worth of objects every few trials."""
    study = SimulatedStudy(spec, url, layers)
    for step in range(200):
        if study.outcome().finished:
            break
        if restart_every and step and step % restart_every == 0:
            study = SimulatedStudy(spec, url, layers)  # the runner or operator restarted
        plan = study.plan()
        if study.active:
            number = min(study.active)
            study.complete(number, value=0.05 * ((number * 7) % 11) + 0.2)
        elif not plan.launch:
            break
    return [t.params for t in study.trials()]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_study_restarted_after_every_two_trials_never_repeats_a_configuration(sampler, tmp_path):
    spec = study_spec(sampler={"name": sampler, "seed": 7}, trials={"max": 10, "parallel": 1},
                      reuse={"enabled": False})
    params = run_with_restarts(spec, f"journal://{tmp_path / 's.journal'}", tmp_path / "layers", restart_every=2)

    assert len(params) == 10
    assert len({params_key(p) for p in params}) == 10  # 10 distinct of the space's 12


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_restarted_study_proposes_what_an_uninterrupted_one_proposes(sampler, tmp_path):
    """Reproducible for a seed and a history: restarts change nothing, another seed changes something."""
    spec = study_spec(sampler={"name": sampler, "seed": 3}, trials={"max": 8, "parallel": 1}, reuse={"enabled": False})

    straight = run_with_restarts(spec, f"journal://{tmp_path / 'a.journal'}", tmp_path / "a", restart_every=None)
    restarted = run_with_restarts(spec, f"journal://{tmp_path / 'b.journal'}", tmp_path / "b", restart_every=3)
    other = run_with_restarts(study_spec(sampler={"name": sampler, "seed": 4}, trials={"max": 8, "parallel": 1},
                                         reuse={"enabled": False}),
                              f"journal://{tmp_path / 'c.journal'}", tmp_path / "c", restart_every=None)

    assert restarted == straight
    assert other != straight


def test_restarts_on_postgresql_with_reuse_aware_scheduling_keep_every_configuration_distinct(postgres_url, tmp_path):
    spec = study_spec(sampler={"name": "tpe", "seed": 11, "startupTrials": 3}, trials={"max": 12, "parallel": 2})
    params = run_with_restarts(spec, postgres_url, tmp_path / "layers", restart_every=2)

    assert len(params) == 12
    assert len({params_key(p) for p in params}) == 12  # the whole space, each configuration once


def test_once_the_space_is_exhausted_a_repeat_gets_the_earlier_result(tmp_path):
    small = {"convLayers": {"type": "int", "low": 1, "high": 1},
             "learningRate": {"type": "categorical", "choices": [0.001, 0.01]}}
    spec = study_spec(searchSpace=small, sampler={"name": "tpe", "seed": 1}, trials={"max": 3, "parallel": 1})
    study = SimulatedStudy(spec, f"journal://{tmp_path / 's.journal'}", tmp_path / "layers")
    study.run_to_end()

    trials = study.trials()
    assert len({params_key(t.params) for t in trials[:2]}) == 2
    assert trials[2].state == TrialState.COMPLETE and "strata.duplicate_of" in trials[2].user_attrs


def test_the_wrapper_draws_an_untried_point_when_the_inner_sampler_keeps_repeating():
    space = study_spec(sampler={"name": "random", "seed": 0}).search_space

    class Stubborn(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):
            return {"convLayers": 1, "learningRate": 0.001, "batchSize": 32}[name]

    spec = study_spec()
    base = build_sampler(spec)
    sampler = DistinctSampler(lambda seed: Stubborn(seed=seed), base.infer_relative_search_space(None, None), 5,
                              spec.grid())
    study = optuna.create_study(sampler=sampler)
    seen = set()
    for _ in range(len(spec.grid())):
        trial = study.ask(base.infer_relative_search_space(None, None))
        seen.add(params_key(trial.params))
        study.tell(trial, 0.5)
    assert len(seen) == len(spec.grid()) == 12 and space


def test_trial_seeds_are_stable_and_distinct():
    assert trial_seed(7, 3) == trial_seed(7, 3)
    assert len({trial_seed(7, n) for n in range(1000)}) == 1000
    assert trial_seed(7, 3) != trial_seed(8, 3)


def test_sharing_the_search_space_cache_across_rebuilds_changes_no_proposal():
    """DistinctSampler hands one incremental IntersectionSearchSpace to every per-trial TPE it builds:
    the proposals are those of samplers that each compute it afresh."""
    import optuna

    from strata.sampling import DistinctSampler
    from strata.spec import parse_spec
    from strata.study import _inner_sampler, distributions

    spec = parse_spec({"searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 3},
                                       "learningRate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                                       "fcLayout": {"type": "categorical", "choices": ["32", "64"]}},
                       "sampler": {"name": "tpe", "seed": 4, "startupTrials": 5}, "trials": {"max": 40}})

    class Unshared(DistinctSampler):
        def _shared(self, inner):
            return inner

    proposals = []
    for kind in (DistinctSampler, Unshared):
        sampler = kind(lambda seed: _inner_sampler(spec, seed), distributions(spec), 4)
        study = optuna.create_study(sampler=sampler)
        running = []
        for i in range(30):
            trial = study.ask(distributions(spec))
            running.append(trial)
            if i % 3 == 2:  # some trials stay running a while, as in a study under way
                for t in running[:-1]:
                    study.tell(t, (t.params["learningRate"] - 0.01) ** 2 + t.params["convLayers"] / 10)
                running = running[-1:]
        proposals.append([t.params for t in study.trials])
    assert proposals[0] == proposals[1]
