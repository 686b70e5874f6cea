"""CA-ToMe's cache of matches across denoising steps, with static shapes (entry point: :class:`MatchCacheRuntime`).

The backend returns this runtime for ``method="catome"``. Per UNet call it

* detects generations like :class:`~graphprune.runtime.StepRuntime` (a rising timestep starts a new one; every
  piece of state is dropped, and call 0 always recomputes the match: the official cache leaks across images);
* at a *refresh* call (``config.refresh``), runs a graph that computes every site's match and returns it as extra
  outputs (offsets, rank order, best destinations, merge decisions, counts); at the other calls, runs a graph that
  takes those tensors as inputs and skips the similarity matmul, the sort and the random draw;
* ``exact=True``: reads each site's merge count r to the host at refresh calls only (the official code syncs there
  too) and picks the variant compiled for the largest budget buckets <= r (one bucket per level or per site), inside
  which the merges above the bucket are applied by masking: outputs equal the official code. A refresh call runs
  the window's buckets speculatively and is rerun with buckets 0 if some site's r fell below its bucket (counted in
  ``describe()["reruns"]``); call 0 always uses buckets 0. At most ``max_variants`` graphs are compiled; beyond that
  the best compiled variant that is still exact is used.
* ``exact=False``: one graph for every call, with a fixed count per site and a refresh flag input; no host read.

Offsets come from graphprune's own generator, reseeded at each generation, drawn once per refresh call.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.fx import GraphModule

from ..config import PruneConfig
from ..inner import compile_inner
from ..methods.base import SiteGeometry, StateSpec, TokenMethod
from ..methods.refresh import RefreshSchedule, build_refresh
from ..passes.cut import copy_graph_module
from ..passes.ops import node_val
from ..passes.rewrite import prune_graph
from ..progress import stage
from ..report import GraphReport
from .base import Runtime

log = logging.getLogger(__name__)

Buckets = tuple[int, ...]


@dataclass
class MatchVariant:
    """One compiled graph: its kind (``refresh``/``cached``/``fixed``), per-site buckets and calling convention."""

    kind: str
    buckets: Buckets
    gm: GraphModule
    fn: Callable[..., Any]
    extra: list[str]  # names of the inputs after the user's: graphprune_state_<i>_<j>, graphprune_refresh, random
    report: GraphReport
    calls: int = 0

    def describe(self) -> dict[str, Any]:
        pruned = [s for s in self.report.pruned if s.kind == "self"]
        return {"kind": self.kind, "buckets": list(self.buckets), "calls": self.calls,
                "ops": sum(1 for n in self.gm.graph.nodes if n.op == "call_function"),
                "pruned_sites": len(pruned), "budgets": [(s.module_path, s.N, s.K) for s in pruned]}


class MatchCacheRuntime(Runtime):
    """The callable the backend returns for methods whose plans are carried across steps (``method="catome"``; see
    the module docstring). The method provides the state (:meth:`~graphprune.methods.base.TokenMethod.state_specs`,
    one spec named by its ``count_state`` holds [r the buckets may rely on, merged tokens]) and its budget buckets
    (``bucket_for``, ``fixed_bucket``)."""

    name = "match-cache"

    def __init__(self, gm: GraphModule, example_inputs: list[Any], config: PruneConfig, method: TokenMethod,
                 reports: list[GraphReport] | None = None, all_reports: Any = None, register: bool = True,
                 shape: str | None = None):
        super().__init__(gm, example_inputs, config, method, reports, all_reports, register, shape)
        self.refresh: RefreshSchedule = build_refresh(config.refresh)
        self.variants: dict[tuple[str, Buckets], MatchVariant] = {}
        # inspect builds runtimes on the meta device, which has no generator (and never draws)
        self.generator = torch.Generator(device=self.device if self.device.type != "meta" else "cpu")
        self.state_specs: list[tuple[StateSpec, ...]] = []
        self.random_specs: list = []
        # sites and their geometry, from the refresh graph with buckets 0 (compiled now: errors surface here)
        first = self._variant("refresh" if config.exact else "fixed", None, example_inputs)
        self.sites = [(s.module_path, SiteGeometry(B=0, N=s.N, C=s.C or 0, H=s.grid[0], W=s.grid[1], level=s.level))
                      for s in first.report.pruned if s.kind == "self"]
        self.zero: Buckets = tuple(0 for _ in self.sites)
        self.stats = {"refresh_calls": 0, "cached_calls": 0, "reruns": 0, "refresh_seconds": 0.0,
                      "cached_seconds": 0.0, "merged_fraction": []}
        self.call_keys: list[tuple[str, Buckets]] = []  # the variant every graph run of this generation used
        self.previous_call_keys: list[tuple[str, Buckets]] = []
        self.reset_state()
        log.info("graphprune[%s]: T=%g, %s, %d site(s), exact=%s", config.method, config.threshold,
                 self.refresh.describe(), len(self.sites), config.exact)

    def _counts_of(self, state: list[torch.Tensor], specs: list[tuple[StateSpec, ...]]) -> list[torch.Tensor]:
        """Each site's ``count_state`` tensor (found by name in its specs) from the flat carried state."""
        out, offset = [], 0
        for site_specs in specs:
            names = [spec.name for spec in site_specs]
            out.append(state[offset + names.index(self.method.count_state)])
            offset += len(site_specs)
        return out

    # ---------------------------------------------------------------- variants
    def _fixed_buckets(self, examples: list[Any], gm_sites: list[tuple[str, SiteGeometry]]) -> Buckets:
        """exact=False: each site's fixed merge count: ``fixed_ratio`` of N, or calibrated from T by running the
        exact refresh graph eagerly on the first call's inputs."""
        cfg = self.config
        if cfg.fixed_ratio is not None:
            return tuple(self.method.fixed_bucket(cfg, g) for _, g in gm_sites)
        if self.device.type == "meta":  # inspect traces on the meta device: there is no data to calibrate on
            log.info("graphprune[%s]: exact=False calibrates its counts on the first real call; reported with "
                     "buckets 0", cfg.method)
            return tuple(0 for _ in gm_sites)
        exact_cfg = dataclasses.replace(cfg, exact=True, compiler="eager", mode=None)
        gm = copy_graph_module(self.base)
        result = prune_graph(gm, exact_cfg, self.method, state_mode="produce", warn_unpruned=False)
        rand = [torch.zeros(s.shape, dtype=torch.int64, device=d) for s, d in result.random_inputs]
        with torch.no_grad():
            out = gm(*examples, *rand)
        specs = [site_specs for _, site_specs in result.state_sites]
        counts = [int(t[0]) for t in self._counts_of(list(out[self.n_outputs:]), specs)]  # the r T allows
        log.info("graphprune[%s]: exact=False calibrated from T=%g on the first call: r per site %s",
                 cfg.method, cfg.threshold, counts)
        return tuple(counts)

    def _build(self, kind: str, buckets: Buckets | None, examples: list[Any] | None) -> MatchVariant:
        gm = copy_graph_module(self.base)
        mode = {"refresh": "produce", "cached": "consume", "fixed": "select"}[kind]
        site_buckets = dict(zip((p for p, _ in self.sites), buckets)) if buckets is not None else {}
        if kind == "fixed" and buckets is None:  # find the sites first (bucket 0), then fix their counts
            probe = copy_graph_module(self.base)
            res = prune_graph(probe, self.config, self.method, state_mode="select", warn_unpruned=False)
            sites = [(s.module_path, SiteGeometry(B=0, N=s.N, C=0, H=s.grid[0], W=s.grid[1]))
                     for s in res.report.pruned if s.kind == "self"]
            buckets = self._fixed_buckets(list(examples or []), sites)
            site_buckets = dict(zip((p for p, _ in sites), buckets))
        result = prune_graph(gm, self.config, self.method, state_mode=mode, site_buckets=site_buckets,
                             warn_unpruned=buckets is None)
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        extra = placeholders[self.n_user:]
        if buckets is None:
            buckets = tuple(0 for _ in result.state_sites)
        self.record(result.report, f"{kind} buckets={list(buckets)}")
        if result.random_inputs:
            self.random_specs = result.random_inputs
        self.state_specs = [specs for _, specs in result.state_sites]
        ex = list(examples) if examples is not None else None
        if ex is None:
            raise RuntimeError("internal: a variant needs example inputs to compile")
        with stage(f"compile the {kind} variant ({self.config.compiler}) for {self.shape}"):
            fn = compile_inner(gm, ex + [self._example(name, gm) for name in extra], self.config)
        return MatchVariant(kind=kind, buckets=tuple(buckets), gm=gm, fn=fn, extra=extra, report=result.report)

    @staticmethod
    def _example(name: str, gm: GraphModule) -> torch.Tensor:
        node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)
        val = node_val(node)
        return torch.zeros(val.shape, dtype=val.dtype, device=val.device)

    def _variant(self, kind: str, buckets: Buckets | None, args: Any) -> MatchVariant:
        """The compiled variant of ``kind`` for ``buckets`` (None: buckets 0, or the fixed counts), built on demand."""
        if kind == "fixed":
            buckets = None
        elif buckets is not None and (kind, buckets) not in self.variants:
            buckets = self._affordable(kind, buckets)
        key = (kind, buckets if buckets is not None else ())
        variant = self.variants.get(key)
        if variant is None:
            variant = self._build(kind, buckets, list(args))
            self.variants[(kind, variant.buckets if kind != "fixed" else ())] = variant
            log.info("graphprune[%s]: compiled the %s variant with buckets %s", self.config.method, kind,
                     list(variant.buckets))
        return variant

    def _affordable(self, kind: str, wanted: Buckets) -> Buckets:
        """``wanted`` if it is compiled or may be; else the compiled variant of this kind with the most merges whose
        buckets are all <= ``wanted`` (still exact)."""
        if (kind, wanted) in self.variants or len(self.variants) < self.config.max_variants:
            return wanted
        fits = [b for (k, b) in self.variants if k == kind and all(x <= w for x, w in zip(b, wanted))]
        if not fits:
            if kind == "refresh":
                return self.zero
            raise RuntimeError(f"graphprune[{self.config.method}]: max_variants={self.config.max_variants} graphs are compiled "
                               f"and none fits buckets {list(wanted)}; raise max_variants or use fewer buckets")
        return max(fits, key=sum)

    def _choose(self, safe: list[int]) -> Buckets:
        """Per-site merge counts r the data allows -> per-site buckets (grouped by level unless bucket_scope='site')."""
        per_site = [self.method.bucket_for(self.config, g, r) for (_, g), r in zip(self.sites, safe)]
        if self.config.bucket_scope == "site":
            return tuple(per_site)
        # a level's bucket: the largest fraction every site of the level allows
        frac: dict[int, float] = {}
        for (_, g), b in zip(self.sites, per_site):
            frac[g.level] = min(frac.get(g.level, 1.0), b / g.N)
        return tuple(self.method.bucket_for(self.config, g, int(round(frac[g.level] * g.N))) for _, g in self.sites)

    # ---------------------------------------------------------------- stepping
    def end_generation(self) -> None:
        self.previous_call_keys = self.call_keys

    def reset_state(self) -> None:
        """Forget the cached matches; the next call is call 0 (a refresh) of a new generation."""
        self.call_keys = []
        self.state: list[torch.Tensor] | None = None
        self.window: Buckets = self.zero
        self.rand: list[torch.Tensor] = []
        self.generator.manual_seed(self.config.seed)

    def _draw(self) -> list[torch.Tensor]:
        return [torch.randint(spec.high, spec.shape, generator=self.generator, device=self.device).to(device)
                for spec, device in self.random_specs]

    def _run(self, variant: MatchVariant, args: tuple[Any, ...], flag: bool | None = None) -> tuple[Any, ...]:
        extra = self.extra_inputs(variant, flag)
        variant.calls += 1
        self.call_keys.append((variant.kind, variant.buckets))
        return tuple(variant.fn(*args, *extra))

    def extra_inputs(self, variant: MatchVariant, flag: bool | None = None) -> list[torch.Tensor]:
        """The inputs ``variant`` takes after the graph's own: the carried state, the refresh flag, the offsets."""
        named: dict[str, torch.Tensor] = {}
        if self.state is not None:
            n = 0
            for i, specs in enumerate(self.state_specs):
                for j in range(len(specs)):
                    named[f"graphprune_state_{i}_{j}"] = self.state[n]
                    n += 1
        for k, r in enumerate(self.rand):
            named[f"graphprune_random_{k}"] = r
        if flag is not None:
            named["graphprune_refresh"] = torch.tensor(flag, device=self.device)
        return [named[name] if name in named else self._example(name, variant.gm) for name in variant.extra]

    def run_step(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], str]:
        refresh = self.state is None or self.refresh.is_refresh(self.step)
        start = time.perf_counter()
        if not self.config.exact:
            if refresh:
                self.rand = self._draw()
            out = self._run(self._variant("fixed", None, args), args, flag=refresh)
            self.state = list(out[self.n_outputs:])
        elif refresh:
            self.rand = self._draw()
            out, safe = self._refresh(self.window if self.step > 0 else self.zero, args)
            self.window = self._choose(safe)
        else:
            out = self._run(self._variant("cached", self.window, args), args)
        key = "refresh" if refresh else "cached"
        self.stats[f"{key}_calls"] += 1
        self.stats[f"{key}_seconds"] += time.perf_counter() - start
        return out[: self.n_outputs], key

    def _refresh(self, buckets: Buckets, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], list[int]]:
        """Run a refresh call speculatively with ``buckets``; rerun with buckets 0 if a site's r fell below."""
        variant = self._variant("refresh", buckets, args)
        out = self._run(variant, args)
        stats = self._counts(out)
        safe = [int(s[0]) for s in stats]
        if any(r < b for r, b in zip(safe, variant.buckets)):
            self.stats["reruns"] += 1
            log.debug("graphprune[%s]: refresh at call %d with buckets %s but r=%s: rerun with buckets 0",
                      self.config.method, self.step, list(variant.buckets), safe)
            out = self._run(self._variant("refresh", self.zero, args), args)
            stats = self._counts(out)
            safe = [int(s[0]) for s in stats]
        self.state = list(out[self.n_outputs:])
        B = out[0].shape[0] if isinstance(out[0], torch.Tensor) else 1
        self.stats["merged_fraction"].append([s[1] / (B * g.N) for s, (_, g) in zip(stats, self.sites)])
        return out, safe

    def _counts(self, out: tuple[Any, ...]) -> list[list[int]]:
        """[r the buckets may rely on, merged tokens over the batch] per site: the one host read of a refresh."""
        stats = self._counts_of(list(out[self.n_outputs:]), self.state_specs)
        return torch.stack(stats).tolist() if stats else []

    # ---------------------------------------------------------------- reporting
    @property
    def graphprune_graph(self) -> GraphModule:
        """The first compiled variant's rewritten graph (for tests and debugging)."""
        return next(iter(self.variants.values())).gm

    def mean_merged_fraction(self) -> float | None:
        """Mean over refresh calls and sites of the merged fraction of tokens (None before any refresh)."""
        rows = self.stats["merged_fraction"]
        return sum(sum(r) / len(r) for r in rows) / len(rows) if rows and self.sites else None

    def state_tensors(self) -> Iterable[Any]:
        return self.state or ()

    def describe_extra(self) -> dict[str, Any]:
        stats = {k: v for k, v in self.stats.items() if k != "merged_fraction"}
        return {"schedule": self.refresh.describe(), "cut_description": "none (the match is cached, not a feature)",
                "window_buckets": list(self.window), "sites": [(p, g.N) for p, g in self.sites],
                "variants": [v.describe() for v in self.variants.values()], "max_variants": self.config.max_variants,
                "mean_merged_fraction": self.mean_merged_fraction(), **stats}

    def __str__(self) -> str:
        d = self.describe()
        lines = [f"graphprune[{d['method']}] runtime: T={self.config.threshold:g}, {d['schedule']}; generation "
                 f"{d['generation']}, call {d['step']}; {d['refresh_calls']} refresh / {d['cached_calls']} cached "
                 f"calls, {d['reruns']} rerun(s); state held {d['state_bytes'] / 2**20:.2f} MiB"]
        for v in d["variants"]:
            lines.append(f"  variant {v['kind']:<8} buckets={v['buckets']} calls={v['calls']} ops={v['ops']}")
        return "\n".join(lines)

__all__ = ["MatchCacheRuntime", "MatchVariant"]
