"""Step-aware execution for methods that work across denoising steps (entry point: :class:`StepRuntime`).

For a stateful method the backend returns a :class:`StepRuntime` instead of one compiled graph. It

* counts UNet calls; a call whose timestep is higher than the previous call's starts a new generation and resets
  every piece of state (an equal timestep, as PNDM/PLMS repeat at their start, does not);
* asks the schedule for the step's kind (``full`` / ``shallow`` / ``reuse``; step 0 of a generation is always
  full) and runs the matching compiled *variant*: variants (one per distinct step kind and token budget) are built
  from the traced graph and compiled lazily on first use, at most ``max_variants`` of them;
* threads cross-step tensors through the graphs as inputs and outputs: the feature cached at the cut (an extra
  output of the full graph, an input of the shallow graph), the previous noise predictions (inputs of DaTo's plans),
  the previous output (returned as is on reuse steps). No graph has a Python side effect or a host sync; the only
  host read is the timestep, outside the graphs.

Random inputs come from a dedicated generator per variant, seeded from the config: the user's RNG stream is never
consumed. ``graphprune.reset(model)`` resets explicitly; ``describe()`` lists the variants and the state's bytes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch._inductor
from torch.fx import GraphModule, Node

from ..config import PruneConfig
from ..inner import RandomFeed, compile_inner
from ..methods.base import TokenMethod
from ..passes.cut import CutPoint, add_input, copy_graph_module, find_cut, full_graph, running_modules, shallow_graph
from ..passes.match import find_attention_sites
from ..passes.ops import node_val
from ..passes.rewrite import prune_graph
from ..progress import stage
from ..report import GraphReport
from ..schedule import Schedule, build_schedule
from .base import Runtime

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """One compiled graph of a runtime: its step kind, rewritten graph, compiled callable and random feed."""

    kind: str
    gm: GraphModule
    fn: Callable[..., Any]
    feed: RandomFeed | None
    report: GraphReport
    modules: list[str]
    calls: int = 0

    def describe(self) -> dict[str, Any]:
        pruned = self.report.pruned
        return {"kind": self.kind, "calls": self.calls, "ops": sum(1 for n in self.gm.graph.nodes
                                                                   if n.op == "call_function"),
                "pruned_sites": len(pruned), "budgets": sorted({(s.N, s.K) for s in pruned}),
                "random_inputs": self.report.random_inputs, "modules": self.modules}


@dataclass
class StepState:
    """Cross-step tensors of one generation (all None at its start)."""

    cache: torch.Tensor | None = None  # the cut tensor from the last full step, (B, C, H, W)
    outputs: tuple[Any, ...] | None = None  # the previous call's outputs (returned on reuse steps)
    eps: list[torch.Tensor] = field(default_factory=list)  # the last two noise predictions, newest first



class StepRuntime(Runtime):
    """The callable the backend returns for step-aware configs (see the module docstring)."""

    name = "steps"

    def __init__(self, gm: GraphModule, example_inputs: list[Any], config: PruneConfig, method: TokenMethod,
                 reports: list[GraphReport] | None = None, all_reports: Any = None, register: bool = True,
                 shape: str | None = None):
        super().__init__(gm, example_inputs, config, method, reports, all_reports, register, shape)
        #: feature caching (full/shallow/reuse over a graph cut) or phases only (AT-EDM's DSAP: "early"/"late",
        #: each a differently pruned copy of the whole graph; no cut, no cached tensor)
        self.caches = config.caches
        self.schedule: Schedule = build_schedule(config) if self.caches else config.step_schedule()
        self.first_kind = "full" if self.caches else self.schedule.first_kind
        self.cut: CutPoint | None = find_cut(gm.graph, config.cache_branch) if self.caches else None
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = output.args[0]
        self.eps_like = node_val(outs[0] if isinstance(outs, (list, tuple)) else outs)
        sites, _ = find_attention_sites(gm.graph)
        self.finest_tokens = max((s.N for s in sites if s.kind == "self" and s.grid is not None), default=None)
        self.variants: dict[tuple[str, float], Variant] = {}
        self.state = StepState()
        # CUDA-graph modes replay into static output buffers: tensors kept across steps must be copies
        self._copy_state = bool(config.mode and torch._inductor.list_mode_options(config.mode).get("triton.cudagraphs"))
        self._variant(self.first_kind, example_inputs)  # compile the first variant now: errors surface early
        log.info("graphprune[%s]: %s; cut at %s", config.method, self.schedule.describe(), self._cut_description())

    # ---------------------------------------------------------------- variants
    def _context(self, gm: GraphModule) -> dict[str, Node]:
        """Placeholders for the method's cross-step inputs (after the existing ones, before random inputs)."""
        return {name: add_input(gm.graph, f"graphprune_{name}", self.eps_like) for name in self.method.context_inputs}

    def _cut_description(self) -> str:
        return self.cut.describe() if self.cut is not None else "none (no feature caching)"

    def _build(self, kind: str) -> tuple[GraphModule, GraphReport, list, list[str]]:
        config = self.config
        if not self.caches:  # a phase variant: the whole graph, pruned as the phase's config says
            gm = copy_graph_module(self.base)
            modules = running_modules(gm)
            config = self.config.phase_config(kind)
        elif kind == "full":
            gm = full_graph(self.base, self.cut)
            modules = running_modules(gm)
        else:
            gm, modules = shallow_graph(self.base, self.cut)
        context = self._context(gm)
        result = prune_graph(gm, config, self.method, context=context, finest_tokens=self.finest_tokens,
                             warn_unpruned=kind == self.first_kind)
        if context and not result.changed:  # nothing reads the state inputs: keep them (callers pass them)
            gm.recompile()
        self.record(result.report, kind)
        return gm, result.report, result.random_inputs, modules

    def _variant(self, kind: str, args: Iterable[Any]) -> Variant:
        key = (kind, self.config.ratio)
        variant = self.variants.get(key)
        if variant is not None:
            return variant
        if len(self.variants) >= self.config.max_variants:  # AT-EDM: exactly two (its phases)
            raise RuntimeError(f"graphprune: more than max_variants={self.config.max_variants} compiled variants "
                               f"needed ({sorted(self.variants)} + {key}); raise max_variants")
        gm, report, random_inputs, modules = self._build(kind)
        feed = RandomFeed(random_inputs, getattr(self.config, "seed", 0)) if random_inputs else None
        examples = list(args) + self._state_inputs(kind, examples=True) + (feed.examples() if feed else [])
        with stage(f"compile the {kind} variant ({self.config.compiler}) for {self.shape}"):
            fn = compile_inner(gm, examples, self.config)
        variant = Variant(kind=kind, gm=gm, fn=fn, feed=feed, report=report, modules=modules)
        self.variants[key] = variant
        log.info("graphprune[%s]: compiled the %s variant (%d of the graph's modules run)", self.config.method, kind,
                 len(modules))
        return variant

    def build_variants(self) -> None:
        """Build every variant the schedule can use (with ``compiler="eager"`` this compiles nothing; used by
        ``graphprune.inspect`` to report the shallow graph before any shallow step ran)."""
        if self.config.compiler != "eager":
            raise RuntimeError("build_variants needs example inputs for a real compiler; use compiler='eager'")
        if not self.caches:
            for kind in ("early", "late"):
                self._variant(kind, [])
            return
        if self.schedule.kinds is None or "shallow" in self.schedule.kinds:
            self._variant("shallow", [])

    def _state_inputs(self, kind: str, examples: bool = False) -> list[torch.Tensor]:
        """The cross-step tensors a variant takes after the user's inputs: [cache (shallow)], [eps_prev, eps_prev2]."""
        out: list[torch.Tensor] = []
        if kind == "shallow":
            out.append(self.state.cache if not examples else torch.zeros(
                self.cut.shape, dtype=self.eps_like.dtype, device=self.eps_like.device))
        if self.method.context_inputs:
            zeros = torch.zeros(self.eps_like.shape, dtype=self.eps_like.dtype, device=self.eps_like.device)
            eps = self.state.eps if not examples else []
            prev = eps[0] if eps else zeros
            prev2 = eps[1] if len(eps) > 1 else prev  # d = 0 until two predictions exist (as the official code)
            out += [prev, prev2]
        return out

    # ---------------------------------------------------------------- stepping
    def end_generation(self) -> None:
        length = self.schedule.length
        if length is not None and len(self.kinds) != length:
            log.warning("graphprune[%s]: the generation made %d UNet calls but schedule %r covers %d; check "
                        "num_steps", self.config.method, len(self.kinds), self.schedule.name, length)

    def reset_state(self) -> None:
        self.state = StepState()
        for variant in self.variants.values():  # every generation draws the same random inputs: reproducible
            if variant.feed is not None:
                variant.feed.reseed()

    def next_kind(self) -> str:
        """The kind the next call will run (step 0 and a missing cache or output force a full step)."""
        if not self.caches:
            return self.schedule.kind(self.step)
        kind = "full" if self.step == 0 else self.schedule.kind(self.step)
        if (kind == "shallow" and self.state.cache is None) or (kind == "reuse" and self.state.outputs is None):
            return "full"
        return kind

    def run_step(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], str]:
        kind = self.next_kind()
        if kind == "reuse":
            outputs = self.state.outputs
            eps = self.state.eps[0] if self.state.eps else None
        else:
            variant = self._variant(kind, args)
            variant.calls += 1
            rand = variant.feed.draw() if variant.feed else []
            result = variant.fn(*args, *self._state_inputs(kind), *rand)
            outputs = tuple(result[: self.n_outputs])
            if self._copy_state:
                outputs = tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)
            if kind == "full" and self.caches:
                cache = result[self.n_outputs]
                self.state.cache = cache.clone() if self._copy_state else cache
            eps = outputs[0]
        if self.method.context_inputs:
            self.state.eps = [eps] + self.state.eps[:1]
        self.state.outputs = outputs
        return outputs, kind

    # ---------------------------------------------------------------- reporting
    @property
    def graphprune_graph(self) -> GraphModule:
        """The first variant's rewritten graph (full; AT-EDM: early) (for tests and debugging, like the stateless
        backend's)."""
        return self.variants[(self.first_kind, self.config.ratio)].gm

    def state_tensors(self) -> Iterable[Any]:
        return [self.state.cache, *(self.state.outputs or ()), *self.state.eps]

    def describe_extra(self) -> dict[str, Any]:
        """Schedule, cut and the compiled variants, as plain data."""
        return {"schedule": self.schedule.describe(), "cut": dataclasses.asdict(self.cut) if self.cut else None,
                "cut_description": self._cut_description(),
                "variants": [v.describe() for v in self.variants.values()], "max_variants": self.config.max_variants}

    def __str__(self) -> str:
        d = self.describe()
        lines = [f"graphprune[{d['method']}] runtime: {d['schedule']}; cut at {d['cut_description']}; "
                 f"generation {d['generation']}, step {d['step']}; state held: {d['state_bytes'] / 2**20:.2f} MiB"]
        for v in d["variants"]:
            lines.append(f"  variant {v['kind']:<8} calls={v['calls']:<4} ops={v['ops']:<5} "
                         f"pruned sites={v['pruned_sites']} budgets(N->K)={v['budgets']} modules={len(v['modules'])}")
        return "\n".join(lines)

__all__ = ["StepRuntime", "Variant", "StepState"]
