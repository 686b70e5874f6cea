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
    """All sites of one compiled graph plus the config that produced it."""

    config: dict[str, Any]
    sites: list[SiteReport] = field(default_factory=list)
    random_inputs: int = 0

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
        return {"config": self.config, "sites": [asdict(s) for s in self.sites], "random_inputs": self.random_inputs}

    def __str__(self) -> str:
        return format_table(self.sites, title=self.summary())


HEADER = ["module", "kind", "N", "C", "heads", "grid", "level", "K", "status", "reason"]


def format_table(sites: list[SiteReport], title: str = "") -> str:
    """A plain-text table of site reports."""
    rows = [HEADER] + [s.row() for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = [title] if title else []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 6))
    return "\n".join(lines)


@dataclass
class InspectReport:
    """The reports of every graph Dynamo produced for one model call."""

    graphs: list[GraphReport]
    #: step-aware runtimes (``StepRuntime.describe()``): schedule, cut, variants, bytes of state held
    runtimes: list[dict[str, Any]] = field(default_factory=list)
    #: issue 16: graph breaks and attention modules no graph proves (``graphprune.passes.coverage.CoverageReport``)
    coverage: Any = None

    @property
    def sites(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g.sites]

    def count(self, status: str, kind: str | None = None) -> int:
        return sum(g.count(status, kind) for g in self.graphs)

    def __str__(self) -> str:
        head = f"{len(self.graphs)} graph(s); " + "; ".join(g.summary() for g in self.graphs)
        lines = [format_table(self.sites, title=head)]
        for r in self.runtimes:
            lines.append(f"runtime[{r['method']}]: schedule {r['schedule']}; cut at {r['cut_description']}; "
                         f"state held {r['state_bytes']} bytes")
            for v in r["variants"]:
                if "buckets" in v:  # catome: the match cache's variants
                    lines.append(f"  variant {v['kind']}: buckets {v['buckets']}, {v['ops']} ops, "
                                 f"{v['pruned_sites']} pruned site(s), {v['calls']} call(s)")
                    continue
                runs = "the whole graph" if v["kind"] == "full" else ", ".join(v["modules"])
                lines.append(f"  variant {v['kind']}: {v['ops']} ops, {v['pruned_sites']} pruned site(s) "
                             f"(N->K {v['budgets']}), {v['calls']} call(s); runs {runs}")
        if self.coverage is not None and not self.coverage.complete:  # issue 16
            lines.append(str(self.coverage))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": [g.to_dict() for g in self.graphs], "runtimes": self.runtimes,
                "coverage": self.coverage.to_dict() if self.coverage is not None else None}  # issue 16
