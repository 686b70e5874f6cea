"""The ``torch.compile`` backend (entry point: :func:`graphprune_backend`, registered as ``"graphprune"``).

    torch.compile(unet, backend="graphprune", options={"method": "sito", "ratio": 0.5})

options -> typed config (:func:`graphprune.methods.parse_options`) -> match + rewrite (:mod:`graphprune.passes`) ->
the inner compiler (Inductor by default). The method says whether a config needs a runtime across denoising steps
(:meth:`~graphprune.methods.base.TokenMethod.runtime`); the backend looks that runtime up in
:data:`graphprune.runtime.RUNTIMES` and returns it instead of one compiled graph.
Methods that need randomness get it as extra graph inputs, drawn on every call from graphprune's own generator
(seeded by the config), so the user's RNG stream is never touched and no RNG runs inside the graph.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable

from torch.fx import GraphModule

from .config import PruneConfig, with_overrides
from .inner import RandomFeed, compile_inner
from .methods import method_for, parse_options
from .passes.cut import copy_graph_module
from .passes.rewrite import RewriteResult, prune_graph
from .report import GraphReport
from .runtime import RUNTIMES

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

    ``reports`` (Python callers only) receives the :class:`GraphReport` of every graph compiled. Configs that need a
    runtime across steps (``deepcache``, ``dato``, ``catome``, AT-EDM's DSAP) return a
    :class:`~graphprune.runtime.Runtime`; ``register_runtime=False`` keeps it out of the registry that
    ``graphprune.reset(model)`` searches (``inspect`` uses that).
    """
    config = parse_options(options)
    if mode is not None and mode != "default":
        config = with_overrides(config, mode=mode)
    method = method_for(config)
    runtime = method.runtime(config)
    if runtime != "none":
        return RUNTIMES[runtime](gm, list(example_inputs), config, method, reports=reports, all_reports=REPORTS,
                                 register=register_runtime)
    if method.unchanged_reason(config) is None:
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
