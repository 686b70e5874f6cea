"""graphprune: training-free token pruning for diffusion models, as a torch.compile pass.

    fast = torch.compile(unet, backend="graphprune", options={"method": "sito", "ratio": 0.5})
    report = graphprune.inspect(unet, latents, t, text_embeddings, options={"method": "sito"})  # str(): a table
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .backend import graphprune_backend, last_report
from .config import PruneConfig, config_to_dict
from .methods import (AtEdmConfig, CachingConfig, CaToMeConfig, DaToConfig, DeepCacheConfig, RandomConfig, SiToConfig,
                      ToDoConfig, ToMeConfig, TokenMethod, config_from_dict, method_names, parse_options,
                      register_method, registered_methods)
from .passes.coverage import check_coverage, graph_break_counts  # issue 16: graph breaks / uncovered attention
from .pipeline import apply, remove
from .report import GraphReport, InspectReport, SiteReport
from .runtime import MatchCacheRuntime, Runtime, StepRuntime, reset, runtimes
from .schedule import Schedule, build_schedule

__version__ = "0.1.0"


def inspect(model: Any, *args: Any, options: dict[str, Any] | PruneConfig | None = None,
            **kwargs: Any) -> InspectReport:
    """Trace ``model(*args, **kwargs)`` once and report every attention site and what ``options`` would do to it.

    Runs the rewritten graph eagerly (no Inductor compile), so it is cheap. Returns an :class:`InspectReport`;
    ``print`` it for a table. For a step-aware method the report also holds the runtime (schedule, cut point,
    compiled variants: the full and the shallow one are both built) and the bytes of state it holds.

    Without inputs, ``inspect(fast)`` describes the live step-aware runtimes of an already compiled model (variants
    compiled so far, their calls, the state held now).
    """
    if not args and not kwargs and options is None:
        found = runtimes(model)
        return InspectReport(graphs=[g for r in found for g in (v.report for v in r.variants.values())],
                             runtimes=[r.describe() for r in found])
    config = dataclasses.replace(parse_options(options), compiler="eager", mode=None)
    graphs: list[GraphReport] = []
    made: list[Any] = []
    seen: list[Any] = []  # issue 16: every graph as Dynamo handed it, with its example inputs (for coverage)

    def backend(gm: Any, ex: Any) -> Any:
        seen.append((gm, list(ex)))  # issue 16
        fn = graphprune_backend(gm, ex, options=config, reports=graphs, register_runtime=False)
        made.append(fn)
        return fn

    compiled = torch.compile(model, backend=backend)
    breaks_before = graph_break_counts()  # issue 16
    with torch.no_grad():
        compiled(*args, **kwargs)
        infos = []
        for fn in made:
            if isinstance(fn, StepRuntime):
                fn.build_variants()  # eager: the shallow graph too, without running it
            if isinstance(fn, Runtime):
                infos.append(fn.describe())
    coverage = check_coverage(model, seen, breaks_before)  # issue 16
    return InspectReport(graphs=graphs, runtimes=infos, coverage=coverage)


__all__ = ["inspect", "apply", "remove", "reset", "runtimes", "Runtime", "StepRuntime", "MatchCacheRuntime",
           "Schedule", "build_schedule", "graphprune_backend", "last_report", "PruneConfig", "ToMeConfig",
           "SiToConfig", "ToDoConfig", "RandomConfig", "CachingConfig", "DeepCacheConfig", "DaToConfig",
           "CaToMeConfig", "AtEdmConfig", "TokenMethod", "register_method", "parse_options", "config_to_dict",
           "config_from_dict", "method_names", "registered_methods", "GraphReport", "InspectReport", "SiteReport",
           "__version__"]
