"""The callable for configs that need no state across steps (entry point: :class:`PlainGraph`).

One rewritten graph, compiled once; the methods' random inputs are drawn on every call from graphprune's own
generator (seeded by the config) and appended to the graph's inputs. ``graphprune.reset(model)`` (and
``graphprune.apply``'s per-call reset) restarts the draws from the seed, so a generation with the same inputs gives
the same output every time.
"""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule

from ..config import PruneConfig
from ..inner import RandomFeed, compile_inner
from ..methods.base import TokenMethod
from ..passes.cut import copy_graph_module
from ..passes.rewrite import prune_graph
from ..progress import stage
from ..report import GraphReport
from .base import Tracked


class PlainGraph(Tracked):
    """One rewritten, compiled graph (``TokenMethod.runtime(config) == "none"``)."""

    name = "none"

    def __init__(self, gm: GraphModule, example_inputs: list[Any], config: PruneConfig, method: TokenMethod,
                 reports: list[GraphReport] | None = None, all_reports: Any = None, register: bool = True,
                 shape: str | None = None):
        super().__init__(gm, example_inputs, config, method, reports, all_reports, register, shape)
        if method.unchanged_reason(config) is None:
            gm = copy_graph_module(gm)  # Dynamo keeps reading the graph it handed over
        result = prune_graph(gm, config, method)
        self.record(result.report)
        self.gm = gm
        self.feed = RandomFeed(result.random_inputs, getattr(config, "seed", 0)) if result.random_inputs else None
        with stage(f"compile the rewritten graph ({config.compiler}) for {self.shape}"):
            self.fn = compile_inner(gm, list(example_inputs) + (self.feed.examples() if self.feed else []), config)

    @property
    def graphprune_graph(self) -> GraphModule:
        """The rewritten graph (for tests and debugging)."""
        return self.gm

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.feed is None:
            return self.fn(*args)
        return self.fn(*args, *self.feed.draw())

    def reset(self, reason: str = "explicit") -> None:
        if self.feed is not None:
            self.feed.reseed()


__all__ = ["PlainGraph"]
