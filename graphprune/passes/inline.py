"""Give the rewritten graph cacheable, stable op identities before Inductor (entry point: :func:`inline_calls`).

The rewrite inserts graphprune's own Python functions (plan, reduce, restore, the canonical attention: closures over
the config and the site) as ``call_function`` nodes. AOTAutograd's on-disk cache keys a graph by its code and only
accepts torch ops and public torch functions as targets: it cannot tell two closures of the same name apart, so it
*bypasses* any graph holding one, and every warm compile re-traced the whole UNet (Inductor's FX graph cache still
hit afterwards). :func:`inline_calls` traces each such function with ``make_fx`` on the node's fake values and
splices the ATen ops in its place: the graph then holds only ops (``torch.ops.aten.*``), builtins
(``operator.getitem``) and tensor constants (as attributes, whose values the cache key includes), every one of
them named by what it computes, so the same config on the same model gives the same key in every process.

The ops are those AOTAutograd's own trace records when it runs through the function (same dispatch, same
decompositions), so the compiled code is the same; a node that cannot be traced (a non-tensor input value, a
tracing error) is left as it is, logged, and its graph is then compiled uncached, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import types
from typing import Any, Callable, Hashable

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node

from .ops import node_val

log = logging.getLogger(__name__)

PREFIX = "graphprune."


def is_graphprune_call(node: Node) -> bool:
    """A ``call_function`` node whose target is one of graphprune's inserted functions."""
    return node.op == "call_function" and str(getattr(node.target, "__module__", "")).startswith(PREFIX)


def _val_key(gm: GraphModule) -> str:
    return "val" if any("val" in n.meta for n in gm.graph.nodes if n.op == "placeholder") else "example_value"


def _trace(fn: Callable[..., Any], args: Any, kwargs: Any) -> tuple[GraphModule, list[int], pytree.TreeSpec]:
    """``fn(*args, **kwargs)`` (Node arguments already replaced by their fake values) as an ATen graph over its
    tensor leaves. Returns the graph, the positions of the tensor leaves among all leaves, and the leaves' spec."""
    from torch.fx.experimental.proxy_tensor import make_fx

    leaves, spec = pytree.tree_flatten((args, kwargs))
    positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    tensor_positions = set(positions)
    leaves = [_fresh(x) if i in tensor_positions else x for i, x in enumerate(leaves)]

    def flat(*tensors: torch.Tensor) -> Any:
        full = list(leaves)
        for i, t in zip(positions, tensors):
            full[i] = t
        a, k = pytree.tree_unflatten(full, spec)
        return fn(*a, **k)

    with torch.no_grad():
        sub = make_fx(flat, tracing_mode="fake")(*[leaves[i] for i in positions])
    return sub, positions, spec


def _fresh(value: torch.Tensor) -> torch.Tensor:
    """A new tensor object (of ``value``'s fake mode, if any) with ``value``'s shape, strides, dtype and device.
    make_fx maps tensors to graph inputs by identity: two inputs holding one object (graph values sharing a meta
    value, e.g. a step runtime's ``eps_prev`` and ``eps_prev2``) would trace as one input, and the spliced ops would
    then read the first input in place of the second. Fresh objects give every position its own placeholder."""
    from torch._subclasses.fake_tensor import FakeTensor

    mode = value.fake_mode if isinstance(value, FakeTensor) else contextlib.nullcontext()
    with mode:
        return torch.empty_strided(tuple(value.shape), value.stride(), dtype=value.dtype, device=value.device)


class _Unstable(Exception):
    """A value with no canonical description (a graph node, an arbitrary object): no memo for its function."""


def _canon(value: Any) -> Hashable:
    """A description of ``value`` that equal values share (plain data, dataclasses, functions, stateless objects of
    graphprune's classes); :class:`_Unstable` otherwise."""
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(value).__name__, repr(value))
    if isinstance(value, slice):  # projection columns (graphprune.passes.splice.take_columns)
        return ("slice", _canon((value.start, value.stop, value.step)))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_canon(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), _canon(v)) for k, v in value.items())))
    if isinstance(value, types.FunctionType):
        return fingerprint(value)
    cls = type(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (cls.__module__, cls.__qualname__,
                tuple((f.name, _canon(getattr(value, f.name))) for f in dataclasses.fields(value)))
    if cls.__module__.startswith(PREFIX) and not isinstance(value, Node):  # e.g. a stateless method instance
        return (cls.__module__, cls.__qualname__, _canon(dict(vars(value))))
    raise _Unstable(f"{cls.__qualname__}")


def _code(code: types.CodeType) -> Hashable:
    return (code.co_code, code.co_names, tuple(_code(c) if isinstance(c, types.CodeType) else _canon(c)
                                              for c in code.co_consts))


def fingerprint(fn: types.FunctionType) -> Hashable:
    """What decides the ops of ``fn`` for given inputs: its code and the values it closes over (:class:`_Unstable`
    when one of them has no canonical description)."""
    cells = tuple(_canon(c.cell_contents) for c in fn.__closure__ or ())
    return (fn.__module__, fn.__qualname__, _code(fn.__code__), cells, _canon(fn.__defaults__))


def _memo_key(fn: Any, leaves: list[Any], spec: Any) -> Hashable | None:
    """The key under which a trace of ``fn`` on these inputs can be reused (None: trace it anew)."""
    try:
        fp = fingerprint(fn)
        meta = tuple((tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else _canon(x)
                     for x in leaves)
    except (_Unstable, AttributeError):
        return None
    return fp, meta, str(spec)


def _resolve(arg: Any, env: dict[Node, Any]) -> Any:
    """``arg`` with every inlined node replaced by the (pytree of) nodes that now hold its value."""
    return torch.fx.node.map_aggregate(arg, lambda a: env.get(a, a) if isinstance(a, Node) else a)


def inline_calls(gm: GraphModule) -> int:
    """Replace every graphprune function node of ``gm`` (in place) by the ATen ops it runs; returns how many were
    inlined. Callers that keep the rewritten graph (inspect, ``graphprune_graph``) pass a copy."""
    graph = gm.graph
    key = _val_key(gm)
    env: dict[Node, Any] = {}  # inlined node -> pytree of the nodes holding its outputs
    done = failed = consts = 0
    memo: dict[Hashable, tuple[GraphModule, list[int]]] = {}  # sites of one level share their plan's trace
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in env:
            value = env[node.args[0]][node.args[1]]
            if isinstance(value, Node):
                node.replace_all_uses_with(value)
            else:
                _replace_tuple_uses(node, value)
            graph.erase_node(node)
            continue
        if not is_graphprune_call(node):
            continue
        args = _resolve(node.args, env)
        kwargs = _resolve(node.kwargs, env)
        try:
            fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), node_val)
        except Exception as exc:  # noqa: BLE001 - an input without a traced value: leave the call as it is
            log.debug("graphprune: %s has an input without a traced value (%s); not inlined", node.name, exc)
            failed += 1
            continue
        leaves = pytree.tree_leaves((fake_args, fake_kwargs))
        node_leaves = pytree.tree_leaves((args, kwargs))
        if any(isinstance(n, Node) and not isinstance(v, torch.Tensor) for n, v in zip(node_leaves, leaves)):
            log.debug("graphprune: %s takes a non-tensor graph value; not inlined", node.name)
            failed += 1
            continue
        memo_key = _memo_key(node.target, leaves, pytree.tree_structure((fake_args, fake_kwargs)))
        if memo_key is not None and memo_key in memo:
            sub, positions = memo[memo_key]
        else:
            try:
                sub, positions, _ = _trace(node.target, fake_args, fake_kwargs)
            except Exception as exc:  # noqa: BLE001 - never fail a compile over caching
                log.debug("graphprune: %s could not be traced for inlining (%s); its graph compiles uncached",
                          node.name, exc)
                failed += 1
                continue
            if memo_key is not None:
                memo[memo_key] = (sub, positions)
        inputs = iter([node_leaves[i] for i in positions])
        mapping: dict[Node, Any] = {}
        stack = node.meta.get("nn_module_stack")
        with graph.inserting_before(node):
            for s in sub.graph.nodes:
                if s.op == "placeholder":
                    mapping[s] = next(inputs)
                elif s.op == "get_attr":
                    name = f"_graphprune_const_{consts}"
                    consts += 1
                    value = getattr(sub, s.target)
                    gm.register_buffer(name, value) if isinstance(value, torch.Tensor) else setattr(gm, name, value)
                    new = graph.get_attr(name)
                    new.meta[key] = s.meta.get("val")
                    mapping[s] = new
                elif s.op == "output":
                    result = torch.fx.node.map_arg(s.args[0], lambda a: mapping[a])
                else:
                    new = graph.node_copy(s, lambda a: mapping[a])
                    new.meta = {key: s.meta.get("val")}
                    if stack is not None:
                        new.meta["nn_module_stack"] = dict(stack)
                    mapping[s] = new
        if isinstance(result, Node):
            node.replace_all_uses_with(result)
            graph.erase_node(node)
        else:  # a tuple: its getitem users take the parts, the node goes once they are rewired
            env[node] = result
        done += 1
    for node, value in env.items():  # users left that take a whole tuple (e.g. the output): substitute
        _replace_tuple_uses(node, value)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    if failed:
        log.info("graphprune: %d of %d inserted calls inlined; the others keep the graph out of AOTAutograd's "
                 "cache", done, done + failed)
    return done


def _replace_tuple_uses(node: Node, value: Any) -> None:
    """Replace ``node`` in the arguments of its users by ``value`` (a pytree of nodes)."""
    for user in list(node.users):
        user.args = torch.fx.node.map_aggregate(user.args, lambda a: value if a is node else a)
        user.kwargs = torch.fx.node.map_aggregate(user.kwargs, lambda a: value if a is node else a)


__all__ = ["inline_calls", "is_graphprune_call", "fingerprint"]
