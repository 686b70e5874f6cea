"""What a pass did, as data: one :class:`SiteReport` per attention site, one :class:`GraphReport` per graph.

Nothing is silent: a graph whose sites were all skipped says so, with each reason. ``str(report)`` is a table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SiteReport:
    """One attention site: where it is, its shape, and what was done with it and why.

    status: ``"pruned"`` (rewritten to run on K tokens), ``"kept"`` (proved but left unchanged by the config,
    e.g. a coarser level or a cross-attention outside the scope), ``"skipped"`` (could not be pruned),
    ``"unmatched"`` (an attention-like op the matcher could not prove).
    """

    module_path: str
    kind: str
    form: str = ""
    N: int | None = None
    C: int | None = None
    heads: int | None = None
    grid: tuple[int, int] | None = None
    level: int | None = None
    K: int | None = None
    status: str = "kept"
    reason: str = ""

    def row(self) -> list[str]:
        grid = f"{self.grid[0]}x{self.grid[1]}" if self.grid else "-"
        return [self.module_path or "<root>", self.kind, str(self.N or "-"), str(self.C or "-"),
                str(self.heads or "-"), grid, str(self.level or "-"), str(self.K if self.K is not None else "-"),
                self.status, self.reason]


@dataclass
class GraphReport:
    """All sites of one compiled graph plus the config that produced it.

    ``shape``: the user inputs' shapes the graph was compiled for (``"2x4x64x64, 2x77x768"``); ``variant``: which of a
    runtime's graphs it is (``"full"``, ``"shallow"``, ``"early"``, ``"late"``, ``"refresh buckets=[...]"``; ``"-"`` for a
    plain graph)."""

    config: dict[str, Any]
    sites: list[SiteReport] = field(default_factory=list)
    random_inputs: int = 0
    shape: str = ""
    variant: str = "-"

    def count(self, status: str, kind: str | None = None) -> int:
        """Number of sites with this status (and kind, if given)."""
        return sum(1 for s in self.sites if s.status == status and (kind is None or s.kind == kind))

    @property
    def pruned(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "pruned"]

    def summary(self) -> str:
        kinds = sorted({s.kind for s in self.sites})
        parts = [f"{self.count('pruned', k)}/{sum(1 for s in self.sites if s.kind == k)} {k} pruned" for k in kinds]
        return f"graphprune[{self.config.get('_type')}]: " + (", ".join(parts) or "no attention found")

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "shape": self.shape, "variant": self.variant,
                "sites": [asdict(s) for s in self.sites], "random_inputs": self.random_inputs}

    def __str__(self) -> str:
        return format_table(self.sites, title=self.summary())


HEADER = ["module", "kind", "N", "C", "heads", "grid", "level", "K", "status", "reason"]


def format_table(sites: list[SiteReport], title: str = "", prefix: list[tuple[str, list[str]]] | None = None) -> str:
    """A plain-text table of site reports; ``prefix``: extra leading columns (name, one value per site)."""
    prefix = prefix or []
    rows = [[name for name, _ in prefix] + HEADER]
    rows += [[values[i] for _, values in prefix] + s.row() for i, s in enumerate(sites)]
    n = len(rows[0])
    widths = [max(len(r[i]) for r in rows) for i in range(n - 1)]
    lines = [title] if title else []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 6))
    return "\n".join(lines)


@dataclass
class InspectReport:
    """The reports of every graph graphprune compiled (or would compile) for one model: per input shape and, for
    runtimes, per variant. ``str()`` is one table (with shape / variant columns where there are several) plus a line
    per runtime."""

    graphs: list[GraphReport]
    #: runtimes' ``describe()``: schedule, cut, variants, bytes of state held
    runtimes: list[dict[str, Any]] = field(default_factory=list)
    #: notes printed under the table (e.g. what was looked up, graph breaks)
    notes: list[str] = field(default_factory=list)
    #: graph breaks and attention modules no graph proves (:class:`graphprune.passes.coverage.CoverageReport`)
    coverage: Any = None

    @property
    def sites(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def pruned(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g.pruned]

    def count(self, status: str, kind: str | None = None) -> int:
        return sum(g.count(status, kind) for g in self.graphs)

    def verdict(self) -> str:
        """One line: how much was pruned, or why nothing was (no attention at all, nothing proved, nothing selected)."""
        attention = [s for s in self.sites if s.kind in ("self", "cross", "?", "block")]
        pruned = [s for s in self.sites if s.status == "pruned"]
        if pruned:
            return f"pruned {len(pruned)} site(s) in {sum(1 for g in self.graphs if g.pruned)} of {len(self.graphs)} graph(s)"
        if not self.graphs:
            return "no graph compiled yet (call the compiled model once, or pass example inputs to inspect)"
        if not attention:
            return "unsupported architecture: no attention found in any graph (is this a diffusion model?)"
        if not any(s.kind in ("self", "cross", "block") for s in attention):
            return ("unsupported architecture: attention-like ops were found but none could be proved (see the "
                    "reasons in the table)")
        return "nothing pruned: every proved site was left unchanged by the config (see the reasons)"

    def __str__(self) -> str:
        head = f"{len(self.graphs)} graph(s); " + "; ".join(
            (f"[{g.shape} {g.variant}] " if g.shape or g.variant != "-" else "") + g.summary() for g in self.graphs)
        prefix = []
        for name, attr in (("shape", "shape"), ("variant", "variant")):
            values = [getattr(g, attr) for g in self.graphs]
            if len(set(values)) > 1:
                prefix.append((name, [v for g, v in zip(self.graphs, values) for _ in g.sites]))
        lines = [format_table(self.sites, title=head, prefix=prefix), self.verdict()]
        for r in self.runtimes:
            if r.get("runtime") == "none":
                continue
            lines.append(f"runtime[{r['method']}] {r.get('shape', '')}: schedule {r.get('schedule')}; cut at "
                         f"{r.get('cut_description')}; generation {r.get('generation')}, step {r.get('step')}; "
                         f"state held {r.get('state_bytes')} bytes")
            for v in r.get("variants", []):
                if "buckets" in v:  # catome: the match cache's variants
                    lines.append(f"  variant {v['kind']}: buckets {v['buckets']}, {v['ops']} ops, "
                                 f"{v['pruned_sites']} pruned site(s), {v['calls']} call(s)")
                    continue
                runs = "the whole graph" if v["kind"] == "full" else ", ".join(v["modules"])
                lines.append(f"  variant {v['kind']}: {v['ops']} ops, {v['pruned_sites']} pruned site(s) "
                             f"(N->K {v['budgets']}), {v['calls']} call(s); runs {runs}")
        if self.coverage is not None and not self.coverage.complete:
            lines.append(str(self.coverage))
        lines += self.notes
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": [g.to_dict() for g in self.graphs], "runtimes": self.runtimes, "notes": self.notes,
                "verdict": self.verdict(),
                "coverage": self.coverage.to_dict() if self.coverage is not None else None}
