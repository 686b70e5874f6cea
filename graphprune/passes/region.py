"""The region rewrite: prune at one node, run everything up to a later node on K tokens, refill N tokens there
(entry point: :func:`rewrite_regions`, called by :func:`~.rewrite.prune_graph` for ``scope="block"``).

A region lives inside one transformer stack (:class:`~.match.TransformerStack`, e.g. the ``transformer_blocks`` of
an SDXL ``Transformer2DModel``)::

    start (B, N, C)  = the residual stream at the pruning point: the stack's input (metric methods: tome, sito, ...)
                       or the output of the ranking layer (AT-EDM; in a one-layer stack, the residual stream right
                       after its self-attention)
    plan             = method.plan(start | ranking q, k, *state, *random)      # static K
    x_K              = method.reduce(plan, start)                              # (B, K, C)
    span on x_K      = every node on a path start -> end, copied onto K tokens; each proved attention inside it
                       rebuilt in canonical form (self: K x K, cross: K queries x the text tokens)
    y                = method.restore(plan, end_K)                             # (B, N, C): one gather
    end (B, N, C)    = the last layer's output, read by proj_out

The span is found by dataflow (descendants of ``start`` that ``end`` depends on) and proved token-wise before
anything changes: every op is a linear, a LayerNorm over channels, an elementwise op, a channel chunk/split or a
proved attention; nothing in it is read from outside except ``end``; no other (B, N, *) tensor enters it. A stack
that fails any check is left unchanged with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import Graph, Node

from ..config import PruneConfig
from ..methods.base import RandomSpec, SiteGeometry, SiteSkip, TokenMethod
from ..report import SiteReport
from .match import AttentionSite, TransformerStack, find_transformer_stacks, module_path
from .ops import INPLACE, describe, node_val, not_tokenwise, real_users, target_name, tensor_shape
from .splice import Splicer, attention_call, gate, named, projection_weights, take_columns, token_calls

log = logging.getLogger(__name__)

#: (random specs, device) -> the new placeholder nodes (``RewriteResult`` records them)
AddRandom = Callable[[tuple[RandomSpec, ...], torch.device], list[Node]]


@dataclass
class Region:
    """What one stack's rewrite touches: ``start`` -> ``body`` (graph order, ends with ``end``) -> ``end``.

    ``sites``: indices of the attention sites whose attention op is in the body (rebuilt on K tokens);
    ``rank_site``: the self-attention whose q, k rank the tokens (plans of source "attention"), else None.
    """

    stack: TransformerStack
    start: Node
    end: Node
    body: list[Node]
    sites: list[int]
    rank_site: int | None
    span: str


def _layer_nodes(graph: Graph, layer: str) -> list[Node]:
    return [n for n in graph.nodes if n.op in ("call_function", "call_method")
            and (module_path(n) == layer or module_path(n).startswith(layer + "."))]


def find_region(graph: Graph, stack: TransformerStack, sites: list[AttentionSite], method: TokenMethod,
                config: PruneConfig) -> Region | str:
    """The region of ``stack`` for this method and config, or the reason there is none."""
    L = len(stack.layers)
    rank_site = None
    if any(sites[i].channels_first for i in stack.self_sites + stack.cross_sites if i is not None):
        return "channel-first (1x1 conv) attention: the region form runs (B, N, C) token layers only"
    if method.plan_source == "attention":
        p = getattr(config, "prune_layer", 1)
        if p > L:
            return f"prune_layer={p} but the stack has {L} layer(s)"
        rank_site = stack.self_sites[p - 1]
        if rank_site is None:
            return f"layer {p} has no proved self-attention to rank tokens with"
        if p < L:
            nxt = stack.self_sites[p]
            if nxt is None:
                return f"layer {p + 1} has no proved self-attention (its input is the pruning point)"
            start_site, span = sites[nxt], (f"layer {p + 1}" if p + 1 == L else f"layers {p + 1}..{L}") + \
                " (self, cross, ff)"
        else:
            cross = stack.cross_sites[p - 1]
            if cross is None:
                return (f"layer {p} is the stack's last and has no cross-attention after its self-attention: "
                        "nothing left to run on K tokens")
            start_site, span = sites[cross], f"layer {p}'s cross-attention and feed-forward"
    else:
        first = stack.self_sites[0]
        if first is None:
            return "the stack's first layer has no proved self-attention"
        start_site, span = sites[first], ("layer 1" if L == 1 else f"layers 1..{L}") + " (self, cross, ff)"
    if start_site.metric_source != "pre-norm block input":
        return f"no LayerNorm above {start_site.module_path}: the residual stream at the pruning point is unknown"
    start = start_site.metric
    inside = set(_layer_nodes(graph, stack.layers[-1]))
    outs = [n for n in graph.nodes if n in inside and any(u not in inside for u in real_users(n))]
    if len(outs) != 1:
        return f"the last layer {stack.layers[-1]} has {len(outs)} outputs (expected one residual stream)"
    end = outs[0]
    B, N = stack.B, stack.N
    if tensor_shape(end) != tensor_shape(start) or (tensor_shape(start) or (0, 0))[:2] != (B, N):
        return f"the stack's output {end.name} and the pruning point {start.name} differ in shape"
    order = {n: i for i, n in enumerate(graph.nodes)}
    if order[end] <= order[start]:
        return "the stack's output comes before the pruning point"
    desc: set[Node] = set()
    todo = [start]
    while todo:
        for u in todo.pop().users:
            if u not in desc and order[u] <= order[end]:
                desc.add(u)
                todo.append(u)
    anc: set[Node] = {end}
    todo = [end]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in anc and order[a] > order[start]:
                anc.add(a)
                todo.append(a)
    body_set = (desc & anc) | {end}
    if end not in desc:
        return f"the stack's output {end.name} does not depend on the pruning point {start.name}"
    inner = [i for i, s in enumerate(sites) if s.attention in body_set]
    internal: set[Node] = set()
    for i in inner:
        s = sites[i]
        if s.x not in body_set or s.out.linear not in body_set:
            return f"attention {s.module_path} is only partly inside the span"
        internal |= s.internal
    for n in body_set:
        mutated = n.args[0] if target_name(n) in INPLACE and n.args else None
        if isinstance(mutated, Node) and mutated not in body_set:  # the span writes into a tensor from outside it
            later = [u for u in real_users(mutated) if u not in body_set and order[u] > order[n]]
            if later:
                return f"{describe(n)} writes into {mutated.name}, which {describe(later[0])} reads after the span"
        if n is not end:
            escaped = [u for u in real_users(n) if u not in body_set]
            if escaped:
                return f"{n.name} inside the span is also read by {escaped[0].name} outside it"
        if n in internal:
            continue
        why = not_tokenwise(n)
        if why:
            return why
        for a in n.all_input_nodes:
            shape = tensor_shape(a)
            if a not in body_set and a is not start and shape is not None and len(shape) == 3 \
                    and shape[:2] == (B, N):
                return f"{n.name} reads the token tensor {a.name} from outside the span"
    body = sorted(body_set, key=order.__getitem__)
    return Region(stack=stack, start=start, end=end, body=body, sites=inner, rank_site=rank_site, span=span)


def splice_region(sp: Splicer, region: Region, sites: list[AttentionSite], plan: Node, method: TokenMethod,
                  config: PruneConfig) -> list[Node]:
    """Reduce at ``region.start``, copy the span onto K tokens, restore at ``region.end``; erase the old span.
    ``plan`` must already be in the graph after ``region.end``; the new nodes follow it. Returns them."""
    graph = sp.graph
    reduce, restore = token_calls(method, config)
    rebuilt = {sites[i].out.linear: sites[i] for i in region.sites}
    internal = {n for i in region.sites for n in sites[i].internal}
    end = region.end
    new: list[Node] = []
    with graph.inserting_before(plan.next):  # after the plan, which sits right after ``end``
        env: dict[Node, Node] = {region.start: sp.call(reduce, (plan, region.start), end)}
        new.append(env[region.start])
        for n in region.body:
            if n in rebuilt:
                s = rebuilt[n]
                xq = env[s.x]
                kv = xq if s.kind == "self" else s.context
                env[n] = sp.call(attention_call(s), (xq, kv, *projection_weights(s)), n)
            elif n in internal:
                continue
            else:
                env[n] = sp.copy(n, env)
            new.append(env[n])
        back = sp.call(restore, (plan, env[end]), end)
        new.append(back)
    for user in list(real_users(end)):
        if user not in region.body and user is not back:
            user.replace_input_with(end, back)
    sp.erase(set(region.body) | internal)
    return new


def rewrite_regions(sp: Splicer, sites: list[AttentionSite], levels: dict[int, int], config: PruneConfig,
                    method: TokenMethod, reports: dict[int, SiteReport], context: dict[str, Node],
                    missing: list[str], add_random: AddRandom) -> tuple[list[SiteReport], bool]:
    """Rewrite every transformer stack ``config`` selects into its region form.

    Returns (one report per stack, kind ``"block"``; whether the graph changed). Site reports of attentions inside
    a region are updated in ``reports``; ``add_random`` makes the plans' random inputs.
    """
    graph = sp.graph
    stacks = find_transformer_stacks(sites)
    paths = [s.path for s in stacks]
    out: list[SiteReport] = []
    changed = False
    for st in stacks:
        first = next(i for i in st.self_sites if i is not None)
        level = levels.get(first)
        rep = SiteReport(module_path=st.path or "<root>", kind="block", form=f"{len(st.layers)} layer(s)", N=st.N,
                         C=st.C, heads=sites[first].heads, grid=st.grid, level=level)
        out.append(rep)
        verdict = gate(st.grid, level, config, method, missing)
        if verdict:
            rep.status, rep.reason = verdict
            continue
        region = find_region(graph, st, sites, method, config)
        if isinstance(region, str):
            rep.status, rep.reason = "skipped", region
            log.info("graphprune: stack %s left unchanged: %s", st.path, region)
            continue
        rank = sites[region.rank_site] if region.rank_site is not None else None
        geo = SiteGeometry(B=st.B, N=st.N, C=tensor_shape(region.start)[-1], H=st.grid[0], W=st.grid[1],
                           level=level, heads=rank.heads if rank else 1, head_dim=rank.head_dim if rank else 0,
                           scale=rank.scale if rank else 0.0)
        why = method.skip_region(config, geo, st.path, paths)
        if why:
            rep.reason = why
            continue
        try:
            rep.K = method.budget(config, geo)
        except SiteSkip as exc:
            rep.status, rep.reason = "skipped", str(exc)
            continue
        plan = _insert_region_plan(sp, region, rank, geo, config, method, context, add_random)
        splice_region(sp, region, sites, plan, method, config)
        source = f"G-WPR of {rank.module_path}" if rank else f"similarity on {region.start.name}"
        rep.status = "pruned"
        rep.reason = f"{st.N} -> {rep.K} tokens over {region.span}; ranked by {source}; refilled before proj_out"
        for i in region.sites:
            reports[i].status, reports[i].K = "pruned", rep.K
            reports[i].reason = f"on {rep.K} of {st.N} tokens inside the region of {st.path}"
        if region.rank_site is not None:
            reports[region.rank_site].reason = f"ranks the tokens of {st.path} (runs on all {st.N})"
        changed = True
    for i, s in enumerate(sites):
        if reports[i].status == "kept" and not reports[i].reason:
            reports[i].reason = "scope 'block': outside every pruned region"
    return out, changed


def _insert_region_plan(sp: Splicer, region: Region, rank: AttentionSite | None, geo: SiteGeometry,
                        config: PruneConfig, method: TokenMethod, context: dict[str, Node], add_random: AddRandom
                        ) -> Node:
    """The plan of a region, right after ``region.end``: from the ranking attention's q and k (AT-EDM) or from the
    residual stream at the pruning point."""
    rand_nodes = add_random(method.random_inputs(config, geo), node_val(region.start).device)
    state = [context[name] for name in method.context_inputs]
    name = f"graphprune_{method.name}_plan"
    if rank is not None:
        qc, kc = rank.q.columns, rank.k.columns
        plan_fn = named(lambda qf, kf, *r: method.plan(config, geo, take_columns(qf, qc), take_columns(kf, kc), *r),
                        name)
        plan_args = (rank.q.linear, rank.k.linear, *state, *rand_nodes)
    else:
        plan_fn = named(lambda m, *r: method.plan(config, geo, m, *r), name)
        plan_args = (region.start, *state, *rand_nodes)
    with sp.graph.inserting_before(region.end.next):
        return sp.call(plan_fn, plan_args, region.end)


__all__ = ["Region", "find_region", "rewrite_regions", "splice_region"]
