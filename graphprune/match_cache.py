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

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from .config import CaToMeConfig, config_to_dict
from .inner import compile_inner
from .methods.base import SiteGeometry, TokenMethod, method_for
from .methods.catome import bucket_for, site_counts
from .passes.cut import copy_graph_module, find_timestep_input
from .passes.ops import node_val
from .passes.rewrite import prune_graph
from .refresh import RefreshSchedule, build_refresh
from .report import GraphReport
from .runtime import _RUNTIMES

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


class MatchCacheRuntime:
    """The callable the backend returns for ``method="catome"`` (see the module docstring)."""

    def __init__(self, gm: GraphModule, example_inputs: list[Any], config: CaToMeConfig,
                 reports: list[GraphReport] | None = None, all_reports: Any = None, register: bool = True):
        self.config = config
        self.refresh: RefreshSchedule = build_refresh(config.refresh)
        self.method: TokenMethod = method_for(config)
        self._sinks = [r for r in (reports, all_reports) if r is not None]
        self.base = gm
        t_index = find_timestep_input(gm.graph)
        if t_index is None:
            raise ValueError("method 'catome' caches matches across denoising steps, but the traced graph has no "
                             "timestep input: pass the timestep as a tensor (diffusers pipelines do)")
        self.t_index = t_index
        self.n_user = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = output.args[0]
        self.n_outputs = len(outs) if isinstance(outs, (list, tuple)) else 1
        self.variants: dict[tuple[str, Buckets], MatchVariant] = {}
        self._keys = {t.data_ptr() for t in example_inputs if isinstance(t, torch.Tensor) and t.numel() > 1}
        self.device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        self.generator = torch.Generator(device=self.device)
        # sites and their geometry, from the refresh graph with buckets 0 (compiled now: errors surface here)
        first = self._variant("refresh" if config.exact else "fixed", None, example_inputs)
        self.sites = [(s.module_path, SiteGeometry(B=0, N=s.N, C=s.C or 0, H=s.grid[0], W=s.grid[1], level=s.level))
                      for s in first.report.pruned if s.kind == "self"]
        self.zero: Buckets = tuple(0 for _ in self.sites)
        self.stats = {"refresh_calls": 0, "cached_calls": 0, "reruns": 0, "refresh_seconds": 0.0,
                      "cached_seconds": 0.0, "merged_fraction": []}
        self.generation = 0
        self.previous_call_keys: list[tuple[str, Buckets]] = []
        self.previous_kinds: list[str] = []
        if register:
            _RUNTIMES.add(self)
        self.reset(reason="new runtime")
        log.info("graphprune[catome]: T=%g, %s, %d site(s), exact=%s", config.threshold, self.refresh.describe(),
                 len(self.sites), config.exact)

    # ---------------------------------------------------------------- variants
    def _fixed_buckets(self, examples: list[Any], gm_sites: list[tuple[str, SiteGeometry]]) -> Buckets:
        """exact=False: each site's fixed merge count: ``fixed_ratio`` of N, or calibrated from T by running the
        exact refresh graph eagerly on the first call's inputs."""
        cfg = self.config
        if cfg.fixed_ratio is not None:
            return tuple(min(int(g.N * cfg.fixed_ratio), site_counts(cfg, g)[2]) for _, g in gm_sites)
        import dataclasses

        exact_cfg = dataclasses.replace(cfg, exact=True, compiler="eager", mode=None)
        gm = copy_graph_module(self.base)
        result = prune_graph(gm, exact_cfg, self.method, state_mode="produce", warn_unpruned=False)
        rand = [torch.zeros(s.shape, dtype=torch.int64, device=d) for s, d in result.random_inputs]
        with torch.no_grad():
            out = gm(*examples, *rand)
        counts = [int(t[0]) for t in out[self.n_outputs:][4::5]]  # stats[0] of each site: the r T allows
        log.info("graphprune[catome]: exact=False calibrated from T=%g on the first call: r per site %s",
                 cfg.threshold, counts)
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
        for sink in self._sinks:
            sink.append(result.report)
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        extra = placeholders[self.n_user:]
        if buckets is None:
            buckets = tuple(0 for _ in result.state_sites)
        self.random_specs = result.random_inputs or getattr(self, "random_specs", [])
        self.state_specs = [specs for _, specs in result.state_sites]
        ex = list(examples) if examples is not None else None
        if ex is None:
            raise RuntimeError("internal: a variant needs example inputs to compile")
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
            log.info("graphprune[catome]: compiled the %s variant with buckets %s", kind, list(variant.buckets))
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
            raise RuntimeError(f"graphprune[catome]: max_variants={self.config.max_variants} graphs are compiled "
                               f"and none fits buckets {list(wanted)}; raise max_variants or use fewer buckets")
        return max(fits, key=sum)

    def _choose(self, safe: list[int]) -> Buckets:
        """Per-site merge counts r the data allows -> per-site buckets (grouped by level unless bucket_scope='site')."""
        per_site = [bucket_for(self.config, g, r) for (_, g), r in zip(self.sites, safe)]
        if self.config.bucket_scope == "site":
            return tuple(per_site)
        # a level's bucket: the largest fraction every site of the level allows
        frac: dict[int, float] = {}
        for (_, g), b in zip(self.sites, per_site):
            frac[g.level] = min(frac.get(g.level, 1.0), b / g.N)
        return tuple(bucket_for(self.config, g, int(round(frac[g.level] * g.N))) for _, g in self.sites)

    # ---------------------------------------------------------------- stepping
    def reset(self, reason: str = "explicit") -> None:
        """Forget the cached matches; the next call is call 0 (a refresh) of a new generation."""
        if getattr(self, "step", 0):
            self.generation += 1
            self.previous_call_keys = self.call_keys
            self.previous_kinds = self.kinds
        self.call_keys: list[tuple[str, Buckets]] = []  # the variant every graph run of this generation used
        self.step = 0
        self.last_t: float | None = None
        self.state: list[torch.Tensor] | None = None
        self.window: Buckets = self.zero
        self.rand: list[torch.Tensor] = []
        self.kinds: list[str] = []
        self.generator.manual_seed(self.config.seed)
        log.debug("graphprune[catome]: state reset (%s)", reason)

    def _timestep(self, args: tuple[Any, ...]) -> float:
        t = args[self.t_index]
        return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)

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

    def __call__(self, *args: Any) -> Any:
        t = self._timestep(args)
        if self.last_t is not None and t > self.last_t:
            self.reset(reason=f"timestep rose from {self.last_t:g} to {t:g}")
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
        self.kinds.append(key)
        self.last_t = t
        self.step += 1
        return out[: self.n_outputs]

    def _refresh(self, buckets: Buckets, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], list[int]]:
        """Run a refresh call speculatively with ``buckets``; rerun with buckets 0 if a site's r fell below."""
        variant = self._variant("refresh", buckets, args)
        out = self._run(variant, args)
        stats = self._counts(out)
        safe = [int(s[0]) for s in stats]
        if any(r < b for r, b in zip(safe, variant.buckets)):
            self.stats["reruns"] += 1
            log.debug("graphprune[catome]: refresh at call %d with buckets %s but r=%s: rerun with buckets 0",
                      self.step, list(variant.buckets), safe)
            out = self._run(self._variant("refresh", self.zero, args), args)
            stats = self._counts(out)
            safe = [int(s[0]) for s in stats]
        self.state = list(out[self.n_outputs:])
        B = out[0].shape[0] if isinstance(out[0], torch.Tensor) else 1
        self.stats["merged_fraction"].append([s[1] / (B * g.N) for s, (_, g) in zip(stats, self.sites)])
        return out, safe

    def _counts(self, out: tuple[Any, ...]) -> list[list[int]]:
        """[r the buckets may rely on, merged tokens over the batch] per site: the one host read of a refresh."""
        stats = list(out[self.n_outputs:][4::5])
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

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state or ())

    def describe(self) -> dict[str, Any]:
        stats = {k: v for k, v in self.stats.items() if k != "merged_fraction"}
        return {"method": "catome", "config": config_to_dict(self.config), "schedule": self.refresh.describe(),
                "cut_description": "none (the match is cached, not a feature)", "generation": self.generation,
                "step": self.step, "window_buckets": list(self.window),
                "sites": [(p, g.N) for p, g in self.sites], "variants": [v.describe() for v in self.variants.values()],
                "max_variants": self.config.max_variants, "state_bytes": self.state_bytes(),
                "mean_merged_fraction": self.mean_merged_fraction(), **stats}

    def __str__(self) -> str:
        d = self.describe()
        lines = [f"graphprune[catome] runtime: T={self.config.threshold:g}, {d['schedule']}; generation "
                 f"{d['generation']}, call {d['step']}; {d['refresh_calls']} refresh / {d['cached_calls']} cached "
                 f"calls, {d['reruns']} rerun(s); state held {d['state_bytes'] / 2**20:.2f} MiB"]
        for v in d["variants"]:
            lines.append(f"  variant {v['kind']:<8} buckets={v['buckets']} calls={v['calls']} ops={v['ops']}")
        return "\n".join(lines)

    def owns(self, tensors: Any) -> bool:
        return any(t.data_ptr() in self._keys for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 1)


__all__ = ["MatchCacheRuntime", "MatchVariant"]
