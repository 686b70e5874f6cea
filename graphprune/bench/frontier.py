"""The speed-quality front of a sweep: which points are Pareto-optimal, their table, plot and JSON.

    finish(result, out_dir)          # marks the front, writes pareto.json, pareto.txt, pareto.png into out_dir
    replot("pareto.json", out_dir)   # the same from a stored (also partial) result, nothing measured

A result is ``{"header": ..., "baseline": {...}, "points": [{"label", "method", "ratio", "speed", "speedup",
"quality", "bounds"}, ...]}`` (:mod:`graphprune.bench.pareto`, :mod:`graphprune.bench.realweights`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from .output import fmt, plot_speed_error, render_table, write_json
from .variants import TOMESD

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (speedup, error) points: True where no other point is at least as fast *and* at least as accurate
    while strictly better in one of the two (higher speedup is better, lower error is better). Equal points are
    all on the front. NaN points are never on it.
    """
    out = []
    for i, (s, e) in enumerate(points):
        if math.isnan(s) or math.isnan(e):
            out.append(False)
            continue
        dominated = any(j != i and s2 >= s and e2 <= e and (s2 > s or e2 < e)
                        for j, (s2, e2) in enumerate(points) if not (math.isnan(s2) or math.isnan(e2)))
        out.append(not dominated)
    return out


def error_value(point: dict[str, Any]) -> float:
    """The error axis of the plot and the front: latent rel. error, or 1 - mean SSIM for real-weights images."""
    q = point.get("quality") or {}
    if "rel_error" in q:
        return float(q["rel_error"])
    if "ssim_mean" in q:
        return 1.0 - float(q["ssim_mean"])
    return math.nan


def finish(result: dict[str, Any], out: str | Path) -> None:
    """Mark the front (over the points and the unpruned baseline at (1, 0)), write table, JSON and plot."""
    pts = result["points"]
    xy = [(math.nan if p.get("speedup") is None else p["speedup"], error_value(p)) for p in pts]  # None: not timed
    front = pareto_front([(1.0, 0.0)] + xy)
    result["baseline_on_front"] = front[0]
    for p, on in zip(pts, front[1:]):
        p["front"] = on
    result["front"] = ([f"unpruned ({result['header'].get('speed_compiler', 'inductor')})"] if front[0] else []) + [p["label"] for p in pts if p["front"]]
    result["at_ratio_0.5"] = at_ratio(result, 0.5)
    result["table"] = table(result)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pareto.txt").write_text(result["table"] + "\n")
    plotted = plot(result, out_dir / "pareto.png")
    result["plot"] = str(plotted) if plotted else None
    save(result, out_dir)
    log.info("wrote %s", out_dir)


def save(result: dict[str, Any], out: str | Path) -> Path:
    """Write ``pareto.json`` into ``out`` (after every point: a stopped sweep keeps what it measured)."""
    return write_json(result, Path(out) / "pareto.json")


def replot(paths: str | Path | Sequence[str | Path], out: str | Path, speeds: str | Path | None = None
           ) -> dict[str, Any]:
    """Front, table, plot and JSON again from stored pareto.json files (nothing is measured).

    Several files (a sweep run in parts) are joined: the first one's header and baseline, every file's points (a
    label seen before is skipped). ``speeds``: a ``graphprune bench speed`` JSON whose paired speedups fill the
    points it measured (:func:`merge_speeds`).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    results = [json.loads(Path(p).read_text()) for p in paths]
    for path, r in zip(paths, results):
        if r.get("header", {}).get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path}: not a pareto.json of schema {SCHEMA_VERSION}")
    result = results[0]
    seen = {p["label"] for p in result["points"]}
    for r in results[1:]:
        for point in r["points"]:
            if point["label"] not in seen:
                seen.add(point["label"])
                result["points"].append(point)
    result["replotted_from"] = [str(p) for p in paths]
    if speeds is not None:
        merge_speeds(result, json.loads(Path(speeds).read_text()), source=str(speeds))
    finish(result, out)
    return result


def merge_speeds(result: dict[str, Any], speed: dict[str, Any], source: str = "") -> list[str]:
    """Fill each point's ``speedup`` from a ``graphprune bench speed`` result at the sweep's latent: the variant with
    the same graphprune options (tomesd: the same ratio). Those speedups are paired against the speed run's
    baseline, all variants in one process. Returns the labels filled."""
    from .variants import variant

    header = result["header"]
    latent = str(header.get("latent") or (header.get("options") or {}).get("latent") or "")
    runs = speed.get("latents", {})
    run = runs.get(latent) if latent in runs else (next(iter(runs.values())) if len(runs) == 1 else None)
    if run is None:
        raise ValueError(f"the speed result has no latent {latent or '?'} (it has {sorted(runs)})")
    measured: list[tuple[Any, dict[str, Any]]] = []
    for key, r in run["variants"].items():
        if "error" in r or r.get("speedup") is None or key == run["baseline"]:
            continue
        v = variant(key)
        if v.kind == "graphprune":
            measured.append(({k: x for k, x in v.options.items() if k != "compiler"}, r))
        elif v.kind == TOMESD and not v.inductor:
            measured.append(((TOMESD, v.ratio), r))
    filled = []
    for point in result["points"]:
        ident = (TOMESD, point.get("ratio")) if point.get("method") == TOMESD else point.get("options")
        match = next((r for m, r in measured if m == ident), None)
        if match is not None:
            point["speedup"] = match["speedup"]
            point["speed_source"] = {"file": source, "baseline": run["baseline"], "median_s": match.get("median_s"),
                                     "other_cpu_cores": match.get("other_cpu_cores")}
            if not point.get("bounds") and match.get("flop_bound") is not None:
                point["bounds"] = {"flop": match["flop_bound"], "ideal": match.get("ideal_bound")}
            filled.append(point["label"])
    header["speeds_from"] = source or "a speed result"
    header["speed_compiler"] = run["baseline"]
    log.info("speedups from %s for %s", source or "the speed result", filled)
    return filled


def at_ratio(result: dict[str, Any], ratio: float) -> list[dict[str, Any]]:
    """Per method (tomesd included) at ``ratio``: speedup, error, PSNR (the README's closing note)."""
    rows = []
    for p in result["points"]:
        if p.get("ratio") is not None and abs(p["ratio"] - ratio) < 1e-9 and "error" not in p:
            q = p.get("quality", {})
            rows.append({"method": p["method"], "speedup": p.get("speedup"), "error": error_value(p),
                         "psnr_db": q.get("psnr_db", q.get("psnr_mean"))})
    return rows


def table(result: dict[str, Any]) -> str:
    """The printed table: one row per point, plus the unpruned baselines."""
    real = any("ssim_mean" in (p.get("quality") or {}) for p in result["points"])
    err_name = "1-SSIM" if real else "rel. error"
    cols = ["variant", "median s", "speedup", "ideal 1/(1-f)", "FLOP bound", err_name, "PSNR dB", "front",
            "compile s", "graphs", "recompiles", "other CPU"]
    rows = []
    b = result.get("baseline", {})
    base_key = b.get("speed_baseline", "inductor")
    for name, key in (("unpruned (inductor)", "inductor"), ("unpruned (eager)", "eager")):
        if key in b:
            s = b[key]
            speedup = s.get("speedup", b[base_key]["median_s"] / s["median_s"])
            rows.append([name, fmt(s["median_s"], ".4f"), fmt(speedup, ".3f"),
                         "-", "-", "0", "inf", "yes" if key == base_key and result.get("baseline_on_front") else "",
                         fmt(s["compile_s"], ".1f"), str(s["graphs"]),
                         str(s["recompiles_timed"]["unique_graphs"]), fmt(s["other_cpu_cores"], ".2f")])
    notes = []
    for p in result["points"]:
        if "error" in p:
            rows.append([p["label"], "FAILED" if "Traceback" in p["error"] else "SKIPPED"] + ["-"] * (len(cols) - 2))
            notes.append(f"{p['label']}: {p['error'].strip().splitlines()[-1]}")
            continue
        s, q, bd = p.get("speed") or {}, p.get("quality") or {}, p.get("bounds") or {}
        mark = "*" if p["method"] == TOMESD and bd else ""
        rows.append([
            p["label"] + (" (eager)" if p["method"] == TOMESD else ""), fmt(s.get("median_s"), ".4f"),
            fmt(p.get("speedup"), ".3f"), fmt(bd.get("ideal"), ".2f") + (mark if bd else ""),
            fmt(bd.get("flop"), ".3f") + (mark if bd else ""), fmt(error_value(p), ".3e"),
            fmt(q.get("psnr_db", q.get("psnr_mean")), ".2f"), "yes" if p.get("front") else "",
            fmt(s.get("compile_s"), ".1f"), str(s.get("graphs", "-")),
            str((s.get("recompiles_timed") or {}).get("unique_graphs", "-")), fmt(s.get("other_cpu_cores"), ".2f"),
        ])
        if "speed_inductor" in p:
            si = p["speed_inductor"]
            rows.append([p["label"] + " + inductor", fmt(si["median_s"], ".4f"), fmt(p.get("speedup_inductor"), ".3f"),
                         "", "", "(same)", "", "", fmt(si["compile_s"], ".1f"), str(si["graphs"]),
                         str(si["recompiles_timed"]["unique_graphs"]), fmt(si["other_cpu_cores"], ".2f")])
    lines = render_table(cols, rows).splitlines()
    h = result["header"]
    lines.insert(0, f"{h['model']} | {h['device']} | {h['dtype']} | shapes {h['call_shapes']}" +
                 (f" | {h['loop']}" if "loop" in h else ""))
    paired = any("speedup_paired" in (p.get("speed") or {}) for p in result["points"]) or bool(h.get("speeds_from"))
    if h.get("speeds_from"):
        lines.append(f"speedup: from the 'bench speed' run {h['speeds_from']} (every timed call paired with a call "
                     f"of its baseline {h.get('speed_compiler', '')}, all variants in one process); - = not timed")
    lines.append(f"speedup = unpruned {h.get('speed_compiler', 'inductor')} / variant, one model call (batch 2), "
                 + ("median of per-pair ratios, each timed call paired with a baseline call (the baseline row: its "
                    "own calls at the start); " if paired else "median / median; ")
                 + "ideal 1/(1-f) = "
                 "Amdahl bound if the pruned sites cost nothing; FLOP bound = unpruned / rewritten-graph FLOPs")
    if real:
        lines.append("1-SSIM, PSNR: images of the pipeline against its unpruned images (same prompts and seeds), mean")
        for p in result["points"]:
            q = p.get("quality") or {}
            got = {k: q[k] for k in ("fid", "fd_clip") if k in q}
            if got:
                lines.append(f"{p['label']}: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()))
        if result.get("fidelity_note"):
            lines.append(result["fidelity_note"])
    else:
        lines.append(f"rel. error = ||final - ref|| / ||ref||, PSNR over the reference's range: final latent of the "
                     f"DDIM loop vs the unpruned loop (same noise); quality compiler = {h['quality_compiler']}")
    if any(p["method"] == TOMESD for p in result["points"]):
        lines.append("tomesd runs eager (its monkey-patch); * = bounds borrowed from graphprune tome at the same "
                     "ratio (same attn1 sites with tomesd's max_downsample=1)")
    lines += [f"not measured: {n}" for n in notes]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Speedup (y) vs error (x), one curve per method ordered by ratio, the front circled."""
    pts = [p for p in result["points"] if "error" not in p and not math.isnan(error_value(p))
           and p.get("speedup") is not None]
    h = result["header"]
    series: dict[str, list[tuple[float, float, str]]] = {}
    for m in dict.fromkeys(p.get("curve", p["method"]) for p in pts):  # "curve": an explicit variant list's point
        name = m + (" (eager)" if m == TOMESD else "")
        series[name] = [(error_value(p), p["speedup"], "" if p.get("curve") else f"{p['ratio']:g}")
                        for p in sorted((p for p in pts if p.get("curve", p["method"]) == m),
                                        key=lambda p: p["ratio"] or 0.0)]
    real = any("ssim_mean" in (p.get("quality") or {}) for p in pts)
    return plot_speed_error(
        series, path, baseline=f"unpruned ({h['speed_compiler']})", dashed=[TOMESD + " (eager)"],
        front=[(error_value(p), p["speedup"]) for p in pts if p.get("front")],
        xlabel="1 - SSIM of the images vs unpruned" if real else "rel. error of the final latent vs unpruned (DDIM loop)",
        ylabel=f"speedup vs unpruned {h['speed_compiler']} (one model call)",
        title=f"{h['model']}, {h['call_shapes'].get('args[0]')}, {h['dtype']}, {h['device']}\n{h.get('loop', '')}")


__all__ = ["pareto_front", "error_value", "finish", "save", "replot", "table", "plot", "at_ratio", "SCHEMA_VERSION"]
