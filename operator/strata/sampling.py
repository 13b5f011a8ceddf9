"""A sampler wrapper that keeps a study's budget on distinct configurations across restarts.

Two things go wrong with a plain seeded Optuna sampler in a study that outlives its process:
- Replay: `strata run` resumed, an operator restarted or a spec changed rebuilds the sampler with
  the same seed, so its random stream starts again and it proposes the configurations it proposed
  before. Here the inner sampler is rebuilt for every trial with a seed derived from the study's
  seed and the trial's number: a proposal depends only on the seed, the trial number and the
  history in the storage, never on how many processes came and went.
- Repeats: in a finite space (the paper's grids) TPE keeps proposing its favourite configuration.
  Every proposal is checked against the configurations the study already holds (running, waiting,
  finished or failed); a repeat is proposed again a few times and then replaced by an untried
  point drawn at random, so the budget goes to new configurations while the space has them.

The wrapper samples the whole search space in `sample_relative` (the inner sampler's relative
space first, its independent sampling for the rest), so one place sees the complete proposal.
Optuna's own composition pattern (cf. `PartialFixedSampler`): every other hook is delegated.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

ATTEMPTS = 8  # proposals asked of the inner sampler before an untried point is drawn instead


def trial_seed(seed: int, number: int) -> int:
    """A seed for one trial's proposal: stable across processes, different for every trial."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, number]).generate_state(1)[0])


def params_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, round(v, 12) if isinstance(v, float) and math.isfinite(v) else v)
                        for k, v in params.items()))


class DistinctSampler(BaseSampler):
    """Wraps the sampler a spec names; see the module docstring.

    make(seed) builds the inner sampler; with `reseed` it is rebuilt per trial from the study seed
    and the trial number (QMC keeps one seed: its sequence position lives in the study itself).
    `grid` lists every configuration of a finite space (None for an infinite one).
    """

    def __init__(self, make: Callable[[int | None], BaseSampler], space: dict[str, BaseDistribution],
                 seed: int | None, grid: Sequence[dict[str, Any]] | None = None, reseed: bool = True):
        self._make, self._space, self._seed, self._reseed = make, dict(space), seed, reseed
        self._grid = list(grid) if grid is not None else None
        self._search_space_cache: IntersectionSearchSpace | None = None
        self._finished_keys: dict[int, tuple] = {}  # trial number -> params key, for finished trials
        self._inner = self._shared(make(seed))
        self._number: int | None = None

    @property
    def inner(self) -> BaseSampler:
        return self._inner

    def _for_trial(self, number: int) -> None:
        if self._reseed and self._seed is not None and number != self._number:
            self._inner = self._shared(self._make(trial_seed(self._seed, number)))
        self._number = number

    def _shared(self, inner: BaseSampler) -> BaseSampler:
        """One search-space cache for every rebuild of the inner sampler.

        Optuna's TPE and CMA-ES compute the intersection search space incrementally, in an object
        that depends on the study only; a sampler rebuilt per trial would start it afresh and walk
        every trial on each ask (half of an ask's time at 5,000 trials, bench/scale.py).
        """
        cache = getattr(inner, "_search_space", None)
        if isinstance(cache, IntersectionSearchSpace):
            if self._search_space_cache is None or self._search_space_cache._include_pruned != cache._include_pruned:
                self._search_space_cache = cache
            else:
                inner._search_space = self._search_space_cache
        return inner

    # --- BaseSampler ------------------------------------------------------------------------

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._for_trial(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        self._for_trial(trial.number)
        taken = self._configurations(study, exclude=trial.number)
        params: dict[str, Any] = {}
        for _ in range(ATTEMPTS):
            params = self._propose(study, trial, search_space)
            if params_key(params) not in taken:
                return params
        untried = [p for p in self._grid or () if params_key(p) not in taken and set(p) == set(search_space)]
        if untried:
            rng = random.Random(trial_seed(self._seed or 0, trial.number))
            return dict(rng.choice(untried))
        return params  # the space is exhausted (or infinite): the scheduler copies the earlier result

    def _propose(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        inner_space = {name: dist for name, dist in self._inner.infer_relative_search_space(study, trial).items()
                       if name in search_space and not dist.single()}
        params = dict(self._inner.sample_relative(study, trial, inner_space)) if inner_space else {}
        for name, distribution in search_space.items():
            if name not in params:
                params[name] = self._inner.sample_independent(study, trial, name, distribution)
        return params

    def _configurations(self, study: Study, exclude: int) -> set[tuple]:
        """Every configuration the study holds: asked trials' params and enqueued trials' fixed params.

        A finished trial's params never change, so its key is computed once (a pass over 5,000 trials
        building every key was a seventh of an ask, bench/scale.py)."""
        taken = set()
        for t in study.get_trials(deepcopy=False):
            if t.number == exclude:
                continue
            key = self._finished_keys.get(t.number)
            if key is None:
                # WAITING: enqueued (its fixed params) or parked by the scheduler (asked: its params)
                params = t.params or (t.system_attrs.get("fixed_params", {}) if t.state == TrialState.WAITING else {})
                if not params:
                    continue
                key = params_key(params)
                if t.state.is_finished():
                    self._finished_keys[t.number] = key
            taken.add(key)
        return taken

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        # Only for parameters outside the spec's space (never asked by Strata).
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


