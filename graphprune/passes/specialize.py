"""Static graphs from symbolic ones (entry points: :func:`is_symbolic`, :func:`signature`, :func:`specialize`).

Dynamo hands the backend a graph with symbolic sizes after a shape change (automatic dynamic shapes) or under
``torch.compile(dynamic=True)``: its placeholders include ``SymInt`` sizes (``s0``, ``s1``, ...), its views take sizes
computed in the graph (``mul(s1, s2)``, ``sym_sum``), and with ``dynamic=True`` module floats arrive as 0-d float64
tensor inputs read by ``.item()``. Token pruning needs static token counts, so the backend specializes such a graph
per concrete call signature:

    key = signature(args)                      # shapes, strides, dtypes, devices, scalar values of one call
    static_gm = specialize(gm, args)           # sizes and module floats folded in, static fake values on every node

The specialized graph keeps every placeholder (its calling convention is unchanged: sizes and floats are still
passed, unused), every node's ``nn_module_stack`` (module paths), and has static ``example_value`` metadata, so the
matcher and the rewrite see exactly what a ``dynamic=False`` trace at those shapes would give them.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from .cut import copy_graph_module
from .ops import node_val

_SCALARS = (int, float, bool)


def _is_sym(value: Any) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _unspecialized_float(node: Node) -> bool:
    """A 0-d float64 input read only through ``.item()``: a Python float Dynamo left unspecialized (dynamic=True)."""
    val = node_val(node)
    return (node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() == 0
            and val.dtype == torch.float64 and bool(node.users)
            and all(u.op == "call_method" and u.target == "item" for u in node.users))


def is_symbolic(gm: GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Whether ``gm`` has symbolic sizes or strides, symbolic scalar inputs, or unspecialized float inputs."""
    for node, example in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs):
        if _is_sym(example) or _unspecialized_float(node):
            return True
        val = node_val(node)
        if isinstance(val, torch.Tensor) and (any(_is_sym(s) for s in val.shape)
                                              or any(_is_sym(s) for s in val.stride())):
            return True
    return False


def signature(args: Sequence[Any]) -> Hashable:
    """What a specialized graph depends on in one call: per argument its shape, stride, dtype and device (tensors)
    or its value (Python scalars). 0-d float64 tensors (Dynamo's unspecialized floats) are keyed by value too."""
    key: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.dim() == 0 and a.dtype == torch.float64 and a.device.type == "cpu":
                key.append(("f64", float(a)))
            else:
                key.append((tuple(a.shape), tuple(a.stride()), a.dtype, a.device))
        elif isinstance(a, _SCALARS) or a is None:
            key.append(a)
        else:
            key.append(type(a).__name__)
    return tuple(key)


def named_signature(gm: GraphModule, args: Sequence[Any]) -> tuple[tuple[str, Hashable], ...]:
    """The tensor inputs of one call by placeholder name: ((name, (shape, stride, dtype, device)), ...), sorted.
    Two graphs Dynamo traced from the same code at these shapes (a static one, a symbolic one) agree on it."""
    out = []
    for node, a in zip((n for n in gm.graph.nodes if n.op == "placeholder"), args):
        if isinstance(a, torch.Tensor):
            out.append((str(node.target), (tuple(a.shape), tuple(a.stride()), a.dtype, a.device)))
    return tuple(sorted(out, key=lambda item: item[0]))


def describe_signature(gm: GraphModule, args: Sequence[Any]) -> str:
    """The user inputs' shapes of one call, for reports: ``"2x4x32x32, 2x77x768"`` (parameters and scalars left out)."""
    parts = []
    for node, a in zip((n for n in gm.graph.nodes if n.op == "placeholder"), args):
        if not isinstance(a, torch.Tensor) or isinstance(a, torch.nn.Parameter) or a.dim() == 0:
            continue
        if "_parameters_" in node.name or "_buffers_" in node.name:
            continue
        parts.append("x".join(str(int(s)) for s in a.shape))
    return ", ".join(parts) or "-"


class _StaticProp(Interpreter):
    """Runs the graph on fake tensors of the concrete shapes, recording each node's value."""

    def __init__(self, gm: GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


def _constant(value: Any) -> bool:
    if isinstance(value, _SCALARS) and not _is_sym(value):
        return True
    if isinstance(value, (tuple, list, torch.Size)):
        return all(_constant(v) for v in value)
    return False


def specialize(gm: GraphModule, args: Sequence[Any]) -> GraphModule:
    """A copy of ``gm`` specialized to the concrete call ``args`` (see the module docstring).

    Every placeholder stays; size inputs are replaced in their uses by the call's ints, unspecialized float inputs'
    ``.item()`` by the call's floats; every node computing a Python scalar (or a size tuple) from them is folded into
    a constant; tensor nodes get static fake values (``example_value``) from a fake run at these shapes.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    out = copy_graph_module(gm)
    graph = out.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise ValueError(f"graph has {len(placeholders)} inputs but the call passed {len(args)}")
    for node, a in zip(placeholders, args):
        if _unspecialized_float(node):
            for item in list(node.users):
                item.replace_all_uses_with(float(a))
                graph.erase_node(item)
        elif isinstance(a, _SCALARS) and not isinstance(a, torch.Tensor):
            node.replace_all_uses_with(a, propagate_meta=False)
            # keep the placeholder (the calling convention), now unused
    graph.lint()
    out.recompile()
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True, static_shapes=True)
    with fake_mode:
        fake_args = [fake_mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
        prop = _StaticProp(out)
        prop.run(*fake_args)
    for node in list(graph.nodes):
        if node.op in ("placeholder", "output"):
            continue
        value = prop.values.get(node)
        if _constant(value) and node.op in ("call_function", "call_method"):
            node.replace_all_uses_with(value if not isinstance(value, (list, torch.Size)) else tuple(value),
                                       propagate_meta=False)
    graph.eliminate_dead_code()  # placeholders, asserts and other side effects stay
    for node in graph.nodes:
        value = prop.values.get(node)
        if node.op == "placeholder":
            value = fake_args[placeholders.index(node)]
        if value is not None:
            node.meta["example_value"] = value
            node.meta.pop("val", None)
    graph.lint()
    out.recompile()
    return out


__all__ = ["is_symbolic", "signature", "named_signature", "describe_signature", "specialize"]
