"""Step-aware execution for methods that work across denoising steps (entry point: :class:`StepRuntime`).

For a stateful method the backend returns a :class:`StepRuntime` instead of one compiled graph. It

* counts UNet calls; a call whose timestep is higher than the previous call's starts a new generation and resets
  every piece of state (an equal timestep, as PNDM/PLMS repeat at their start, does not);
* asks its *policy* (:mod:`graphprune.policy`) for the step's kind (``full`` / ``shallow`` / ``reuse``; step 0 of
  a generation is always full): a fixed schedule, First Block Cache (``policy="first-block"``: a compiled probe
  graph runs first and its one scalar is read on the host) or MagCache (``policy="magcache"``: a calibrated
  schedule, no host read); then runs the matching compiled *variant*: variants (one per distinct step kind and
  token budget, plus the probe) are built from the traced graph and compiled lazily on first use, at most
  ``max_variants`` of them;
* threads cross-step tensors through the graphs as inputs and outputs, found by the placeholder names
  (``graphprune_<name>``): the feature cached at the cut (an extra output of the full graph, an input of the
  shallow graph), the Taylor factors of a forecast (``forecast="taylor"``: new factors are extra outputs of the full
  graph, the shallow graph reads them with the step's coefficients), the probe's frontier tensors and its reference
  output (first-block), the previous noise predictions (inputs of DaTo's plans), the previous output (returned as
  is on reuse steps). No graph has a Python side effect or a host sync; host reads happen between graphs only
  (the timestep; first-block's scalar);
* keeps one *cache context* per CFG stream: one for a [uncond; cond] batch (``cfg="batch"``), or two when the
  pipeline calls the UNet once per half (``cfg="split"``: the n-th call at a timestep uses context ``str(n % 2)``,
  so a pipeline that calls cond then uncond at every step keeps them apart, as diffusers' ``cache_context("cond")``
  / ``cache_context("uncond")`` do), each with its own state, policy and step count.

Random inputs come from a dedicated generator per variant, seeded from the config: the user's RNG stream is never
consumed. ``graphprune.reset(model)`` resets explicitly; ``describe()`` lists the variants, the state's bytes and the
policy's record of every step (kind, signal, threshold, accumulated error).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch._inductor
from torch.fx import GraphModule, Node

from ..calibration import Calibration, model_fingerprint
from ..config import PruneConfig
from ..inner import RandomFeed, compile_inner
from ..methods.base import TokenMethod
from ..methods.registry import method_for, parse_options
from ..passes.cut import (CutPoint, ProbeCut, add_factor_update, add_forecast, add_input, add_probe_signal,
                          copy_graph_module, find_cut, find_probe, full_graph, probe_graph, remainder_graph,
                          running_modules, shallow_graph)
from ..passes.match import find_attention_sites
from ..passes.ops import node_val
from ..passes.rewrite import prune_graph
from ..policy import FixedPolicy, StepPolicy, StepRecord, build_policy, check_policy_options, format_records
from ..progress import stage
from ..report import GraphReport
from .base import Runtime

log = logging.getLogger(__name__)

_PREFIX = "graphprune_"


@dataclass
class Variant:
    """One compiled graph of a runtime: its step kind, rewritten graph, compiled callable and random feed.
    ``inputs``: the names of the graph's inputs after the user's, in order (``graphprune_cache``, ...)."""

    kind: str
    gm: GraphModule
    fn: Callable[..., Any]
    feed: RandomFeed | None
    report: GraphReport
    modules: list[str]
    inputs: list[str] = field(default_factory=list)
    calls: int = 0

    def describe(self) -> dict[str, Any]:
        pruned = self.report.pruned
        return {"kind": self.kind, "calls": self.calls, "ops": sum(1 for n in self.gm.graph.nodes
                                                                   if n.op == "call_function"),
                "pruned_sites": len(pruned), "budgets": sorted({(s.N, s.K) for s in pruned}),
                "random_inputs": self.report.random_inputs, "modules": self.modules, "inputs": list(self.inputs)}


@dataclass
class StepState:
    """Cross-step tensors of one cache context in one generation (all empty at its start)."""

    cache: torch.Tensor | None = None  # the cut tensor from the last full step, (B, C, H, W) (Taylor's F0)
    outputs: tuple[Any, ...] | None = None  # the previous call's outputs (returned on reuse steps)
    eps: list[torch.Tensor] = field(default_factory=list)  # the last two noise predictions, newest first
    taylor: list[torch.Tensor] = field(default_factory=list)  # Taylor factors F1.. of the last full step
    probe_ref: torch.Tensor | None = None  # first-block: the probe's stage output at the last full step
    last_full: int | None = None  # step index of the last full step
    fulls: int = 0  # full steps so far


@dataclass
class CacheContext:
    """One cache context: its state, its policy (own accumulators), its step count and its record of steps."""

    name: str
    policy: StepPolicy
    state: StepState = field(default_factory=StepState)
    step: int = 0
    records: list[StepRecord] = field(default_factory=list)


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
        #: the token method pruning inside every graph: the config's own (dato), or a per-step method given as
        #: ``prune={"method": "tome", ...}`` to a caching config (deepcache); its config decides the pruning
        self.token_config: PruneConfig = config
        self.token_method: TokenMethod = method
        inner = config.nested_options().get("prune") if self.caches else None
        if inner is not None:
            self.token_config = parse_options(inner)
            self.token_method = method_for(self.token_config)
        self.calibration: Calibration | None = check_policy_options(config) if self.caches else None
        self.cut: CutPoint | None = find_cut(gm.graph, config.cache_branch) if self.caches else None
        self._params = [weakref.ref(t) for t in example_inputs if isinstance(t, torch.nn.Parameter)]
        if self.calibration is not None:  # MagCache's ratios belong to one model and one cut
            self.calibration.check_model(self.model_fingerprint(), self.cut.resnet)
        self.policy = self._new_policy("")
        self.schedule = getattr(self.policy, "schedule", None)  # fixed policies: the Schedule (or DSAP phases)
        self.first_kind = self.policy.first_kind
        self.probe: ProbeCut | None = find_probe(gm.graph) if self.policy.uses_probe else None
        self.order: int | None = config.taylor_order if self.caches else None
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = output.args[0]
        self.eps_like = node_val(outs[0] if isinstance(outs, (list, tuple)) else outs)
        sites, _ = find_attention_sites(gm.graph)
        self.finest_tokens = max((s.N for s in sites if s.kind == "self" and s.grid is not None), default=None)
        self.variants: dict[tuple[str, float], Variant] = {}
        self.contexts: dict[str, CacheContext] = {}
        self.previous_records: list[StepRecord] = []
        self._stream: tuple[float | None, int] = (None, 0)  # (timestep, calls at it so far) for cfg="split"
        #: callables ``f(context, record, state)`` run after every call (``graphprune.calibrate`` records with it)
        self.observers: list[Callable[[CacheContext, StepRecord, StepState], None]] = []
        # CUDA-graph modes replay into static output buffers: tensors kept across steps must be copies
        self._copy_state = bool(config.mode and torch._inductor.list_mode_options(config.mode).get("triton.cudagraphs"))
        if self.probe is not None:
            self._variant("probe", example_inputs)
        self._variant(self.first_kind, example_inputs)  # compile the first variant now: errors surface early
        log.info("graphprune[%s]: %s; cut at %s", config.method, self.policy.describe(), self._cut_description())

    def model_fingerprint(self) -> dict[str, Any]:
        """The traced model's parameters as :func:`graphprune.calibration.model_fingerprint` describes them."""
        return model_fingerprint([p for ref in self._params if (p := ref()) is not None])

    # ---------------------------------------------------------------- policies and contexts
    def _new_policy(self, context: str) -> StepPolicy:
        if not self.caches:
            return FixedPolicy(self.config.step_schedule())
        return build_policy(self.config, context, self.calibration)

    def _context_for_call(self) -> CacheContext:
        if not self.caches or self.config.cfg == "batch":
            name = ""
        else:
            t = self.current_t
            last, count = self._stream
            count = count + 1 if t == last else 0
            self._stream = (t, count)
            name = str(count % 2)
        ctx = self.contexts.get(name)
        if ctx is None:
            ctx = self.contexts[name] = CacheContext(name, self.policy if name == "" else self._new_policy(name))
        return ctx

    # ---------------------------------------------------------------- variants
    def _context_inputs(self, gm: GraphModule) -> dict[str, Node]:
        """Placeholders for the method's cross-step inputs (after the existing ones, before random inputs)."""
        return {name: add_input(gm.graph, f"{_PREFIX}{name}", self.eps_like) for name in self.token_method.context_inputs}

    def _cut_description(self) -> str:
        return self.cut.describe() if self.cut is not None else "none (no feature caching)"

    def _build(self, kind: str) -> tuple[GraphModule, GraphReport, list, list[str]]:
        config = self.token_config
        if not self.caches:  # a phase variant: the whole graph, pruned as the phase's config says
            gm = copy_graph_module(self.base)
            config = self.config.phase_config(kind)
        elif kind == "probe":
            gm = probe_graph(self.base, self.probe)
        elif kind == "full":
            gm = full_graph(self.base, self.cut)
            if self.order:
                add_factor_update(gm, self.cut, self.order)
        else:
            gm, _ = shallow_graph(self.base, self.cut)
            if self.order:
                add_forecast(gm, self.order)
        if self.probe is not None and kind != "probe":
            gm = remainder_graph(gm, self.probe)
        context = self._context_inputs(gm)
        warn = kind == self.first_kind and self.probe is None
        result = prune_graph(gm, config, self.token_method, context=context, finest_tokens=self.finest_tokens,
                             warn_unpruned=warn)
        if kind == "probe":
            add_probe_signal(gm, self.probe)
        elif context and not result.changed:  # nothing reads the state inputs: keep them (callers pass them)
            gm.recompile()
        if self.probe is not None and kind == "full" and not result.changed and \
                not self.variants[("probe", self.config.ratio)].report.pruned and \
                self.token_method.unchanged_reason(config) is None:
            log.warning("graphprune[%s]: nothing pruned in the probe or the full remainder", config.method)
        self.record(result.report, kind)
        return gm, result.report, result.random_inputs, running_modules(gm)

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
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = [n.target for n in placeholders[self.n_user:]]
        examples = list(args) + [self._example(n) for n in placeholders[self.n_user:]]
        with stage(f"compile the {kind} variant ({self.config.compiler}) for {self.shape}"):
            fn = compile_inner(gm, examples, self.config)
        variant = Variant(kind=kind, gm=gm, fn=fn, feed=feed, report=report, modules=modules, inputs=inputs)
        self.variants[key] = variant
        log.info("graphprune[%s]: compiled the %s variant (%d of the graph's modules run)", self.config.method, kind,
                 len(modules))
        return variant

    def _example(self, node: Node) -> torch.Tensor:
        """Zeros shaped like a state or random input (example inputs for compiling)."""
        val = node_val(node)
        if val is None:
            raise RuntimeError(f"graphprune: graph input {node.target!r} carries no shape metadata")
        return torch.zeros(tuple(val.shape), dtype=val.dtype, device=self.device)

    def build_variants(self) -> None:
        """Build every variant the policy can use (with ``compiler="eager"`` this compiles nothing; used by
        ``graphprune.inspect`` to report the shallow graph before any shallow step ran)."""
        if self.config.compiler != "eager":
            raise RuntimeError("build_variants needs example inputs for a real compiler; use compiler='eager'")
        if not self.caches:
            for kind in ("early", "late"):
                self._variant(kind, [])
            return
        kinds = getattr(self.schedule, "kinds", None)
        if kinds is None or "shallow" in kinds:
            self._variant("shallow", [])

    def _inputs(self, variant: Variant, ctx: CacheContext, probe_out: tuple[Any, ...] = ()) -> list[Any]:
        """The tensors a variant takes after the user's inputs, by name (see the module docstring)."""
        state = ctx.state
        rand = iter(variant.feed.draw()) if variant.feed else iter(())
        out: list[Any] = []
        for name in variant.inputs:
            key = name[len(_PREFIX):]
            if key.startswith("random_"):
                out.append(next(rand))
            elif key == "cache":
                out.append(state.cache)
            elif key.startswith("probe_") and key != "probe_ref":
                out.append(probe_out[int(key[len("probe_"):])])
            elif key == "probe_ref":
                out.append(state.probe_ref if state.probe_ref is not None else self._zeros(variant, name))
            elif key == "taylor_coeffs":
                out.append(self._taylor_coeffs(ctx, variant, name))
            elif key == "taylor_inv_delta":
                delta = ctx.step - state.last_full if state.last_full is not None else 0
                out.append(torch.tensor(1.0 / delta if delta else 0.0, dtype=self.eps_like.dtype,
                                        device=self.device))
            elif key.startswith("taylor_prev_"):
                j = int(key[len("taylor_prev_"):])
                have = state.cache if j == 0 else state.taylor[j - 1] if len(state.taylor) >= j else None
                out.append(have if have is not None else self._zeros(variant, name))
            elif key.startswith("taylor_"):
                j = int(key[len("taylor_"):])
                out.append(state.taylor[j - 1] if len(state.taylor) >= j else self._zeros(variant, name))
            elif key in self.token_method.context_inputs:
                prev = state.eps[0] if state.eps else self._zeros(variant, name)
                prev2 = state.eps[1] if len(state.eps) > 1 else prev  # d = 0 until two predictions exist
                out.append(prev if key == self.token_method.context_inputs[0] else prev2)
            else:
                raise RuntimeError(f"graphprune: no state provides the graph input {name!r}")
        return out

    def _zeros(self, variant: Variant, name: str) -> torch.Tensor:
        node = next(n for n in variant.gm.graph.nodes if n.op == "placeholder" and n.target == name)
        return self._example(node)

    def _taylor_coeffs(self, ctx: CacheContext, variant: Variant, name: str) -> torch.Tensor:
        """(order,): k^j / j! for the factors known so far (min(order, full steps - 1) of them), 0 for the rest;
        k = calls since the last full step (TaylorSeer's Taylor formula in the step index)."""
        state, order = ctx.state, self.order
        known = min(order, max(state.fulls - 1, 0))
        k = ctx.step - state.last_full
        coeffs = [k ** j / math.factorial(j) if j <= known else 0.0 for j in range(1, order + 1)]
        return torch.tensor(coeffs, dtype=self._zeros(variant, name).dtype, device=self.device)

    # ---------------------------------------------------------------- stepping
    def end_generation(self) -> None:
        for ctx in self.contexts.values():
            length = ctx.policy.length
            if length is not None and ctx.step != length:
                log.warning("graphprune[%s]: the generation made %d UNet calls%s but policy %r covers %d; check "
                            "num_steps", self.config.method, ctx.step,
                            f" in cache context {ctx.name!r}" if ctx.name else "", ctx.policy.describe(), length)

    def reset_state(self) -> None:
        if any(ctx.records for ctx in self.contexts.values()):
            self.previous_records = [r for ctx in self.contexts.values() for r in ctx.records]
        self.contexts = {}
        self.policy.reset()
        self._stream = (None, 0)
        for variant in self.variants.values():  # every generation draws the same random inputs: reproducible
            if variant.feed is not None:
                variant.feed.reseed()

    def _available(self, state: StepState) -> frozenset[str] | None:
        if not self.caches:
            return None
        return frozenset(["full"] + (["shallow"] if state.cache is not None else [])
                         + (["reuse"] if state.outputs is not None else []))

    def next_kind(self) -> str | None:
        """The kind the next call of the (first) cache context will run. Fixed and MagCache policies decide without
        run-time data; first-block needs the call's probe scalar, so its answer here is None."""
        ctx = self.contexts.get(next(iter(self.contexts), ""))
        state, step = (ctx.state, ctx.step) if ctx is not None else (StepState(), 0)
        if self.policy.uses_probe:
            return None
        return self.policy.decide(step, self._available(state)).kind

    def _keep(self, t: Any) -> Any:
        return t.clone() if self._copy_state and isinstance(t, torch.Tensor) else t

    def run_step(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], str]:
        ctx = self._context_for_call()
        state = ctx.state
        probe_out: tuple[Any, ...] = ()
        signal = None
        if self.probe is not None:
            variant = self._variant("probe", args)
            variant.calls += 1
            result = variant.fn(*args, *self._inputs(variant, ctx))
            probe_out, signal_t = tuple(result[:-1]), result[-1]
            if state.probe_ref is not None:
                signal = float(signal_t.detach())  # the one host read of the step (outside every graph)
        record = ctx.policy.decide(ctx.step, self._available(state), signal, ctx.name)
        kind = record.kind
        if kind == "reuse":
            outputs = state.outputs
            eps = state.eps[0] if state.eps else None
        else:
            variant = self._variant(kind, args)
            variant.calls += 1
            result = variant.fn(*args, *self._inputs(variant, ctx, probe_out))
            outputs = tuple(self._keep(o) for o in result[: self.n_outputs])
            if kind == "full" and self.caches:
                state.cache = self._keep(result[self.n_outputs])
                if self.order:
                    state.taylor = [self._keep(f) for f in result[self.n_outputs + 1: self.n_outputs + 1 + self.order]]
                if self.probe is not None:
                    state.probe_ref = self._keep(probe_out[self.probe.output_index])
                state.last_full = ctx.step
                state.fulls += 1
            eps = outputs[0]
        if self.token_method.context_inputs:
            state.eps = [eps] + state.eps[:1]
        state.outputs = outputs
        ctx.records.append(record)
        ctx.step += 1
        for observer in self.observers:
            observer(ctx, record, state)
        return outputs, kind

    # ---------------------------------------------------------------- reporting
    @property
    def graphprune_graph(self) -> GraphModule:
        """The first variant's rewritten graph (full; AT-EDM: early) (for tests and debugging, like the stateless
        backend's)."""
        return self.variants[(self.first_kind, self.config.ratio)].gm

    @property
    def records(self) -> list[StepRecord]:
        """The policy's record of every call of the current generation (of the previous one before the first call
        of a new generation), contexts in order of first use."""
        current = [r for ctx in self.contexts.values() for r in ctx.records]
        return current or self.previous_records

    def state_tensors(self) -> Iterable[Any]:
        for ctx in self.contexts.values():
            s = ctx.state
            yield from [s.cache, *(s.outputs or ()), *s.eps, *s.taylor, s.probe_ref]

    def carried_bytes_per_context(self) -> int:
        """Bytes of the cross-step tensors one cache context carries between calls once every state exists (the
        cached feature, Taylor factors, the probe reference, the method's previous predictions), from the compiled
        variants' graph inputs: known before any call (``inspect``'s dry run), unlike :meth:`state_bytes`."""
        sizes: dict[str, int] = {}
        for variant in self.variants.values():
            for node in variant.gm.graph.nodes:
                key = str(node.target)[len(_PREFIX):] if node.op == "placeholder" else ""
                carried = key in ("cache", "probe_ref") or key in self.token_method.context_inputs or (
                    key.startswith("taylor_") and key[len("taylor_"):].isdigit())
                val = node_val(node) if carried else None
                if val is not None:
                    sizes[key] = val.numel() * val.element_size()
        return sum(sizes.values())

    def describe_extra(self) -> dict[str, Any]:
        """Policy, cut, the compiled variants and the record of steps, as plain data."""
        records = self.records
        return {"schedule": self.policy.describe(), "policy": self.policy.name,
                "carried_bytes_per_context": self.carried_bytes_per_context(),
                "forecast": f"taylor(order={self.order})" if self.order is not None else "none",
                "cfg": getattr(self.config, "cfg", "batch"),
                "cut": dataclasses.asdict(self.cut) if self.cut else None,
                "cut_description": self._cut_description(),
                "probe": self.probe.describe() if self.probe else None,
                "variants": [v.describe() for v in self.variants.values()], "max_variants": self.config.max_variants,
                "steps": [dataclasses.asdict(r) for r in records],
                "steps_table": format_records(records) if records and self.caches else ""}

    def __str__(self) -> str:
        d = self.describe()
        lines = [f"graphprune[{d['method']}] runtime: {d['schedule']}; forecast {d['forecast']}; cut at "
                 f"{d['cut_description']}; generation {d['generation']}, step {d['step']}; state held: "
                 f"{d['state_bytes'] / 2**20:.2f} MiB ({d['carried_bytes_per_context'] / 2**20:.2f} MiB per cache "
                 f"context once running)"]
        if d["probe"]:
            lines.append(f"  probe: {d['probe']}")
        for v in d["variants"]:
            lines.append(f"  variant {v['kind']:<8} calls={v['calls']:<4} ops={v['ops']:<5} "
                         f"pruned sites={v['pruned_sites']} budgets(N->K)={v['budgets']} modules={len(v['modules'])}")
        if d["steps_table"]:
            lines.append(d["steps_table"])
        return "\n".join(lines)


__all__ = ["StepRuntime", "Variant", "StepState", "CacheContext"]
