"""Stateful execution across denoising steps: one base (:class:`Runtime`) and a subclass per kind of state.

The backend asks the method which runtime a config needs (:meth:`~graphprune.methods.base.TokenMethod.runtime`) and
looks the name up in :data:`RUNTIMES`.
"""

from .base import Runtime, reset, runtimes
from .match_cache import MatchCacheRuntime
from .steps import StepRuntime

#: runtime name (what ``TokenMethod.runtime(config)`` returns) -> class; "none" means one plain compiled graph
RUNTIMES: dict[str, type[Runtime]] = {StepRuntime.name: StepRuntime, MatchCacheRuntime.name: MatchCacheRuntime}

__all__ = ["Runtime", "StepRuntime", "MatchCacheRuntime", "RUNTIMES", "reset", "runtimes"]
