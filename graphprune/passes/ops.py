"""Op vocabulary shared by the passes: one table per role, covering Dynamo's torch-level graphs and ATen graphs.

:func:`op_kind` names what a node does (``"linear"``, ``"sdpa"``, ``"layout"``, ...), so the matcher is written
once for both IRs. :func:`replay` re-runs a chain of layout nodes on a concrete tensor, which the matcher uses to
*prove* that a chain of views/transposes is a head split (never guessed from shapes).
"""

from __future__ import annotations

import collections
import math
import operator
from typing import Any, Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch.fx import Node

aten = torch.ops.aten


def _ops(*names: str) -> set[Any]:
    """Resolve 'aten.op.overload' strings that exist in this torch build."""
    found = set()
    for name in names:
        obj: Any = torch.ops
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            continue
        found.add(obj)
    return found


LINEAR = {torch._C._nn.linear, F.linear} | _ops("aten.linear.default")
CONV = {torch.conv1d, torch.conv2d, F.conv1d, F.conv2d} | _ops(
    "aten.conv1d.default", "aten.conv2d.default", "aten.convolution.default")
EINSUM = {torch.einsum, torch.functional.einsum} | _ops("aten.einsum.default")
SDPA = {F.scaled_dot_product_attention} | _ops("aten.scaled_dot_product_attention.default")
SDPA_TUPLE = _ops(
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
)
MATMUL = {torch.matmul, operator.matmul, torch.bmm} | _ops("aten.matmul.default", "aten.bmm.default")
BADDBMM = {torch.baddbmm} | _ops("aten.baddbmm.default")
SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax} | _ops("aten._softmax.default", "aten.softmax.int")
LAYER_NORM = {F.layer_norm} | _ops("aten.layer_norm.default")
GROUP_NORM = {F.group_norm, torch.group_norm} | _ops("aten.group_norm.default", "aten.native_group_norm.default")
CAT = {torch.cat, torch.concat, torch.concatenate} | _ops("aten.cat.default")
LAYOUT = {
    torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.chunk, torch.split, torch.unbind,
    torch.squeeze, torch.unsqueeze, operator.getitem, torch.Tensor.view, torch.Tensor.reshape, torch.movedim,
    torch.moveaxis, torch.swapaxes, torch.swapdims, torch.unflatten, torch.narrow,
} | _ops(
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.transpose.int",
    "aten.permute.default", "aten.t.default", "aten.flatten.using_ints", "aten.unflatten.int", "aten.chunk.default",
    "aten.split.Tensor", "aten.split_with_sizes.default", "aten.unbind.int", "aten.squeeze.dim",
    "aten.unsqueeze.default", "aten.slice.Tensor", "aten.select.int", "aten.contiguous.default", "aten.movedim.int",
    "aten.narrow.default",
)
CAST = {torch.clone} | _ops(
    "aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.clone.default", "aten.alias.default",
    "aten.detach.default", "aten.lift_fresh_copy.default",
)
DROPOUT = {F.dropout, torch.dropout} | _ops("aten.dropout.default")
SCALE = {operator.mul, operator.truediv, torch.mul, torch.div} | _ops(
    "aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar"
)
DIVIDE = {operator.truediv, torch.div} | _ops("aten.div.Tensor", "aten.div.Scalar")
ADD = {operator.add, torch.add, operator.sub, torch.sub} | _ops("aten.add.Tensor", "aten.sub.Tensor")

ASSERTS = _ops("aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
               "aten.sym_constrain_range_for_size.default")

LAYOUT_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "chunk", "split",
                  "unbind", "squeeze", "unsqueeze", "t", "__getitem__", "movedim", "moveaxis", "swapaxes", "swapdims",
                  "narrow"}
CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "clone", "detach", "type_as"}
SCALE_METHODS = {"mul", "div", "__mul__", "__truediv__"}
MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
ADD_METHODS = {"add", "sub", "__add__", "__sub__"}


def real_users(node: Node) -> list[Node]:
    """Users of ``node`` that compute something (metadata assertions that export inserts are left out)."""
    return [u for u in node.users if not (u.op == "call_function" and u.target in ASSERTS)]


def assert_users(node: Node) -> list[Node]:
    """The metadata-assertion users of ``node`` (they go when the node goes)."""
    return [u for u in node.users if u.op == "call_function" and u.target in ASSERTS]


def op_kind(node: Node) -> str | None:
    """The role of ``node``: linear, conv, sdpa, sdpa_tuple, matmul, baddbmm, einsum, softmax, layer_norm,
    group_norm, cat, layout, cast, dropout, scale, add, setitem; ``None`` for anything else."""
    if node.op == "call_method":
        name = node.target
        if name in LAYOUT_METHODS:
            return "layout"
        if name in CAST_METHODS:
            return "cast"
        if name in SCALE_METHODS:
            return "scale"
        if name in MATMUL_METHODS:
            return "matmul"
        if name == "softmax":
            return "softmax"
        if name == "baddbmm":
            return "baddbmm"
        if name in ADD_METHODS:
            return "add"
        return None
    if node.op != "call_function":
        return None
    t = node.target
    for kind, table in (("linear", LINEAR), ("conv", CONV), ("sdpa", SDPA), ("sdpa_tuple", SDPA_TUPLE),
                        ("matmul", MATMUL), ("baddbmm", BADDBMM), ("einsum", EINSUM), ("softmax", SOFTMAX),
                        ("layer_norm", LAYER_NORM), ("group_norm", GROUP_NORM), ("cat", CAT), ("layout", LAYOUT),
                        ("cast", CAST), ("dropout", DROPOUT), ("scale", SCALE), ("add", ADD)):
        if t in table:
            return kind
    return "setitem" if t is operator.setitem else None


def describe(node: Any) -> str:
    """A node as a reason names it: ``linear_3 (linear)``, ``graph input l_q_``, never an object address."""
    if not isinstance(node, Node):
        return repr(node)
    if node.op == "placeholder":
        return f"graph input {node.name}"
    if node.op == "get_attr":
        return f"attribute {node.target}"
    if node.op in ("call_function", "call_method"):
        name = target_name(node)
        return node.name if node.name.rstrip("_0123456789") == name else f"{node.name} ({name})"
    return f"{node.op} {node.name}"


def describe_chain(chain: Sequence[Node]) -> str:
    """The ops of a walked chain, in order (``view -> transpose``), or ``no op`` for an empty one."""
    return " -> ".join(target_name(n) for n in chain) or "no op"


def _einsum_operands(node: Node) -> tuple[str, list[Any]] | None:
    args = list(node.args)
    if not args or not isinstance(args[0], str):
        return None
    equation, rest = args[0], args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):  # einsum(eq, [a, b]) and aten.einsum(eq, [a, b])
        rest = list(rest[0])
    return equation, rest


def _expand_einsum(equation: str, ranks: Sequence[int]) -> tuple[list[str], str] | None:
    """Operand and output index strings of an einsum equation with ``...`` expanded to fresh letters."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    fresh = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    ell = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t), default=0)
    if ell < 0 or ell > len(fresh):
        return None
    filler = "".join(fresh[:ell])
    expanded = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            n = r - len(t.replace("...", ""))
            t = t.replace("...", filler[ell - n:])
        if len(t) != r or not t.isalpha():
            return None
        expanded.append(t)
    if arrow:
        out = rhs.replace("...", filler)
    else:  # implicit output: the letters seen once, in alphabetical order, after the broadcast dims
        counts = {c: sum(t.count(c) for t in expanded) for c in set("".join(expanded))}
        out = filler + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in filler))
    return expanded, out


def contraction(node: Node) -> tuple[list[Node], list[str], str] | None:
    """A two-operand product in einsum notation: (operands, their index strings, the output's), e.g. a bmm is
    ``([a, b], ["Aij", "Ajk"], "Aik")`` and ``einsum("b i d, b j d -> b i j", q, k)`` is ``([q, k], ["bid", "bjd"],
    "bij")``. Covers matmul, bmm, baddbmm (its two matrices) and two-operand einsum; None for anything else,
    broadcasting matmuls or repeated indices within one operand."""
    kind = op_kind(node)
    if kind == "einsum":
        parsed = _einsum_operands(node)
        if parsed is None or len(parsed[1]) != 2 or not all(isinstance(a, Node) for a in parsed[1]):
            return None
        ranks = [len(tensor_shape(a) or ()) for a in parsed[1]]
        letters = _expand_einsum(parsed[0], ranks)
        if letters is None:
            return None
        terms, out = letters
        if any(len(set(t)) != len(t) for t in terms + [out]):
            return None
        return list(parsed[1]), terms, out
    if kind in ("matmul", "baddbmm"):
        a, b = (node.args[0], node.args[1]) if kind == "matmul" else (node.args[1], node.args[2])
        ranks = {len(tensor_shape(x) or ()) for x in (a, b, node) if isinstance(x, Node)}
        if not (isinstance(a, Node) and isinstance(b, Node)) or len(ranks) != 1 or min(ranks) < 2:
            return None
        batch = "ABCDEFGH"[:ranks.pop() - 2]
        return [a, b], [batch + "ij", batch + "jk"], batch + "ik"
    return None


def conv_is_pointwise(node: Node) -> str | None:
    """Why a convolution node is not a per-position linear (None: a 1x1 kernel, stride 1, no padding, no dilation,
    one group, not transposed), i.e. it equals ``F.linear`` on the tokens of its channel-first input."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups") \
        if target_name(node) == "convolution.default" else ("input", "weight", "bias", "stride", "padding",
                                                              "dilation", "groups")
    a = named_args(node, names)
    wshape = tensor_shape(a.get("weight"))
    if wshape is None or any(k != 1 for k in wshape[2:]):
        return f"{describe(node)} has kernel {tuple(wshape[2:]) if wshape else '?'} (a projection is 1x1)"
    def ones(v: Any) -> bool:
        return v is None or all(x == 1 for x in (v if isinstance(v, (list, tuple)) else [v]))
    def zeros(v: Any) -> bool:
        return v is None or v == "valid" or all(x == 0 for x in (v if isinstance(v, (list, tuple)) else [v]))
    if not (ones(a.get("stride")) and ones(a.get("dilation")) and zeros(a.get("padding"))
            and a.get("groups", 1) in (1, None) and not a.get("transposed", False)):
        return f"{describe(node)} is strided, padded, dilated, grouped or transposed"
    return None


def node_val(node: Any) -> Any:
    """The fake value a node carries: ``meta['val']`` (ATen graphs) or ``meta['example_value']`` (Dynamo)."""
    if not isinstance(node, Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """Static shape of a tensor-valued node; None if not a tensor or any dimension is symbolic."""
    val = node_val(node)
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in val.shape)
    except (TypeError, ValueError):
        return None


def is_symbolic(node: Node) -> bool:
    """True if the node's value has a symbolic (dynamic) size."""
    val = node_val(node)
    return isinstance(val, torch.Tensor) and any(not isinstance(s, int) for s in val.shape)


def tensor_input(node: Node) -> Node | None:
    """The single tensor operand a layout/cast/scale/dropout node transforms (its first Node argument)."""
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return first if isinstance(first, Node) else None


def scale_factor(node: Node) -> float | None:
    """For ``x * c`` or ``x / c`` with a Python number c: the factor on x; None if not of that form."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    divide = (node.op == "call_method" and node.target in ("div", "__truediv__")) or (
        node.op == "call_function" and node.target in DIVIDE)
    if isinstance(a, Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return 1.0 / b if divide else float(b)
    if isinstance(b, Node) and isinstance(a, (int, float)) and not divide and not isinstance(a, bool):
        return float(a)
    return None


def dropout_is_identity(node: Node) -> bool:
    """A dropout node that does nothing (p == 0 or training is False)."""
    args = list(node.args) + [None] * 3
    p = node.kwargs.get("p", args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.kwargs.get("train", args[2] if len(node.args) > 2 else True))
    return p == 0 or training is False


def named_args(node: Node, names: Sequence[str]) -> dict[str, Any]:
    """Map a call's positional and keyword args onto ``names`` (the op's parameter order)."""
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_TUPLE_ARGS = ("query", "key", "value", "dropout_p", "is_causal")


_ELEMENTWISE = {"gelu", "silu", "relu", "tanh", "sigmoid", "mul", "add", "sub", "div", "neg", "exp", "pow",
                "square", "rsqrt", "sqrt", "softplus", "mish", "erf", "gelu.default", "silu.default", "mul.Tensor",
                "add.Tensor", "sub.Tensor", "div.Tensor", "contiguous", "contiguous.default", "clone"} | \
    {"iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_", "div_"}
#: elementwise ops that write into their first operand (ComfyUI's ``x += n`` residuals)
INPLACE = {"iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_", "div_"}
_CHANNEL_SPLITS = {"chunk", "split", "chunk.default", "split.Tensor", "split_with_sizes.default"}


def target_name(n: Node) -> str:
    """A readable name of what a node calls: the method name, the function's ``__name__`` or the op's name."""
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _channel_dim_only(n: Node) -> bool:
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
    rank = len(tensor_shape(n.args[0]) or ())
    return dim in (-1, rank - 1)


def not_tokenwise(n: Node) -> str | None:
    """Why ``n`` may not run on a subset of tokens (None: it acts on each token alone): linears, LayerNorms over
    channels, identity dropouts, casts, elementwise ops and channel chunks/splits are token-wise."""
    if n.op not in ("call_function", "call_method"):
        return f"{n.op} node {n.name}"
    kind, name = op_kind(n), target_name(n)
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
        ok = isinstance(src, Node) and target_name(src) in _CHANNEL_SPLITS and isinstance(n.args[1], int)
        return None if ok else f"{n.name}: indexing a token tensor"
    if name in _ELEMENTWISE:
        return None
    return f"{n.name} ({name}) is not proved token-wise"


def replay(chain: Sequence[Node], start: Node, value: torch.Tensor) -> torch.Tensor | None:
    """Run ``chain`` (layout/cast/scale/dropout nodes in order, fed by ``start``) on a concrete tensor.

    Casts, identity dropouts and scalings are identities here (they do not move elements; their result is
    contiguous, so a later ``view`` replays as it ran). Returns None if a node needs a Node argument other than the
    chain's own values.
    """
    env: dict[Node, Any] = {start: value}

    def sub(a: Any) -> Any:
        if isinstance(a, Node):
            if a not in env:
                raise KeyError(a)
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        return a

    try:
        for node in chain:
            kind = op_kind(node)
            if kind in ("cast", "scale", "dropout"):  # a fresh (contiguous) tensor of the same values, as in the graph
                env[node] = env[tensor_input(node)].contiguous()
                continue
            args, kwargs = sub(node.args), {k: sub(v) for k, v in node.kwargs.items()}
            if node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                env[node] = node.target(*args, **kwargs)
    except (KeyError, RuntimeError, TypeError, IndexError, ValueError):
        return None
    out = env[chain[-1]] if chain else value
    return out if isinstance(out, torch.Tensor) else None


def walk_back(node: Node, kinds: set[str]) -> tuple[Node, list[Node]]:
    """Follow single-operand nodes of the given kinds upwards. Returns (source, chain in execution order)."""
    chain: list[Node] = []
    cur = node
    while isinstance(cur, Node) and op_kind(cur) in kinds:
        if op_kind(cur) == "dropout" and not dropout_is_identity(cur):
            break
        if op_kind(cur) == "scale" and scale_factor(cur) is None:
            break
        nxt = tensor_input(cur)
        if nxt is None:
            break
        chain.append(cur)
        cur = nxt
    chain.reverse()
    return cur, chain


def chain_scale(chain: Sequence[Node]) -> float:
    """Product of the scalar factors of the scale nodes in a chain."""
    return math.prod(scale_factor(n) or 1.0 for n in chain if op_kind(n) == "scale")


def chain_signature(chain: Sequence[Node], start: Node) -> Hashable:
    """What a layout chain does, independent of the graph it sits in: each node's op, target and arguments, with
    graph nodes named by their position in ``[start, *chain]`` (-1: a node from outside the chain)."""
    position = {start: 0}

    def encode(a: Any) -> Any:
        if isinstance(a, Node):
            return ("node", position.get(a, -1))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(encode(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple(sorted((k, encode(v)) for k, v in a.items())))
        if isinstance(a, slice):
            return ("slice", encode(a.start), encode(a.stop), encode(a.step))
        return a if isinstance(a, Hashable) else repr(a)

    sig = []
    for i, n in enumerate(chain, 1):
        sig.append((n.op, n.target, encode(n.args), encode(n.kwargs)))
        position[n] = i
    return tuple(sig)


_PROOFS: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
_PROOF_CACHE_SIZE = 1024


def memo_proof(key: Hashable, prove: Callable[[], Any]) -> Any:
    """``prove()``, memoized by ``key``: a layout proof's verdict, keyed by what determines it (a tag, the chain's
    :func:`chain_signature`, the shapes and the canonical layout's parameters). A model repeats the same few layouts
    in every block, and replaying them on index tensors (tens of MB for large attentions) is what proving costs."""
    if key in _PROOFS:
        _PROOFS.move_to_end(key)
        return _PROOFS[key]
    value = _PROOFS[key] = prove()
    if len(_PROOFS) > _PROOF_CACHE_SIZE:
        _PROOFS.popitem(last=False)
    return value


def index_tensor(shape: Sequence[int]) -> torch.Tensor:
    """A float64 tensor whose elements are their own flat index (exact up to 2**53)."""
    return torch.arange(math.prod(shape), dtype=torch.float64).view(*shape)


def same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """Exact equality of shape and values."""
    return a is not None and a.shape == b.shape and torch.equal(a, b)

