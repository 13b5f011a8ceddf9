"""The scheduler: which trials to run next, reuse-aware, for any executor (local processes or pods).

Everything it decides is derived from the Optuna study, the layer registry and the set of trials
whose worker is alive, so a restarted runner or operator rebuilds its state by asking again.

Reuse-aware policy (the paper's future work, made concrete):
- A trial wants a donor for the prefix it shares with its family's next smaller network (the
  paper's CNN: n conv layers want the (n-1)-layer prefix; ResNet-32 wants the stem and first three
  blocks ResNet-20 has; strata.families). If the registry has one, it runs now. If a running trial
  (or a pending shallower one) will publish that prefix, it waits.
- If nobody will, and the budget allows, the scheduler enqueues the donor configuration (the same
  parameters with the next smaller depth) and defers the trial until the donor has published: the
  donor is trained in full (the paper: donors must be trained well) and is a useful trial in itself.
  A donor that has no donor either gets one the same way: a 3-layer proposal starts a 1-2-3 chain.
  A custom family has no torch-free structure, so its trials are not ordered this way.
- Grid search runs smaller depths first, so every deeper configuration finds its donor.
- Retries: a trial whose worker died (crash, OOM, eviction, lost pod) is failed in Optuna and
  re-run as a new trial with the same parameters, up to `retries` times; a failure the trainer
  reported itself (deterministic, e.g. divergence) or a timeout is not retried.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from strata.families import Architecture, ConfigurationError, PrefixSignature, family_for
from strata.registry import LayerRegistry
from strata.sampling import params_key as _params_key
from strata.objectstore import ObjectStoreError
from strata.spec import StudySpec
from strata.study import (
    ATTR_ATTEMPT, ATTR_DONOR_FOR, ATTR_FAIL_REASON, ATTR_REGISTRY_LOAD_FAILURES, ATTR_REGISTRY_PUBLISH_FAILURES,
    ATTR_MODEL, ATTR_REUSED_LAYERS, ATTR_RETRY_OF, ATTR_SECONDS_SAVED, ATTR_TEST_ACCURACY,
    ParkingStudy, distributions, parked, read_trial, restart_clock, under_way,
)

log = logging.getLogger(__name__)
ATTR_FAIL_KIND = "strata.failure_kind"  # trainer | infrastructure | timeout | interrupted
ATTR_STARTED = "strata.started"
ATTR_DUPLICATE_OF = "strata.duplicate_of"
RETRYABLE = {"infrastructure"}


@dataclass(frozen=True)
class Best:
    number: int
    value: float
    params: dict[str, Any]
    test_accuracy: float | None = None  # its best-epoch weights on the test split (chosen by validation only)
    model: str | None = None  # e.g. resnet-20


@dataclass
class Progress:
    """A bounded summary of the study: what status, the CLI and the metrics show."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0  # failed attempts, retried or not
    retried: int = 0  # attempts that re-ran a failed trial's configuration
    running: int = 0  # trials with a live worker
    waiting: int = 0  # asked trials waiting for a donor or a free slot
    configs: int = 0  # trials that count towards max (retries do not)
    finished: int = 0  # configs that are complete, pruned, or failed for good
    best: Best | None = None
    reused_trials: int = 0
    reused_layers: int = 0
    seconds_saved: float = 0.0
    registry_load_failures: int = 0  # donors refused or unreadable, or the registry unreachable, in trials
    registry_publish_failures: int = 0  # prefixes trials could not publish (later trials cannot reuse them)

    @property
    def reuse_rate(self) -> float:
        done = self.complete + self.pruned
        return self.reused_trials / done if done else 0.0


@dataclass(frozen=True)
class Outcome:
    finished: bool
    phase: str  # Pending | Running | Suspended | Succeeded | Failed
    reason: str
    message: str
    stop_active: bool = False  # the executor should stop running workers now


@dataclass
class Plan:
    launch: list[int] = field(default_factory=list)
    waiting: dict[int, str] = field(default_factory=dict)  # trial number -> why it is not launched


def root_of(trial: FrozenTrial) -> int:
    return int(trial.user_attrs.get(ATTR_RETRY_OF, trial.number))


class TrialScheduler:
    def __init__(self, study: optuna.Study, spec: StudySpec, registry: LayerRegistry | None):
        self.study = ParkingStudy.of(study)  # its asks leave the trials it parks alone
        self.spec = spec
        self.registry = registry
        self._distributions = distributions(spec)
        self._known_donors: set[str] = set()  # signature keys seen in the registry (entries never vanish)
        self.registry_error: str | None = None  # the last registry failure while planning (None: reachable)
        self._architectures: dict[str, Architecture | None] = {}  # by configuration

    def update_spec(self, spec: StudySpec) -> None:
        self.spec = spec
        self._distributions = distributions(spec)
        self._architectures.clear()

    # --- reading the study -------------------------------------------------------------------

    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def started_at(self) -> float:
        started = self.study.user_attrs.get(ATTR_STARTED)
        if started is None:
            started = time.time()
            self.study.set_user_attr(ATTR_STARTED, started)
        return float(started)

    def progress(self, active: Iterable[int] = (), trials: list[FrozenTrial] | None = None) -> Progress:
        active = set(active)
        trials = self.trials() if trials is None else trials
        p = Progress()
        retried_roots = self._attempts(trials)
        for t in trials:
            if _counts_towards_max(t):
                p.configs += 1
            if ATTR_RETRY_OF in t.user_attrs:
                p.retried += 1
            if t.state == TrialState.COMPLETE:
                p.complete += 1
            elif t.state == TrialState.PRUNED:
                p.pruned += 1
            elif t.state == TrialState.FAIL and t.user_attrs.get(ATTR_FAIL_KIND) != "interrupted":
                p.failed += 1
            elif t.state == TrialState.RUNNING and t.number in active:
                p.running += 1
            elif _pending(t, active):
                p.waiting += 1
            p.registry_load_failures += int(t.user_attrs.get(ATTR_REGISTRY_LOAD_FAILURES) or 0)
            p.registry_publish_failures += int(t.user_attrs.get(ATTR_REGISTRY_PUBLISH_FAILURES) or 0)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                p.finished += 1
                reused = int(t.user_attrs.get(ATTR_REUSED_LAYERS) or 0)
                if reused:
                    p.reused_trials += 1
                    p.reused_layers += reused
                    p.seconds_saved += float(t.user_attrs.get(ATTR_SECONDS_SAVED) or 0.0)
            elif t.state == TrialState.FAIL and self._failed_for_good(t, trials, retried_roots):
                p.finished += 1
        completed = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        if completed:
            pick = min if self.spec.objective.resolved_direction == "minimize" else max
            best = pick(completed, key=lambda t: t.value)
            test = best.user_attrs.get(ATTR_TEST_ACCURACY)
            p.best = Best(best.number, float(best.value), dict(best.params),
                          float(test) if test is not None else None, best.user_attrs.get(ATTR_MODEL))
        return p

    @staticmethod
    def _attempts(trials: list[FrozenTrial]) -> dict[int, int]:
        attempts: dict[int, int] = {}
        for t in trials:
            attempts[root_of(t)] = attempts.get(root_of(t), 0) + 1
        return attempts

    def _latest_attempt(self, t: FrozenTrial, trials: list[FrozenTrial]) -> bool:
        root = root_of(t)
        return t.number == max(u.number for u in trials if root_of(u) == root)

    def _failed_for_good(self, t: FrozenTrial, trials: list[FrozenTrial], attempts: dict[int, int]) -> bool:
        return self._latest_attempt(t, trials) and not self._should_retry(t, attempts)

    def _should_retry(self, t: FrozenTrial, attempts: dict[int, int]) -> bool:
        kind = t.user_attrs.get(ATTR_FAIL_KIND, "trainer" if ATTR_FAIL_REASON in t.user_attrs else "infrastructure")
        return kind in RETRYABLE and attempts.get(root_of(t), 1) <= self.spec.trials.retries

    # --- deciding ------------------------------------------------------------------------------

    def outcome(self, active: Iterable[int] = (), trials: list[FrozenTrial] | None = None) -> Outcome:
        active = set(active)
        p = self.progress(active, trials)
        limit = self.spec.trials.max_failed
        if p.failed > limit:
            return Outcome(True, "Failed", "FailureBudgetExceeded",
                           f"{p.failed} trial attempts failed, more than maxFailed={limit}", stop_active=True)
        timeout = self.spec.trials.study_timeout_seconds
        if timeout and time.time() - self.started_at() > timeout:
            return Outcome(not active, "Succeeded" if p.complete else "Failed", "StudyTimeout",
                           f"study timeout of {timeout}s passed with {p.complete} complete trials", stop_active=True)
        if p.best is not None and self.spec.objective.reached(p.best.value):
            # Running trials can no longer change the result: stop them (their pods are deleted).
            return Outcome(not active, "Succeeded", "GoalReached",
                           f"trial {p.best.number} reached {p.best.value:.4g} (goal {self.spec.objective.goal})",
                           stop_active=True)
        target = self._target()
        if p.finished >= target and not active and p.waiting == 0:
            return Outcome(True, "Succeeded" if p.complete else "Failed", "MaxTrialsReached",
                           f"{p.finished} of {target} trials finished" + ("" if p.complete else ", none completed"))
        if self.spec.suspend:
            return Outcome(False, "Suspended", "Suspended", "spec.suspend is true: no new trials are started")
        waiting = f", {p.waiting} waiting for a donor or a slot" if p.waiting else ""
        best = f"; best {p.best.value:.4g} (trial {p.best.number})" if p.best is not None else ""
        return Outcome(False, "Running" if p.configs or active else "Pending", "TrialsRunning",
                       f"{p.finished} of {target} trials finished, {len(active)} running{waiting}{best}")

    def _target(self) -> int:
        if self.spec.sampler.name == "grid":
            return min(self.spec.trials.max, self.spec.grid_size())
        return self.spec.trials.max

    def plan(self, active: Iterable[int], free_slots: int) -> Plan:
        """Trials (already RUNNING in Optuna) to start now, asking new ones as needed."""
        active = set(active)
        plan = Plan()
        trials = self.trials()  # read once; what this plan asks is merged in (_with), not read again
        outcome = self.outcome(active, trials)
        if outcome.finished or outcome.stop_active or self.spec.suspend or outcome.reason == "GoalReached":
            return plan
        if self._retry_failed(trials):
            trials = self.trials()
        pending = sorted((t for t in trials if _pending(t, active)), key=lambda t: t.number)
        for t in pending:
            if self._tell_if_duplicate(t, trials):
                continue
            if len(plan.launch) >= free_slots:
                plan.waiting[t.number] = "no free slot"
                continue
            reason = self._wait_reason(t, trials, active | set(plan.launch))
            if reason:
                plan.waiting[t.number] = reason
            else:
                plan.launch.append(t.number)
        budget = self._target() - sum(1 for t in trials if _counts_towards_max(t))
        asks = 0
        while len(plan.launch) < free_slots and budget > 0 and asks < 4 * free_slots + 8:
            asks += 1
            trial = self._ask_next(trials)
            if trial is None:
                break
            budget -= 1
            trials = _with(trials, trial)
            if self._tell_if_duplicate(trial, trials):
                continue
            # A donor may need a donor itself: enqueue the chain down to a prefix that exists.
            while budget > 0 and self._needs_donor(trial, trials, active | set(plan.launch)):
                donor = self._enqueue_donor(trial)
                if donor is None:
                    break
                plan.waiting[trial.number] = f"waits for donor trial {donor}"
                budget -= 1
                trial = read_trial(self.study, donor)
                trials = _with(trials, trial)
            self._consider(trial, trials, active, plan, free_slots)
        if not active and not plan.launch and plan.waiting and free_slots > 0:
            # Nothing runs and everything waits: never stall, start the oldest trial without a donor.
            plan.launch.append(min(plan.waiting))
            del plan.waiting[plan.launch[0]]
        self._park_and_start(trials, {t.number for t in pending}, plan)
        return plan

    def _park_and_start(self, trials: list[FrozenTrial], pending: set[int], plan: Plan) -> None:
        """Optuna's duration of a trial must be its run time, not its wait for a donor or a slot.

        Optuna counts a trial's duration from its datetime_start, which it sets when the trial goes
        RUNNING (asked, or popped from WAITING). So a trial that waits is parked: set back to WAITING
        (Optuna's own state for a trial not started; the dashboard shows it so), with its params and
        its ask time kept; when it starts it is set RUNNING again, which restarts Optuna's clock, and
        the wait is kept as `queued_seconds` (study.restart_clock; the report draws it apart). A
        pending trial still RUNNING (its pass ended before it parked it) is restarted the same way.
        Asked and started in one pass (not pending when it began): nothing waited, no attr."""
        storage = self.study._storage
        by_number = {t.number: t for t in trials}
        for number in plan.launch:
            t = by_number.get(number)
            if number in pending and t is not None:
                restart_clock(storage, t)
        for number in plan.waiting:
            t = by_number.get(number)
            if t is not None and t.state == TrialState.RUNNING:
                storage.set_trial_state_values(t._trial_id, TrialState.WAITING)

    def _unpark(self, t: FrozenTrial) -> None:
        """A parked trial RUNNING again (its clock starts now), to start it or to tell it."""
        if parked(t):
            self.study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)

    def _consider(self, t: FrozenTrial, trials, active, plan: Plan, free_slots: int) -> None:
        reason = self._wait_reason(t, trials, active | set(plan.launch))
        if reason:
            plan.waiting[t.number] = reason
        elif len(plan.launch) < free_slots:
            plan.launch.append(t.number)
        else:
            plan.waiting[t.number] = "no free slot"

    def _ask_next(self, trials: list[FrozenTrial]) -> FrozenTrial | None:
        if self.spec.sampler.name == "grid":
            point = self._next_grid_point(trials)
            if point is None:
                return None
            self.study.enqueue_trial(point)
        trial = self.study.ask(self._distributions)
        return read_trial(self.study, trial.number)

    def _next_grid_point(self, trials: list[FrozenTrial]) -> dict[str, Any] | None:
        """Smaller depths first, so deeper configurations find donors; shuffled within a depth."""
        import random

        taken = {_params_key(t.params) for t in trials if ATTR_RETRY_OF not in t.user_attrs}
        grid = self.spec.grid()
        random.Random(self.spec.sampler.seed or 0).shuffle(grid)
        grid.sort(key=self._depth)
        for point in grid:
            if _params_key(point) not in taken:
                return point
        return None

    def _tell_if_duplicate(self, trial: FrozenTrial, trials: list[FrozenTrial]) -> bool:
        """A sampler proposing a finished configuration again gets its result, without training."""
        key = _params_key(trial.params)
        for t in trials:
            if t.number != trial.number and t.state in (TrialState.COMPLETE, TrialState.PRUNED) \
                    and _params_key(t.params) == key and ATTR_DUPLICATE_OF not in t.user_attrs:
                self._unpark(trial)
                storage = self.study._storage
                storage.set_trial_user_attr(trial._trial_id, ATTR_DUPLICATE_OF, t.number)
                for name in ("val_loss", "val_accuracy"):
                    if name in t.user_attrs:
                        storage.set_trial_user_attr(trial._trial_id, name, t.user_attrs[name])
                if t.state == TrialState.COMPLETE:
                    self.study.tell(trial.number, t.value)
                else:
                    self.study.tell(trial.number, state=TrialState.PRUNED)
                log.info("trial %d repeats trial %d: result copied, nothing trained", trial.number, t.number)
                return True
        return False

    def _retry_failed(self, trials: list[FrozenTrial]) -> bool:
        """Re-ask failed attempts that may be retried; True when it asked any."""
        attempts = self._attempts(trials)
        retried = False
        for t in trials:
            if t.state == TrialState.FAIL and self._latest_attempt(t, trials) and self._should_retry(t, attempts):
                root = root_of(t)
                attempt = attempts.get(root, 1) + 1
                log.info("retrying trial %d (attempt %d of %d)", root, attempt, self.spec.trials.retries + 1)
                self.study.enqueue_trial(dict(t.params), user_attrs={ATTR_RETRY_OF: root, ATTR_ATTEMPT: attempt})
                self.study.ask(self._distributions)
                attempts[root] = attempt
                retried = True
        return retried

    def _reuse_aware(self) -> bool:
        return self.spec.reuse.enabled and self.spec.reuse.reuse_aware_scheduling and self.registry is not None

    def _has_donor(self, signature) -> bool:
        if signature.key in self._known_donors:
            return True
        try:
            found = self.registry.has_donor(signature, self.spec.reuse.min_donor_epochs)
        except ObjectStoreError as error:
            if self.registry_error is None:
                log.warning("layer registry unreachable (%s): scheduling without reuse", error)
            self.registry_error = str(error)
            return True  # do not hold trials back for a store nobody can reach
        self.registry_error = None
        if found:
            self._known_donors.add(signature.key)
        return found

    def _architecture(self, params: dict[str, Any]) -> Architecture | None:
        """The trial's architecture (memoised per configuration), None when it cannot be built."""
        key = _params_key(params)
        if key not in self._architectures:
            try:
                self._architectures[key] = family_for(self.spec).architecture(self.spec, params)
            except ConfigurationError:
                self._architectures[key] = None  # its trial fails with the reason; nothing to wait for
        return self._architectures[key]

    def _depth(self, params: dict[str, Any]) -> int:
        arch = self._architecture(params)
        return arch.depth if arch is not None else 0

    def _wanted_prefix(self, params: dict[str, Any]) -> tuple[int, PrefixSignature] | None:
        """The prefix a trial would take from its family's next smaller network: (units, signature)."""
        arch = self._architecture(params)
        smaller = family_for(self.spec).smaller(self.spec, params) if arch is not None else None
        donor = self._architecture(smaller) if smaller is not None else None
        if donor is None:
            return None
        k = arch.common_prefix(donor)
        return (k, arch.prefix_signature(k)) if 1 <= k < arch.depth else None

    def _wait_reason(self, t: FrozenTrial, trials: list[FrozenTrial], active: set[int]) -> str | None:
        """Why t should not start yet: the same configuration is under way (it gets that result), or
        a trial that will publish the prefix t takes from its next smaller network is."""
        if ATTR_RETRY_OF not in t.user_attrs:
            key = _params_key(t.params)
            for u in trials:
                if u.number < t.number and under_way(u) and _params_key(u.params) == key:
                    return f"repeats trial {u.number}, which is under way"
        if not self._reuse_aware():
            return None
        wanted = self._wanted_prefix(t.params)
        if wanted is None:
            return None
        k, signature = wanted
        if self._has_donor(signature):
            return None
        n = self._depth(t.params)
        for u in trials:
            if u.number == t.number or not under_way(u):
                continue
            m = self._depth(u.params)
            # running producers of any depth >= k, or pending shallower ones (no cycles)
            if (u.number in active and m >= k) or (u.number not in active and k <= m < n):
                if self._architecture(u.params).prefix_signature(k) == signature:
                    return f"waits for trial {u.number} to publish its {k}-unit prefix"
        return None

    def _needs_donor(self, t: FrozenTrial, trials: list[FrozenTrial], active: set[int]) -> bool:
        if not self._reuse_aware() or self.spec.sampler.name == "grid":
            return False
        wanted = self._wanted_prefix(t.params)
        if wanted is None:
            return False
        if self._wait_reason(t, trials, active):
            return False  # a producer is already under way
        return not self._has_donor(wanted[1])

    def _enqueue_donor(self, t: FrozenTrial) -> int | None:
        """Ask the donor configuration (the family's next smaller network, all else equal) if the space has it."""
        family = family_for(self.spec)
        params = family.smaller(self.spec, t.params)
        if params is None or params.get(family.depth_parameter) not in family.depth_values(self.spec):
            return None
        self.study.enqueue_trial(params, user_attrs={ATTR_DONOR_FOR: t.number})
        donor = self.study.ask(self._distributions)
        log.info("trial %d (%d units) deferred: donor trial %d (%d units) trains its prefix first",
                 t.number, self._depth(t.params), donor.number, self._depth(params))
        return donor.number

    # --- recording worker outcomes -------------------------------------------------------------

    def fail_attempt(self, number: int, reason: str, kind: str = "infrastructure") -> None:
        """A worker ended without telling Optuna (crash, OOM, lost pod, timeout): record it as FAIL.

        The retry itself is derived on the next plan(), so a restart between the two loses nothing.
        """
        trial = read_trial(self.study, number)
        if trial.state != TrialState.RUNNING and not parked(trial):
            return
        self._unpark(trial)
        storage = self.study._storage
        storage.set_trial_user_attr(trial._trial_id, ATTR_FAIL_KIND, kind)
        storage.set_trial_user_attr(trial._trial_id, ATTR_FAIL_REASON, reason[:500])
        self.study.tell(number, state=TrialState.FAIL)

    def stop_waiting(self, active: Iterable[int], reason: str) -> None:
        """The study ended: trials asked but never started are failed so nothing stays RUNNING."""
        active = set(active)
        for t in self.trials():
            if _pending(t, active):
                self.fail_attempt(t.number, reason, kind="interrupted")


def _with(trials: list[FrozenTrial], trial: FrozenTrial) -> list[FrozenTrial]:
    """The study's trials (ordered by number) with one asked or changed trial put in its place."""
    merged = [t for t in trials if t.number != trial.number]
    merged.append(trial)
    if merged[-1].number < (merged[-2].number if len(merged) > 1 else -1):
        merged.sort(key=lambda t: t.number)
    return merged


def _counts_towards_max(t: FrozenTrial) -> bool:
    # Retries re-run a configuration; an enqueued trial (WAITING) counts once it is asked.
    return ATTR_RETRY_OF not in t.user_attrs and (t.state != TrialState.WAITING or parked(t))


def _pending(t: FrozenTrial, active: set[int]) -> bool:
    """Asked, not started: parked (WAITING), or RUNNING without a live worker (asked by a pass
    that ended before it parked or started it, or a worker lost before it claimed it)."""
    return t.number not in active and under_way(t)
