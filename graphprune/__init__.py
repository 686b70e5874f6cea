"""graphprune: training-free token pruning for diffusion models, as a torch.compile pass.

    fast = torch.compile(unet, backend="graphprune", options={"method": "sito", "ratio": 0.5})
    report = graphprune.inspect(unet, latents, t, text_embeddings, options={"method": "sito"})  # str(): a table
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .backend import graphprune_backend, last_report
from .config import (PruneConfig, RandomConfig, SiToConfig, ToDoConfig, ToMeConfig, config_from_dict, config_to_dict,
                     method_names, parse_options)
from .methods import registered_methods
from .report import GraphReport, InspectReport, SiteReport

__version__ = "0.1.0"


def inspect(model: torch.nn.Module, *args: Any, options: dict[str, Any] | PruneConfig | None = None,
            **kwargs: Any) -> InspectReport:
    """Trace ``model(*args, **kwargs)`` once and report every attention site and what ``options`` would do to it.

    Runs the rewritten graph eagerly (no Inductor compile), so it is cheap. Returns an :class:`InspectReport`;
    ``print`` it for a table.
    """
    config = dataclasses.replace(parse_options(options), compiler="eager", mode=None)
    graphs: list[GraphReport] = []
    compiled = torch.compile(model, backend=lambda gm, ex: graphprune_backend(gm, ex, options=config,
                                                                             reports=graphs))
    with torch.no_grad():
        compiled(*args, **kwargs)
    return InspectReport(graphs=graphs)


__all__ = ["inspect", "graphprune_backend", "last_report", "PruneConfig", "ToMeConfig", "SiToConfig", "ToDoConfig",
           "RandomConfig",
           "parse_options", "config_to_dict", "config_from_dict", "method_names", "registered_methods",
           "GraphReport", "InspectReport", "SiteReport", "__version__"]
