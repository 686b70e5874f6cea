"""Feature caching as a graph cut (entry points: :func:`find_cut`, :func:`full_graph`, :func:`shallow_graph`).

DeepCache's observation: in a U-Net the deep path's output changes slowly between adjacent denoising steps. The
*full* graph runs the whole UNet and also outputs the tensor at a cut point on the up path; the *shallow* graph
takes that tensor as an input and keeps only the nodes the output still needs (slice + dead-code elimination): the
encoder levels that feed the remaining skip connections, the up-path stages after the cut and the output head.

The cut is found from the graph's module structure, never from names in user code: every up-path ResNet of a
diffusers UNet reads ``cat([hidden, skip])``; counting those ResNets from the output end, ``branch`` b cuts the
``hidden`` operand of the b-th one. Branch 0 is DeepCache's (pip package) and DaTo's branch 0: the shallow step
runs ``conv_in``, the last (ResNet, attention) pair of the last up block and the output head.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from .match import module_path
from .ops import node_val, tensor_shape

log = logging.getLogger(__name__)

_UP_BLOCK = re.compile(r"^up_blocks\.(\d+)$")
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
           "find_timestep_input", "copy_graph_module", "add_input"]
