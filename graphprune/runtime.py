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
import gc
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch._inductor
from torch.fx import GraphModule, Node

from .config import CachingConfig, PruneConfig, config_to_dict
from .inner import RandomFeed, compile_inner
from .methods.base import TokenMethod, method_for
from .passes.cut import (CutPoint, add_input, copy_graph_module, find_cut, find_timestep_input, full_graph,
                         running_modules, shallow_graph)
from .passes.match import find_attention_sites
from .passes.ops import node_val
from .passes.rewrite import prune_graph
from .report import GraphReport
from .schedule import Schedule, build_schedule

log = logging.getLogger(__name__)

#: Every live runtime (for ``graphprune.reset`` / ``graphprune.runtimes`` lookups by model).
_RUNTIMES: "weakref.WeakSet[StepRuntime]" = weakref.WeakSet()


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

    def nbytes(self) -> int:
        tensors = [self.cache, *(self.outputs or ()), *self.eps]
        seen: dict[int, int] = {}
        for t in tensors:
            if isinstance(t, torch.Tensor):
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())


class _NoPruning(TokenMethod):
    """Stands in for a method when a caching-only config (ratio 0) is reported: nothing is planned."""

    name = "none"


class StepRuntime:
    """The callable the backend returns for step-aware configs (see the module docstring).

    gm: the graph Dynamo traced (never edited in place); example_inputs: its example inputs.
    """

    def __init__(self, gm: GraphModule, example_inputs: list[Any], config: CachingConfig | PruneConfig,
                 reports: list[GraphReport] | None = None, all_reports: Any = None, register: bool = True):
        self.config = config
        #: feature caching (full/shallow/reuse over a graph cut) or phases only (AT-EDM's DSAP: "early"/"late",
        #: each a differently pruned copy of the whole graph; no cut, no cached tensor)
        self.caches = config.caches
        self.schedule: Schedule = build_schedule(config) if self.caches else config.step_schedule()
        self.first_kind = "full" if self.caches else self.schedule.first_kind
        self.method: TokenMethod = method_for(config) if config.ratio > 0 else _NoPruning()
        self._reports_sinks = [r for r in (reports, all_reports) if r is not None]
        self.base = gm
        t_index = find_timestep_input(gm.graph)
        if t_index is None:
            raise ValueError(f"method {config.method!r} is step-aware but the traced graph has no timestep input: "
                             "pass the timestep as a tensor (diffusers pipelines do), not a Python number")
        self.t_index = t_index
        self.cut: CutPoint | None = find_cut(gm.graph, config.cache_branch) if self.caches else None
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = output.args[0]
        self.n_outputs = len(outs) if isinstance(outs, (list, tuple)) else 1
        self.eps_like = node_val(outs[0] if isinstance(outs, (list, tuple)) else outs)
        sites, _ = find_attention_sites(gm.graph)
        self.finest_tokens = max((s.N for s in sites if s.kind == "self" and s.grid is not None), default=None)
        self.variants: dict[tuple[str, float], Variant] = {}
        self.state = StepState()
        self.step = 0
        self.generation = 0
        self.last_t: float | None = None
        self.kinds: list[str] = []  # kinds run in the current generation
        self.previous_kinds: list[str] = []  # kinds run in the previous generation
        # CUDA-graph modes replay into static output buffers: tensors kept across steps must be copies
        self._copy_state = bool(config.mode and torch._inductor.list_mode_options(config.mode).get("triton.cudagraphs"))
        self._keys = {t.data_ptr() for t in example_inputs if isinstance(t, torch.Tensor) and t.numel() > 1}
        if register:
            _RUNTIMES.add(self)
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
        for sink in self._reports_sinks:
            sink.append(result.report)
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
    def reset(self, reason: str = "explicit") -> None:
        """Forget every cross-step tensor; the next call is step 0 (full) of a new generation."""
        length = self.schedule.length
        if length is not None and self.kinds and len(self.kinds) != length:
            log.warning("graphprune[%s]: the generation made %d UNet calls but schedule %r covers %d; check "
                        "num_steps", self.config.method, len(self.kinds), self.schedule.name, length)
        if self.kinds:
            self.previous_kinds = self.kinds
            self.generation += 1
        self.state = StepState()
        self.step = 0
        self.kinds = []
        self.last_t = None
        for variant in self.variants.values():  # every generation draws the same random inputs: reproducible
            if variant.feed is not None:
                variant.feed.reseed()
        log.debug("graphprune[%s]: state reset (%s)", self.config.method, reason)

    def _timestep(self, args: tuple[Any, ...]) -> float:
        t = args[self.t_index]
        return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)

    def next_kind(self) -> str:
        """The kind the next call will run (step 0 and a missing cache or output force a full step)."""
        if not self.caches:
            return self.schedule.kind(self.step)
        kind = "full" if self.step == 0 else self.schedule.kind(self.step)
        if (kind == "shallow" and self.state.cache is None) or (kind == "reuse" and self.state.outputs is None):
            return "full"
        return kind

    def __call__(self, *args: Any) -> Any:
        t = self._timestep(args)
        if self.last_t is not None and t > self.last_t:
            self.reset(reason=f"timestep rose from {self.last_t:g} to {t:g}")
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
        self.last_t = t
        self.step += 1
        self.kinds.append(kind)
        return outputs

    # ---------------------------------------------------------------- reporting
    @property
    def graphprune_graph(self) -> GraphModule:
        """The first variant's rewritten graph (full; AT-EDM: early) (for tests and debugging, like the stateless
        backend's)."""
        return self.variants[(self.first_kind, self.config.ratio)].gm

    def state_bytes(self) -> int:
        """Bytes of the cross-step tensors held now."""
        return self.state.nbytes()

    def describe(self) -> dict[str, Any]:
        """Schedule, cut, compiled variants and the state held, as plain data."""
        return {"method": self.config.method, "config": config_to_dict(self.config),
                "schedule": self.schedule.describe(), "cut": dataclasses.asdict(self.cut) if self.cut else None,
                "cut_description": self._cut_description(), "generation": self.generation, "step": self.step,
                "variants": [v.describe() for v in self.variants.values()], "max_variants": self.config.max_variants,
                "state_bytes": self.state_bytes()}

    def __str__(self) -> str:
        d = self.describe()
        lines = [f"graphprune[{d['method']}] runtime: {d['schedule']}; cut at {d['cut_description']}; "
                 f"generation {d['generation']}, step {d['step']}; state held: {d['state_bytes'] / 2**20:.2f} MiB"]
        for v in d["variants"]:
            lines.append(f"  variant {v['kind']:<8} calls={v['calls']:<4} ops={v['ops']:<5} "
                         f"pruned sites={v['pruned_sites']} budgets(N->K)={v['budgets']} modules={len(v['modules'])}")
        return "\n".join(lines)

    def owns(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Whether any of ``tensors`` (a model's parameters) was an input of this runtime's graph."""
        return any(t.data_ptr() in self._keys for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 1)


def _module_of(obj: Any) -> torch.nn.Module | None:
    if isinstance(obj, torch.nn.Module):
        return getattr(obj, "_orig_mod", obj)
    for name in ("unet", "transformer"):
        inner = getattr(obj, name, None)
        if isinstance(inner, torch.nn.Module):
            return _module_of(inner)
    return None


def runtimes(obj: Any = None) -> list[StepRuntime]:
    """The live runtimes of a model (a compiled or plain module, or a pipeline), or all of them for ``None``."""
    if isinstance(obj, StepRuntime):
        return [obj]
    gc.collect()  # runtimes of graphs Dynamo dropped (torch._dynamo.reset, recompiles) may sit in reference cycles
    live = list(_RUNTIMES)
    if obj is None:
        return live
    module = _module_of(obj)
    if module is None:
        raise TypeError(f"expected a model, a compiled model or a pipeline with .unet, got {type(obj).__name__}")
    params = [*module.parameters(), *module.buffers()]
    return [r for r in live if r.owns(params)]


def reset(obj: Any = None) -> int:
    """Reset the cross-step state of every runtime of ``obj`` (all runtimes for ``None``). Returns how many."""
    found = runtimes(obj)
    for r in found:
        r.reset()
    if obj is not None and not found:
        log.info("graphprune.reset: no step-aware runtime found for this model (nothing compiled yet?)")
    return len(found)


__all__ = ["StepRuntime", "Variant", "StepState", "runtimes", "reset"]
