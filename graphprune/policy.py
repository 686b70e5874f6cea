"""Step policies: what the step-aware runtime asks for the kind of each UNet call (entry point: :func:`build_policy`).

A policy is one small object with one question to answer: given the call's index in its generation (and, for
rules that measure something at run time, the measured signal), which kind of step is it (``"full"``,
``"shallow"``, ``"reuse"``; AT-EDM's phases ``"early"``/``"late"``)? Each answer is a :class:`StepRecord`
(kind, signal, threshold, accumulated error), which ``graphprune.inspect`` prints per step.

* :class:`FixedPolicy` (``policy="fixed"``, the default): a fixed :class:`~graphprune.schedule.Schedule` (uniform
  interval, DeepCache's non-uniform schedule, DaTo's presets, an explicit list) or AT-EDM's DSAP phases.
* :class:`FirstBlockPolicy` (``policy="first-block"``): the First Block Cache rule on a UNet. A probe graph runs
  the part of the UNet every step needs (time embedding, ``conv_in``, the first down stage); its output's relative
  L1 change against the last full step's is read on the host (one scalar per call) and accumulated; the full
  remainder runs when the accumulated change reaches ``threshold`` or after ``max_skips`` cached steps.
* :class:`MagCachePolicy` (``policy="magcache"``): the MagCache rule. The per-step magnitude ratio of the cached
  feature, measured once by a calibration run (:mod:`graphprune.calibration`), predicts the error of skipping:
  accumulated ratio, accumulated error, skip while the error stays within ``error_budget`` and at most
  ``max_skips`` steps in a row. The whole schedule follows from the calibration: no host read at run time.

Pure Python: no tensor is touched here (the probe's scalar arrives as a float).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from .calibration import Calibration, load_calibration
from .schedule import PhaseSchedule, Schedule, build_schedule

log = logging.getLogger(__name__)

POLICIES = ("fixed", "first-block", "magcache")
FORECASTS = ("none", "taylor")
CFG_MODES = ("batch", "split")

#: Defaults of the adaptive rules (diffusers' MagCacheConfig: threshold 0.06, max_skip_steps 3, retention 0.2;
#: the first-block threshold of the issue's example; FBCache has no skip limit and no warm-up).
FIRST_BLOCK_THRESHOLD = 0.08
MAGCACHE_BUDGET = 0.06
MAGCACHE_MAX_SKIPS = 3
MAGCACHE_RETENTION = 0.2


@dataclass(frozen=True)
class StepRecord:
    """What a policy decided for one call: the kind, and (adaptive rules) the numbers it decided from.

    signal: first-block: the relative L1 change of the probe's output against the last full step's; magcache: the
    calibrated magnitude ratio of this step. accumulated: the quantity compared with ``threshold`` (first-block: the
    accumulated change; magcache: the accumulated error estimate). skips: cached steps in a row after this one.
    """

    step: int
    kind: str
    signal: float | None = None
    accumulated: float | None = None
    threshold: float | None = None
    skips: int = 0
    context: str = ""

    def row(self) -> list[str]:
        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"

        return [str(self.step), self.context or "-", self.kind, num(self.signal), num(self.accumulated),
                num(self.threshold), str(self.skips)]


RECORD_HEADER = ["step", "context", "kind", "signal", "accumulated", "threshold", "skips"]


def format_records(records: Sequence[StepRecord]) -> str:
    """A plain-text table of step records (what ``graphprune.inspect`` prints per step)."""
    rows = [RECORD_HEADER] + [r.row() for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(RECORD_HEADER))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


class StepPolicy:
    """Base of the policies. ``decide`` is the one question; ``reset`` starts a generation.

    available: the kinds the runtime can run now (``"shallow"`` needs a cached feature, ``"reuse"`` a previous
    output); None for runtimes without feature caching (phases). signal: the probe's scalar (``uses_probe``).
    """

    name = ""
    #: whether the runtime runs a probe graph before deciding and passes its scalar (one host read per call)
    uses_probe = False
    #: calls per generation a list-like policy covers (None: any number)
    length: int | None = None
    first_kind = "full"

    def reset(self) -> None:
        """Forget the accumulators (a new generation starts)."""

    def decide(self, step: int, available: frozenset[str] | None, signal: float | None = None,
               context: str = "") -> StepRecord:
        raise NotImplementedError

    def kinds_for(self, num_steps: int) -> tuple[str, ...] | None:
        """The kinds of a ``num_steps``-call generation when they do not depend on run-time data, else None."""
        return None

    def describe(self) -> str:
        return self.name


class FixedPolicy(StepPolicy):
    """A fixed schedule (or AT-EDM's phases): the kind of call ``step`` is ``schedule.kind(step)``; step 0 of a
    caching generation is full, and a kind whose state is missing (no cache, no previous output) becomes full."""

    name = "fixed"

    def __init__(self, schedule: Schedule | PhaseSchedule):
        self.schedule = schedule
        self.length = schedule.length
        self.first_kind = getattr(schedule, "first_kind", "full")

    def decide(self, step: int, available: frozenset[str] | None, signal: float | None = None,
               context: str = "") -> StepRecord:
        if available is None:  # phases: no cut, every kind runs
            return StepRecord(step, self.schedule.kind(step), context=context)
        kind = "full" if step == 0 else self.schedule.kind(step)
        return StepRecord(step, kind if kind in available else "full", context=context)

    def kinds_for(self, num_steps: int) -> tuple[str, ...]:
        return self.schedule.kinds_for(num_steps)

    def describe(self) -> str:
        return self.schedule.describe()


class FirstBlockPolicy(StepPolicy):
    """First Block Cache on a UNet (see the module docstring). ``signal`` is the probe's relative L1 change
    ``mean|p - p_full| / mean|p_full|`` over the whole batch, ``p_full`` the probe output of the last full step.

    accumulate=True (the default): the changes of the cached steps are summed and the full remainder runs when the
    sum reaches ``threshold`` (an estimate of the error the cached steps accumulate, as MagCache's); False: each
    step's change alone is compared (diffusers' ``FirstBlockCacheConfig`` and ParaAttention's rule). A step is
    cached only while the compared value is *below* ``threshold``, so ``threshold=0`` runs every step in full.
    ``max_skips``: at most this many cached steps in a row (None: no limit, as FBCache). ``warmup``: the first calls
    of a generation that always run in full.
    """

    name = "first-block"
    uses_probe = True

    def __init__(self, threshold: float, max_skips: int | None = None, warmup: int = 0, accumulate: bool = True):
        self.threshold = threshold
        self.max_skips = max_skips
        self.warmup = warmup
        self.accumulate = accumulate
        self.reset()

    def reset(self) -> None:
        self.accumulated = 0.0
        self.skips = 0

    def decide(self, step: int, available: frozenset[str] | None, signal: float | None = None,
               context: str = "") -> StepRecord:
        can_skip = step >= self.warmup and signal is not None and available is not None and "shallow" in available
        compared = (self.accumulated + signal if self.accumulate else signal) if signal is not None else None
        if can_skip and compared < self.threshold and (self.max_skips is None or self.skips < self.max_skips):
            self.accumulated, self.skips = compared, self.skips + 1
            kind = "shallow"
        else:
            self.accumulated, self.skips = 0.0, 0
            kind = "full"
        return StepRecord(step, kind, signal=signal, accumulated=compared, threshold=self.threshold,
                          skips=self.skips, context=context)

    def describe(self) -> str:
        limit = "no limit" if self.max_skips is None else f"at most {self.max_skips} in a row"
        rule = "accumulated" if self.accumulate else "per-step"
        return (f"first-block: full when the {rule} relative L1 change of the probe reaches {self.threshold:g}; "
                f"cached steps {limit}; first {self.warmup} call(s) full")


def magcache_schedule(ratios: Sequence[float], error_budget: float, max_skips: int, warmup: int,
                      context: str = "") -> list[StepRecord]:
    """MagCache's rule over a whole generation (one record per call; ``ratios[i]``: the calibrated magnitude ratio
    of call i's cached feature to call i-1's, ``ratios[0] = 1``).

    From call ``warmup`` on: accumulated ratio *= ratios[i]; skipped steps += 1; accumulated error +=
    |1 - accumulated ratio|; the call is cached (``"shallow"``) if the error is <= ``error_budget`` and the skipped
    steps <= ``max_skips``, else it runs in full and the three accumulators restart at (1, 0, 0). Call 0 is always
    full (nothing is cached yet). As MagCache's official code and diffusers' ``MagCacheConfig``.
    """
    records = []
    ratio_acc, err_acc, steps_acc = 1.0, 0.0, 0
    for i, ratio in enumerate(ratios):
        if i == 0 or i < warmup:
            records.append(StepRecord(i, "full", signal=float(ratio), threshold=error_budget, context=context))
            continue
        ratio_acc *= float(ratio)
        steps_acc += 1
        err_acc += abs(1.0 - ratio_acc)
        compared = err_acc
        if err_acc <= error_budget and steps_acc <= max_skips:
            kind = "shallow"
        else:
            kind = "full"
            ratio_acc, err_acc, steps_acc = 1.0, 0.0, 0
        records.append(StepRecord(i, kind, signal=float(ratio), accumulated=compared, threshold=error_budget,
                                  skips=steps_acc, context=context))
    return records


class MagCachePolicy(StepPolicy):
    """MagCache (see :func:`magcache_schedule`): a schedule computed once from calibrated ratios, so deciding reads
    nothing at run time. Calls past the calibrated length run in full (and the runtime warns at the end of the
    generation)."""

    name = "magcache"

    def __init__(self, ratios: Sequence[float], error_budget: float, max_skips: int, warmup: int, context: str = ""):
        self.ratios = tuple(float(r) for r in ratios)
        self.error_budget, self.max_skips, self.warmup = error_budget, max_skips, warmup
        self.records = magcache_schedule(self.ratios, error_budget, max_skips, warmup, context)
        self.length = len(self.records)

    def decide(self, step: int, available: frozenset[str] | None, signal: float | None = None,
               context: str = "") -> StepRecord:
        if step >= len(self.records):
            return StepRecord(step, "full", threshold=self.error_budget, context=context)
        record = self.records[step]
        if available is not None and record.kind not in available:
            return StepRecord(step, "full", signal=record.signal, threshold=self.error_budget, context=context)
        return StepRecord(record.step, record.kind, record.signal, record.accumulated, record.threshold,
                          record.skips, context)

    def kinds_for(self, num_steps: int) -> tuple[str, ...]:
        kinds = [r.kind for r in self.records[:num_steps]]
        return tuple(kinds + ["full"] * (num_steps - len(kinds)))

    def describe(self) -> str:
        kinds = [r.kind for r in self.records]
        return (f"magcache: {len(kinds)} calls ({kinds.count('full')} full, {kinds.count('shallow')} shallow) "
                f"within error budget {self.error_budget:g}, at most {self.max_skips} cached in a row, first "
                f"{self.warmup} call(s) full")


# ------------------------------------------------------------------------------------------------ options
def _warmup(ratio: float, num_steps: int | None) -> int:
    """MagCache's retention: the first ``int(ratio * num_steps + 0.5)`` calls run in full."""
    return int(ratio * num_steps + 0.5) if ratio and num_steps else 0


def check_policy_options(config: Any) -> Calibration | None:
    """Validate the policy options of a caching config together; returns the loaded calibration (magcache) or None.

    Raises ``ValueError`` naming the fix: an option that the chosen policy does not read, a missing calibration,
    out-of-range values.
    """
    policy, forecast = config.policy, config.forecast
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if forecast not in FORECASTS:
        raise ValueError(f"forecast must be one of {FORECASTS}, got {forecast!r}")
    if config.cfg not in CFG_MODES:
        raise ValueError(f"cfg must be one of {CFG_MODES} ('batch': one decision for a [uncond; cond] batch, "
                         f"'split': two cache contexts for pipelines that call the UNet per half), got {config.cfg!r}")
    reads = {"fixed": set(), "first-block": {"threshold", "max_skips", "retention_ratio", "accumulate"},
             "magcache": {"calibration", "error_budget", "max_skips", "retention_ratio"}}[policy]
    given = {name for name in ("threshold", "max_skips", "calibration", "error_budget", "retention_ratio",
                               "accumulate") if getattr(config, name) is not None}
    unused = sorted(given - reads)
    if unused:
        users = {"threshold": "'first-block'", "accumulate": "'first-block'", "calibration": "'magcache'",
                 "error_budget": "'magcache'", "max_skips": "'first-block' or 'magcache'",
                 "retention_ratio": "'first-block' or 'magcache'"}
        raise ValueError(f"option(s) {unused} do nothing with policy={policy!r}: "
                         + "; ".join(f"{u} is read by policy={users[u]}" for u in unused))
    if policy != "fixed" and (config.schedule is not None or config.cache_interval is not None):
        raise ValueError(f"policy={policy!r} decides each step itself: drop schedule/cache_interval (they belong to "
                         "policy='fixed')")
    if config.order is not None and forecast != "taylor":
        raise ValueError("order is the Taylor forecast's order: pass forecast='taylor' with it")
    if config.order is not None and (isinstance(config.order, bool) or config.order not in (0, 1, 2)):
        raise ValueError(f"order must be 0, 1 or 2 (0 = reuse the cached feature, 1 = linear, 2 = quadratic "
                         f"forecast), got {config.order!r}")
    for name in ("threshold", "error_budget"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if config.max_skips is not None and (isinstance(config.max_skips, bool) or not isinstance(config.max_skips, int)
                                         or config.max_skips < 1):
        raise ValueError(f"max_skips must be an integer >= 1 (cached steps in a row), got {config.max_skips!r}")
    ratio = config.retention_ratio
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
        raise ValueError(f"retention_ratio must be in [0, 1) (the fraction of first calls that run in full), "
                         f"got {ratio!r}")
    if policy == "first-block" and ratio and config.num_steps is None:
        raise ValueError("retention_ratio with policy='first-block' needs num_steps (UNet calls per generation)")
    if policy == "magcache":
        if config.calibration is None:
            raise ValueError("policy='magcache' needs calibration: a file written by `graphprune calibrate --arch sd15 "
                             "--latent 64 --steps 50 -o calib.json` (or --model PATH), or its dict "
                             "(graphprune.calibrate(...).to_dict())")
        calibration = load_calibration(config.calibration)
        if config.cfg != calibration.cfg:
            raise ValueError(f"the calibration was made with cfg={calibration.cfg!r} but this config has "
                             f"cfg={config.cfg!r}: pass cfg={calibration.cfg!r} or calibrate again with "
                             f"`graphprune calibrate ... --cfg {config.cfg}`")
        if config.cache_branch != calibration.cache_branch:
            raise ValueError(f"the calibration measured the feature at cache_branch={calibration.cache_branch} but "
                             f"this config cuts at cache_branch={config.cache_branch}: pass "
                             f"cache_branch={calibration.cache_branch} or calibrate again with "
                             f"`graphprune calibrate ... --cache-branch {config.cache_branch}`")
        return calibration
    return None


def build_policy(config: Any, context: str = "", calibration: Calibration | None = None) -> StepPolicy:
    """The policy a caching config asks for, for one cache context (``context``: ``""`` with ``cfg="batch"``,
    the context's name with ``cfg="split"``; magcache reads that context's ratios)."""
    if config.policy == "fixed":
        return FixedPolicy(build_schedule(config))
    if config.policy == "first-block":
        threshold = FIRST_BLOCK_THRESHOLD if config.threshold is None else float(config.threshold)
        return FirstBlockPolicy(threshold, config.max_skips, _warmup(config.retention_ratio or 0.0, config.num_steps),
                                accumulate=True if config.accumulate is None else bool(config.accumulate))
    calibration = calibration or load_calibration(config.calibration)
    ratios = calibration.ratios_for(context or "batch", config.num_steps)
    retention = MAGCACHE_RETENTION if config.retention_ratio is None else config.retention_ratio
    return MagCachePolicy(ratios, MAGCACHE_BUDGET if config.error_budget is None else float(config.error_budget),
                          MAGCACHE_MAX_SKIPS if config.max_skips is None else config.max_skips,
                          _warmup(retention, len(ratios)), context)


__all__ = ["POLICIES", "FORECASTS", "CFG_MODES", "StepRecord", "StepPolicy", "FixedPolicy", "FirstBlockPolicy",
           "MagCachePolicy", "magcache_schedule", "check_policy_options", "build_policy", "format_records",
           "RECORD_HEADER"]
