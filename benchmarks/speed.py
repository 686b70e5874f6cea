#!/usr/bin/env python
"""Wall-clock speed of graphprune vs Inductor, eager and tomesd on one UNet, all in one process.

    python benchmarks/speed.py --quick                          # tiny UNet, latent 16, smoke test (~1-2 min)
    python benchmarks/speed.py --latents 64,32 --out results/speed_cpu.json

For every latent size: one reference eager call, a FLOP analysis (FlopCounterMode on the unpruned model and on
the rewritten graphs run with ``compiler="eager"``), then each variant is timed: the first call (compile) is
timed on its own, then warm-up calls, then the median of ``--runs`` timed calls. Every call uses a different
timestep so that a recompile on the timestep value would show (and is recorded). Speedups are relative to the
``inductor`` variant (``torch.compile(unet)``, default backend). See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("speed")

# import the graphprune of this checkout (not another installed copy): the helpers live in graphprune.bench
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: variant key -> (display name, kind, graphprune options or None)
VARIANTS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "eager": ("eager", "eager", None),
    "inductor": ("inductor", "inductor", None),
    "sito0.5": ("graphprune sito r=0.5", "graphprune", {"method": "sito", "ratio": 0.5}),
    "sito0.7": ("graphprune sito r=0.7", "graphprune", {"method": "sito", "ratio": 0.7}),
    "tome0.5": ("graphprune tome r=0.5", "graphprune", {"method": "tome", "ratio": 0.5}),
    "tomesd": ("tomesd r=0.5 eager", "tomesd", None),
    "tomesd+inductor": ("tomesd r=0.5 + inductor", "tomesd+inductor", None),
    # not run by default: separate Dynamo's graph capture from Inductor and from pruning
    "dynamo-eager": ("dynamo graph, eager backend", "dynamo-eager", None),
    "sito0.5-fx": ("graphprune sito r=0.5, compiler=eager", "graphprune",
                   {"method": "sito", "ratio": 0.5, "compiler": "eager"}),
    "tome0.5-fx": ("graphprune tome r=0.5, compiler=eager", "graphprune",
                   {"method": "tome", "ratio": 0.5, "compiler": "eager"}),
}
DEFAULT_VARIANTS = ("eager", "inductor", "sito0.5", "sito0.7", "tome0.5", "tomesd", "tomesd+inductor")
TOMESD_RATIO = 0.5
#: the graphprune config whose site set and FLOP bound the tomesd rows borrow
TOMESD_PROXY = "tome0.5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time graphprune (sito/tome) against eager, Inductor and tomesd on a UNet, in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="sd15", help="built-in architecture (graphprune.archs.build_unet)")
    p.add_argument("--latents", default="64,32", help="comma-separated latent sizes (latent x latent)")
    p.add_argument("--batch", type=int, default=2, help="batch size (2 = classifier-free guidance)")
    p.add_argument("--runs", type=int, default=5, help="timed calls per variant (median reported), >= 1")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls after the first (compiling) call, >= 2")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--error-timestep", type=int, default=500,
                   help="timestep of the call compared with the unpruned eager output")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--contention", type=float, default=0.25,
                   help="CPU cores used by other processes (average over the timed calls) above which the "
                        "timed calls count as contended and are repeated")
    p.add_argument("--retries", type=int, default=2,
                   help="repeat contended timed calls up to this many times (the least contended set is kept)")
    p.add_argument("--retry-wait", type=float, default=20.0, help="seconds to wait before repeating")
    p.add_argument("--out", default="results/speed.json", help="JSON output path")
    p.add_argument("--keep-inductor-cache", action="store_true",
                   help="use the usual on-disk Inductor cache (default: a fresh temporary one, so compile "
                        "times are cold for the first variant that compiles a kernel)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: --arch tiny --latents 16 --runs 2")
    p.add_argument("--log-level", default="INFO", help="logging level")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.latents, args.runs = "tiny", "16", 2
    args.latent_list = [int(x) for x in str(args.latents).split(",") if x.strip()]
    args.variant_list = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.warmup < 2:
        p.error("--warmup must be >= 2")
    if args.retries < 0:
        p.error("--retries must be >= 0")
    if 1 + args.warmup + args.runs * (1 + args.retries) > 99:
        p.error("too many calls per variant (1 + warmup + runs * (1 + retries) must be <= 99)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# helpers and FLOP analysis: shared with the Pareto harness (graphprune/bench/common.py)

from graphprune.bench.common import (GraphFlops, cpu_busy_s, cpu_model, delta, dynamo_stats,  # noqa: E402,F401
                                     flop_analysis as _flop_analysis, flop_counter, git_commit, git_dirty,
                                     module_flops, other_cpu_share, rel_error, sync, timestep_schedule, unet_out)


def flop_analysis(unet: Any, inputs: tuple[tuple[Any, ...], dict[str, Any]], configs: dict[str, dict[str, Any]],
                  with_tomesd: bool) -> dict[str, Any]:
    return _flop_analysis(unet, inputs, configs, TOMESD_RATIO if with_tomesd else None, TOMESD_PROXY)


# ----------------------------------------------------------------------------------------------------------------
# timing

def make_callable(key: str, unet: Any, tomesd_unet: Any) -> Callable[..., Any]:
    import torch

    name, kind, options = VARIANTS[key]
    if kind == "eager":
        return unet
    if kind == "inductor":
        return torch.compile(unet)
    if kind == "graphprune":
        return torch.compile(unet, backend="graphprune", options=dict(options))
    if kind == "dynamo-eager":
        return torch.compile(unet, backend="eager")
    if kind == "tomesd":
        return tomesd_unet
    if kind == "tomesd+inductor":
        return torch.compile(tomesd_unet)
    raise ValueError(key)


def time_variant(key: str, fn: Callable[..., Any], inputs: tuple[tuple[Any, ...], dict[str, Any]], ref: Any,
                 opts: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch
    from graphprune.backend import REPORTS
    from tqdm import tqdm

    (sample, t0, context), kwargs = inputs
    steps = timestep_schedule(1 + opts.warmup + opts.runs * (1 + opts.retries))
    ts = [torch.tensor(s, dtype=t0.dtype, device=t0.device) for s in steps]
    t_err = torch.tensor(opts.error_timestep, dtype=t0.dtype, device=t0.device)
    reports_before = len(REPORTS)
    res: dict[str, Any] = {"timesteps": steps, "error_timestep": opts.error_timestep}

    def call(t: Any) -> tuple[float, Any]:
        sync(device)
        start = time.perf_counter()
        out = unet_out(fn(sample, t, context, **kwargs))
        sync(device)
        return time.perf_counter() - start, out

    bar = tqdm(total=1 + opts.warmup + opts.runs + 1, desc=f"{key}", leave=False, unit="call")
    with torch.no_grad():
        s0 = dynamo_stats()
        bar.set_postfix_str("first call (compile)")
        res["compile_s"], _ = call(ts[0])
        bar.update()
        s1 = dynamo_stats()
        res["first_call"] = delta(s1, s0)
        warm = []
        for t in ts[1:1 + opts.warmup]:
            bar.set_postfix_str("warm-up")
            dt, _ = call(t)
            warm.append(dt)
            bar.update()
        s2 = dynamo_stats()
        attempts = []
        for attempt in range(1 + opts.retries):
            first = 1 + opts.warmup + attempt * opts.runs
            cpu0, wall0 = cpu_busy_s(), time.perf_counter()
            times = []
            for t in ts[first:first + opts.runs]:
                bar.set_postfix_str("timed" if not attempt else f"timed (retry {attempt})")
                dt, _ = call(t)
                times.append(dt)
                bar.update()
            other = other_cpu_share(cpu0, cpu_busy_s(), time.perf_counter() - wall0)
            attempts.append({"times_s": times, "timesteps": steps[first:first + opts.runs], "other_cpu_cores": other})
            if other is None or other <= opts.contention:
                break
            log.warning("%s: other processes used %.2f CPU cores on average during the timed runs (> %.2f): "
                        "timings are contended%s", key, other, opts.contention,
                        "; timing again" if attempt < opts.retries else "; no retries left")
            if attempt < opts.retries:
                time.sleep(opts.retry_wait)
            bar.total += opts.runs
        s3 = dynamo_stats()
        best = min(attempts, key=lambda a: a["other_cpu_cores"] if a["other_cpu_cores"] is not None else 0.0)
        times = best["times_s"]
        res["timed_attempts"] = attempts
        res["timed_attempt_used"] = attempts.index(best) + 1
        res["other_cpu_cores"] = best["other_cpu_cores"]
        res["loadavg_after_timed"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        torch.manual_seed(0)
        bar.set_postfix_str("error check")
        _, out = call(t_err)
        bar.update()
        s4 = dynamo_stats()
    bar.close()
    res.update(warmup_s=warm, times_s=times, median_s=statistics.median(times),
               min_s=min(times), max_s=max(times), rel_error=rel_error(out, ref))
    res["recompiles_warmup"] = delta(s2, s1)
    res["recompiles_timed"] = delta(s3, s2)
    res["recompiles_error_call"] = delta(s4, s3)
    res["graphs"] = res["first_call"]["unique_graphs"]
    res["graph_breaks"] = res["first_call"]["graph_breaks"]
    grew = [d for d in (res["recompiles_warmup"], res["recompiles_timed"], res["recompiles_error_call"])
            if d["unique_graphs"] or d["frames_ok"]]
    res["no_recompiles"] = not grew
    res["no_recompiles_timed"] = not (res["recompiles_timed"]["unique_graphs"] or res["recompiles_timed"]["frames_ok"])
    new_reports = list(REPORTS)[reports_before:] if len(REPORTS) >= reports_before else []
    if VARIANTS[key][1] == "graphprune":
        res["graphprune_reports"] = len(new_reports)
        res["pruned_sites"] = [s.module_path for r in new_reports for s in r.sites if s.status == "pruned"]
        res["report_summaries"] = [r.summary() for r in new_reports]
    if not res["no_recompiles"]:
        log.warning("%s: recompiles after the first call: warm-up %s, timed %s, error call %s", key,
                    res["recompiles_warmup"], res["recompiles_timed"], res["recompiles_error_call"])
    log.info("%s: first call %.2fs, median %.3fs (runs %s), rel. error %.3g, graphs %d, breaks %d, "
             "no recompiles: %s", key, res["compile_s"], res["median_s"], ", ".join(f"{x:.3f}" for x in times),
             res["rel_error"], res["graphs"], res["graph_breaks"], res["no_recompiles"])
    return res


# ----------------------------------------------------------------------------------------------------------------
# output

COLUMNS = ["variant", "compile s", "median s", "speedup vs inductor", "rel. error", "pruned share f",
           "ideal 1/(1-f)", "FLOP bound", "fraction of bound", "graphs", "recompiles warm/timed", "other CPU"]


def fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(latent_result: dict[str, Any]) -> str:
    rows = [COLUMNS]
    notes = []
    for key, r in latent_result["variants"].items():
        name = VARIANTS[key][0]
        if "error" in r:
            rows.append([name, "FAILED"] + ["-"] * (len(COLUMNS) - 2))
            notes.append(f"{name}: {r['error'].strip().splitlines()[-1]}")
            continue
        mark = "*" if r.get("bound_source") == TOMESD_PROXY and VARIANTS[key][1].startswith("tomesd") else ""
        rows.append([
            name, fmt(r["compile_s"], ".1f"), fmt(r["median_s"], ".3f"), fmt(r.get("speedup"), ".3f"),
            fmt(r["rel_error"], ".2e"), fmt(r.get("f"), ".3f") + (mark if r.get("f") is not None else ""),
            fmt(r.get("ideal_bound"), ".2f"), fmt(r.get("flop_bound"), ".3f") + (mark if r.get("flop_bound") else ""),
            fmt(r.get("fraction_of_bound"), ".2f"), str(r["graphs"]) + (f" ({r['graph_breaks']} breaks)"
                                                                         if r["graph_breaks"] else ""),
            f"{r['recompiles_warmup']['unique_graphs']}/{r['recompiles_timed']['unique_graphs']}",
            fmt(r.get("other_cpu_cores"), ".2f") + (f" (try {r['timed_attempt_used']})"
                                                    if len(r.get("timed_attempts", [])) > 1 else ""),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    fl = latent_result.get("flops", {})
    if any(VARIANTS[k][1].startswith("tomesd") for k in latent_result["variants"]):
        meas = fl.get("tomesd_measured")
        extra = (f"; tomesd's own FLOPs measured directly give a bound of {meas['flop_bound']:.3f}x"
                 if meas else "")
        lines.append(f"* tomesd rows use the pruned-site set and FLOP bound of graphprune tome r=0.5 (tomesd "
                     f"r=0.5, max_downsample=1 touches the same attn1 modules){extra}")
    if fl:
        cc = fl.get("capture_check", {})
        lines.append(f"unpruned FLOPs per call: {fl['total_unpruned'] / 1e9:.2f} GFLOP (FlopCounterMode, CPU "
                     f"flash-attention counted); rewritten-graph capture covers the model: "
                     f"{cc.get('covers_model')}")
    lines.append("recompiles warm/timed = new Dynamo graphs during the warm-up calls / the timed calls; other CPU = "
                 "average cores used by other processes during the timed calls (try n: contended timed calls were repeated "
                 "and the n-th, least contended set is reported)")
    lines.append("compile s = wall time of the first call (compile + one run); speedup = inductor median / "
                 "variant median; rel. error = ||out - eager|| / ||eager|| at t="
                 f"{latent_result['error_timestep']}")
    lines += [f"FAILED {n}" for n in notes]
    return "\n".join(lines)


def header_facts(opts: argparse.Namespace, device: Any, dtype: Any) -> dict[str, Any]:
    import diffusers
    import torch

    import graphprune

    try:
        import tomesd  # noqa: F401
        from importlib.metadata import version

        tomesd_version = version("tomesd")
    except Exception:  # noqa: BLE001
        tomesd_version = None
    return {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "graphprune": graphprune.__version__,
        "tomesd": tomesd_version, "python": platform.python_version(),
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "model": opts.arch, "latents": opts.latent_list, "batch": opts.batch,
        "runs": opts.runs, "warmup": opts.warmup, "variants": opts.variant_list,
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "inductor_cache_fresh": not opts.keep_inductor_cache, "git_commit": git_commit(), "graphprune_uncommitted": git_dirty(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def format_header(h: dict[str, Any]) -> str:
    return "\n".join([
        f"torch {h['torch']} | diffusers {h['diffusers']} | graphprune {h['graphprune']} | tomesd {h['tomesd']} | "
        f"python {h['python']}",
        f"device {h['device']} ({h['cpu']}, {h['cpu_count']} CPUs) | dtype {h['dtype']} | threads {h['threads']}",
        f"model {h['model']} | latents {h['latents']} | batch {h['batch']} | warm-up {h['warmup']} | "
        f"runs {h['runs']} (median) | git {h['git_commit']}",
    ])


# ----------------------------------------------------------------------------------------------------------------

def run_latent(latent: int, unet: Any, opts: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from graphprune.archs import example_inputs

    inputs = example_inputs(unet, latent=latent, batch=opts.batch, structured=True, timestep=opts.error_timestep)
    args, kwargs = inputs
    log.info("latent %d: sample %s, context %s", latent, tuple(args[0].shape), tuple(args[2].shape))
    with torch.no_grad():
        ref = unet_out(unet(*args, **kwargs)).detach().clone()

    gp_keys = [k for k in opts.variant_list if VARIANTS[k][1] == "graphprune"]
    want_tomesd = any(VARIANTS[k][1].startswith("tomesd") for k in opts.variant_list)
    configs = {k: dict(VARIANTS[k][2]) for k in gp_keys}
    if want_tomesd and TOMESD_PROXY not in configs:
        configs[TOMESD_PROXY] = dict(VARIANTS[TOMESD_PROXY][2])
    out: dict[str, Any] = {"latent": latent, "error_timestep": opts.error_timestep, "variants": {}}
    log.info("latent %d: FLOP analysis", latent)
    out["flops"] = flop_analysis(unet, inputs, configs, want_tomesd)

    tomesd_unet = None
    if want_tomesd:
        import tomesd

        tomesd_unet = copy.deepcopy(unet)
        tomesd.apply_patch(tomesd_unet, ratio=TOMESD_RATIO)

    for key in tqdm(opts.variant_list, desc=f"latent {latent}", unit="variant"):
        log.info("latent %d: variant %s", latent, key)
        torch._dynamo.reset()
        gc.collect()
        try:
            fn = make_callable(key, unet, tomesd_unet)
            r = time_variant(key, fn, inputs, ref, opts, device)
        except Exception as exc:  # noqa: BLE001
            tb = traceback.format_exc()
            log.error("latent %d: variant %s failed: %s\n%s", latent, key, exc, tb)
            r = {"error": tb}
        finally:
            fn = None
            torch._dynamo.reset()
            gc.collect()
        out["variants"][key] = r

    base = out["variants"].get("inductor", {}).get("median_s")
    for key, r in out["variants"].items():
        if "error" in r:
            continue
        r["speedup"] = base / r["median_s"] if base else None
        kind = VARIANTS[key][1]
        src = key if kind == "graphprune" else TOMESD_PROXY if kind.startswith("tomesd") else None
        if src and src in out["flops"]["configs"]:
            c = out["flops"]["configs"][src]
            r.update(bound_source=src, f=c["f"], ideal_bound=c["ideal_bound"], flop_bound=c["flop_bound"])
            r["fraction_of_bound"] = r["speedup"] / c["flop_bound"] if r["speedup"] else None
        if kind == "graphprune" and src in out["flops"]["configs"]:
            expected = sorted(out["flops"]["configs"][src]["pruned_sites"])
            r["sites_match_analysis"] = sorted(r.get("pruned_sites", [])) == expected
            if not r["sites_match_analysis"]:
                log.warning("%s: pruned sites of the Inductor compile %s differ from the eager analysis %s", key,
                            r.get("pruned_sites"), expected)
    return out


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=getattr(logging, opts.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    fresh_cache = None
    if not opts.keep_inductor_cache:
        fresh_cache = tempfile.mkdtemp(prefix="speed_inductor_cache_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh_cache
    try:
        return run(opts)
    finally:
        if fresh_cache:
            shutil.rmtree(fresh_cache, ignore_errors=True)


def run(opts: argparse.Namespace) -> int:
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    from graphprune.archs import build_unet

    if opts.threads:
        torch.set_num_threads(opts.threads)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    header = header_facts(opts, device, dtype)
    print(format_header(header), flush=True)
    result: dict[str, Any] = {"header": header, "latents": {}}

    out_path = Path(opts.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with logging_redirect_tqdm():
        log.info("building %s UNet (%s, %s)", opts.arch, device, dtype)
        unet = build_unet(opts.arch, dtype=dtype, seed=opts.seed).to(device)
        from torch.nn.modules import module as nn_module

        for latent in opts.latent_list:
            hooks = len(nn_module._global_forward_hooks) + len(nn_module._global_forward_pre_hooks)
            if hooks:
                log.warning("%d global module hooks are registered (they slow eager calls)", hooks)
            lr = run_latent(latent, unet, opts, device)
            result["latents"][str(latent)] = lr
            out_path.write_text(json.dumps(result, indent=2, default=str))  # partial results survive a crash
            print(f"\n== {opts.arch}, latent {latent}x{latent}, batch {opts.batch}, {header['dtype']}, "
                  f"{header['device']} ==", flush=True)
            print(table(lr), flush=True)
    result["tables"] = {k: table(v) for k, v in result["latents"].items()}
    out_path.write_text(json.dumps(result, indent=2, default=str))
    log.info("wrote %s", out_path)
    failed = [(l, k) for l, v in result["latents"].items() for k, r in v["variants"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
