"""Compile time as a user sees it: cold and warm ``torch.compile`` of a UNet, each run in a fresh process.

    graphprune bench compile --latent 32 --steps 4 --variants inductor,tome0.5          # per-call variants
    graphprune bench compile --latent 32 --steps 50 --variants inductor,deepcache3,dato-imagenet,dato-coco
    python benchmarks/compile.py --quick                                                # tiny UNet (smoke)
    result = run(CompileOptions(latent=32, variants=("inductor", "tome0.5")))

Per variant, one *series*: a fresh temporary Inductor cache folder (``TORCHINDUCTOR_CACHE_DIR``) and ``processes``
fresh Python processes run one after another against it: the first compiles cold, the next find Inductor's FX
graph cache and AOTAutograd's cache on disk (both enabled), as a user's second run of the same script does. Each
process builds the model (seeded random weights), wraps it (``torch.compile(unet, backend="graphprune",
options=...)``, plain Inductor, or a peer's way) and runs one seeded ``steps``-step CFG DDIM generation
(:func:`~graphprune.bench.ddim.ddim_loop`), timing every UNet call.

**Compile seconds** = what the first call of each step kind (full, shallow, reuse, ...) cost beyond that kind's
steady call (the median of its later calls), summed over the kinds: what the first call of each kind added (Dynamo's trace, graphprune's rewrite, AOTAutograd, Inductor, loading from the
caches); a kind called only once has no compiled reference and its compile is not separated (reported as such).
**First call** = the first UNet call's seconds (compile + one call), what a user waits for before anything runs.

Reported per process: both, the steady seconds per call of each kind, the graphs compiled (Dynamo graphs,
Inductor compiles = FX graph cache hits + misses + bypasses, graphprune's compiled step variants), the cache
counters (``counters["inductor"]`` fxgraph_cache_hit/miss/bypass, ``counters["aot_autograd"]``
autograd_cache_hit/miss/bypass/saved), peak memory and machine load; per variant, warm over cold and its warm
compile over the baseline variant's (the issue's goal: graphprune's warm <= plain Inductor's warm + 20%).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .env import environment, format_header, loadavg
from .options import CompileOptions
from .output import render_table, write_json
from .variants import variants

log = logging.getLogger(__name__)

#: the on-disk caches a warm process reads (Inductor's FX graph cache, AOTAutograd's cache)
CACHE_ENV = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
COUNTERS = {"inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
            "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass",
                             "autograd_cache_saved"),
            "stats": ("unique_graphs",)}


def run(opts: CompileOptions) -> dict[str, Any]:
    """Every variant's series of fresh processes (cold, then warm); returns the result (JSON in ``opts.out``) with
    ``table`` and ``failed``."""
    from tqdm import tqdm

    opts.check()
    chosen = variants(opts.variants)
    header = environment("cpu", "float32", model=opts.arch, latent=opts.latent, batch=2, steps=opts.steps,
                         guidance=opts.guidance, scheduler="DDIM", processes=opts.processes, threads=opts.threads,
                         caches="fresh TORCHINDUCTOR_CACHE_DIR per variant; FX graph cache + AOTAutograd cache on",
                         options=opts.as_dict())
    log.info("%s", format_header(header))
    result: dict[str, Any] = {"header": header, "variants": {}}
    for v in tqdm(chosen, desc="variants"):
        cache = tempfile.mkdtemp(prefix=f"compile_cache_{v.key}_")
        series = []
        try:
            for i in tqdm(range(opts.processes), desc=v.key, leave=False):
                series.append(_process(v.key, opts, cache))
                log.info("%s process %d: %s", v.key, i + 1, _brief(series[-1]))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        result["variants"][v.key] = {"name": v.label, "processes": series}
        if opts.out:
            write_json(result, opts.out)  # partial results survive a crash
    header["loadavg_end"] = loadavg()
    summarize(result, chosen[0].key)
    result["failed"] = [k for k, r in result["variants"].items() if any("error" in p for p in r["processes"])]
    result["table"] = "\n\n".join((format_header(header), table(result)))
    if opts.out:
        write_json(result, opts.out)
    return result


def _process(key: str, opts: CompileOptions, cache: str) -> dict[str, Any]:
    """One fresh process measuring ``key`` against the cache folder ``cache``."""
    env = {**os.environ, **CACHE_ENV, "TORCHINDUCTOR_CACHE_DIR": cache}
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    spec = {"key": key, "arch": opts.arch, "latent": opts.latent, "steps": opts.steps, "guidance": opts.guidance,
            "threads": opts.threads}
    with tempfile.TemporaryDirectory(prefix="compile_out_") as tmp:
        out = Path(tmp) / "process.json"
        code = ("import json, sys; from graphprune.bench.compile import measure_process; "
                "json.dump(measure_process(json.loads(sys.argv[1])), open(sys.argv[2], 'w'))")
        start, load = time.perf_counter(), loadavg()
        try:
            done = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(out)], env=env,
                                  capture_output=True, text=True, timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {opts.timeout} s", "loadavg_start": load}
        wall = time.perf_counter() - start
        if done.returncode != 0 or not out.exists():
            return {"error": done.stderr[-4000:], "returncode": done.returncode, "loadavg_start": load}
        row = json.loads(out.read_text())
    row.update(process_seconds=wall, loadavg_start=load, loadavg_end=loadavg())
    return row


def measure_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the fresh process: build, compile and run one generation of ``spec["key"]``; the row of
    :func:`run`'s table (JSON-ready)."""
    import resource

    import torch
    from torch._dynamo.utils import counters

    from ..archs import example_inputs
    from ..runtime.base import runtimes
    from .ddim import ddim_loop, loop_start, make_scheduler
    from .options import LoopSpec
    from .variants import build_model, generation_kinds, new_runtime, variant

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    v = variant(spec["key"])
    if v.kind == "graphprune" and str(v.options.get("schedule", "")).startswith("dato-"):
        v = v.with_options(num_steps=spec["steps"])  # DaTo's presets in their one-call-per-step (DDIM) form
    t1 = time.perf_counter()
    unet = build_model(spec["arch"])
    template = example_inputs(unet, spec["latent"], batch=2, seed=0, structured=True)
    loop = LoopSpec(steps=spec["steps"], guidance=spec["guidance"], strength=1.0, seed=1)
    start = loop_start(unet, spec["latent"], images=1, seed=1)
    scheduler = make_scheduler()
    build_s = time.perf_counter() - t1
    before = {id(r) for r in runtimes()}
    built = v.build(unet, scheduler=scheduler)
    times: list[float] = []
    t2 = time.perf_counter()
    with torch.no_grad():
        ddim_loop(built.fn, template, start, loop, on_call=lambda i, s: times.append(s))
    generation_s = time.perf_counter() - t2
    rt = new_runtime(built, before) if v.kind == "graphprune" else None  # plain Inductor: a compiled function
    kinds = generation_kinds(built, rt, spec["steps"])
    compiled = [d["kind"] for d in rt.describe().get("variants", [])] if rt is not None else []
    built.close()
    row = {"build_seconds": build_s, "generation_seconds": generation_s,
           "first_call_seconds": times[0], "call_seconds": times, "kinds": kinds, "compiled_variants": compiled,
           "counters": {group: {k: counters[group].get(k, 0) for k in keys} for group, keys in COUNTERS.items()},
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
           "torch_threads": torch.get_num_threads()}
    row.update(split_compile(times, kinds))
    return row


def split_compile(times: list[float], kinds: list[str]) -> dict[str, Any]:
    """The compile seconds in a generation's per-call ``times`` (``kinds[i]``: the step kind of call i): per kind,
    the median of its calls after the first is its steady cost; what its first call cost beyond it is compile.
    ``compile_seconds`` is None when a kind ran only once (no steady call to subtract)."""
    steady: dict[str, float] = {}
    single = []
    extra = 0.0
    for kind in dict.fromkeys(kinds):
        mine = [t for t, k in zip(times, kinds) if k == kind]
        if len(mine) < 2:
            single.append(kind)
            continue
        steady[kind] = statistics.median(mine[1:])
        extra += mine[0] - steady[kind]  # only the first call compiles (load elsewhere does not add up)
    compile_s = None if single else extra
    return {"compile_seconds": compile_s, "steady_call_seconds": steady, "kinds_called_once": single}


def summarize(result: dict[str, Any], baseline: str) -> None:
    """Per variant: cold and warm compile seconds (the last process is the warm one), warm / cold, and the warm
    compile over the baseline variant's warm compile."""
    for r in result["variants"].values():
        ok = [p for p in r["processes"] if "error" not in p]
        cold = ok[0]["compile_seconds"] if ok and len(ok) == len(r["processes"]) else None
        warm = ok[-1]["compile_seconds"] if len(ok) > 1 and len(ok) == len(r["processes"]) else None
        r.update(cold_compile_seconds=cold, warm_compile_seconds=warm,
                 warm_over_cold=warm / cold if cold and warm is not None else None)
    base_warm = result["variants"][baseline]["warm_compile_seconds"]
    for r in result["variants"].values():
        w = r["warm_compile_seconds"]
        r["warm_vs_baseline_warm"] = w / base_warm if w is not None and base_warm else None


def _counts(p: dict[str, Any]) -> tuple[str, str, str]:
    c = p["counters"]
    ind, aot = c["inductor"], c["aot_autograd"]
    graphs = (f"{c['stats']['unique_graphs']} / {sum(ind.values())}"
              + (f" / {len(p['compiled_variants'])} ({', '.join(p['compiled_variants'])})"
                 if p["compiled_variants"] else " / -"))
    return (graphs, f"{ind['fxgraph_cache_hit']} / {ind['fxgraph_cache_miss']} / {ind['fxgraph_cache_bypass']}",
            f"{aot['autograd_cache_hit']} / {aot['autograd_cache_miss']} / {aot['autograd_cache_bypass']}")


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _brief(p: dict[str, Any]) -> str:
    if "error" in p:
        return "FAILED: " + p["error"].strip().splitlines()[-1] if p["error"].strip() else "FAILED"
    return (f"compile {_fmt(p['compile_seconds'])} s, first call {p['first_call_seconds']:.1f} s, "
            f"graphs (dynamo / inductor / graphprune) {_counts(p)[0]}, fxgraph h/m/b {_counts(p)[1]}, "
            f"aot h/m/b {_counts(p)[2]}, load {p['loadavg_start']}")


def table(result: dict[str, Any]) -> str:
    base = next(iter(result["variants"].values()))["name"]
    rows = []
    for r in result["variants"].values():
        for i, p in enumerate(r["processes"]):
            run_name = "cold" if i == 0 else f"warm {i}" if len(r["processes"]) > 2 else "warm"
            if "error" in p:
                rows.append([r["name"], run_name, "FAILED"] + ["-"] * 8)
                continue
            steady = ", ".join(f"{k} {s:.2f}" for k, s in p["steady_call_seconds"].items() if k != "reuse")
            graphs, fx, aot = _counts(p)
            last = i == len(r["processes"]) - 1 and i > 0
            rows.append([r["name"], run_name, _fmt(p["compile_seconds"]), f"{p['first_call_seconds']:.1f}",
                         steady or "-", graphs, fx, aot,
                         _fmt(r["warm_over_cold"], ".2f", "x") if last else "",
                         _fmt(r["warm_vs_baseline_warm"], ".2f", "x") if last else "",
                         " ".join(f"{x:g}" for x in p["loadavg_start"] or [])])
    return render_table(["variant", "process", "compile s", "first call s", "steady s / call (kind)",
                         "graphs: dynamo / inductor / graphprune", "fxgraph hit / miss / bypass",
                         "aot hit / miss / bypass", "warm / cold", f"warm vs {base} warm", "load (1, 5, 15 min)"],
                        rows, markdown=True)


__all__ = ["run", "measure_process", "split_compile", "summarize", "table", "CompileOptions"]
