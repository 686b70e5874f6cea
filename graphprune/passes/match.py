"""Find attention sites in an FX graph by dataflow (entry point: :func:`find_attention_sites`).

One implementation serves Dynamo's torch-level graphs and ``torch.export``'s ATen graphs (the op tables live in
:mod:`.ops`). A site is proved, never guessed:

* the attention op is ``scaled_dot_product_attention`` (any variant) or matmul -> [scale] -> softmax -> matmul
  (also ``baddbmm``);
* q, k, v each come from a linear projection (or a slice of one fused qkv linear) through layout ops only, and
  replaying those ops on an index tensor equals the canonical head split (B, L, h*d) -> (B, h, L, d) (or
  (B*h, L, d) for bmm-style code);
* the attention output reaches an out-projection linear through layout ops equal to the canonical head merge;
* no intermediate is used outside the site.

Self-attention: q, k and v project the same tensor. Cross-attention: k and v project another tensor (never taken
for self-attention). Each site also carries the pre-norm input (the residual stream that similarity methods measure,
one LayerNorm up) and the token grid (H, W), proved by replaying the (B, C, H, W) -> (B, H*W, C) flattening.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
import torch
from torch.fx import Graph, Node

from .ops import (SDPA_ARGS, SDPA_TUPLE_ARGS, assert_users, chain_scale, dropout_is_identity, first_layout_match,
                  is_symbolic, named_args, node_val, op_kind, real_users, scale_factor, tensor_input, tensor_shape,
                  walk_back)

log = logging.getLogger(__name__)

_CHAIN_KINDS = {"layout", "cast", "scale", "dropout"}


@dataclass
class Projection:
    """A linear projection feeding (or fed by) attention: ``linear(x, weight, bias)[..., start:start + width]``."""

    linear: Node
    weight: Node
    bias: Node | None
    start: int
    width: int


@dataclass
class AttentionSite:
    """One proved attention: q/k/v/out projections, heads, scale, token grid and the nodes it owns.

    Shapes: ``x`` (B, N, C) is the token tensor the q projection reads; ``context`` (B, L, Ck) the k/v input for
    cross-attention (``None`` for self-attention); ``metric`` (B, N, C) the pre-norm residual stream.
    """

    kind: str  # "self" | "cross"
    form: str  # e.g. "sdpa", "matmul-softmax", "fused-qkv sdpa"
    module_path: str
    attention: Node
    x: Node
    context: Node | None
    q: Projection
    k: Projection
    v: Projection
    out: Projection
    heads: int
    head_dim: int
    scale: float
    B: int
    N: int
    C: int
    L: int
    metric: Node
    metric_source: str
    grid: tuple[int, int] | None
    internal: set[Node] = field(default_factory=set, repr=False)

    @property
    def block_path(self) -> str:
        """Module path of the transformer layer holding this attention (its parent module)."""
        return self.module_path.rsplit(".", 1)[0] if "." in self.module_path else ""


@dataclass
class Unmatched:
    """An attention-like node the matcher could not prove, with the reason."""

    attention: Node
    module_path: str
    reason: str


_PATH_PART = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]|\['([^']+)'\]|\._modules\['([^']+)'\]")


def module_path(node: Node) -> str:
    """Dotted module path of the innermost module that produced ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    raw = raw.replace("L['self']", "").replace("L__self__", "")
    path = _PATH_PART.sub(lambda m: "." + next(g for g in m.groups() if g), raw)
    path = re.sub(r"^\.+", "", path).replace("._modules.", ".")
    return path


class _NoMatch(Exception):
    pass


def _linear_parts(node: Node) -> tuple[Node, Node, Node | None]:
    args = list(node.args) + [node.kwargs.get("bias")]
    inp = args[0] if args else node.kwargs.get("input")
    weight = args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(inp, Node) or not isinstance(weight, Node):
        raise _NoMatch("linear with non-node input or weight")
    return inp, weight, bias if isinstance(bias, Node) else None


def _head_split(p: torch.Tensor, start: int, h: int, d: int, B: int, bmm: bool) -> torch.Tensor:
    """Canonical (B, L, F) -> (B, h, L, d), or (B*h, L, d) for bmm-style code, of columns start..start+h*d."""
    L = p.shape[1]
    q = p[..., start:start + h * d].reshape(B, L, h, d).transpose(1, 2)
    return q.reshape(B * h, L, d) if bmm else q


def _head_merge(o: torch.Tensor, h: int, B: int, bmm: bool) -> torch.Tensor:
    """Canonical inverse: (B, h, L, d) or (B*h, L, d) -> (B, L, h*d)."""
    if bmm:
        o = o.reshape(B, h, o.shape[1], o.shape[2])
    return o.transpose(1, 2).reshape(B, o.shape[2], h * o.shape[3])


def _prove_projection(t: Node, h: int, d: int, bmm: bool, transposed: bool) -> tuple[Projection, list[Node], float]:
    """Walk from an attention operand back to its linear and prove the chain is a head split (+ scalings)."""
    src, chain = walk_back(t, _CHAIN_KINDS)
    if op_kind(src) != "linear":
        raise _NoMatch(f"operand {t.name} does not come from a linear projection through layout ops "
                       f"(found {src.op} {getattr(src.target, '__name__', src.target)})")
    inp, weight, bias = _linear_parts(src)
    pshape = tensor_shape(src)
    if pshape is None or len(pshape) != 3:
        raise _NoMatch(f"projection {src.name} is not a static (B, L, F) tensor")
    B = pshape[0]
    starts = list(range(0, pshape[2] - h * d + 1, h * d))

    def split_at(start: int):
        def want(probe: torch.Tensor) -> torch.Tensor:
            w = _head_split(probe, start, h, d, B, bmm)
            return w.transpose(-1, -2) if transposed else w
        return ("head split", start, h, d, B, bmm, transposed), want

    found = first_layout_match(chain, src, pshape, [split_at(start) for start in starts])
    if found is not None:
        return Projection(src, weight, bias, starts[found], h * d), chain, chain_scale(chain)
    raise _NoMatch(f"layout ops from {src.name} to {t.name} are not a head split into {h} heads of {d}")


def _prove_output(att: Node, h: int, B: int, bmm: bool) -> tuple[Projection, list[Node]]:
    """Follow the attention output through layout ops to the out-projection and prove the head merge."""
    chain: list[Node] = []
    cur = att
    while True:
        users = real_users(cur)
        if len(users) != 1:
            raise _NoMatch(f"attention output {cur.name} has {len(users)} users; expected one path to the out "
                           "projection")
        nxt = users[0]
        kind = op_kind(nxt)
        if kind == "linear" and nxt.args and nxt.args[0] is cur:
            break
        if kind not in ("layout", "cast") and not (kind == "dropout" and dropout_is_identity(nxt)):
            raise _NoMatch(f"attention output reaches {nxt.name} ({nxt.target}) before any out projection")
        chain.append(nxt)
        cur = nxt
    out_linear = nxt
    _, weight, bias = _linear_parts(out_linear)
    shape = tensor_shape(att)
    if shape is None:
        raise _NoMatch("attention output has no static shape")
    merge = (("head merge", h, B, bmm), lambda probe: _head_merge(probe, h, B, bmm))
    if first_layout_match(chain, att, shape, [merge]) is None:
        raise _NoMatch(f"layout ops after {att.name} are not the canonical head merge")
    return Projection(out_linear, weight, bias, 0, int(tensor_shape(out_linear)[-1])), chain


def _core_sdpa(node: Node) -> tuple[Node, Node, Node, Node, float | None, list[Node], str]:
    """SDPA node -> (q, k, v, output node, scale or None for default, internal nodes, form)."""
    tuple_form = op_kind(node) == "sdpa_tuple"
    a = named_args(node, SDPA_TUPLE_ARGS if tuple_form else SDPA_ARGS)
    if a.get("attn_mask") is not None:
        raise _NoMatch("attention mask present (not supported for pruning)")
    if a.get("dropout_p", 0.0) not in (0, 0.0):
        raise _NoMatch("attention dropout > 0")
    if a.get("is_causal", False):
        raise _NoMatch("causal attention")
    if a.get("enable_gqa", False):
        raise _NoMatch("grouped-query attention")
    out, internal = node, [node]
    if tuple_form:
        getters = [u for u in node.users if u.target is __import__("operator").getitem]
        firsts = [u for u in getters if u.args[1] == 0]
        if len(firsts) != 1 or any(u.args[1] != 0 for u in getters if u.users):
            raise _NoMatch("fused attention's extra outputs are used")
        out = firsts[0]
        internal += getters
    return a["query"], a["key"], a["value"], out, a.get("scale"), internal, "sdpa"


def _core_softmax(soft: Node) -> tuple[Node, Node, Node, Node, float, list[Node], str]:
    """softmax node -> the hand-written attention around it (matmul/baddbmm -> scale -> softmax -> matmul)."""
    dim = soft.kwargs.get("dim", soft.args[1] if len(soft.args) > 1 else None)
    rank = len(tensor_shape(soft) or ())
    if dim not in (-1, rank - 1):
        raise _NoMatch(f"softmax over dim {dim}, not the last")
    scores, pre = walk_back(tensor_input(soft), {"cast", "scale"})
    scale = chain_scale(pre)
    internal = [soft, scores, *pre]
    if op_kind(scores) == "matmul":
        q, kt = scores.args[0], scores.args[1]
    elif op_kind(scores) == "baddbmm":
        beta = scores.kwargs.get("beta", 1)
        if beta != 0:
            raise _NoMatch("baddbmm with beta != 0 (adds a bias to the scores)")
        q, kt = scores.args[1], scores.args[2]
        scale *= scores.kwargs.get("alpha", 1)
        buf = scores.args[0]
        if isinstance(buf, Node) and len(real_users(buf)) == 1:
            internal.append(buf)
    else:
        raise _NoMatch(f"softmax input does not come from a matmul (found {scores.target})")
    # softmax -> casts / identity dropout -> matmul(p, v)
    cur, post = soft, []
    while len(real_users(cur)) == 1 and op_kind(real_users(cur)[0]) in ("cast", "dropout"):
        cur = real_users(cur)[0]
        if op_kind(cur) == "dropout" and not dropout_is_identity(cur):
            raise _NoMatch("attention dropout is active")
        post.append(cur)
    users = real_users(cur)
    if len(users) != 1 or op_kind(users[0]) != "matmul" or users[0].args[0] is not cur:
        raise _NoMatch("softmax output does not feed one matmul with the values")
    pv = users[0]
    internal += post + [pv]
    return q, kt, pv.args[1], pv, scale, internal, "matmul-softmax"


def _match_one(node: Node) -> AttentionSite:
    """Prove one attention op (sdpa or softmax node) and everything around it."""
    if op_kind(node) in ("sdpa", "sdpa_tuple"):
        q_t, k_t, v_t, out, scale, internal, form = _core_sdpa(node)
        k_transposed = False
    else:
        q_t, k_t, v_t, out, scale, internal, form = _core_softmax(node)
        k_transposed = True
    qshape = tensor_shape(q_t)
    if qshape is None or len(qshape) not in (3, 4):
        raise _NoMatch("query is not a static 3-D or 4-D tensor")
    # The batch comes from the q projection; bmm-style code folds heads into the batch.
    q_src, _ = walk_back(q_t, _CHAIN_KINDS)
    pshape = tensor_shape(q_src)
    if pshape is None or len(pshape) != 3:
        raise _NoMatch("query does not come from a (B, N, F) projection")
    B = pshape[0]
    bmm = len(qshape) == 3
    h = qshape[0] // B if bmm else qshape[1]
    d = qshape[-1]
    q, q_chain, q_scale = _prove_projection(q_t, h, d, bmm, transposed=False)
    k, k_chain, k_scale = _prove_projection(k_t, h, d, bmm, transposed=k_transposed)
    v, v_chain, v_scale = _prove_projection(v_t, h, d, bmm, transposed=False)
    if v_scale != 1.0:
        raise _NoMatch("values are scaled before attention")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scale *= q_scale * k_scale
    out_proj, out_chain = _prove_output(out, h, B, bmm)
    x = _linear_parts(q.linear)[0]
    xk = _linear_parts(k.linear)[0]
    xv = _linear_parts(v.linear)[0]
    if xk is not xv:
        raise _NoMatch("keys and values project different tensors")
    kind = "self" if xk is x else "cross"
    if kind == "self" and not (q.linear is k.linear is v.linear) and len({q.linear, k.linear, v.linear}) != 3:
        raise _NoMatch("q, k, v share some but not all projections")
    xshape = tensor_shape(x)
    if xshape is None or len(xshape) != 3:
        raise _NoMatch("token tensor is not a static (B, N, C) tensor")
    ctx_shape = tensor_shape(xk)
    nodes = set(internal) | set(q_chain) | set(k_chain) | set(v_chain) | set(out_chain)
    nodes |= {q.linear, k.linear, v.linear}
    for n in list(nodes):
        nodes.update(assert_users(n))
    for n in nodes:
        outside = [u for u in real_users(n) if u not in nodes and u is not out_proj.linear]
        if outside:
            raise _NoMatch(f"intermediate {n.name} is also used outside the attention (by {outside[0].name})")
    fused = q.linear is k.linear
    path = module_path(node)  # the module that runs the attention op (diffusers: the Attention module)
    metric, metric_source = find_pre_norm(x)
    return AttentionSite(
        kind=kind, form=("fused-qkv " if fused else "") + form, module_path=path, attention=node, x=x,
        context=None if kind == "self" else xk, q=q, k=k, v=v, out=out_proj, heads=h, head_dim=d,
        scale=float(scale), B=B, N=xshape[1], C=xshape[2], L=ctx_shape[1] if ctx_shape else xshape[1],
        metric=metric, metric_source=metric_source, grid=None, internal=nodes,
    )


def find_pre_norm(x: Node, max_steps: int = 8) -> tuple[Node, str]:
    """Walk from the attention input up through the norm (LayerNorm, then optional adaLN scale/shift) to its input.

    Returns (node, description). Falls back to ``x`` itself when no LayerNorm is found (e.g. a norm-free module):
    a documented deviation for similarity-based methods.
    """
    shape = tensor_shape(x)
    cur = x
    for _ in range(max_steps):
        kind = op_kind(cur)
        if kind == "layer_norm":
            src = tensor_input(cur)
            if src is not None and tensor_shape(src) == shape:
                return src, "pre-norm block input"
            break
        if kind not in ("cast", "add", "scale"):
            break
        # adaLN: norm(x) * (1 + scale) + shift; follow the operand that has the token shape
        same_shape = [a for a in cur.args if isinstance(a, Node) and tensor_shape(a) == shape]
        if len(same_shape) != 1:
            break
        cur = same_shape[0]
    return x, "attention input (no LayerNorm found above it)"


def find_token_grid(start: Node, limit: int = 20000) -> tuple[int, int] | None:
    """Search upstream of ``start`` (B, N, C) for the (B, C', H, W) tensor whose row-major flattening made the
    tokens; returns (H, W) once replaying the flattening proves it, else None."""
    shape = tensor_shape(start)
    if shape is None or len(shape) != 3:
        return None
    B, N = shape[0], shape[1]
    seen: set[Node] = set()
    frontier = [start]
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if op_kind(node) == "layout":
            src, chain = walk_back(node, {"layout", "cast"})
            sshape = tensor_shape(src)
            if sshape is not None and len(sshape) == 4 and sshape[0] == B and sshape[2] * sshape[3] == N:
                flatten = (("flatten", B, N), lambda probe: probe.permute(0, 2, 3, 1).reshape(B, N, probe.shape[1]))
                if first_layout_match(chain, src, sshape, [flatten]) == 0:
                    return sshape[2], sshape[3]
        for arg in node.all_input_nodes:
            ashape = tensor_shape(arg)
            if ashape is not None and len(ashape) == 3 and ashape[0] == B and ashape[1] == N:
                frontier.append(arg)
    return None


def attention_candidates(graph: Graph) -> list[Node]:
    """Nodes that look like an attention op: every SDPA variant and every softmax."""
    return [n for n in graph.nodes if op_kind(n) in ("sdpa", "sdpa_tuple", "softmax")]


def find_attention_sites(graph: Graph) -> tuple[list[AttentionSite], list[Unmatched]]:
    """Match every attention in ``graph``. Returns (proved sites in graph order, unmatched with reasons)."""
    sites: list[AttentionSite] = []
    unmatched: list[Unmatched] = []
    grids: dict[Node, tuple[int, int] | None] = {}
    for node in attention_candidates(graph):
        if is_symbolic(node):
            unmatched.append(Unmatched(node, module_path(node), "dynamic (symbolic) shapes; compile with "
                                       "dynamic=False"))
            continue
        try:
            site = _match_one(node)
        except _NoMatch as exc:
            log.info("graphprune: attention %s (%s) left unchanged: %s", node.name, module_path(node), exc)
            unmatched.append(Unmatched(node, module_path(node), str(exc)))
            continue
        if site.metric not in grids:
            grids[site.metric] = find_token_grid(site.metric) or find_token_grid(site.x)
        site.grid = grids[site.metric]
        sites.append(site)
    return sites, unmatched


_LAYER_PATH = re.compile(r"^(?:(.*)\.)?([A-Za-z_]\w*)\.(\d+)$")


@dataclass
class TransformerStack:
    """A stack of transformer layers (a ModuleList ``<path>.<name>.0 .. L-1``, e.g. the ``transformer_blocks`` of
    a diffusers ``Transformer2DModel``) whose self-attentions the matcher proved, in layer order.

    ``layers[i]`` is the module path of layer i; ``self_sites[i]`` / ``cross_sites[i]`` index into the site list
    (``None`` where the layer has no proved attention of that kind). N, C, B and grid are those of the first layer.
    """

    path: str
    layers: list[str]
    self_sites: list[int | None]
    cross_sites: list[int | None]
    N: int
    C: int
    B: int
    grid: tuple[int, int] | None


def find_transformer_stacks(sites: list[AttentionSite]) -> list[TransformerStack]:
    """Group sites into transformer stacks by their layer's module path (``<stack>.<list>.<i>``), in graph order.

    A stack whose layer indices are not 0..L-1 (a layer without a proved self-attention) is still returned; the
    region rewrite then finds the unproved attention inside the span and leaves the stack unchanged.
    """
    groups: dict[tuple[str, str], dict[int, dict[str, int]]] = {}
    for i, s in enumerate(sites):
        m = _LAYER_PATH.match(s.block_path)
        if not m:
            continue
        layer = groups.setdefault((m.group(1) or "", m.group(2)), {}).setdefault(int(m.group(3)), {})
        layer.setdefault(s.kind, i)
    stacks = []
    for (path, name), layers in groups.items():
        idx = sorted(layers)
        if not any("self" in layers[j] for j in idx):
            continue
        full = list(range(idx[-1] + 1))
        first = sites[next(layers[j]["self"] for j in idx if "self" in layers[j])]
        stacks.append(TransformerStack(
            path=path, layers=[f"{path}.{name}.{j}" if path else f"{name}.{j}" for j in full],
            self_sites=[layers.get(j, {}).get("self") for j in full],
            cross_sites=[layers.get(j, {}).get("cross") for j in full],
            N=first.N, C=first.C, B=first.B, grid=first.grid))
    return stacks


def downsample_levels(sites: list[AttentionSite], finest_tokens: int | None = None) -> dict[int, int]:
    """Per site (by index): tomesd's downsample factor ceil(sqrt(N_max // N)) relative to the finest grid
    (``finest_tokens`` if given, e.g. the whole model's when ``sites`` come from a slice of its graph)."""
    gridded = [s.N for s in sites if s.grid is not None and s.kind == "self"]
    if not gridded:
        return {}
    n_max = max(gridded + ([finest_tokens] if finest_tokens else []))
    return {i: math.ceil(math.sqrt(n_max // s.N)) for i, s in enumerate(sites) if s.grid is not None}


__all__ = ["AttentionSite", "Projection", "Unmatched", "TransformerStack", "find_attention_sites",
           "find_transformer_stacks", "find_pre_norm", "find_token_grid",
           "module_path", "downsample_levels", "node_val", "scale_factor"]
