"""What a benchmark hands back: tables (aligned text or markdown), JSON files, matplotlib plots.

    text = render_table(["variant", "median s"], [["inductor", "6.475"], ...])          # aligned text
    md = render_table(cols, rows, markdown=True)                                        # for the README
    write_json(result, "results/speed.json")                                            # rewritten as it grows
    plot_speed_error({"tome": [(0.01, 1.05, "0.5"), ...]}, "pareto.png", title=..., baseline="inductor")
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


def fmt(x: Any, spec: str) -> str:
    """``format(x, spec)``, or ``-`` for None / NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """Rows under a header: markdown (``| a | b |``), or text with the first column left- and the others
    right-aligned."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    body = [list(columns)] + rows
    widths = [max(len(r[i]) for r in body) for i in range(len(columns))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in body]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` (indented; non-JSON values as strings), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def plot_speed_error(series: dict[str, Sequence[tuple[float, float, str]]], path: str | Path, *, title: str,
                     xlabel: str, ylabel: str, baseline: str | None = None,
                     front: Sequence[tuple[float, float]] = (), dashed: Sequence[str] = ()) -> Path | None:
    """Speedup (y) vs error (x) of the benchmark's variants, one line per series (points in the given order, each
    annotated with its text), the Pareto ``front`` circled, the baseline at y = 1 dotted. x is logarithmic where
    the errors span more than a decade. Returns the path, or None (logged) where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        log.warning("no plot: %s (pip install matplotlib)", exc)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "osD^vP*X"
    errs = []
    for i, (name, pts) in enumerate(series.items()):
        xs = [max(e, 1e-12) for e, _, _ in pts]
        ys = [s for _, s, _ in pts]
        errs += [e for e, _, _ in pts]
        ax.plot(xs, ys, "--" if name in dashed else "-", marker=markers[i % len(markers)], label=name)
        for x, y, (_, _, note) in zip(xs, ys, pts):
            if note:
                ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if front:
        pts = sorted(front)
        ax.plot([max(e, 1e-12) for e, _ in pts], [s for _, s in pts], "o", ms=14, mfc="none", mec="black", mew=1.2,
                label="Pareto front")
    if baseline:
        ax.axhline(1.0, color="gray", lw=0.8, ls=":", label=f"{baseline} = 1")
    if errs and min(errs) > 0 and max(errs) / min(errs) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["fmt", "render_table", "write_json", "plot_speed_error"]
