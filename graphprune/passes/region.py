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
from typing import Any

from torch.fx import Graph, Node
from torch.fx.node import map_arg

from ..config import PruneConfig
from ..methods.base import SiteGeometry, SiteSkip, TokenMethod
from ..report import SiteReport
from .match import AttentionSite, TransformerStack, find_transformer_stacks, module_path
from .ops import dropout_is_identity, node_val, op_kind, real_users, assert_users, tensor_shape

log = logging.getLogger(__name__)

_ELEMENTWISE = {"gelu", "silu", "relu", "tanh", "sigmoid", "mul", "add", "sub", "div", "neg", "exp", "pow",
                "square", "rsqrt", "sqrt", "softplus", "mish", "erf", "gelu.default", "silu.default", "mul.Tensor",
                "add.Tensor", "sub.Tensor", "div.Tensor", "contiguous", "contiguous.default", "clone"}
_CHANNEL_SPLITS = {"chunk", "split", "chunk.default", "split.Tensor", "split_with_sizes.default"}


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


def _name(n: Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _channel_dim_only(n: Node) -> bool:
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
    rank = len(tensor_shape(n.args[0]) or ())
    return dim in (-1, rank - 1)


def not_tokenwise(n: Node) -> str | None:
    """Why ``n`` may not run on a subset of tokens (None: it acts on each token alone)."""
    if n.op not in ("call_function", "call_method"):
        return f"{n.op} node {n.name}"
    kind, name = op_kind(n), _name(n)
    if kind == "layer_norm":
        shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
        return None if isinstance(shape, (list, tuple)) and len(shape) == 1 else f"{n.name}: norm over more than channels"
    if kind == "dropout":
        return None if dropout_is_identity(n) else f"{n.name}: active dropout"
    if kind in ("linear", "cast", "add", "scale"):
        return None
    if name in _CHANNEL_SPLITS:
        return None if _channel_dim_only(n) else f"{n.name}: {name} over a non-channel dimension"
    if name == "getitem":
        src = n.args[0]
        ok = isinstance(src, Node) and _name(src) in _CHANNEL_SPLITS and isinstance(n.args[1], int)
        return None if ok else f"{n.name}: indexing a token tensor"
    if name in _ELEMENTWISE:
        return None
    return f"{n.name} ({name}) is not proved token-wise"


def _layer_nodes(graph: Graph, layer: str) -> list[Node]:
    return [n for n in graph.nodes if n.op in ("call_function", "call_method")
            and (module_path(n) == layer or module_path(n).startswith(layer + "."))]


def find_region(graph: Graph, stack: TransformerStack, sites: list[AttentionSite], method: TokenMethod,
                config: PruneConfig) -> Region | str:
    """The region of ``stack`` for this method and config, or the reason there is none."""
    L = len(stack.layers)
    rank_site = None
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


def _annotate(sp: Any, node: Node, original: Node) -> None:
    if sp.fake_mode is None:
        return
    args = map_arg(node.args, node_val)
    kwargs = map_arg(node.kwargs, node_val)
    with sp.fake_mode:
        node.meta[sp.val_key] = (getattr(args[0], original.target)(*args[1:], **kwargs)
                                 if original.op == "call_method" else original.target(*args, **kwargs))


def splice_region(sp: Any, region: Region, sites: list[AttentionSite], plan: Node, method: TokenMethod,
                  config: PruneConfig) -> list[Node]:
    """Reduce at ``region.start``, copy the span onto K tokens, restore at ``region.end``; erase the old span.
    ``plan`` must already be in the graph after ``region.end``; the new nodes follow it. Returns them."""
    from .rewrite import _attention_call, _named, _weights

    graph = sp.graph
    reduce = _named(lambda p, x: method.reduce(config, p, x), f"graphprune_{method.name}_reduce")
    restore = _named(lambda p, y: method.restore(config, p, y), f"graphprune_{method.name}_restore")
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
                env[n] = sp.call(_attention_call(s), (xq, kv, *_weights(s.q), *_weights(s.k), *_weights(s.v),
                                                      *_weights(s.out)), n)
            elif n in internal:
                continue
            else:
                env[n] = graph.node_copy(n, lambda a: env.get(a, a))
                _annotate(sp, env[n], n)
            new.append(env[n])
        back = sp.call(restore, (plan, env[end]), end)
        new.append(back)
    for user in list(real_users(end)):
        if user not in region.body and user is not back:
            user.replace_input_with(end, back)
    doomed = set(region.body) | internal
    for n in reversed(list(graph.nodes)):
        if n in doomed and not real_users(n):
            for a in assert_users(n):
                graph.erase_node(a)
            graph.erase_node(n)
    return new


def rewrite_regions(sp: Any, sites: list[AttentionSite], levels: dict[int, int], config: PruneConfig,
                    method: TokenMethod, reports: dict[int, SiteReport], context: dict[str, Node],
                    missing: list[str], random_inputs: list) -> tuple[list[SiteReport], bool]:
    """Rewrite every transformer stack ``config`` selects into its region form.

    Returns (one report per stack, kind ``"block"``; whether the graph changed). Site reports of attentions inside
    a region are updated in ``reports``; random-input specs are appended to ``random_inputs``.
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
        if st.grid is None:
            rep.status, rep.reason = "skipped", "token grid unknown (no (B, C, H, W) -> (B, H*W, C) flattening found)"
            continue
        if level is None or level > config.max_downsample:
            rep.reason = f"level {level} > max_downsample={config.max_downsample}"
            continue
        if config.ratio == 0:
            rep.reason = "ratio=0: unchanged"
            continue
        if missing:
            rep.status, rep.reason = "skipped", f"{method.name} needs {missing} (state of the step-aware runtime)"
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
        device = node_val(region.start).device
        rand_nodes = []
        for spec in method.random_inputs(config, geo):
            rand_nodes.append(sp.placeholder(f"graphprune_random_{len(random_inputs)}", spec, device))
            random_inputs.append((spec, device))
        state = [context[name] for name in method.context_inputs]
        from .rewrite import _named

        if rank is not None:
            (qs, qw), (ks, kw) = (rank.q.start, rank.q.width), (rank.k.start, rank.k.width)
            plan_fn = _named(lambda qf, kf, *r, _g=geo, _q=(qs, qs + qw), _k=(ks, ks + kw): method.plan(
                config, _g, qf[..., _q[0]:_q[1]], kf[..., _k[0]:_k[1]], *r), f"graphprune_{method.name}_plan")
            plan_args = (rank.q.linear, rank.k.linear, *state, *rand_nodes)
        else:
            plan_fn = _named(lambda m, *r, _g=geo: method.plan(config, _g, m, *r), f"graphprune_{method.name}_plan")
            plan_args = (region.start, *state, *rand_nodes)
        with graph.inserting_before(region.end.next):
            plan = sp.call(plan_fn, plan_args, region.end)
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


__all__ = ["Region", "find_region", "not_tokenwise", "rewrite_regions", "splice_region"]
