"""The tools both rewrites share (the per-site :mod:`.rewrite` and the region :mod:`.region`): the canonical attention
a proved site is rebuilt as, the method calls that go into a graph, the gate that decides whether a site is pruned,
and :class:`Splicer`, which inserts nodes with correct fake-tensor metadata.

    sp = Splicer(gm.graph)
    reduce, restore = token_calls(method, config)
    with sp.graph.inserting_before(out):
        xk = sp.call(reduce, (plan, site.x), out)                    # (B, K, C)
        y = sp.call(attention_call(site), (xk, xk, *projection_weights(site)), out)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from ..config import PruneConfig
from ..methods.base import RandomSpec, StateSpec, TokenMethod
from .match import AttentionSite, Projection
from .ops import assert_users, node_val

GRID_UNKNOWN = "token grid unknown (no (B, C, H, W) -> (B, H*W, C) flattening found)"


def take_columns(t: torch.Tensor, cols: slice | tuple[int, ...]) -> torch.Tensor:
    """``t[..., cols]`` for a slice or for row indices in head order (a constant index inside the graph)."""
    if isinstance(cols, slice):
        return t[..., cols]
    return t.index_select(-1, torch.tensor(cols, device=t.device))


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cols: slice | tuple[int, ...]) -> torch.Tensor:
    """x (B, L, C) -> (B, L, width): the columns ``cols`` of a projection. A 1x1 conv kernel (F, C, 1[, 1]) is the
    linear weight (F, C) on tokens."""
    if w.dim() > 2:
        w = w.flatten(1)
    if cols != slice(0, w.shape[0]):
        w = take_columns(w.transpose(0, 1), cols).transpose(0, 1)  # rows of the weight = output columns
        b = take_columns(b, cols) if b is not None else None
    return F.linear(x, w, b)


def canonical_attention(xq: torch.Tensor, xkv: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None,
                        wk: torch.Tensor, bk: torch.Tensor | None, wv: torch.Tensor, bv: torch.Tensor | None,
                        wo: torch.Tensor, bo: torch.Tensor | None, *, cols: tuple[slice | tuple[int, ...], ...],
                        heads: int, head_dim: int, scale: float, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention with out projection. xq: (B, Lq, C), xkv: (B, Lk, Ckv) -> (B, Lq, Cout).

    ``cols`` holds the output columns of the q, k, v projections (a slice, or row indices in head order; a fused qkv
    projection passes the same weight three times). Weights may be 1x1 conv kernels (a linear on tokens).
    ``key_bias`` (B, 1, 1, Lk): added to the logits (-inf hides a key).
    """
    B, Lq, _ = xq.shape
    Lk = xkv.shape[1]
    q = _project(xq, wq, bq, cols[0]).view(B, Lq, heads, head_dim).transpose(1, 2)
    k = _project(xkv, wk, bk, cols[1]).view(B, Lk, heads, head_dim).transpose(1, 2)
    v = _project(xkv, wv, bv, cols[2]).view(B, Lk, heads, head_dim).transpose(1, 2)
    mask = key_bias.to(q.dtype) if key_bias is not None else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.linear(o.transpose(1, 2).reshape(B, Lq, heads * head_dim), wo.flatten(1) if wo.dim() > 2 else wo, bo)


def named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with ``__name__`` set: the name its nodes get in the graph (``graphprune_<method>_<step>``)."""
    fn.__name__ = fn.__qualname__ = name
    return fn


def weights(p: Projection) -> tuple[Node, Node | None]:
    """(weight, bias) graph nodes of a projection."""
    return p.weight, p.bias


def projection_weights(site: AttentionSite) -> tuple[Node | None, ...]:
    """The q, k, v and out (weight, bias) nodes of a site, in :func:`canonical_attention`'s argument order."""
    return (*weights(site.q), *weights(site.k), *weights(site.v), *weights(site.out))


def attention_call(site: AttentionSite) -> Callable[..., torch.Tensor]:
    """The canonical attention of a proved site as a graph function:
    ``(xq, xkv, wq, bq, wk, bk, wv, bv, wo, bo, key_bias=None) -> (B, Lq, Cout)`` on tokens."""
    cols = (site.q.columns, site.k.columns, site.v.columns)

    def attend(xq, xkv, wq, bq, wk, bk, wv, bv, wo, bo, key_bias=None):
        return canonical_attention(xq, xkv, wq, bq, wk, bk, wv, bv, wo, bo, cols=cols, heads=site.heads,
                                   head_dim=site.head_dim, scale=site.scale, key_bias=key_bias)

    return named(attend, "graphprune_attention")


def as_tokens(sp: "Splicer", node: Node, channels_first: bool, stack_from: Node | None = None) -> Node:
    """``node`` as (B, N, C) tokens: itself, or (``channels_first``) the flattening of a (B, C, *spatial) map that a
    1x1 conv projection reads, inserted at the current insertion point."""
    if not channels_first:
        return node
    return sp.call(named(lambda m: m.flatten(2).transpose(1, 2), "graphprune_tokens"), (node,), stack_from)


def as_output_of(sp: "Splicer", y: Node, out: Projection) -> Node:
    """The (B, N, Cout) tokens ``y`` laid out as ``out``'s result: itself for a linear, the (B, Cout, *spatial) map
    for a 1x1 conv out projection."""
    if not out.conv:
        return y
    shape = tuple(node_val(out.linear).shape)
    return sp.call(named(lambda t: t.transpose(1, 2).reshape(shape), "graphprune_channels_first"), (y,), out.linear)


def token_calls(method: TokenMethod, config: PruneConfig) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The method's ``reduce(plan, x)`` and ``restore(plan, y)`` as named graph functions."""
    reduce = named(lambda p, x: method.reduce(config, p, x), f"graphprune_{method.name}_reduce")
    restore = named(lambda p, y: method.restore(config, p, y), f"graphprune_{method.name}_restore")
    return reduce, restore


def gate(grid: tuple[int, int] | None, level: int | None, config: PruneConfig, method: TokenMethod,
         missing: list[str]) -> tuple[str, str] | None:
    """Whether a site (or a transformer stack) is rewritten: None, or the (status, reason) it keeps instead.

    ``missing``: context inputs the method's plan needs that this graph lacks (e.g. DaTo outside the runtime)."""
    if grid is None:
        return "skipped", GRID_UNKNOWN
    if level is None or level > config.max_downsample:
        return "kept", f"level {level} > max_downsample={config.max_downsample}"
    unchanged = method.unchanged_reason(config)
    if unchanged:
        return "kept", unchanged
    if missing:
        return "skipped", f"{method.name} needs {missing} (state of the step-aware runtime)"
    return None


class Splicer:
    """Inserts nodes with fake-tensor metadata into one graph (Dynamo's ``example_value`` or export's ``val``)."""

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

    def annotate(self, node: Node, like: Node | None = None) -> None:
        """Compute ``node``'s fake value from its arguments' (``like``: the node it copies, for call_method)."""
        if self.fake_mode is None:
            return
        original = like or node
        args = map_arg(node.args, node_val)
        kwargs = map_arg(node.kwargs, node_val)
        with self.fake_mode:
            node.meta[self.val_key] = (getattr(args[0], original.target)(*args[1:], **kwargs)
                                       if original.op == "call_method" else original.target(*args, **kwargs))

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], stack_from: Node | None = None) -> Node:
        """Insert ``fn(*args)`` at the current insertion point (module stack copied from ``stack_from``)."""
        node = self.graph.call_function(fn, args)
        if stack_from is not None and "nn_module_stack" in stack_from.meta:
            node.meta["nn_module_stack"] = dict(stack_from.meta["nn_module_stack"])
        self.annotate(node)
        return node

    def copy(self, node: Node, env: dict[Node, Node]) -> Node:
        """Insert a copy of ``node`` whose inputs are mapped through ``env`` (others kept), with its fake value."""
        new = self.graph.node_copy(node, lambda a: env.get(a, a))
        self.annotate(new, like=node)
        return new

    def placeholder(self, name: str, spec: RandomSpec | StateSpec, device: torch.device) -> Node:
        """A new graph input after the last one, for a random or carried-state tensor."""
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


__all__ = ["canonical_attention", "take_columns", "named", "weights", "projection_weights", "attention_call",
           "as_tokens", "as_output_of", "token_calls", "gate", "Splicer", "GRID_UNKNOWN"]
