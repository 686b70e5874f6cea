"""The fields every step-caching method shares (``deepcache``, ``dato``): where the UNet is cut and which kind each
denoising step is. Not a method itself; :class:`CachingConfig` is the base of their configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import PruneConfig, check_int
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

    Args to tinker with:
        nonuniform_center, nonuniform_pow: DeepCache's ``center`` and ``pow`` of the non-uniform schedule.
        max_variants: the most compiled variants (one per distinct step kind and token budget) a runtime may hold.
    """

    cache_interval: int | None = None
    schedule: Any = None
    cache_branch: int = 0
    num_steps: int | None = None
    nonuniform_center: int = 15
    nonuniform_pow: float = 1.4
    max_variants: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.schedule, list):
            object.__setattr__(self, "schedule", tuple(self.schedule))
        for name in ("cache_interval", "num_steps"):
            check_int("", name, getattr(self, name), 1, optional=True)
        check_int("", "cache_branch", self.cache_branch, 0)
        check_int("", "max_variants", self.max_variants, 2)
        build_schedule(self)  # validates schedule, interval and length together

    @property
    def step_aware(self) -> bool:
        return True

    @property
    def caches(self) -> bool:
        return True


__all__ = ["CachingConfig"]
