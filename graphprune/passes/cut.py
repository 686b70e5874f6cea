"""Feature caching as a graph cut (entry points: :func:`find_cut`, :func:`full_graph`, :func:`shallow_graph`).

DeepCache's observation: in a U-Net the deep path's output changes slowly between adjacent denoising steps. The
*full* graph runs the whole UNet and also outputs the tensor at a cut point on the up path; the *shallow* graph
takes that tensor as an input and keeps only the nodes the output still needs (slice + dead-code elimination): the
encoder levels that feed the remaining skip connections, the up-path stages after the cut and the output head.

The cut is found from the graph's module structure, never from names in user code: every up-path ResNet of a
diffusers UNet reads ``cat([hidden, skip])``; counting those ResNets from the output end, ``branch`` b cuts the
``hidden`` operand of the b-th one. Branch 0 is DeepCache's (pip package) and DaTo's branch 0: the shallow step
runs ``conv_in``, the last (ResNet, attention) pair of the last up block and the output head.

Two more cuts serve the adaptive step policies (:mod:`graphprune.policy`):

* **the probe** (First Block Cache on a UNet, :func:`find_probe`): every node the output of the first down stage
  depends on (time embedding, ``conv_in``, ``down_blocks.0``). :func:`probe_graph` keeps only those and outputs the
  *frontier* (each probe tensor that a later node reads) plus the relative L1 change of the stage's output against
  a reference input; :func:`remainder_graph` reads the frontier from new inputs instead of computing it.
* **the Taylor forecast** (TaylorSeer): :func:`add_forecast` makes a shallow graph read the cut tensor as
  ``F0 + sum_j c_j F_j`` from Taylor factors given as inputs; :func:`add_factor_update` makes a full graph also
  output the new factors by finite differences against the previous ones.
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from .match import module_path
from .ops import node_val, tensor_shape
from .splice import Splicer

log = logging.getLogger(__name__)

_UP_BLOCK = re.compile(r"^up_blocks\.(\d+)$")
_FIRST_DOWN = re.compile(r"^down_blocks\.0(\.|$)")
_UP_RESNET = re.compile(r"^(up_blocks\.\d+\.resnets\.\d+)(\.|$)")
_CAT_NAMES = ("cat", "cat.default", "concat")


class CutError(ValueError):
    """The graph has no cut point for the requested branch; the message says why and what to change."""


@dataclass(frozen=True)
class CutPoint:
    """Where a graph is cut: the ``hidden`` operand (a node name) of the ``cat`` feeding one up-path ResNet.

    shape: (B, C, H, W) of the cached tensor; ``resnet``: module path of the ResNet reading it; ``branches``: how
    many up-path ResNets the graph has (valid branches are 0 .. branches - 1).
    """

    node: str
    resnet: str
    shape: tuple[int, ...]
    branch: int
    branches: int

    def describe(self) -> str:
        return (f"branch {self.branch} of {self.branches}: input of {self.resnet} "
                f"({'x'.join(map(str, self.shape))})")


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node metadata, modules and attributes shared).

    Dynamo keeps reading the graph it hands to a backend, so passes never edit that graph in place.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


def _is_cat(node: Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _CAT_NAMES


def up_path_cuts(graph: Graph) -> list[tuple[Node, str]]:
    """(cat node, ResNet path) of every up-path ResNet input, counted from the output end (index = branch)."""
    cuts = []
    for n in graph.nodes:
        if not _is_cat(n) or not _UP_BLOCK.match(module_path(n)):
            continue
        paths = {m.group(1) for u in n.users if (m := _UP_RESNET.match(module_path(u)))}
        tensors = n.args[0] if n.args else ()
        if len(paths) == 1 and isinstance(tensors, (list, tuple)) and len(tensors) == 2:
            cuts.append((n, paths.pop()))
    return cuts[::-1]


def find_cut(graph: Graph, branch: int = 0) -> CutPoint:
    """The cut point of ``branch`` (0 = the shallowest: only the last up-path ResNet stage runs on shallow steps)."""
    cuts = up_path_cuts(graph)
    if not cuts:
        raise CutError("no up-path skip concatenation (cat feeding an up_blocks.*.resnets.* module) in this graph: "
                       "feature caching needs a diffusers U-Net (UNet2DConditionModel); DiTs have no U-shaped "
                       "skip path")
    if branch >= len(cuts):
        raise CutError(f"cache_branch={branch} but this UNet's up path has {len(cuts)} ResNets; "
                       f"valid branches are 0..{len(cuts) - 1}")
    cat, resnet = cuts[branch]
    hidden = cat.args[0][0]
    shape = tensor_shape(hidden)
    if shape is None:
        raise CutError(f"the cut tensor {hidden.name} has no static shape (dynamic shapes?); compile with "
                       "dynamic=False")
    return CutPoint(node=hidden.name, resnet=resnet, shape=shape, branch=branch, branches=len(cuts))


def _node(graph: Graph, name: str) -> Node:
    for n in graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def _output_node(graph: Graph) -> Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def add_input(graph: Graph, name: str, like: torch.Tensor | None) -> Node:
    """Append a placeholder after the last one, carrying fake-tensor metadata ``like`` (a fake or meta tensor)."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    key = "val" if "val" in last.meta else "example_value"
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    if like is not None:
        node.meta[key] = like
    return node


def full_graph(gm: GraphModule, cut: CutPoint) -> GraphModule:
    """A copy of ``gm`` that also outputs the cut tensor, after its own outputs."""
    out = copy_graph_module(gm)
    output = _output_node(out.graph)
    outs = output.args[0]
    seq = tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)
    output.args = (seq + (_node(out.graph, cut.node),),)
    out.recompile()
    return out


def shallow_graph(gm: GraphModule, cut: CutPoint) -> tuple[GraphModule, list[str]]:
    """A copy of ``gm`` that reads the cut tensor from a new last input (``graphprune_cache``) and keeps only what its
    output needs. Returns the graph and the top-level modules that still run (for the report)."""
    out = copy_graph_module(gm)
    graph = out.graph
    hidden = _node(graph, cut.node)
    cache = add_input(graph, "graphprune_cache", node_val(hidden))
    hidden.replace_all_uses_with(cache)
    graph.eliminate_dead_code()
    graph.lint()
    out.recompile()
    return out, running_modules(out)


def running_modules(gm: GraphModule, depth: int = 4) -> list[str]:
    """Module paths (cut to ``depth`` parts) that own at least one compute node of ``gm``, in graph order."""
    seen: dict[str, None] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            path = module_path(n)
            if path:
                seen.setdefault(".".join(path.split(".")[:depth]), None)
    return list(seen)


# ------------------------------------------------------------------------------------------------ the probe
@dataclass(frozen=True)
class ProbeCut:
    """The probe of the first-block policy: the first down stage's output ``output`` (shape ``shape``), every node it
    depends on (``nodes``, names), and the ``frontier``: probe tensors that nodes outside the probe read, in graph
    order (the probe graph's outputs, the remainder graphs' ``graphprune_probe_<i>`` inputs)."""

    output: str
    shape: tuple[int, ...]
    nodes: frozenset[str]
    frontier: tuple[str, ...]

    @property
    def output_index(self) -> int:
        """Position of the stage's output among the frontier tensors."""
        return self.frontier.index(self.output)

    def describe(self) -> str:
        return (f"output of down_blocks.0 ({'x'.join(map(str, self.shape))}); {len(self.nodes)} nodes, "
                f"{len(self.frontier)} tensors handed on")


def find_probe(graph: Graph) -> ProbeCut:
    """The probe of a diffusers U-Net graph: the last ``down_blocks.0`` tensor that the next stage reads."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    stage_outputs = [n for n in graph.nodes if n.op == "call_function" and _FIRST_DOWN.match(module_path(n))
                     and any(not _FIRST_DOWN.match(module_path(u)) and not module_path(u).startswith("up_blocks")
                             and u.op != "output" for u in n.users)]
    if not stage_outputs:
        raise CutError("no first down stage (down_blocks.0 feeding a later stage) in this graph: policy='first-block' "
                       "needs a diffusers U-Net (UNet2DConditionModel)")
    output = max(stage_outputs, key=order.__getitem__)
    shape = tensor_shape(output)
    if shape is None:
        raise CutError(f"the probe tensor {output.name} has no static shape (dynamic shapes?); compile with "
                       "dynamic=False")
    nodes: set[Node] = set()
    stack = [output]
    while stack:
        n = stack.pop()
        if n in nodes or n.op in ("placeholder", "get_attr"):
            continue
        nodes.add(n)
        stack.extend(n.all_input_nodes)
    frontier = [n for n in graph.nodes if n in nodes and isinstance(node_val(n), torch.Tensor)
                and any(u not in nodes for u in n.users)]
    return ProbeCut(output=output.name, shape=shape, nodes=frozenset(n.name for n in nodes),
                    frontier=tuple(n.name for n in frontier))


def probe_graph(gm: GraphModule, probe: ProbeCut) -> GraphModule:
    """A copy of ``gm`` that outputs only the probe's frontier tensors (everything else is dead code)."""
    out = copy_graph_module(gm)
    graph = out.graph
    output = _output_node(graph)
    output.args = (tuple(_node(graph, name) for name in probe.frontier),)
    graph.eliminate_dead_code()
    graph.lint()
    out.recompile()
    return out


def add_probe_signal(gm: GraphModule, probe: ProbeCut) -> None:
    """Append to a probe graph a reference input ``graphprune_probe_ref`` (the stage output of the last full step)
    and, as its last output, the scalar ``mean|p - ref| / mean|ref|`` over the whole batch (First Block Cache's
    relative L1 change; ``ref`` all zeros gives inf-free garbage, which the policy ignores at a generation's first
    call). Mutates and recompiles ``gm``."""
    graph = gm.graph
    p = _node(graph, probe.output)
    ref = add_input(graph, "graphprune_probe_ref", node_val(p))
    sp = Splicer(graph)
    output = _output_node(graph)
    with graph.inserting_before(output):
        diff = sp.call(torch.mean, (sp.call(torch.abs, (sp.call(torch.sub, (p, ref)),)),))
        scale = sp.call(torch.clamp_min, (sp.call(torch.mean, (sp.call(torch.abs, (ref,)),)), 1e-12))
        signal = sp.call(torch.div, (diff, scale))
    output.args = (tuple(output.args[0]) + (signal,),)
    graph.lint()
    gm.recompile()


def remainder_graph(gm: GraphModule, probe: ProbeCut) -> GraphModule:
    """A copy of ``gm`` (a full or shallow graph) that reads the frontier tensors of the probe it needs from new
    inputs ``graphprune_probe_<i>`` (i = the tensor's index in ``probe.frontier``) and no longer computes the probe."""
    out = copy_graph_module(gm)
    graph = out.graph
    names = {n.name: n for n in graph.nodes}
    added = []
    for i, name in enumerate(probe.frontier):
        node = names.get(name)
        if node is None or all(u.name in probe.nodes for u in node.users):
            continue
        placeholder = add_input(graph, f"graphprune_probe_{i}", node_val(node))
        node.replace_all_uses_with(placeholder, delete_user_cb=lambda u: u.name not in probe.nodes)
        added.append(placeholder)
    graph.eliminate_dead_code()
    for placeholder in added:  # a frontier tensor only other probe tensors read: nothing left reads it
        if not placeholder.users:
            graph.erase_node(placeholder)
    graph.lint()
    out.recompile()
    return out


# ------------------------------------------------------------------------------------------------ Taylor forecast
def add_forecast(gm: GraphModule, order: int) -> None:
    """Make a shallow graph forecast its cut tensor: the ``graphprune_cache`` input becomes F0 and the graph reads
    ``F0 + sum_{j=1..order} coeffs[j-1] * F_j`` (``graphprune_taylor_<j>`` inputs, F_j shaped like F0;
    ``graphprune_taylor_coeffs``: (order,), coeffs[j-1] = k^j / j! for a step k calls after the last full one, 0
    for factors not known yet). ``order=0`` changes nothing. Mutates and recompiles ``gm``."""
    if order == 0:
        return
    graph = gm.graph
    cache = _node(graph, "graphprune_cache")
    like = node_val(cache)
    factors = [add_input(graph, f"graphprune_taylor_{j}", like) for j in range(1, order + 1)]
    coeffs = add_input(graph, "graphprune_taylor_coeffs", _like(like, (order,)))
    users = list(cache.users)
    sp = Splicer(graph)
    with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
        feature = cache
        for j, factor in enumerate(factors):
            c = sp.call(operator.getitem, (coeffs, j))
            feature = sp.call(torch.add, (feature, sp.call(torch.mul, (factor, c))))
    for user in users:
        user.replace_input_with(cache, feature)
    graph.lint()
    gm.recompile()


def add_factor_update(gm: GraphModule, cut: CutPoint, order: int) -> None:
    """Make a full graph also output the new Taylor factors F_1..F_order after its outputs (the cut tensor F0 is
    already the last one): ``F_j = (F_(j-1) - F_(j-1)_prev) * inv_delta`` (TaylorSeer's divided differences, delta
    = calls since the previous full step), from inputs ``graphprune_taylor_prev_<j>`` (j = 0..order-1) and
    ``graphprune_taylor_inv_delta`` (0-dim). ``order=0`` changes nothing. Mutates and recompiles ``gm``."""
    if order == 0:
        return
    graph = gm.graph
    current = _node(graph, cut.node)
    like = node_val(current)
    prev = [add_input(graph, f"graphprune_taylor_prev_{j}", like) for j in range(order)]
    inv_delta = add_input(graph, "graphprune_taylor_inv_delta", _like(like, ()))
    sp = Splicer(graph)
    output = _output_node(graph)
    new = []
    with graph.inserting_before(output):
        for j in range(order):
            current = sp.call(torch.mul, (sp.call(torch.sub, (current, prev[j])), inv_delta))
            new.append(current)
    output.args = (tuple(output.args[0]) + tuple(new),)
    graph.lint()
    gm.recompile()


def _like(val: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A fake/meta tensor of ``shape`` with ``val``'s dtype and device (for new placeholders' metadata)."""
    if val is None:
        return None
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return torch.empty(shape, dtype=val.dtype, device="meta")
    with mode:
        return torch.empty(shape, dtype=val.dtype, device=val.device)


def find_timestep_input(graph: Graph) -> int | None:
    """Index (among the placeholders) of the timestep input: the non-parameter input that reaches ``time_proj``.

    Walks backwards from the first node of the time projection; returns None if the graph has none (e.g. the
    timestep was a Python number, which Dynamo bakes into the graph).
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = ("time_proj", "time_embed", "t_embedder", "adaln_single")  # anywhere in the path: DiT's sit in norm1.emb
    starts = [n for n in graph.nodes if any(part in names for part in module_path(n).split("."))]
    seen: set[Node] = set()
    stack = list(starts)
    found: list[Node] = []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            val = node_val(n)
            if isinstance(val, torch.Tensor) and val.numel() <= 64 and not isinstance(val, torch.nn.Parameter) \
                    and "parameters" not in n.name and "buffers" not in n.name:
                found.append(n)
            continue
        stack.extend(n.all_input_nodes)
    if not found:
        return None
    return placeholders.index(min(found, key=placeholders.index))


__all__ = ["CutPoint", "CutError", "find_cut", "full_graph", "shallow_graph", "up_path_cuts", "running_modules",
           "find_timestep_input", "copy_graph_module", "add_input", "ProbeCut", "find_probe", "probe_graph",
           "add_probe_signal", "remainder_graph", "add_forecast", "add_factor_update"]
