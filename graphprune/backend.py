"""The ``torch.compile`` backend (entry point: :func:`graphprune_backend`, registered as ``"graphprune"``).

    torch.compile(unet, backend="graphprune", options={"method": "sito", "ratio": 0.5})

options -> typed config -> match + rewrite (:mod:`graphprune.passes`) -> the inner compiler (Inductor by default).
Methods that need randomness get it as extra graph inputs, drawn on every call from graphprune's own generator
(seeded by the config), so the user's RNG stream is never touched and no RNG runs inside the graph.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from . import methods  # noqa: F401  (registers the methods)
from .config import PruneConfig, parse_options, with_overrides
from .methods.base import RandomSpec, method_for
from .passes.rewrite import RewriteResult, prune_graph
from .report import GraphReport

log = logging.getLogger(__name__)

#: Reports of the most recent graphs the backend compiled (newest last).
REPORTS: collections.deque[GraphReport] = collections.deque(maxlen=256)


def last_report() -> GraphReport | None:
    """The report of the last graph the backend compiled, or None."""
    return REPORTS[-1] if REPORTS else None


class RandomFeed:
    """Draws the rewritten graph's random inputs on every call from a dedicated, seeded generator per device."""

    def __init__(self, specs: Sequence[tuple[RandomSpec, torch.device]], seed: int):
        self.specs = list(specs)
        self.generators: dict[torch.device, torch.Generator] = {}
        for _, device in self.specs:
            if device not in self.generators:
                self.generators[device] = torch.Generator(device=device).manual_seed(seed)

    def draw(self) -> list[torch.Tensor]:
        out = []
        for spec, device in self.specs:
            g = self.generators[device]
            if spec.kind == "normal":
                out.append(torch.randn(spec.shape, generator=g, device=device))
            else:
                out.append(torch.randint(spec.high, spec.shape, generator=g, device=device))
        return out

    def examples(self) -> list[torch.Tensor]:
        """Example tensors (zeros) for compiling the graph."""
        return [torch.zeros(spec.shape, device=device,
                            dtype=torch.float32 if spec.kind == "normal" else torch.int64)
                for spec, device in self.specs]


def compile_inner(gm: GraphModule, example_inputs: list[Any], config: PruneConfig) -> Callable[..., Any]:
    """Hand the (rewritten) graph to the configured inner compiler."""
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(config.mode) if config.mode else None
    return compile_fx(gm, example_inputs, config_patches=patches)


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node metadata shared, modules and attributes shared).

    Dynamo keeps reading the graph it hands to a backend, so the pass never edits that graph in place.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


def rewrite(gm: GraphModule, config: PruneConfig, reports: list[GraphReport] | None = None) -> RewriteResult:
    """Run the pruning pass on ``gm`` in place and record its report (in ``REPORTS`` and in ``reports``)."""
    result = prune_graph(gm, config, method_for(config))
    REPORTS.append(result.report)
    if reports is not None:
        reports.append(result.report)
    return result


def graphprune_backend(gm: GraphModule, example_inputs: list[Any], options: Any = None,
                       mode: str | None = None, reports: list[GraphReport] | None = None) -> Callable[..., Any]:
    """torch.compile backend: ``options`` is a dict (``{"method": "sito", "ratio": 0.5, ...}``) or a config.

    ``reports`` (Python callers only) receives the :class:`GraphReport` of every graph compiled.
    """
    config = parse_options(options)
    if mode is not None and mode != "default":
        config = with_overrides(config, mode=mode)
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


__all__ = ["graphprune_backend", "last_report", "REPORTS", "RandomFeed", "rewrite"]
