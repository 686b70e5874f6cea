"""What the graphs miss: graph breaks, and attention modules whose attention no graph proves (entry point:
:func:`check_coverage`).

The matcher proves what a graph holds. It cannot see attention that Dynamo ran eagerly (a frame skipped after a
graph break: sgm's ``sdp_kernel`` context before graphprune's stand-in, a host-side memory query), nor attention
whose projections and softmax a graph break put into different graphs (ComfyUI's ``sub_quad`` / ``split`` CPU
defaults query free memory between them). This module says so, with the pointer to fix it::

    before = graph_break_counts()
    compiled(*inputs)                      # the backend wrapper keeps (gm, example_inputs) of every graph
    report = check_coverage(model, seen, before)
    print(report)                          # the graph breaks, the attention modules no graph proves, and why

Attention modules are found by class name (``*Attention*``, ``*Attn*``; the outermost of nested ones) and tied to
graphs by their parameters: a graph's inputs are the model's real parameters, so a proved site's projection weight
names its module even in the graph of a frame Dynamo resumed after a break (whose module paths are relative).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch.fx import GraphModule, Node

from .match import AttentionSite, attention_candidates, find_attention_sites, module_path
from .ops import walk_back

_ATTENTION_CLASS = re.compile(r"attn|attention", re.IGNORECASE)

#: (keywords found in a break's reason or frames, what to do about it), first match wins
HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("sdp_kernel",),
     "torch.backends.cuda.sdp_kernel around the attention (Stability's sgm): graphprune registers a Dynamo stand-in "
     "for it on import (graphprune.standins.STATUS says whether it is active here); or use "
     "torch.nn.attention.sdpa_kernel"),
    (("virtual_memory", "psutil", "mem_get_info", "get_free_memory"),
     "a host-side free-memory query sizes the attention's chunks (ComfyUI's sub_quad / split, AUTOMATIC1111's "
     "sub-quadratic / Doggettx attention): run attention in one call (ComfyUI: --use-pytorch-cross-attention; "
     "AUTOMATIC1111: --opt-sdp-attention)"),
    (("compiler.disable", "_dynamo.disable", "disable()"),
     "a function excluded from compilation (torch.compiler.disable / torch._dynamo.disable) runs the attention: "
     "remove the decorator there, or nothing inside it can be pruned"),
    (("context manager",),
     "a context manager Dynamo cannot trace: enter it outside the compiled model or use a traceable one"),
)
_DEFAULT_HINT = ("torch._dynamo.explain(model)(*inputs) shows this break; pruning needs an attention and its "
                 "projections in one graph")


@dataclass
class GraphBreak:
    """One kind of graph break: Dynamo's reason (first lines), the innermost user frames, how often, what to do."""

    reason: str
    where: str
    count: int
    hint: str
    #: every frame of the user stack (``name file:line``), innermost last: what the hints search
    frames: str = ""


@dataclass
class UncoveredModules:
    """Attention modules of one class that no graph proves an attention for.

    status: ``"eager"`` (no module of the class has a parameter in any graph: Dynamo ran their code outside every
    graph) or ``"unproved"`` (the class's code reached a graph, but no proved attention uses these modules'
    projections: see the unmatched rows; after graph breaks, a graph compiled once may also serve several of them).
    """

    cls: str
    status: str
    paths: list[str]
    hint: str


@dataclass
class CoverageReport:
    """Graph breaks of one traced call and the attention modules its graphs do not prove."""

    graphs: int
    breaks: list[GraphBreak] = field(default_factory=list)
    uncovered: list[UncoveredModules] = field(default_factory=list)
    attention_modules: int = 0

    @property
    def complete(self) -> bool:
        """No graph break and every attention module proved in some graph."""
        return not self.breaks and not self.uncovered

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"coverage: {self.graphs} graph(s), {sum(b.count for b in self.breaks)} graph break(s), "
                 f"{sum(len(u.paths) for u in self.uncovered)} of {self.attention_modules} attention module(s) "
                 "with no proved attention"]
        for b in self.breaks:
            lines.append(f"  break x{b.count}: {b.reason}" + (f" [at {b.where}]" if b.where else ""))
            lines.append(f"    fix: {b.hint}")
        for u in self.uncovered:
            shown = ", ".join(u.paths[:3]) + (f", ... ({len(u.paths)} in all)" if len(u.paths) > 3 else "")
            what = "never reached a graph (ran eagerly)" if u.status == "eager" else \
                "no proved attention uses their projections"
            lines.append(f"  {u.cls}: {what}: {shown}")
            lines.append(f"    fix: {u.hint}")
        return "\n".join(lines)


def graph_break_counts() -> dict[str, int]:
    """A snapshot of Dynamo's graph-break counter (reason -> count): pass it to :func:`check_coverage`."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def _headline(reason: str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    explanation = next((ln for ln in lines[1:] if ln.startswith("Explanation:")), "")
    if explanation:
        text = f"{text}: {explanation[len('Explanation:'):].strip()}"
    text = re.sub(r" at 0x[0-9a-f]+", "", text)  # no object addresses
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _hint(*texts: str) -> str:
    low = " ".join(texts).lower()
    return next((hint for keys, hint in HINTS if any(k.lower() in low for k in keys)), _DEFAULT_HINT)


def _library(filename: str) -> bool:
    return any(part in filename for part in ("site-packages", "dist-packages", f"{os.sep}torch{os.sep}"))


def _frames(user_stack: Sequence[Any]) -> str:
    """Where a break happened: the innermost frame, and the innermost frame of the user's own code that led there."""
    frames = list(user_stack)
    if not frames:
        return ""
    show = lambda f: f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})"  # noqa: E731
    own = next((f for f in reversed(frames) if not _library(f.filename)), None)
    return show(frames[-1]) + (f" called from {show(own)}" if own is not None and own is not frames[-1] else "")


def attention_modules(model: torch.nn.Module) -> dict[str, str]:
    """Module path -> class name of the attention modules: classes named *Attention* / *Attn*, the innermost that
    hold parameters (diffusers' ``Attention``, not the ``CrossAttnDownBlock2D`` around it), and of nested ones
    without parameters the outermost (ADM's ``AttentionBlock``, not its ``QKVAttention``)."""
    named = {path: mod for path, mod in model.named_modules() if path and _ATTENTION_CLASS.search(type(mod).__name__)}
    with_params = {p for p, m in named.items() if any(True for _ in m.parameters())}
    keep = [p for p in named if not any(q.startswith(p + ".") for q in with_params)]
    return {p: type(named[p]).__name__ for p in keep if not any(p.startswith(q + ".") for q in keep)}


def _parameter_paths(model: torch.nn.Module, gm: GraphModule, example_inputs: Sequence[Any]) -> dict[Node, str]:
    """Graph inputs that are the model's parameters or buffers -> their dotted names."""
    names = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {node: names[id(value)] for node, value in zip(placeholders, example_inputs) if id(value) in names}
    for node in gm.graph.nodes:  # graphs that hold parameters as attributes (torch without inlined nn modules)
        if node.op == "get_attr":
            try:
                value = gm.get_parameter(node.target)
            except (AttributeError, TypeError):
                continue
            if id(value) in names:
                found[node] = names[id(value)]
    return found


def _owners(site: AttentionSite, params: Mapping[Node, str]) -> set[str]:
    """Modules owning a site's projection weights (through casts: ComfyUI casts weights on the fly)."""
    sources = (walk_back(p.weight, {"cast", "layout"})[0] for p in (site.q, site.k, site.v, site.out))
    return {params[w].rsplit(".", 1)[0] for w in sources if w in params}


def check_coverage(model: torch.nn.Module, graphs: Sequence[tuple[GraphModule, Sequence[Any]]],
                   breaks_before: Mapping[str, int] | None = None) -> CoverageReport:
    """The coverage of one traced call of ``model``.

    graphs: every (GraphModule, example_inputs) Dynamo handed to the backend during the call, unrewritten (the
        backend rewrites a copy) and with the real example inputs (they tie parameters to modules).
    breaks_before: :func:`graph_break_counts` taken before the call (breaks of earlier calls are left out); None
        counts every break since the process started.
    """
    report = CoverageReport(graphs=len(graphs))
    seen: dict[str, GraphBreak] = {}
    proved: set[str] = set()
    in_graph: set[str] = set()
    candidate_paths: set[str] = set()
    for gm, example_inputs in graphs:
        cause = getattr(gm, "compile_subgraph_reason", None)
        if cause is not None and getattr(cause, "graph_break", False):
            stack = list(getattr(cause, "user_stack", ()) or ())
            head, where = _headline(cause.reason), _frames(stack)
            frames = " ".join(f"{f.name} {f.filename}:{f.lineno}" for f in stack)
            entry = seen.setdefault(head + where, GraphBreak(head, where, 0, _hint(str(cause.reason), frames), frames))
            entry.count += 1
        params = _parameter_paths(model, gm, example_inputs)
        in_graph.update(params.values())
        sites, _ = find_attention_sites(gm.graph)
        for s in sites:
            proved |= _owners(s, params)
        candidate_paths.update(module_path(n) for n in attention_candidates(gm.graph))
    from torch._dynamo.utils import counters

    known = {b.reason for b in seen.values()}
    for reason, count in counters["graph_break"].items():  # frames Dynamo skipped produce no graph: counter only
        count -= (breaks_before or {}).get(reason, 0)
        head = _headline(reason)
        if count > 0 and head not in known:
            seen[head] = GraphBreak(head, "", count, _hint(reason))
    report.breaks = list(seen.values())
    modules = attention_modules(model)
    report.attention_modules = len(modules)
    by_class: dict[str, list[str]] = {}
    for path, cls in modules.items():
        inside = lambda p, path=path: p == path or p.startswith(path + ".")  # noqa: E731
        if any(inside(p) for p in proved):
            continue
        if not any(True for _ in model.get_submodule(path).parameters()) and any(inside(p) for p in candidate_paths):
            continue  # a parameter-free attention module: its attention op is in a graph under its own path
        by_class.setdefault(cls, []).append(path)
    for cls, paths in by_class.items():
        # a frame Dynamo compiled once can serve several modules of one class (their parameters are its inputs
        # only for the first), so "never in a graph" is decided per class: no module of it reached any graph
        reached = any(p.startswith(m + ".") for m, c in modules.items() if c == cls for p in in_graph)
        status = "unproved" if reached else "eager"
        if report.breaks:
            hint = _hint(" ".join(b.reason + " " + b.frames for b in report.breaks))
        elif status == "unproved":
            hint = "see the unmatched rows above for the reason each was not proved"
        else:
            hint = ("no softmax or scaled_dot_product_attention was traced for them: attention written another "
                    "way (e.g. a key-chunked streaming softmax, a custom op) is not proved")
        report.uncovered.append(UncoveredModules(cls, status, paths, hint))
    return report


__all__ = ["CoverageReport", "GraphBreak", "UncoveredModules", "HINTS", "attention_modules", "check_coverage",
           "graph_break_counts"]
