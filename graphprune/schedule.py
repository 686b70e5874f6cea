"""Per-step behaviour of the step-aware methods: which kind of step each UNet call of a generation is.

Step kinds (``STEP_KINDS``):

* ``"full"``: the whole UNet runs and refreshes the cached deep feature;
* ``"shallow"``: only the outer branch runs, on the feature cached at the last full step;
* ``"reuse"``: no graph runs; the previous output is returned.

A schedule is either a rule (a uniform interval: full at steps 0, N, 2N, ...) or an explicit list with one kind per
UNet call. Step 0 of every generation is always full (the runtime enforces it). Built from a config with
:func:`build_schedule`::

    build_schedule(DeepCacheConfig(cache_interval=3)).kinds_for(7)
    # ('full', 'shallow', 'shallow', 'full', 'shallow', 'shallow', 'full')
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

STEP_KINDS = ("full", "shallow", "reuse")
DEFAULT_INTERVAL = 3

# DaTo's two cache strategies as shipped in its repository (research/dato.md section 2), in the code's encoding:
# one entry per UNet call 1..50 of a 50-step PLMS run (51 calls; call 0 is always full); >= 2 full, 1 shallow,
# 0 reuse. S_A: 5 full / 21 shallow / 25 reuse calls (the ~8.4x-fewer-MACs class: the paper's "9x" row, though the
# launch scripts ran it on COCO-30k); S_B: 6 full / 38 shallow / 7 reuse calls (~6.2x: the "7x" class, held fixed
# during the authors' prune-ratio search).
DATO_S_A = (1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 12, 1, 0, 0, 0, 1, 1, 0, 1, 0, 12, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0,
            1, 12, 0, 0, 0, 0, 0, 0, 1, 0, 1, 12, 0, 1, 0, 1)
DATO_S_B = (0, 1, 1, 1, 1, 1, 11, 1, 1, 1, 1, 1, 1, 1, 0, 0, 11, 1, 1, 1, 0, 11, 1, 0, 1, 1, 1, 1, 1, 11, 0, 0, 1, 1,
            1, 1, 1, 1, 1, 1, 11, 1, 1, 1, 1, 1, 1, 1, 1, 1)

#: Named presets: name -> (code strategy, description).
PRESETS: dict[str, tuple[tuple[int, ...], str]] = {
    "dato-imagenet": (DATO_S_A, "DaTo strategy S_A (5 full / 21 shallow / 25 reuse of 51 PLMS calls)"),
    "dato-coco": (DATO_S_B, "DaTo strategy S_B (6 full / 38 shallow / 7 reuse of 51 PLMS calls)"),
}
RULES = ("uniform", "deepcache-nonuniform")


def decode_dato(code: Sequence[int], num_steps: int | None) -> tuple[str, ...]:
    """A DaTo code strategy -> step kinds of a whole generation.

    ``num_steps=51`` (or None): the code's own 51-call PLMS numbering, ``("full",) + decoded``. ``num_steps=50``:
    the same schedule for a sampler that calls the UNet once per step (DDIM, Euler, ...): the entry of PLMS's
    second evaluation of step 0 is dropped.
    """
    kinds = tuple("full" if v >= 2 else "shallow" if v == 1 else "reuse" for v in code)
    if num_steps in (None, len(code) + 1):
        return ("full",) + kinds
    if num_steps == len(code):
        return ("full",) + kinds[1:]
    raise ValueError(f"the DaTo presets are defined for 50 sampling steps: num_steps must be 51 (PLMS/PNDM, which "
                     f"evaluates step 0 twice) or 50 (one UNet call per step), got {num_steps}")


def deepcache_nonuniform(num_steps: int, interval: int, center: int = 15, power: float = 1.4) -> list[int]:
    """DeepCache's non-uniform full steps: ``ceil(num_steps / interval)`` indices, densest around ``center``.

    Points equally spaced in a power-transformed coordinate around ``center`` (DeepCache computes the root of the
    negative endpoint in complex arithmetic and keeps the real part; reproduced here), mapped back and shifted;
    ``power`` is lowered by 0.02 until exactly that many distinct indices come out. Index 0 is always included.
    For 50 steps, interval 5 (center 15, power 1.4, the defaults of DeepCache's pipeline):
    ``[0, 5, 9, 13, 17, 21, 26, 31, 37, 43]``.
    """
    n_full = math.ceil(num_steps / interval)
    p = power
    while p > 1:
        start = complex(-center) ** (1 / p)
        stop = complex(num_steps - center) ** (1 / p)
        xs = np.linspace(start, stop, n_full + 1) ** p
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ints = np.unique(np.real(xs).astype(np.int32))
        indices = [0] + [int(x) + center for x in ints[1:-1]]
        if len(indices) == n_full:
            return sorted(indices)
        p -= 0.02
    raise ValueError(f"no non-uniform schedule with {n_full} full steps of {num_steps} around center={center}: "
                     "lower nonuniform_center or cache_interval")


@dataclass(frozen=True)
class Schedule:
    """Step kinds of one generation: a uniform ``interval`` rule, or a fixed list ``kinds`` (one per UNet call)."""

    name: str
    interval: int | None = None
    kinds: tuple[str, ...] | None = None

    @property
    def length(self) -> int | None:
        """Calls per generation a list schedule covers (None for a rule, which covers any length)."""
        return None if self.kinds is None else len(self.kinds)

    def kind(self, step: int) -> str:
        """The kind of call ``step`` (0-based) of a generation. Raises past the end of a list schedule."""
        if self.kinds is None:
            return "full" if step % self.interval == 0 else "shallow"
        if step >= len(self.kinds):
            raise RuntimeError(f"schedule {self.name!r} covers {len(self.kinds)} UNet calls per generation, but this "
                               f"generation made call {step + 1}; pass a schedule of the right length (num_steps) "
                               "or call graphprune.reset(model) between generations")
        return self.kinds[step]

    def kinds_for(self, num_steps: int) -> tuple[str, ...]:
        """The kinds of a ``num_steps``-call generation (step 0 forced full, as the runtime does)."""
        kinds = tuple(self.kind(i) for i in range(num_steps))
        return ("full",) + kinds[1:] if kinds else kinds

    def counts(self, num_steps: int) -> dict[str, int]:
        """How many calls of each kind a ``num_steps``-call generation makes."""
        kinds = self.kinds_for(num_steps)
        return {k: kinds.count(k) for k in STEP_KINDS}

    def describe(self) -> str:
        if self.kinds is None:
            return f"{self.name}: full every {self.interval} calls, shallow between"
        c = {k: self.kinds.count(k) for k in STEP_KINDS}
        return f"{self.name}: {len(self.kinds)} calls ({c['full']} full, {c['shallow']} shallow, {c['reuse']} reuse)"


def _from_list(kinds: Sequence[object], num_steps: int | None, name: str) -> Schedule:
    bad = [k for k in kinds if k not in STEP_KINDS]
    if bad:
        raise ValueError(f"unknown step kind(s) {bad[:5]!r} in schedule; valid kinds are {STEP_KINDS}")
    if not kinds:
        raise ValueError("an explicit schedule needs at least one step")
    if num_steps is not None and len(kinds) != num_steps:
        raise ValueError(f"schedule has {len(kinds)} steps but num_steps={num_steps}; give one kind per UNet call")
    if kinds[0] != "full":
        raise ValueError(f"the first step of a generation must be 'full' (nothing is cached yet), got {kinds[0]!r}")
    return Schedule(name=name, kinds=tuple(str(k) for k in kinds))


PHASE_KINDS = ("early", "late")


@dataclass(frozen=True)
class PhaseSchedule:
    """A two-phase schedule without feature caching (AT-EDM's DSAP): calls ``0 .. boundary - 1`` of a generation
    are ``"early"``, every later call is ``"late"``. Same interface as :class:`Schedule` (``kinds`` is None: a rule).
    """

    boundary: int
    name: str = "dsap"
    kinds: None = None
    length: None = None
    first_kind: str = "early"

    def kind(self, step: int) -> str:
        """``"early"`` for the first ``boundary`` calls of a generation, ``"late"`` after."""
        return "early" if step < self.boundary else "late"

    def kinds_for(self, num_steps: int) -> tuple[str, ...]:
        return tuple(self.kind(i) for i in range(num_steps))

    def counts(self, num_steps: int) -> dict[str, int]:
        kinds = self.kinds_for(num_steps)
        return {k: kinds.count(k) for k in PHASE_KINDS}

    def describe(self) -> str:
        return f"{self.name}: calls 0..{self.boundary - 1} early (DSAP blocks unpruned), later calls late (all pruned)"


def build_schedule(config: Any) -> Schedule:
    """Validate a caching config's schedule options together and return the :class:`Schedule` they describe."""
    sched, interval, num_steps = config.schedule, config.cache_interval, config.num_steps
    if isinstance(sched, (list, tuple)):
        if interval is not None:
            raise ValueError("give either cache_interval or an explicit schedule list, not both")
        return _from_list(list(sched), num_steps, "explicit")
    if sched is None or sched == "uniform":
        return Schedule(name=f"uniform({interval or DEFAULT_INTERVAL})", interval=interval or DEFAULT_INTERVAL)
    if sched == "deepcache-nonuniform":
        if num_steps is None:
            raise ValueError("schedule='deepcache-nonuniform' needs num_steps (UNet calls per generation)")
        full = set(deepcache_nonuniform(num_steps, interval or DEFAULT_INTERVAL, config.nonuniform_center,
                                        config.nonuniform_pow))
        kinds = tuple("full" if i in full else "shallow" for i in range(num_steps))
        return Schedule(name=f"deepcache-nonuniform({interval or DEFAULT_INTERVAL})", kinds=kinds)
    if isinstance(sched, str) and sched in PRESETS:
        if interval is not None:
            raise ValueError(f"schedule={sched!r} is a fixed preset; drop cache_interval")
        return Schedule(name=sched, kinds=decode_dato(PRESETS[sched][0], num_steps))
    raise ValueError(f"unknown schedule {sched!r}; valid schedules are {RULES + tuple(PRESETS)} or a list of step "
                     f"kinds {STEP_KINDS}")


__all__ = ["STEP_KINDS", "Schedule", "PhaseSchedule", "PHASE_KINDS", "build_schedule", "deepcache_nonuniform", "decode_dato", "PRESETS", "DATO_S_A", "DATO_S_B"]
