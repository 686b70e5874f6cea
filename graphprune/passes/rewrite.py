"""Splice prune -> attend -> recover around matched sites (entry point: :func:`prune_graph`).

For each self-attention site that the config selects, the pass inserts

    plan  = method.plan(metric, *random_inputs)          # once per transformer layer, before its attention
    x_K   = method.reduce(plan, x)                       # (B, N, C) -> (B, K, C)
    y_K   = canonical_attention(x_K, x_K, Wq, ..., Wo)   # rebuilt from what the matcher proved (heads, scale)
    y     = method.restore(plan, y_K)                    # (B, K, C) -> (B, N, C), replaces the out projection

and removes the original attention nodes. The attention is *rebuilt* in canonical form from the proved weights,
head count and scale, so no view/reshape integer of the original graph is patched. With ``scope`` including
``cross``, the cross-attention queries of the same layer are reduced with the same plan (keys/values from the
context are untouched); with ``ff``, the layer's feed-forward runs on the K tokens (only if every op in it is proved
token-wise). ``scope="block"`` hands every transformer stack to :mod:`.region`. K is a Python int fixed at trace
time. New nodes carry fake-tensor metadata.

Per site, three steps, each a function below: :func:`~.splice.gate` (is the site rewritten at all?),
:func:`insert_plan` (the plan node, with its random and state inputs) and the splice (:func:`splice_attention`,
:func:`splice_kv_attention`, :func:`splice_feedforward`).
"""

from __future__ import annotations

import logging
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch.fx import Graph, GraphModule, Node

from ..config import PruneConfig, config_to_dict
from ..methods.base import RandomSpec, SiteGeometry, SiteSkip, StateSpec, TokenMethod
from ..report import GraphReport, SiteReport
from .match import AttentionSite, downsample_levels, find_attention_sites, module_path
from .ops import node_val, not_tokenwise, real_users, tensor_shape
from .region import rewrite_regions
from .splice import Splicer, as_output_of, as_tokens, attention_call, gate, named, projection_weights, token_calls

log = logging.getLogger(__name__)

STATE_MODES = (None, "produce", "consume", "select")


@dataclass
class RewriteResult:
    """The report plus the random inputs the rewritten graph now takes (appended after its original inputs)."""

    report: GraphReport
    random_inputs: list[tuple[RandomSpec, torch.device]] = field(default_factory=list)
    changed: bool = False
    #: stateful methods: (module path, state specs) of every planned site, in the order of their state tensors
    #: (graph outputs after the original ones in "produce"/"select" mode; ``graphprune_state_<i>_<j>`` inputs in
    #: "consume"/"select" mode)
    state_sites: list[tuple[str, tuple[StateSpec, ...]]] = field(default_factory=list)


@dataclass
class _Pass:
    """What one :func:`prune_graph` run carries from site to site."""

    sp: Splicer
    config: PruneConfig
    method: TokenMethod
    result: RewriteResult
    context: dict[str, Node]
    state_mode: str | None
    site_buckets: Mapping[str, int]
    state_outputs: list[Node] = field(default_factory=list)
    refresh_flag: Node | None = None

    def random_placeholders(self, specs: tuple[RandomSpec, ...], device: torch.device) -> list[Node]:
        """New graph inputs ``graphprune_random_<i>`` for a plan's random tensors (recorded in the result)."""
        nodes = []
        for spec in specs:
            nodes.append(self.sp.placeholder(f"graphprune_random_{len(self.result.random_inputs)}", spec, device))
            self.result.random_inputs.append((spec, device))
        return nodes


# ---------------------------------------------------------------------------------------------------- the plan

def _plan_call(method: TokenMethod, config: PruneConfig, geo: SiteGeometry, state_mode: str | None
               ) -> Callable[..., Any]:
    """The plan function for one site: fresh (``plan``), rebuilt from state (``consume``), or ``select`` (a refresh
    flag picks the fresh match's state or the carried one: one graph for both kinds of step)."""
    name = f"graphprune_{method.name}_plan"
    if state_mode == "consume":
        return named(lambda *state: method.plan_from_state(config, geo, *state), name)
    if state_mode == "select":
        n = len(method.state_specs(config, geo))

        def select(flag, metric, *rest):
            fresh = method.state_of(config, geo, method.plan(config, geo, metric, *rest[n:]))
            chosen = [torch.where(flag, f, s) for f, s in zip(fresh, rest[:n])]
            return method.plan_from_state(config, geo, *chosen)

        return named(select, name)
    return named(lambda m, *r: method.plan(config, geo, m, *r), name)


def insert_plan(pw: _Pass, site: AttentionSite, geo: SiteGeometry) -> Node:
    """Insert the plan of ``site`` before its layer's first projection, with its random inputs, its carried-state
    inputs (``consume``/``select``) and its state outputs (``produce``/``select``). Returns the plan node."""
    sp, method, config, mode = pw.sp, pw.method, pw.config, pw.state_mode
    device = node_val(site.metric).device
    state_nodes: list[Node] = []
    if mode is not None:
        specs = method.state_specs(config, geo)
        if mode in ("consume", "select"):
            n_site = len(pw.result.state_sites)
            state_nodes = [sp.placeholder(f"graphprune_state_{n_site}_{j}", spec, device)
                           for j, spec in enumerate(specs)]
        if mode == "select" and pw.refresh_flag is None:
            pw.refresh_flag = sp.placeholder("graphprune_refresh", StateSpec("refresh", (), torch.bool), device)
        pw.result.state_sites.append((site.module_path, specs))
    rand_nodes = pw.random_placeholders(method.random_inputs(config, geo) if mode != "consume" else (), device)
    order = {n: k for k, n in enumerate(sp.graph.nodes)}
    first = min((site.q.linear, site.k.linear, site.v.linear), key=order.__getitem__)
    with sp.graph.inserting_before(first):  # dominates this layer's attention, cross-attention and FF
        metric = as_tokens(sp, site.metric, site.channels_first, site.x) if mode != "consume" else site.metric
        if mode == "consume":
            args: tuple[Any, ...] = tuple(state_nodes)
        elif mode == "select":
            args = (pw.refresh_flag, metric, *state_nodes, *rand_nodes)
        else:
            args = (metric, *[pw.context[name] for name in method.context_inputs], *rand_nodes)
        plan = sp.call(_plan_call(method, config, geo, mode), args, site.x)
        if mode in ("produce", "select"):
            carried = sp.call(named(lambda p, _geo=geo: tuple(method.state_of(config, _geo, p)),
                                    f"graphprune_{method.name}_state"), (plan,), site.x)
            pw.state_outputs += [sp.call(operator.getitem, (carried, j), site.x)
                                 for j in range(len(pw.result.state_sites[-1][1]))]
    return plan


# ---------------------------------------------------------------------------------------------------- the splices

def splice_attention(sp: Splicer, site: AttentionSite, plan: Node, method: TokenMethod, config: PruneConfig
                     ) -> None:
    """Replace one attention (self or cross) by reduce -> canonical attention -> restore (on tokens; a 1x1-conv site's
    channel-first input is flattened first and its output laid out as the conv's)."""
    reduce, restore = token_calls(method, config)
    out = site.out.linear
    with sp.graph.inserting_before(out):
        xk = sp.call(reduce, (plan, as_tokens(sp, site.x, site.channels_first, out)), out)
        kv = xk if site.kind == "self" else as_tokens(sp, site.context, site.k.conv, out)
        bias = ()
        if method.masks_keys and site.kind == "self" and method.uses_key_bias(config):  # CA-ToMe's optional merges
            bias = (sp.call(named(lambda p: method.key_bias(config, p), f"graphprune_{method.name}_key_bias"),
                            (plan,), out),)
        y = sp.call(attention_call(site), (xk, kv, *projection_weights(site), *bias), out)
        back = as_output_of(sp, sp.call(restore, (plan, y), out), site.out)
    out.replace_all_uses_with(back)
    sp.erase(site.internal | {out})


def splice_kv_attention(sp: Splicer, site: AttentionSite, plan: Node, method: TokenMethod, config: PruneConfig
                        ) -> None:
    """Rewrite form "kv": all N queries attend to keys/values projected from ``method.reduce`` of the attention
    input (B, M, C); the output keeps N tokens, so nothing is restored."""
    reduce, _ = token_calls(method, config)
    out = site.out.linear
    with sp.graph.inserting_before(out):
        x = as_tokens(sp, site.x, site.channels_first, out)
        xkv = sp.call(reduce, (plan, x), out)
        y = as_output_of(sp, sp.call(attention_call(site), (x, xkv, *projection_weights(site)), out), site.out)
    out.replace_all_uses_with(y)
    sp.erase(site.internal | {out})


def feedforward_span(graph: Graph, ff_path: str) -> tuple[Node, Node, list[Node]] | str:
    """The nodes of the module at ``ff_path``: (input, output, body) if the span is proved token-wise, else the
    reason it is not."""
    body = [n for n in graph.nodes if n.op in ("call_function", "call_method")
            and (module_path(n) == ff_path or module_path(n).startswith(ff_path + "."))]
    if not body:
        return f"no feed-forward module at {ff_path}"
    inside = set(body)
    for n in body:
        why = not_tokenwise(n)
        if why:
            return f"feed-forward: {why}"
    inputs = {a for n in body for a in n.all_input_nodes if a not in inside and len(tensor_shape(a) or ()) == 3}
    outputs = [n for n in body if any(u not in inside for u in real_users(n))]
    if len(inputs) != 1 or len(outputs) != 1:
        return f"feed-forward has {len(inputs)} token inputs and {len(outputs)} outputs (expected 1 and 1)"
    return next(iter(inputs)), outputs[0], body


def splice_feedforward(sp: Splicer, span: tuple[Node, Node, list[Node]], plan: Node, method: TokenMethod,
                       config: PruneConfig) -> None:
    """Run a token-wise feed-forward on the K kept tokens: copy its nodes onto the reduced input."""
    inp, out, body = span
    reduce, restore = token_calls(method, config)
    with sp.graph.inserting_before(body[0]):
        xk = sp.call(reduce, (plan, inp), body[0])
    env: dict[Node, Node] = {inp: xk}
    with sp.graph.inserting_before(out.next):
        for n in body:
            env[n] = sp.copy(n, env)
        back = sp.call(restore, (plan, env[out]), out)
    for user in list(real_users(out)):
        if user not in env.values() and user is not back:
            user.replace_input_with(out, back)
    sp.erase(set(body))


def _splice_site(pw: _Pass, i: int, site: AttentionSite, plan: Node, rep: SiteReport, by_block: dict,
                 sites: list[AttentionSite], reports: dict[int, SiteReport], ff_reports: dict[int, SiteReport]) -> None:
    """The splices of one planned self-attention site: its attention, and what ``scope`` adds (cross, ff)."""
    sp, method, config = pw.sp, pw.method, pw.config
    if method.form == "kv":  # queries stay: only keys/values shrink; no cross/ff scope (the config checks)
        splice_kv_attention(sp, site, plan, method, config)
        rep.status, rep.reason = "pruned", f"keys/values {site.N} -> {rep.K} tokens (all {site.N} queries kept)"
        return
    splice_attention(sp, site, plan, method, config)
    rep.status, rep.reason = "pruned", f"{site.N} -> {rep.K} tokens " + (
        f"(similarity on {site.metric_source})" if method.uses_metric else "(no similarity metric)")
    if "cross" in config.scope:
        for j in by_block.get((site.block_path, "cross"), []):
            cross = sites[j]
            if cross.N != site.N or cross.B != site.B:
                reports[j].status, reports[j].reason = "skipped", "token count differs from the layer's plan"
                continue
            splice_attention(sp, cross, plan, method, config)
            reports[j].status, reports[j].K = "pruned", rep.K
            reports[j].reason = f"queries {site.N} -> {rep.K} with the plan of {site.module_path}"
    if "ff" in config.scope:
        ff_path = site.block_path + ".ff"
        span = feedforward_span(sp.graph, ff_path) if not site.channels_first else \
            "a channel-first (1x1 conv) attention block has no token feed-forward"
        ff_rep = SiteReport(module_path=ff_path, kind="ff", N=site.N, C=site.C, grid=site.grid, level=rep.level,
                            K=rep.K)
        if isinstance(span, str):
            ff_rep.status, ff_rep.reason = "skipped", span
        else:
            splice_feedforward(sp, span, plan, method, config)
            ff_rep.status, ff_rep.reason = "pruned", f"{site.N} -> {rep.K} tokens (token-wise span)"
        ff_reports[i] = ff_rep


# ---------------------------------------------------------------------------------------------------- the pass

def prune_graph(gm: GraphModule, config: PruneConfig, method: TokenMethod, context: dict[str, Node] | None = None,
                finest_tokens: int | None = None, warn_unpruned: bool = True, state_mode: str | None = None,
                site_buckets: Mapping[str, int] | None = None) -> RewriteResult:
    """Match every attention in ``gm`` and rewrite the ones ``config`` selects. Mutates and recompiles ``gm``.

    context: graph nodes the method's plan reads besides the metric (``method.context_inputs`` names them, e.g. the
        previous noise predictions that DaTo's dynamics come from); the step-aware runtime provides them.
    finest_tokens: N of the finest attention grid of the *whole* model, when ``gm`` is a slice of it (a shallow
        step's graph), so that levels count from the same grid in every variant.
    state_mode: for stateful methods (``method.stateful``): ``"produce"`` (plans are computed and their state
        tensors become extra graph outputs), ``"consume"`` (plans are rebuilt from state inputs), ``"select"``
        (both, chosen by a ``graphprune_refresh`` bool input); None computes plans and outputs nothing extra.
    site_buckets: module path -> the static bucket of that site (``SiteGeometry.bucket``; CA-ToMe's r_lo).
    """
    if state_mode not in STATE_MODES:
        raise ValueError(f"state_mode must be one of {STATE_MODES}, got {state_mode!r}")
    if state_mode is not None and not method.stateful:
        raise ValueError(f"method {method.name!r} has no cross-step state (state_mode={state_mode!r})")
    graph = gm.graph
    sites, unmatched = find_attention_sites(graph)
    levels = downsample_levels(sites, finest_tokens)
    context = context or {}
    missing = [name for name in method.context_inputs if name not in context]
    result = RewriteResult(report=GraphReport(config=config_to_dict(config)))
    pw = _Pass(Splicer(graph), config, method, result, context, state_mode, site_buckets or {})
    reports = {i: SiteReport(module_path=s.module_path, kind=s.kind, form=s.form, N=s.N, C=s.C, heads=s.heads,
                             grid=s.grid, level=levels.get(i)) for i, s in enumerate(sites)}
    ff_reports: dict[int, SiteReport] = {}
    block_reports: list[SiteReport] = []
    if config.scope == ("block",):  # the region form: one prune -> K-token span -> refill per transformer stack
        block_reports, result.changed = rewrite_regions(pw.sp, sites, levels, config, method, reports, context,
                                                        missing, pw.random_placeholders)
    else:
        by_block: dict[tuple[str, str], list[int]] = {}
        for i, s in enumerate(sites):
            by_block.setdefault((s.block_path, s.kind), []).append(i)
        for i, site in enumerate(sites):
            if site.kind != "self":
                continue
            rep = reports[i]
            verdict = gate(site.grid, levels.get(i), config, method, missing)
            if verdict:
                rep.status, rep.reason = verdict
                continue
            geo = SiteGeometry(B=site.B, N=site.N, C=site.C, H=site.grid[0], W=site.grid[1],
                               level=levels[i], bucket=pw.site_buckets.get(site.module_path, 0))
            try:
                rep.K = method.budget(config, geo)
            except SiteSkip as exc:
                rep.status, rep.reason = "skipped", str(exc)
                log.info("graphprune: %s skipped: %s", site.module_path, exc)
                continue
            plan = insert_plan(pw, site, geo)
            _splice_site(pw, i, site, plan, rep, by_block, sites, reports, ff_reports)
            result.changed = True
    _finish_report(result, config, sites, unmatched, reports, ff_reports, block_reports)
    if pw.state_outputs:  # after the graph's own outputs, in site order
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        outs = output.args[0]
        output.args = ((tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)) + tuple(pw.state_outputs),)
    if result.changed:
        graph.lint()
        gm.recompile()
    log.info("%s", result.report.summary())
    if warn_unpruned and not result.changed and method.unchanged_reason(config) is None:
        block = config.scope == ("block",)
        _warn_unpruned(result.report, len(block_reports) if block else sum(1 for s in sites if s.kind == "self"),
                       len(unmatched), "transformer stack(s)" if block else "self-attention site(s)")
    return result


def _finish_report(result: RewriteResult, config: PruneConfig, sites: list[AttentionSite], unmatched: list,
                   reports: dict[int, SiteReport], ff_reports: dict[int, SiteReport],
                   block_reports: list[SiteReport]) -> None:
    """Reasons for cross-attentions left alone, then the rows in order: stacks, sites (+ their ff), unmatched."""
    for i, s in enumerate(sites):
        if s.kind == "cross" and reports[i].status == "kept" and not reports[i].reason:
            reports[i].reason = "cross-attention: outside scope" if "cross" not in config.scope else \
                "its layer's self-attention was not pruned"
    report = result.report
    report.sites = block_reports + [r for i in range(len(sites)) for r in (reports[i], ff_reports.get(i))
                                    if r is not None]
    report.sites += [SiteReport(module_path=u.module_path, kind="?", status="unmatched", reason=u.reason)
                     for u in unmatched]
    report.random_inputs = len(result.random_inputs)


def _warn_unpruned(report: GraphReport, n_self: int, n_unmatched: int, what: str = "self-attention site(s)") -> None:
    reasons = sorted({r.reason for r in report.sites if r.kind in ("self", "?", "block")})
    why = ": " + "; ".join(reasons[:3]) if reasons else ": no attention found (is this a diffusion model with " \
        "self-attention?)"
    # a warning the user sees (not only a log line): pruning was asked for and this graph runs unpruned
    warnings.warn(f"graphprune: nothing pruned in this graph ({n_self} {what}, {n_unmatched} unmatched){why}; "
                  "graphprune.inspect(model) lists every site and its reason", stacklevel=2)


__all__ = ["prune_graph", "insert_plan", "splice_attention", "splice_kv_attention", "splice_feedforward",
           "feedforward_span", "RewriteResult", "STATE_MODES"]
