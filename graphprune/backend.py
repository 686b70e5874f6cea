"""The ``torch.compile`` backend (entry point: :func:`graphprune_backend`, registered as ``"graphprune"``).

    torch.compile(unet, backend="graphprune", options={"method": "sito", "ratio": 0.5})

options -> typed config (:func:`graphprune.methods.parse_options`) -> match + rewrite (:mod:`graphprune.passes`) ->
the inner compiler (Inductor by default). The method says which callable a config needs
(:meth:`~graphprune.methods.base.TokenMethod.runtime`: one plain graph, or a runtime across denoising steps); the
backend looks it up in :data:`graphprune.runtime.RUNTIMES`. Graphs with symbolic sizes are specialized per input
shape (:class:`graphprune.runtime.ShapeSpecialized`), so pruning survives changes of batch and resolution.
Methods that need randomness get it as extra graph inputs, drawn on every call from graphprune's own generator
(seeded by the config), so the user's RNG stream is never touched and no RNG runs inside the graph.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from .config import PruneConfig, with_overrides
from .methods import method_for, parse_options
from .passes.specialize import is_symbolic
from .report import GraphReport
from .runtime import RUNTIMES, ShapeSpecialized, Tracked
from .runtime.shapes import share

log = logging.getLogger(__name__)

#: Reports of the most recent graphs the backend compiled (newest last).
REPORTS: collections.deque[GraphReport] = collections.deque(maxlen=256)


def last_report() -> GraphReport | None:
    """The report of the last graph the backend compiled, or None."""
    return REPORTS[-1] if REPORTS else None


def graphprune_backend(gm: GraphModule, example_inputs: list[Any], options: Any = None,
                       mode: str | None = None, reports: list[GraphReport] | None = None,
                       register_runtime: bool = True) -> Callable[..., Any]:
    """torch.compile backend: ``options`` is a dict (``{"method": "sito", "ratio": 0.5, ...}``) or a config.

    Returns the callable of the method's runtime kind (:data:`graphprune.runtime.RUNTIMES`: a plain rewritten graph,
    or a runtime for configs that work across denoising steps: ``deepcache``, ``dato``, ``catome``, AT-EDM's DSAP).
    A graph with symbolic sizes gets a :class:`~graphprune.runtime.ShapeSpecialized` that builds one of those per
    input shape. ``reports`` (Python callers only) receives the :class:`GraphReport` of every graph compiled;
    ``register_runtime=False`` keeps the callables out of the registry that ``graphprune.reset(model)`` and
    ``graphprune.inspect(model)`` search (``inspect`` uses that).
    """
    config = parse_options(options)
    if mode is not None and mode != "default":
        config = with_overrides(config, mode=mode)
    method = method_for(config)
    kind = RUNTIMES[method.runtime(config)]

    def build(graph: GraphModule, examples: list[Any], shape: str | None = None) -> Tracked:
        return kind(graph, examples, config, method, reports=reports, all_reports=REPORTS,
                    register=register_runtime, shape=shape)

    if is_symbolic(gm, example_inputs):
        owner = min((t.data_ptr() for t in example_inputs if isinstance(t, torch.Tensor) and t.numel() > 1
                     and t.device.type != "meta"), default=None)
        return ShapeSpecialized(gm, build, config.max_shapes, owner=owner, config=config, label=f"[{config.method}]")
    tracked = build(gm, list(example_inputs))
    share(tracked, gm, list(example_inputs))
    return tracked


def compile(model: Any, options: dict[str, Any] | PruneConfig | None = None, *, dynamic: bool | None = None,
            **kwargs: Any) -> Any:
    """``torch.compile(model, backend="graphprune", options=...)`` with the options checked now.

    ``graphprune.compile(unet, method="sito", ratio=0.5)``; a bad option raises here, before any tracing (through
    ``torch.compile`` directly it can only surface at the first call, after Dynamo's trace: torch gives backends no
    earlier hook). ``dynamic`` is torch.compile's; graphprune specializes symbolic graphs per shape either way.
    """
    if isinstance(options, PruneConfig):
        if kwargs:
            raise ValueError("pass either a typed config or keyword options, not both")
        config_options: Any = options
    else:
        if options is not None and not isinstance(options, dict):
            parse_options(options)  # raises with the accepted forms
        config_options = {**(options or {}), **kwargs}
        parse_options(config_options)
    return torch.compile(model, backend="graphprune", options=config_options, dynamic=dynamic)


__all__ = ["graphprune_backend", "last_report", "REPORTS", "compile"]
