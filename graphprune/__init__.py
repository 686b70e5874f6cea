"""graphprune: training-free token pruning for diffusion models, as a torch.compile pass.

    fast = torch.compile(unet, backend="graphprune", options={"method": "sito", "ratio": 0.5})
    fast = graphprune.compile(unet, method="sito", ratio=0.5)          # the same, options checked at once
    print(graphprune.inspect(fast))                                     # what it compiled so far (after a call)
    print(graphprune.inspect(unet, latents, t, text_embeddings, options={"method": "sito"}))   # a dry run on meta
"""

from __future__ import annotations

from . import standins  # noqa: F401  (Dynamo stand-ins for untraceable attention contexts, registered on import)
from .backend import compile, graphprune_backend, last_report
from .config import PruneConfig, config_to_dict
from .methods import (AtEdmConfig, CachingConfig, CaToMeConfig, DaToConfig, DeepCacheConfig, RandomConfig, SiToConfig,
                      ToDoConfig, ToMeConfig, TokenMethod, config_from_dict, method_names, parse_options,
                      register_method, registered_methods)
from .inspection import inspect
from .pipeline import apply, remove
from .report import GraphReport, InspectReport, SiteReport
from .runtime import MatchCacheRuntime, PlainGraph, Runtime, StepRuntime, Tracked, reset, runtimes
from .schedule import Schedule, build_schedule

__version__ = "0.1.0"


__all__ = ["inspect", "compile", "apply", "remove", "reset", "runtimes", "Tracked", "PlainGraph", "Runtime",
           "StepRuntime", "MatchCacheRuntime",
           "Schedule", "build_schedule", "graphprune_backend", "last_report", "PruneConfig", "ToMeConfig",
           "SiToConfig", "ToDoConfig", "RandomConfig", "CachingConfig", "DeepCacheConfig", "DaToConfig",
           "CaToMeConfig", "AtEdmConfig", "TokenMethod", "register_method", "parse_options", "config_to_dict",
           "config_from_dict", "method_names", "registered_methods", "GraphReport", "InspectReport", "SiteReport",
           "__version__"]
