"""Test helpers: compile with graphprune and keep the rewritten graphs and reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from graphprune.backend import graphprune_backend
from graphprune.report import GraphReport


@dataclass
class Capture:
    reports: list[GraphReport] = field(default_factory=list)
    graphs: list[GraphModule] = field(default_factory=list)

    @property
    def report(self) -> GraphReport:
        assert len(self.reports) == 1, f"expected one graph, got {len(self.reports)}"
        return self.reports[0]

    def nodes_named(self, name: str) -> list[torch.fx.Node]:
        return [n for g in self.graphs for n in g.graph.nodes
                if n.op == "call_function" and getattr(n.target, "__name__", "") == name]


def compile_with(model: torch.nn.Module, **options: Any) -> tuple[Any, Capture]:
    """torch.compile(model) through graphprune (eager inner compiler unless options say otherwise)."""
    options.setdefault("compiler", "eager")
    cap = Capture()

    def backend(gm, example_inputs):
        fn = graphprune_backend(gm, example_inputs, options=dict(options), reports=cap.reports)
        gm_rewritten = getattr(fn, "graphprune_graph", None)
        if gm_rewritten is not None:
            cap.graphs.append(gm_rewritten)
        return fn

    return torch.compile(model, backend=backend), cap


def compile_steps(model: torch.nn.Module, **options: Any) -> tuple[Any, list[Any]]:
    """torch.compile through graphprune (``compiler="eager"`` unless given); returns (compiled, list of the callables
    the backend made: the step runtimes of a step-aware config)."""
    options.setdefault("compiler", "eager")
    made: list[Any] = []

    def backend(gm: GraphModule, ex: list[Any]) -> Any:
        fn = graphprune_backend(gm, ex, options=dict(options))
        made.append(fn)
        return fn

    return torch.compile(model, backend=backend), made


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
