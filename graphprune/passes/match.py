"""Find attention sites in an FX graph by dataflow (entry point: :func:`find_attention_sites`).

One implementation serves Dynamo's torch-level graphs and ``torch.export``'s ATen graphs (the op tables live in
:mod:`.ops`). A site is proved, never guessed:

* the attention op is ``scaled_dot_product_attention`` (any variant) or a product of q and k -> [scale] -> softmax
  -> a product with v, each product a ``matmul``/``bmm``/``baddbmm`` or a two-operand ``einsum`` (any index letters,
  heads folded into the batch or not); which operand is transposed is read from the product's index notation
  (:func:`~.ops.contraction`), never assumed;
* q, k, v each come from a projection through layout ops only: a linear on (B, L, C) tokens, or a 1x1 convolution
  on a channel-first (B, C, *spatial) map (a linear on its H*W tokens), separate or one fused qkv projection; and
  replaying those ops on an index tensor equals the canonical head split (B, L, h*d) -> (B, h, L, d) (or (B*h, L, d)
  for bmm-style code) of some columns of the projection, which the replay itself names (ADM's legacy qkv
  interleaves them per head);
* the attention output reaches an out projection (linear, or 1x1 conv) through layout ops equal to the canonical
  head merge;
* query-chunked attention (one attention per slice of the queries, sharing k and v, concatenated along the query
  axis) is proved as one attention when the slices, replayed, concatenate back to the whole query;
* no intermediate is used outside the site.

Self-attention: q, k and v project the same tensor. Cross-attention: k and v project another tensor (never taken
for self-attention). Each site also carries the pre-norm input (the residual stream that similarity methods measure,
one LayerNorm up; one GroupNorm up for channel-first sites) and the token grid (H, W), proved by replaying the
(B, C, H, W) -> (B, H*W, C) flattening (or read from a 1x1 conv's spatial grid). A site that fails says where the
dataflow walk stopped and what was expected there.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from .ops import (SDPA_ARGS, SDPA_TUPLE_ARGS, assert_users, chain_scale, chain_signature, contraction,
                  conv_is_pointwise, describe, describe_chain, dropout_is_identity, index_tensor, is_symbolic,
                  memo_proof, named_args, node_val, op_kind, real_users, replay, same, scale_factor, tensor_input,
                  tensor_shape, walk_back)

log = logging.getLogger(__name__)

_CHAIN_KINDS = {"layout", "cast", "scale", "dropout"}
_PROJECTIONS = ("linear", "conv")

#: what a user reads when attention is computed in chunks written into a preallocated buffer
CHUNKED_BUFFER = ("attention computed in chunks written into a preallocated buffer ({op}): split/sliced attention "
                  "is not proved as one attention; run attention in one call (ComfyUI: --use-pytorch-cross-attention; "
                  "diffusers: pipe.disable_attention_slicing())")


@dataclass
class Projection:
    """A projection feeding (or fed by) attention: ``F.linear(x, weight, bias)`` on (B, L, C) tokens, or (``conv``)
    a 1x1 convolution of a channel-first (B, C, *spatial) map, which is the same linear on its tokens (weight
    (F, C, 1[, 1])). The attention reads the output columns ``start .. start + width``, or ``rows`` (in head order)
    where those are not contiguous (ADM's legacy fused qkv: per head [q | k | v])."""

    linear: Node  # the projection node: a linear or a 1x1 convolution
    weight: Node
    bias: Node | None
    start: int
    width: int
    rows: tuple[int, ...] | None = None
    conv: bool = False

    @property
    def columns(self) -> slice | tuple[int, ...]:
        """The output columns the attention reads, in canonical head order."""
        return self.rows if self.rows is not None else slice(self.start, self.start + self.width)


@dataclass
class AttentionSite:
    """One proved attention: q/k/v/out projections, heads, scale, token grid and the nodes it owns.

    Shapes: ``x`` is the tensor the q projection reads: (B, N, C) tokens, or (B, C, *spatial) with N = H*W for a
    1x1-conv projection (``channels_first``); ``context`` (B, L, Ck) (or channel-first) the k/v input for
    cross-attention (``None`` for self-attention); ``metric`` the pre-norm residual stream, laid out like ``x``.
    """

    kind: str  # "self" | "cross"
    form: str  # e.g. "sdpa", "matmul-softmax", "fused-qkv sdpa", "fused-qkv conv einsum-softmax"
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

    @property
    def channels_first(self) -> bool:
        """``x`` and ``metric`` are (B, C, *spatial) maps read by 1x1 convolutions, not (B, N, C) tokens."""
        return self.q.conv


@dataclass
class Unmatched:
    """An attention-like node the matcher could not prove, with the reason."""

    attention: Node
    module_path: str
    reason: str


_PATH_PART = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]|\['([^']+)'\]|\._modules\['([^']+)'\]")


def _dotted(raw: str) -> str:
    raw = raw.replace("L['self']", "").replace("L__self__", "")
    path = _PATH_PART.sub(lambda m: "." + next(g for g in m.groups() if g), raw)
    return re.sub(r"^\.+", "", path).replace("._modules.", ".")


def module_path(node: Node) -> str:
    """Dotted module path of the innermost module that produced ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return _dotted(list(stack.values())[-1][0]) if stack else ""


def module_paths(node: Node) -> list[str]:
    """Dotted paths of every module on ``node``'s module stack, outermost first."""
    return [_dotted(v[0]) for v in (node.meta.get("nn_module_stack") or {}).values()]


class _NoMatch(Exception):
    pass


def _projection_parts(node: Node) -> tuple[Node, Node, Node | None]:
    """(input, weight, bias) of a linear or convolution node."""
    a = named_args(node, ("input", "weight", "bias"))
    inp, weight, bias = a.get("input"), a.get("weight"), a.get("bias")
    if not isinstance(inp, Node) or not isinstance(weight, Node):
        raise _NoMatch(f"{describe(node)} has a non-node input or weight")
    return inp, weight, bias if isinstance(bias, Node) else None


def _tokens(probe: torch.Tensor, conv: bool) -> torch.Tensor:
    """The (B, L, F) token view of a projection's output: itself for a linear, the flattened map for a conv."""
    return probe.flatten(2).transpose(1, 2) if conv else probe


def _head_split(p: torch.Tensor, h: int, d: int, B: int, bmm: bool) -> torch.Tensor:
    """Canonical (B, L, h*d) -> (B, h, L, d), or (B*h, L, d) for bmm-style code."""
    q = p.reshape(B, p.shape[1], h, d).transpose(1, 2)
    return q.reshape(B * h, p.shape[1], d) if bmm else q


def _head_merge(o: torch.Tensor, h: int, B: int, bmm: bool) -> torch.Tensor:
    """Canonical inverse: (B, h, L, d) or (B*h, L, d) -> (B, L, h*d)."""
    if bmm:
        o = o.reshape(B, h, o.shape[1], o.shape[2])
    return o.transpose(1, 2).reshape(B, o.shape[2], h * o.shape[3])


def _head_columns(got: torch.Tensor | None, perm: tuple[int, ...], tokens: torch.Tensor, h: int, d: int, B: int,
                  bmm: bool) -> list[int] | None:
    """The projection columns, in head order, of which ``got`` (an operand replayed on the index probe whose token
    view is ``tokens``) is exactly the canonical head split once permuted by ``perm``; None if it is not one."""
    L, F_ = tokens.shape[1], tokens.shape[2]
    want_shape = (B * h, L, d) if bmm else (B, h, L, d)
    if got is None or got.dim() != len(perm) or tuple(got.permute(perm).shape) != want_shape or h * d > F_:
        return None
    got = got.permute(perm)
    column = torch.empty(tokens.numel(), dtype=torch.long)  # column of each probe element, by its flat index
    column[tokens.reshape(-1).long()] = torch.arange(F_).repeat(B * L)
    first = got[:h, 0] if bmm else got[0, :, 0]  # batch 0, token 0: (h, d) flat indices
    rows = column[first.reshape(-1).long()].tolist()
    return rows if same(got, _head_split(tokens[..., rows], h, d, B, bmm)) else None


def _walk_stopped(role: str, t: Node, src: Node, chain: list[Node]) -> str:
    where = (f"{role} {t.name}: walking back through {describe_chain(chain)} stopped at {describe(src)}; "
             "expected a linear or 1x1-conv projection (through layout ops only)")
    if src.op == "placeholder":
        where += " - the projection is not in this graph: a graph break separates it from the attention"
    return where


def _prove_projection(t: Node, perm: tuple[int, ...], h: int, d: int, B: int, bmm: bool, role: str
                      ) -> tuple[Projection, list[Node], float]:
    """Walk from an attention operand back to its projection and prove the chain is a head split (+ scalings)."""
    src, chain = walk_back(t, _CHAIN_KINDS)
    kind = op_kind(src)
    if kind not in _PROJECTIONS:
        raise _NoMatch(_walk_stopped(role, t, src, chain))
    conv = kind == "conv"
    why = conv_is_pointwise(src) if conv else None
    if why:
        raise _NoMatch(f"{role} projection: {why}")
    _, weight, bias = _projection_parts(src)
    pshape = tensor_shape(src)
    if pshape is None or len(pshape) < 3 or (not conv and len(pshape) != 3):
        raise _NoMatch(f"{role} projection {describe(src)} is not a static (B, L, F) or (B, F, *spatial) tensor")
    def prove() -> list[int] | None:
        probe = index_tensor(pshape)
        return _head_columns(replay(chain, src, probe), perm, _tokens(probe, conv), h, d, B, bmm)

    rows = memo_proof(("head split", chain_signature(chain, src), pshape, perm, h, d, B, bmm, conv), prove)
    if rows is None:
        raise _NoMatch(f"{role}: the layout ops from {describe(src)} to {t.name} ({describe_chain(chain)}) are not "
                       f"a head split of its columns into {h} heads of {d}")
    contiguous = rows == list(range(rows[0], rows[0] + h * d))
    proj = Projection(src, weight, bias, rows[0], h * d, None if contiguous else tuple(rows), conv)
    return proj, chain, chain_scale(chain)


def _prove_output(att: Node, perm: tuple[int, ...], h: int, B: int, bmm: bool) -> tuple[Projection, list[Node]]:
    """Follow the attention output through layout ops to the out projection and prove the head merge."""
    chain: list[Node] = []
    cur = att
    while True:
        users = real_users(cur)
        if len(users) != 1:
            raise _NoMatch(f"attention output {cur.name} has {len(users)} users "
                           f"({', '.join(describe(u) for u in users[:3])}); expected one path to the out projection")
        nxt = users[0]
        kind = op_kind(nxt)
        if kind in _PROJECTIONS and nxt.args and nxt.args[0] is cur:
            break
        if kind == "setitem":
            raise _NoMatch(CHUNKED_BUFFER.format(op=describe(nxt)))
        if kind not in ("layout", "cast") and not (kind == "dropout" and dropout_is_identity(nxt)):
            raise _NoMatch(f"attention output: walking forward through {describe_chain(chain)} stopped at "
                           f"{describe(nxt)}; expected layout ops up to the out projection (a linear or 1x1 conv)")
        chain.append(nxt)
        cur = nxt
    out_node, conv = nxt, op_kind(nxt) == "conv"
    why = conv_is_pointwise(out_node) if conv else None
    if why:
        raise _NoMatch(f"out projection: {why}")
    _, weight, bias = _projection_parts(out_node)
    shape, in_shape, out_shape = tensor_shape(att), tensor_shape(cur), tensor_shape(out_node)
    if shape is None or in_shape is None or out_shape is None:
        raise _NoMatch("attention output or out projection has no static shape")
    def prove() -> str | None:  # None: proved; else why not
        probe = index_tensor(shape)
        want = _head_merge(probe.permute(perm), h, B, bmm)  # (B, L, h*d)
        if conv:  # the merged tokens as the conv's channel-first input
            if math.prod(in_shape[2:]) != want.shape[1] or in_shape[1] != want.shape[2]:
                return (f"out projection {describe(out_node)} reads {in_shape}, not the {want.shape[1]} "
                        "attention tokens")
            want = want.transpose(1, 2).reshape(in_shape)
        return None if same(replay(chain, att, probe), want) else "not the head merge"

    why_not = memo_proof(("head merge", chain_signature(chain, att), shape, perm, h, B, bmm, conv, in_shape), prove)
    if why_not is not None and why_not != "not the head merge":
        raise _NoMatch(why_not)
    if why_not is not None:
        raise _NoMatch(f"the layout ops after the attention ({describe_chain(chain)}) are not the head merge into "
                       f"{describe(out_node)}")
    width = out_shape[1] if conv else out_shape[-1]
    return Projection(out_node, weight, bias, 0, int(width), conv=conv), chain


@dataclass
class _Core:
    """An attention op and its operands. ``perms[i]``: operand i (q, k, v) permuted by it is canonical
    (batch..., L, d); ``out_perm`` does the same for the output (batch..., Lq, d)."""

    q: Node
    k: Node
    v: Node
    perms: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    out: Node
    out_perm: tuple[int, ...]
    scale: float | None
    internal: list[Node]
    form: str


def _identity(node: Node) -> tuple[int, ...]:
    return tuple(range(len(tensor_shape(node) or ())))


def _core_sdpa(node: Node) -> _Core:
    """SDPA node -> its operands (already canonical), output and internal nodes."""
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
    q, k, v = a["query"], a["key"], a["value"]
    return _Core(q, k, v, (_identity(q), _identity(k), _identity(v)), out, _identity(out), a.get("scale"), internal,
                 "sdpa")


def _permutation(chain: list[Node], start: Node) -> tuple[int, ...] | None:
    """The dimension permutation that the layout ops ``chain`` (fed by ``start``) apply, if that is all they do."""
    shape = tensor_shape(start)
    if shape is None:
        return None
    if not [n for n in chain if op_kind(n) == "layout"]:
        return tuple(range(len(shape)))
    def prove() -> tuple[int, ...] | None:
        probe = index_tensor(shape)
        got = replay(chain, start, probe)
        return next((p for p in itertools.permutations(range(len(shape))) if same(got, probe.permute(p))), None)

    return memo_proof(("permutation", chain_signature(chain, start), shape), prove)


def _core_softmax(soft: Node) -> _Core:
    """softmax node -> the attention around it: (q . k) -> [scale] -> softmax -> (p . v), the products matmul, bmm,
    baddbmm or einsum, their operand layouts read from their index notation."""
    dim = soft.kwargs.get("dim", soft.args[1] if len(soft.args) > 1 else None)
    rank = len(tensor_shape(soft) or ())
    if dim not in (-1, rank - 1):
        raise _NoMatch(f"softmax over dim {dim}, not the last")
    scores, pre = walk_back(tensor_input(soft), {"cast", "scale"})
    scale = chain_scale(pre)
    spec = contraction(scores)
    if spec is None:
        raise _NoMatch(f"softmax input: walking back through {describe_chain(pre)} stopped at {describe(scores)}; "
                       "expected the product of q and k (matmul, bmm, baddbmm or a two-operand einsum)")
    internal = [soft, scores, *pre]
    if op_kind(scores) == "baddbmm":
        if scores.kwargs.get("beta", 1) != 0:
            raise _NoMatch(f"{describe(scores)} has beta != 0 (adds a bias to the scores)")
        scale *= scores.kwargs.get("alpha", 1)
        buf = scores.args[0]
        if isinstance(buf, Node) and len(real_users(buf)) == 1:
            internal.append(buf)
    (a, b), (la, lb), lo = spec
    if len(lo) < 2:
        raise _NoMatch(f"{describe(scores)} is not a matrix product")
    qi, kj, batch = lo[-2], lo[-1], lo[:-2]
    contracted = [c for c in la if c in lb and c not in lo]
    q_first = qi in la and kj in lb
    lq, lk = (la, lb) if q_first else (lb, la)
    if len(contracted) != 1 or not (q_first or (qi in lb and kj in la)) or \
            sorted(lq) != sorted(batch + qi + contracted[0]) or sorted(lk) != sorted(batch + kj + contracted[0]):
        raise _NoMatch(f"{describe(scores)} ('{','.join((la, lb))}->{lo}') is not q . k^T over one index "
                       "with the keys last")
    dq = contracted[0]
    q, k = (a, b) if q_first else (b, a)
    perm_q = tuple(lq.index(c) for c in batch + qi + dq)
    perm_k = tuple(lk.index(c) for c in batch + kj + dq)
    # softmax -> casts / identity dropouts / a permutation -> the product with the values
    cur, post = soft, []
    while len(real_users(cur)) == 1 and op_kind(real_users(cur)[0]) in ("cast", "dropout", "layout"):
        cur = real_users(cur)[0]
        if op_kind(cur) == "dropout" and not dropout_is_identity(cur):
            raise _NoMatch("attention dropout is active")
        post.append(cur)
    users = real_users(cur)
    spec2 = contraction(users[0]) if len(users) == 1 else None
    if spec2 is None or sum(x is cur for x in spec2[0]) != 1:
        found = ", ".join(describe(u) for u in users[:3]) or "nothing"
        raise _NoMatch(f"softmax output: walking forward through {describe_chain(post)} reached {found}; expected "
                       "one product with the values (matmul, bmm or a two-operand einsum)")
    pv = users[0]
    p_perm = _permutation(post, soft)
    if p_perm is None:
        raise _NoMatch(f"the layout ops between softmax and {describe(pv)} ({describe_chain(post)}) are not a "
                       "permutation of the attention map")
    (a2, b2), (l2a, l2b), lo2 = spec2
    lp, v, lv = (l2a, b2, l2b) if a2 is cur else (l2b, a2, l2a)
    canon = batch + qi + kj  # the map's dims as softmax produced them
    if len(lp) != len(canon):
        raise _NoMatch(f"{describe(pv)} does not read the attention map with its {len(canon)} dims")
    role = {lp[i]: canon[p_perm[i]] for i in range(len(lp))}
    by_role = {r: c for c, r in role.items()}
    pb, pi, pj = [by_role[c] for c in batch], by_role[qi], by_role[kj]
    extra = [c for c in lv if c not in lp]
    if len(extra) != 1 or sorted(lv) != sorted(pb + [pj] + extra) or sorted(lo2) != sorted(pb + [pi] + extra):
        raise _NoMatch(f"{describe(pv)} ('{','.join((l2a, l2b))}->{lo2}') is not the attention map times the "
                       "values over the keys")
    perm_v = tuple(lv.index(c) for c in pb + [pj] + extra)
    perm_out = tuple(lo2.index(c) for c in pb + [pi] + extra)
    internal += post + [pv]
    form = "einsum-softmax" if "einsum" in (op_kind(scores), op_kind(pv)) else "matmul-softmax"
    return _Core(q, k, v, (perm_q, perm_k, perm_v), pv, perm_out, scale, internal, form)


def _core(node: Node) -> _Core:
    return _core_sdpa(node) if op_kind(node) in ("sdpa", "sdpa_tuple") else _core_softmax(node)


def _cat_dim(cat: Node) -> int:
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    return dim % len(tensor_shape(cat) or (0,))


def _merge_chunks(cores: list[_Core], cat: Node) -> _Core:
    """Query-chunked attention as one attention: every chunk attends its slice of the queries to the same keys and
    values, and ``cat`` joins the outputs along the query axis. Proved by replaying each chunk's query slice from
    their common source: the slices, concatenated in ``cat``'s order, must be the whole query."""
    first = cores[0]
    n = len(cores)
    what = f"query-chunked attention ({n} chunk(s) joined by {describe(cat)})"
    if [c.out for c in cores] != list(cat.args[0]):
        raise _NoMatch(f"{what}: the concatenated tensors are not all attention outputs")
    if _cat_dim(cat) != first.out_perm[-2]:
        raise _NoMatch(f"{what}: joined along dim {_cat_dim(cat)}, not the query axis")
    for c in cores[1:]:
        if (c.k, c.v, c.perms, c.out_perm, c.scale, c.form) != (first.k, first.v, first.perms, first.out_perm,
                                                                 first.scale, first.form):
            raise _NoMatch(f"{what}: the chunks do not share keys, values, layout and scale")
    walks = [walk_back(c.q, {"layout", "cast"}) for c in cores]
    if len({src for src, _ in walks}) != 1:
        raise _NoMatch(f"{what}: the query slices do not come from one tensor through layout ops")
    chains = [[walks[0][0]] + chain for _, chain in walks]
    common = 0
    while all(len(ch) > common + 1 for ch in chains) and len({ch[common + 1] for ch in chains}) == 1:
        common += 1
    source = chains[0][common]
    shape = tensor_shape(source)
    perm_q = first.perms[0]
    probe = index_tensor(shape) if shape is not None and len(shape) == len(perm_q) else None
    parts = [replay(ch[common + 1:], source, probe) if probe is not None else None for ch in chains]
    if probe is None or any(p is None or p.dim() != len(perm_q) for p in parts) or not same(
            torch.cat([p.permute(perm_q) for p in parts], dim=-2), probe.permute(perm_q)):
        raise _NoMatch(f"{what}: the query slices do not concatenate back to the whole query "
                       "(use one attention call, e.g. ComfyUI's --use-pytorch-cross-attention)")
    internal = [n for c in cores for n in c.internal] + [n for ch in chains for n in ch[common + 1:]] + [cat]
    return _Core(source, first.k, first.v, first.perms, cat, first.out_perm, first.scale, internal,
                 f"{first.form} in {n} query chunks" if n > 1 else first.form)


def _match_core(core: _Core, node: Node) -> AttentionSite:
    """Prove the projections and the out projection around an attention core."""
    qshape = tensor_shape(core.q)
    if qshape is None or len(qshape) != len(core.perms[0]):
        raise _NoMatch("query has no static shape")
    qc = tuple(qshape[i] for i in core.perms[0])  # canonical (batch..., Lq, d)
    if len(qc) not in (3, 4):
        raise _NoMatch(f"query is {len(qc)}-D; expected (B*h, L, d) or (B, h, L, d)")
    q_src, q_walk = walk_back(core.q, _CHAIN_KINDS)
    if op_kind(q_src) not in _PROJECTIONS:
        raise _NoMatch(_walk_stopped("query", core.q, q_src, q_walk))
    B = (tensor_shape(q_src) or (0,))[0]
    bmm = len(qc) == 3
    if B <= 0 or (bmm and qc[0] % B):
        raise _NoMatch(f"query batch {qc[0]} is not the projection's batch {B} times a head count")
    h = qc[0] // B if bmm else qc[1]
    d = qc[-1]
    out_proj, out_chain = _prove_output(core.out, core.out_perm, h, B, bmm)
    q, q_chain, q_scale = _prove_projection(core.q, core.perms[0], h, d, B, bmm, "query")
    k, k_chain, k_scale = _prove_projection(core.k, core.perms[1], h, d, B, bmm, "key")
    v, v_chain, v_scale = _prove_projection(core.v, core.perms[2], h, d, B, bmm, "value")
    if v_scale != 1.0:
        raise _NoMatch("values are scaled before attention")
    scale = (1.0 / math.sqrt(d) if core.scale is None else core.scale) * q_scale * k_scale
    x = _projection_parts(q.linear)[0]
    xk = _projection_parts(k.linear)[0]
    xv = _projection_parts(v.linear)[0]
    if xk is not xv or k.conv != v.conv:
        raise _NoMatch("keys and values project different tensors")
    kind = "self" if xk is x else "cross"
    if kind == "self" and not (q.linear is k.linear is v.linear) and len({q.linear, k.linear, v.linear}) != 3:
        raise _NoMatch("q, k, v share some but not all projections")
    xshape, ctx_shape = tensor_shape(x), tensor_shape(xk)
    if xshape is None or ctx_shape is None or (not q.conv and len(xshape) != 3):
        raise _NoMatch("token tensor is not a static (B, N, C) or (B, C, *spatial) tensor")
    N, C = (math.prod(xshape[2:]), xshape[1]) if q.conv else (xshape[1], xshape[2])
    nodes = set(core.internal) | set(q_chain) | set(k_chain) | set(v_chain) | set(out_chain)
    nodes |= {q.linear, k.linear, v.linear}
    for n in list(nodes):
        nodes.update(assert_users(n))
    for n in nodes:
        outside = [u for u in real_users(n) if u not in nodes and u is not out_proj.linear]
        if outside:
            raise _NoMatch(f"intermediate {describe(n)} is also used outside the attention (by {describe(outside[0])})")
    fused = q.linear is k.linear
    path = module_path(node)  # the module that runs the attention op (diffusers: the Attention module)
    metric, metric_source = find_pre_norm(x, channels_first=q.conv)
    form = ("fused-qkv " if fused else "") + ("conv1x1 " if q.conv else "") + core.form
    return AttentionSite(
        kind=kind, form=form, module_path=path, attention=node, x=x,
        context=None if kind == "self" else xk, q=q, k=k, v=v, out=out_proj, heads=h, head_dim=d,
        scale=float(scale), B=B, N=N, C=C, L=math.prod(ctx_shape[2:]) if k.conv else ctx_shape[1],
        metric=metric, metric_source=metric_source, grid=None, internal=nodes,
    )


def find_pre_norm(x: Node, max_steps: int = 8, channels_first: bool = False) -> tuple[Node, str]:
    """Walk from the attention input up through the norm (LayerNorm, then optional adaLN scale/shift; a GroupNorm
    for ``channels_first`` inputs) to its input.

    Returns (node, description). Falls back to ``x`` itself when no norm is found (e.g. a norm-free module):
    a documented deviation for similarity-based methods.
    """
    shape = tensor_shape(x)
    norm = "group_norm" if channels_first else "layer_norm"
    cur = x
    for _ in range(max_steps):
        kind = op_kind(cur)
        if kind == norm:
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
    return x, f"attention input (no {'GroupNorm' if channels_first else 'LayerNorm'} found above it)"


def find_token_grid(start: Node, limit: int = 20000, channels_first: bool = False) -> tuple[int, int] | None:
    """Search upstream of ``start`` (B, N, C) for the (B, C', H, W) tensor whose row-major flattening made the
    tokens; returns (H, W) once replaying the flattening proves it, else None. ``channels_first``: ``start`` is
    (B, C, N) and the flattening is (B, C', H, W) -> (B, C', H*W)."""
    shape = tensor_shape(start)
    if shape is None or len(shape) != 3:
        return None
    B, N = shape[0], shape[2 if channels_first else 1]
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
                def prove(chain: list[Node] = chain, src: Node = src, sshape: tuple[int, ...] = sshape) -> bool:
                    probe = index_tensor(sshape)
                    want = probe.reshape(B, sshape[1], N) if channels_first else \
                        probe.permute(0, 2, 3, 1).reshape(B, N, sshape[1])
                    return same(replay(chain, src, probe), want)

                if memo_proof(("flatten", chain_signature(chain, src), sshape, channels_first), prove):
                    return sshape[2], sshape[3]
        for arg in node.all_input_nodes:
            ashape = tensor_shape(arg)
            if ashape is not None and len(ashape) == 3 and ashape[0] == B and ashape[2 if channels_first else 1] == N:
                frontier.append(arg)
    return None


def site_grid(site: AttentionSite) -> tuple[int, int] | None:
    """The token grid of a site: a 1x1 conv on (B, C, H, W) reads the H x W grid itself; otherwise the proved
    flattening upstream of its metric (or input)."""
    shape = tensor_shape(site.x) or ()
    if site.channels_first and len(shape) == 4:
        return shape[2], shape[3]
    cf = site.channels_first
    return find_token_grid(site.metric, channels_first=cf) or find_token_grid(site.x, channels_first=cf)


def attention_candidates(graph: Graph) -> list[Node]:
    """Nodes that look like an attention op: every SDPA variant and every softmax."""
    return [n for n in graph.nodes if op_kind(n) in ("sdpa", "sdpa_tuple", "softmax")]


def _chunk_groups(cores: dict[Node, _Core]) -> dict[Node, list[Node]]:
    """Candidates whose outputs one ``cat`` joins (query chunks), keyed by their first candidate."""
    by_cat: dict[Node, list[Node]] = {}
    for node, core in cores.items():
        users = real_users(core.out)
        if len(users) == 1 and op_kind(users[0]) == "cat":
            by_cat.setdefault(users[0], []).append(node)
    groups = {}
    for cat, nodes in by_cat.items():
        order = {core_out: i for i, core_out in enumerate(cat.args[0])} if isinstance(cat.args[0], (list, tuple)) \
            else {}
        nodes.sort(key=lambda n: order.get(cores[n].out, -1))
        groups[nodes[0]] = nodes
    return groups


def find_attention_sites(graph: Graph) -> tuple[list[AttentionSite], list[Unmatched]]:
    """Match every attention in ``graph``. Returns (proved sites in graph order, unmatched with reasons)."""
    sites: list[AttentionSite] = []
    unmatched: list[Unmatched] = []
    grids: dict[Node, tuple[int, int] | None] = {}
    cores: dict[Node, _Core] = {}
    failed: dict[Node, str] = {}
    for node in attention_candidates(graph):
        if is_symbolic(node):
            failed[node] = "dynamic (symbolic) shapes; compile with dynamic=False"
            continue
        try:
            cores[node] = _core(node)
        except _NoMatch as exc:
            failed[node] = str(exc)
    groups = _chunk_groups(cores)
    grouped = {n for nodes in groups.values() for n in nodes[1:]}
    for node in attention_candidates(graph):
        if node in grouped:
            continue
        try:
            if node in failed:
                raise _NoMatch(failed[node])
            core = _merge_chunks([cores[n] for n in groups[node]], real_users(cores[node].out)[0]) \
                if node in groups else cores[node]
            site = _match_core(core, node)
        except _NoMatch as exc:
            log.info("graphprune: attention %s (%s) left unchanged: %s", node.name, module_path(node), exc)
            unmatched.append(Unmatched(node, module_path(node), str(exc)))
            continue
        if site.metric not in grids:
            grids[site.metric] = site_grid(site)
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
           "find_transformer_stacks", "find_pre_norm", "find_token_grid", "site_grid", "attention_candidates",
           "module_path", "module_paths", "downsample_levels", "node_val", "scale_factor", "CHUNKED_BUFFER"]
