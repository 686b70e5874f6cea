"""The fields every step-caching method shares (``deepcache``, ``dato``): where the UNet is cut, which policy picks
each denoising step's kind (a fixed schedule, First Block Cache, MagCache; :mod:`graphprune.policy`), and what a
cached step feeds the shallow graph (the cached feature, or a Taylor forecast of it). Not a method itself;
:class:`CachingConfig` is the base of their configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..calibration import Calibration
from ..config import PruneConfig, check_int
from ..policy import check_policy_options
from ..schedule import build_schedule


@dataclass(frozen=True)
class CachingConfig(PruneConfig):
    """Fields of the step-aware methods (feature caching across denoising steps; see :mod:`graphprune.schedule`).

    Important args:
        cache_interval: uniform schedule: a full step at 0, N, 2N, ... of each generation, shallow steps between
            (default 3 when no ``schedule`` is given).
        schedule: ``None``/``"uniform"`` (uses ``cache_interval``), ``"deepcache-nonuniform"`` (DeepCache's
            quadratic schedule; needs ``num_steps``), a named preset (``"dato-imagenet"``, ``"dato-coco"``), or an
            explicit list of step kinds (``"full"``, ``"shallow"``, ``"reuse"``), one per UNet call.
        cache_branch: where the graph is cut: the cached tensor is the input of the ``cache_branch``-th ResNet of the
            up path counted from the output end (0 = DeepCache's/DaTo's branch 0: only the last up stage runs).
        num_steps: UNet calls per generation; required by ``"deepcache-nonuniform"``, checked against list
            schedules, and selects the 50-call (DDIM) or 51-call (PLMS) form of the DaTo presets.

        policy: who decides each step's kind: ``"fixed"`` (the default: ``schedule``/``cache_interval``),
            ``"first-block"`` (a probe graph's relative L1 change, accumulated, against ``threshold``; one host read
            per call) or ``"magcache"`` (calibrated magnitude ratios against ``error_budget``; no host read).
        threshold: first-block: the accumulated relative L1 change of the probe at which a full step runs
            (default 0.08; 0 runs every step in full).
        max_skips: first-block, magcache: at most this many cached steps in a row (first-block default: no limit;
            magcache: 3, MagCache's K).
        calibration: magcache: a calibration file path (``graphprune calibrate``) or its dict.
        error_budget: magcache: the accumulated error estimate a run of cached steps may reach (default 0.06).
        forecast: what a cached step feeds the shallow graph: ``"none"`` (the cached feature, DeepCache) or
            ``"taylor"`` (TaylorSeer: a Taylor forecast from the last full steps, finite differences in the step
            index).
        order: taylor: 0 (the cached feature itself), 1 (default) or 2.
        prune: options of a per-step token method (``{"method": "tome", "ratio": 0.5}``; tome, sito, todo, random)
            whose pruning runs inside every graph of the runtime (full, shallow, probe), as DaTo's does; for
            ``method="deepcache"`` (DaTo prunes with its own rule).
        cfg: ``"batch"`` (one decision for the whole [uncond; cond] batch) or ``"split"`` (two cache contexts, for
            pipelines that call the UNet once per CFG half at the same timestep: the n-th call at a timestep uses
            context n mod 2).

    Args to tinker with:
        nonuniform_center, nonuniform_pow: DeepCache's ``center`` and ``pow`` of the non-uniform schedule.
        max_variants: the most compiled variants (one per distinct step kind and token budget) a runtime may hold.
        retention_ratio: first-block, magcache: the first ``int(retention_ratio * num_steps + 0.5)`` calls run in
            full (magcache default 0.2, MagCache's; first-block default 0, FBCache's).
        accumulate: first-block: False compares each step's change alone (diffusers' FirstBlockCacheConfig rule)
            instead of their sum.
    """

    cache_interval: int | None = None
    schedule: Any = None
    cache_branch: int = 0
    num_steps: int | None = None
    nonuniform_center: int = 15
    nonuniform_pow: float = 1.4
    max_variants: int = 4
    policy: str = "fixed"
    threshold: float | None = None
    max_skips: int | None = None
    calibration: Any = None
    error_budget: float | None = None
    forecast: str = "none"
    order: int | None = None
    cfg: str = "batch"
    retention_ratio: float | None = None
    accumulate: bool | None = None
    prune: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.schedule, list):
            object.__setattr__(self, "schedule", tuple(self.schedule))
        if isinstance(self.calibration, Calibration):  # keep the config JSON-ready
            object.__setattr__(self, "calibration", self.calibration.to_dict())
        for name in ("cache_interval", "num_steps"):
            check_int("", name, getattr(self, name), 1, optional=True)
        check_int("", "cache_branch", self.cache_branch, 0)
        check_int("", "max_variants", self.max_variants, 2)
        build_schedule(self)  # validates schedule, interval and length together
        check_policy_options(self)  # the policy's options together (and a magcache calibration file)
        if self.prune is not None and not (isinstance(self.prune, Mapping) and "method" in self.prune):
            raise ValueError(f"prune must be the options of a per-step token method, e.g. "
                             f"{{'method': 'tome', 'ratio': 0.5}}, got {self.prune!r}")

    def nested_options(self) -> dict[str, Mapping[str, Any]]:
        """Option dicts of other methods this config holds (``prune``), checked by the registry's parse."""
        return {"prune": self.prune} if self.prune is not None else {}

    @property
    def taylor_order(self) -> int | None:
        """The Taylor forecast's order (None without a forecast)."""
        return (1 if self.order is None else self.order) if self.forecast == "taylor" else None

    @property
    def step_aware(self) -> bool:
        return True

    @property
    def caches(self) -> bool:
        return True


__all__ = ["CachingConfig"]
