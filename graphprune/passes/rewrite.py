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
token-wise). K is a Python int fixed at trace time. New nodes carry fake-tensor metadata.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from ..config import PruneConfig, config_to_dict
from ..methods.base import RandomSpec, SiteGeometry, SiteSkip, StateSpec, TokenMethod
from ..report import GraphReport, SiteReport
from .match import AttentionSite, Projection, downsample_levels, find_attention_sites, module_path
from .ops import assert_users, dropout_is_identity, node_val, op_kind, real_users, tensor_shape

log = logging.getLogger(__name__)


def canonical_attention(xq: torch.Tensor, xkv: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None,
                        wk: torch.Tensor, bk: torch.Tensor | None, wv: torch.Tensor, bv: torch.Tensor | None,
                        wo: torch.Tensor, bo: torch.Tensor | None, *, cols: tuple[tuple[int, int], ...], heads: int,
                        head_dim: int, scale: float, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention with out projection. xq: (B, Lq, C), xkv: (B, Lk, Ckv) -> (B, Lq, Cout).

    ``cols`` holds (start, width) of the q, k, v rows of their weight (a fused qkv linear passes the same weight
    three times with different starts). ``key_bias`` (B, 1, 1, Lk): added to the logits (-inf hides a key).
    """

    def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, start: int, width: int) -> torch.Tensor:
        if start != 0 or width != w.shape[0]:
            w = w[start:start + width]
            b = b[start:start + width] if b is not None else None
        return F.linear(x, w, b)

    B, Lq, _ = xq.shape
    Lk = xkv.shape[1]
    q = project(xq, wq, bq, *cols[0]).view(B, Lq, heads, head_dim).transpose(1, 2)
    k = project(xkv, wk, bk, *cols[1]).view(B, Lk, heads, head_dim).transpose(1, 2)
    v = project(xkv, wv, bv, *cols[2]).view(B, Lk, heads, head_dim).transpose(1, 2)
    mask = key_bias.to(q.dtype) if key_bias is not None else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.linear(o.transpose(1, 2).reshape(B, Lq, heads * head_dim), wo, bo)


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


def _named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    fn.__name__ = fn.__qualname__ = name
    return fn


class _Splicer:
    """Inserts nodes with fake-tensor metadata into one graph."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.val_key = "val"
        self.fake_mode = None
        for node in graph.nodes:
            val = node_val(node)
            if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
                self.fake_mode = val.fake_mode
                self.val_key = "val" if "val" in node.meta else "example_value"
                break

    def annotate(self, node: Node) -> None:
        if self.fake_mode is None:
            return
        args = map_arg(node.args, node_val)
        kwargs = map_arg(node.kwargs, node_val)
        with self.fake_mode:
            node.meta[self.val_key] = node.target(*args, **kwargs)

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], stack_from: Node | None = None) -> Node:
        node = self.graph.call_function(fn, args)
        if stack_from is not None and "nn_module_stack" in stack_from.meta:
            node.meta["nn_module_stack"] = dict(stack_from.meta["nn_module_stack"])
        self.annotate(node)
        return node

    def placeholder(self, name: str, spec: RandomSpec | StateSpec, device: torch.device) -> Node:
        last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(name)
        if self.fake_mode is not None:
            dtype = spec.dtype if isinstance(spec, StateSpec) else torch.float32 if spec.kind == "normal" \
                else torch.int64
            with self.fake_mode:
                node.meta[self.val_key] = torch.empty(spec.shape, dtype=dtype, device=device)
        return node

    def erase(self, nodes: set[Node]) -> None:
        """Erase nodes (and export's metadata asserts on them) that no longer have users."""
        asserts = {a for n in nodes for a in assert_users(n)}
        for a in asserts:
            self.graph.erase_node(a)
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for n in sorted(nodes - asserts, key=lambda n: -order[n]):  # an assert may itself be in ``nodes``
            if not n.users:
                self.graph.erase_node(n)


def _weights(p: Projection) -> tuple[Node, Node | None]:
    return p.weight, p.bias


def _attention_call(site: AttentionSite) -> Callable[..., torch.Tensor]:
    cols = ((site.q.start, site.q.width), (site.k.start, site.k.width), (site.v.start, site.v.width))

    def attend(xq, xkv, wq, bq, wk, bk, wv, bv, wo, bo, key_bias=None):
        return canonical_attention(xq, xkv, wq, bq, wk, bk, wv, bv, wo, bo, cols=cols, heads=site.heads,
                                   head_dim=site.head_dim, scale=site.scale, key_bias=key_bias)

    return _named(attend, "graphprune_attention")


def _splice_attention(sp: _Splicer, site: AttentionSite, plan: Node, method: TokenMethod, config: PruneConfig
                      ) -> None:
    """Replace one attention (self or cross) by reduce -> canonical attention -> restore."""
    reduce = _named(lambda p, x: method.reduce(config, p, x), f"graphprune_{method.name}_reduce")
    restore = _named(lambda p, y: method.restore(config, p, y), f"graphprune_{method.name}_restore")
    out = site.out.linear
    with sp.graph.inserting_before(out):
        xk = sp.call(reduce, (plan, site.x), out)
        kv = xk if site.kind == "self" else site.context
        bias = ()
        if method.masks_keys and site.kind == "self" and method.uses_key_bias(config):  # some kept slots are not keys (CA-ToMe's optional merges)
            bias = (sp.call(_named(lambda p: method.key_bias(config, p), f"graphprune_{method.name}_key_bias"),
                            (plan,), out),)
        y = sp.call(_attention_call(site), (xk, kv, *_weights(site.q), *_weights(site.k), *_weights(site.v),
                                            *_weights(site.out), *bias), out)
        back = sp.call(restore, (plan, y), out)
    out.replace_all_uses_with(back)
    sp.erase(site.internal | {out})


def _splice_kv_attention(sp: _Splicer, site: AttentionSite, plan: Node, method: TokenMethod, config: PruneConfig
                         ) -> None:
    """Rewrite form "kv": all N queries attend to keys/values projected from ``method.reduce`` of the attention
    input (B, M, C); the output keeps N tokens, so nothing is restored."""
    reduce = _named(lambda p, x: method.reduce(config, p, x), f"graphprune_{method.name}_reduce")
    out = site.out.linear
    with sp.graph.inserting_before(out):
        xkv = sp.call(reduce, (plan, site.x), out)
        y = sp.call(_attention_call(site), (site.x, xkv, *_weights(site.q), *_weights(site.k), *_weights(site.v),
                                            *_weights(site.out)), out)
    out.replace_all_uses_with(y)
    sp.erase(site.internal | {out})


_TOKENWISE_KINDS = {"linear", "cast", "scale", "add", "dropout"}
_TOKENWISE_FUNCS = {"gelu", "silu", "relu", "tanh", "sigmoid", "mul", "add", "chunk", "getitem", "mul.Tensor",
                    "add.Tensor", "gelu.default", "silu.default", "chunk.default", "split.Tensor", "split"}


def _last_dim_only(node: Node) -> bool:
    """chunk/split nodes must act on the channel (last) dimension to be token-wise."""
    name = getattr(node.target, "__name__", str(node.target))
    if name.split(".")[0] not in ("chunk", "split"):
        return True
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    rank = len(tensor_shape(node.args[0]) or ())
    return dim in (-1, rank - 1)


def _feedforward_span(graph: Graph, ff_path: str) -> tuple[Node, Node, list[Node]] | str:
    """The nodes of the module at ``ff_path``: (input, output, body) if the span is proved token-wise, else the
    reason it is not."""
    body = [n for n in graph.nodes if n.op in ("call_function", "call_method")
            and (module_path(n) == ff_path or module_path(n).startswith(ff_path + "."))]
    if not body:
        return f"no feed-forward module at {ff_path}"
    inside = set(body)
    for n in body:
        name = getattr(n.target, "__name__", str(n.target))
        kind = op_kind(n)
        ok = kind in _TOKENWISE_KINDS or name in _TOKENWISE_FUNCS or (kind == "layout" and name in (
            "getitem", "chunk", "split", "chunk.default", "split.Tensor"))
        if kind == "dropout" and not dropout_is_identity(n):
            ok = False
        if not ok or not _last_dim_only(n):
            return f"feed-forward op {n.name} ({name}) is not proved token-wise"
    inputs = {a for n in body for a in n.all_input_nodes if a not in inside and len(tensor_shape(a) or ()) == 3}
    outputs = [n for n in body if any(u not in inside for u in real_users(n))]
    if len(inputs) != 1 or len(outputs) != 1:
        return f"feed-forward has {len(inputs)} token inputs and {len(outputs)} outputs (expected 1 and 1)"
    return next(iter(inputs)), outputs[0], body


def _splice_feedforward(sp: _Splicer, span: tuple[Node, Node, list[Node]], plan: Node, method: TokenMethod,
                        config: PruneConfig) -> None:
    """Run a token-wise feed-forward on the K kept tokens: copy its nodes onto the reduced input."""
    inp, out, body = span
    reduce = _named(lambda p, x: method.reduce(config, p, x), f"graphprune_{method.name}_reduce")
    restore = _named(lambda p, y: method.restore(config, p, y), f"graphprune_{method.name}_restore")
    with sp.graph.inserting_before(body[0]):
        xk = sp.call(reduce, (plan, inp), body[0])
    env: dict[Node, Node] = {inp: xk}
    with sp.graph.inserting_before(out.next):
        for n in body:
            copy = sp.graph.node_copy(n, lambda a: env.get(a, a))
            if sp.fake_mode is not None:
                args = map_arg(copy.args, node_val)
                kwargs = map_arg(copy.kwargs, node_val)
                with sp.fake_mode:
                    copy.meta[sp.val_key] = (getattr(args[0], n.target)(*args[1:], **kwargs)
                                             if n.op == "call_method" else n.target(*args, **kwargs))
            env[n] = copy
        back = sp.call(restore, (plan, env[out]), out)
    for user in list(real_users(out)):
        if user not in env.values() and user is not back:
            user.replace_input_with(out, back)
    sp.erase(set(body))


def _plan_call(method: TokenMethod, config: PruneConfig, geo: SiteGeometry, state_mode: str | None
               ) -> Callable[..., Any]:
    """The plan function for one site: fresh (``plan``), rebuilt from state (``consume``), or ``select`` (a refresh
    flag picks the fresh match's state or the carried one: one graph for both kinds of step)."""
    name = f"graphprune_{method.name}_plan"
    if state_mode == "consume":
        return _named(lambda *state: method.plan_from_state(config, geo, *state), name)
    if state_mode == "select":
        n = len(method.state_specs(config, geo))

        def select(flag, metric, *rest):
            fresh = method.state_of(config, geo, method.plan(config, geo, metric, *rest[n:]))
            chosen = [torch.where(flag, f, s) for f, s in zip(fresh, rest[:n])]
            return method.plan_from_state(config, geo, *chosen)

        return _named(select, name)
    return _named(lambda m, *r: method.plan(config, geo, m, *r), name)


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
    if state_mode not in (None, "produce", "consume", "select"):
        raise ValueError(f"state_mode must be None, 'produce', 'consume' or 'select', got {state_mode!r}")
    if state_mode is not None and not method.stateful:
        raise ValueError(f"method {method.name!r} has no cross-step state (state_mode={state_mode!r})")
    site_buckets = site_buckets or {}
    state_outputs: list[Node] = []
    refresh_flag: Node | None = None
    graph = gm.graph
    sites, unmatched = find_attention_sites(graph)
    levels = downsample_levels(sites, finest_tokens)
    context = context or {}
    missing = [name for name in method.context_inputs if name not in context]
    report = GraphReport(config=config_to_dict(config))
    result = RewriteResult(report=report)
    reports: dict[int, SiteReport] = {}
    ff_reports: dict[int, SiteReport] = {}
    for i, s in enumerate(sites):
        reports[i] = SiteReport(module_path=s.module_path, kind=s.kind, form=s.form, N=s.N, C=s.C, heads=s.heads,
                                grid=s.grid, level=levels.get(i))
    sp = _Splicer(graph)
    block_reports: list[SiteReport] = []
    if config.scope == ("block",):  # the region form: one prune -> K-token span -> refill per transformer stack
        from .region import rewrite_regions

        block_reports, result.changed = rewrite_regions(sp, sites, levels, config, method, reports, context, missing,
                                                        result.random_inputs)
        sites_to_prune: list[AttentionSite] = []
    else:
        sites_to_prune = sites
    by_block = {}
    for i, s in enumerate(sites):
        by_block.setdefault((s.block_path, s.kind), []).append(i)
    n_rand = 0
    for i, site in enumerate(sites_to_prune):
        rep = reports[i]
        if site.kind != "self":
            continue
        if site.grid is None:
            rep.status, rep.reason = "skipped", "token grid unknown (no (B, C, H, W) -> (B, H*W, C) flattening found)"
            continue
        if levels[i] > config.max_downsample:
            rep.reason = f"level {levels[i]} > max_downsample={config.max_downsample}"
            continue
        if config.ratio == 0:
            rep.reason = "ratio=0: unchanged"
            continue
        if missing:
            rep.status, rep.reason = "skipped", f"{method.name} needs {missing} (state of the step-aware runtime)"
            continue
        mshape = tensor_shape(site.metric)
        geo = SiteGeometry(B=site.B, N=site.N, C=mshape[-1], H=site.grid[0], W=site.grid[1], level=levels[i],
                           bucket=site_buckets.get(site.module_path, 0))
        try:
            rep.K = method.budget(config, geo)
        except SiteSkip as exc:
            rep.status, rep.reason = "skipped", str(exc)
            log.info("graphprune: %s skipped: %s", site.module_path, exc)
            continue
        device = node_val(site.metric).device
        state_nodes: list[Node] = []
        if state_mode is not None:
            specs = method.state_specs(config, geo)
            if state_mode in ("consume", "select"):
                n_site = len(result.state_sites)
                state_nodes = [sp.placeholder(f"graphprune_state_{n_site}_{j}", spec, device)
                               for j, spec in enumerate(specs)]
            if state_mode == "select" and refresh_flag is None:
                refresh_flag = sp.placeholder("graphprune_refresh", StateSpec((), torch.bool), device)
            result.state_sites.append((site.module_path, specs))
        rand_nodes = []
        for spec in (method.random_inputs(config, geo) if state_mode != "consume" else ()):
            rand_nodes.append(sp.placeholder(f"graphprune_random_{n_rand}", spec, device))
            result.random_inputs.append((spec, device))
            n_rand += 1
        plan_fn = _plan_call(method, config, geo, state_mode)
        order = {n: k for k, n in enumerate(graph.nodes)}
        first = min((site.q.linear, site.k.linear, site.v.linear), key=order.__getitem__)
        state = [context[name] for name in method.context_inputs]
        if state_mode == "consume":
            plan_args = tuple(state_nodes)
        elif state_mode == "select":
            plan_args = (refresh_flag, site.metric, *state_nodes, *rand_nodes)
        else:
            plan_args = (site.metric, *state, *rand_nodes)
        with graph.inserting_before(first):  # dominates this layer's attention, cross-attention and FF
            plan = sp.call(plan_fn, plan_args, site.x)
            if state_mode in ("produce", "select"):
                carried = sp.call(_named(lambda p, _geo=geo: tuple(method.state_of(config, _geo, p)),
                                         f"graphprune_{method.name}_state"), (plan,), site.x)
                state_outputs += [sp.call(operator.getitem, (carried, j), site.x)
                                  for j in range(len(result.state_sites[-1][1]))]
        if method.form == "kv":  # queries stay: only keys/values shrink; no cross/ff scope (the config checks)
            _splice_kv_attention(sp, site, plan, method, config)
            rep.status, rep.reason = "pruned", f"keys/values {site.N} -> {rep.K} tokens (all {site.N} queries kept)"
            result.changed = True
            continue
        _splice_attention(sp, site, plan, method, config)
        rep.status, rep.reason = "pruned", f"{site.N} -> {rep.K} tokens " + (
            f"(similarity on {site.metric_source})" if method.uses_metric else "(no similarity metric)")
        if "cross" in config.scope:
            for j in by_block.get((site.block_path, "cross"), []):
                cross = sites[j]
                if cross.N != site.N or cross.B != site.B:
                    reports[j].status, reports[j].reason = "skipped", "token count differs from the layer's plan"
                    continue
                _splice_attention(sp, cross, plan, method, config)
                reports[j].status, reports[j].K = "pruned", rep.K
                reports[j].reason = f"queries {site.N} -> {rep.K} with the plan of {site.module_path}"
        if "ff" in config.scope:
            ff_path = site.block_path + ".ff"
            span = _feedforward_span(graph, ff_path)
            ff_rep = SiteReport(module_path=ff_path, kind="ff", N=site.N, C=site.C, grid=site.grid,
                                level=levels[i], K=rep.K)
            if isinstance(span, str):
                ff_rep.status, ff_rep.reason = "skipped", span
            else:
                _splice_feedforward(sp, span, plan, method, config)
                ff_rep.status, ff_rep.reason = "pruned", f"{site.N} -> {rep.K} tokens (token-wise span)"
            ff_reports[i] = ff_rep
        result.changed = True
    for s_i, s in enumerate(sites):
        if s.kind == "cross" and reports[s_i].status == "kept" and not reports[s_i].reason:
            reports[s_i].reason = "cross-attention: outside scope" if "cross" not in config.scope else \
                "its layer's self-attention was not pruned"
    report.sites = block_reports + [r for i in range(len(sites)) for r in (reports[i], ff_reports.get(i))
                                    if r is not None]
    report.sites += [SiteReport(module_path=u.module_path, kind="?", status="unmatched", reason=u.reason)
                     for u in unmatched]
    report.random_inputs = len(result.random_inputs)
    if state_outputs:  # after the graph's own outputs, in site order
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        outs = output.args[0]
        output.args = ((tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)) + tuple(state_outputs),)
    if result.changed:
        graph.lint()
        gm.recompile()
    log.info("%s", report.summary())
    n_self = sum(1 for s in sites if s.kind == "self")
    if config.scope == ("block",):
        n_self = len(block_reports)
    if config.ratio > 0 and not result.changed and warn_unpruned:
        reasons = sorted({r.reason for r in report.sites if r.kind in ("self", "?", "block")})
        log.warning("graphprune: nothing pruned in this graph (%d self-attention site(s), %d unmatched)%s",
                    n_self, len(unmatched), ": " + "; ".join(reasons[:3]) if reasons else
                    ": no attention found (is this a diffusion model with self-attention?)")
    return result
