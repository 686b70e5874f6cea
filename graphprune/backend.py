"""The ``torch.compile`` backend (entry point: :func:`graphprune_backend`, registered as ``"graphprune"``).

    torch.compile(unet, backend="graphprune", options={"method": "sito", "ratio": 0.5})

options -> typed config -> match + rewrite (:mod:`graphprune.passes`) -> the inner compiler (Inductor by default).
Methods that need randomness get it as extra graph inputs, drawn on every call from graphprune's own generator
(seeded by the config), so the user's RNG stream is never touched and no RNG runs inside the graph.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from . import methods  # noqa: F401  (registers the methods)
from .config import CaToMeConfig, PruneConfig, parse_options, with_overrides
from .inner import RandomFeed, compile_inner
from .methods.base import method_for
from .passes.cut import copy_graph_module
from .passes.rewrite import RewriteResult, prune_graph
from .report import GraphReport
from .runtime import StepRuntime

log = logging.getLogger(__name__)

#: Reports of the most recent graphs the backend compiled (newest last).
REPORTS: collections.deque[GraphReport] = collections.deque(maxlen=256)


def last_report() -> GraphReport | None:
    """The report of the last graph the backend compiled, or None."""
    return REPORTS[-1] if REPORTS else None


def rewrite(gm: GraphModule, config: PruneConfig, reports: list[GraphReport] | None = None) -> RewriteResult:
    """Run the pruning pass on ``gm`` in place and record its report (in ``REPORTS`` and in ``reports``)."""
    result = prune_graph(gm, config, method_for(config))
    REPORTS.append(result.report)
    if reports is not None:
        reports.append(result.report)
    return result


def graphprune_backend(gm: GraphModule, example_inputs: list[Any], options: Any = None,
                       mode: str | None = None, reports: list[GraphReport] | None = None,
                       register_runtime: bool = True) -> Callable[..., Any]:
    """torch.compile backend: ``options`` is a dict (``{"method": "sito", "ratio": 0.5, ...}``) or a config.

    ``reports`` (Python callers only) receives the :class:`GraphReport` of every graph compiled. Step-aware methods
    (``deepcache``, ``dato``) return a :class:`~graphprune.runtime.StepRuntime`; ``register_runtime=False`` keeps it
    out of the registry that ``graphprune.reset(model)`` searches (``inspect`` uses that).
    """
    config = parse_options(options)
    if mode is not None and mode != "default":
        config = with_overrides(config, mode=mode)
    if config.step_aware:  # caching methods, AT-EDM's DSAP: a runtime that picks a compiled variant per step
        runtime = StepRuntime(gm, list(example_inputs), config, reports=reports, all_reports=REPORTS,
                              register=register_runtime)
        return runtime
    if isinstance(config, CaToMeConfig):
        if config.threshold < 1:  # T >= 1 merges nothing (the official code returns identity): plain compile below
            from .match_cache import MatchCacheRuntime

            return MatchCacheRuntime(gm, list(example_inputs), config, reports=reports, all_reports=REPORTS,
                                     register=register_runtime)
        log.info("graphprune[catome]: threshold %g >= 1 merges nothing; compiling the graph unchanged",
                 config.threshold)
        config = with_overrides(config, ratio=0.0)
    if config.ratio > 0:
        gm = copy_graph_module(gm)
    result = rewrite(gm, config, reports)
    if not result.random_inputs:
        compiled = compile_inner(gm, list(example_inputs), config)
        if config.compiler == "eager":  # keep the rewritten graph reachable for tests and debugging
            return _with_graph(gm.forward, gm)
        return compiled
    feed = RandomFeed(result.random_inputs, getattr(config, "seed", 0))
    compiled = compile_inner(gm, list(example_inputs) + feed.examples(), config)

    def run(*args: Any) -> Any:
        return compiled(*args, *feed.draw())

    run.graphprune_graph = gm  # type: ignore[attr-defined]
    return run


def _with_graph(fn: Callable[..., Any], gm: GraphModule) -> Callable[..., Any]:
    """Wrap ``fn`` so that ``fn.graphprune_graph`` is the rewritten GraphModule (for tests and debugging)."""

    def call(*args: Any) -> Any:
        return fn(*args)

    call.graphprune_graph = gm  # type: ignore[attr-defined]
    return call


__all__ = ["graphprune_backend", "last_report", "REPORTS", "RandomFeed", "compile_inner", "copy_graph_module",
           "rewrite"]
