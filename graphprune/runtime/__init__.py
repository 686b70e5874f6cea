"""The callables the backend returns: one base (:class:`Tracked`), the plain one-graph callable, and a subclass of
:class:`Runtime` per kind of state carried across denoising steps; :class:`ShapeSpecialized` builds one of them per
input shape for graphs Dynamo traced with symbolic sizes.

The backend asks the method which kind a config needs (:meth:`~graphprune.methods.base.TokenMethod.runtime`) and
looks the name up in :data:`RUNTIMES`.
"""

from .base import Runtime, Tracked, reset, runtimes
from .match_cache import MatchCacheRuntime
from .plain import PlainGraph
from .shapes import ShapeSpecialized
from .steps import StepRuntime

#: what ``TokenMethod.runtime(config)`` returns -> the class of the callable the backend builds per static graph
RUNTIMES: dict[str, type[Tracked]] = {PlainGraph.name: PlainGraph, StepRuntime.name: StepRuntime,
                                      MatchCacheRuntime.name: MatchCacheRuntime}

__all__ = ["Tracked", "Runtime", "PlainGraph", "StepRuntime", "MatchCacheRuntime", "ShapeSpecialized", "RUNTIMES",
           "reset", "runtimes"]
