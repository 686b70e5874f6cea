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
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("speed")

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
# helpers

def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timestep_schedule(n: int) -> list[int]:
    """n distinct timesteps 999, 980, 960, ..., 20, then 990, 970, ... (all distinct for n <= 99)."""
    out = [999] + [980 - 20 * i for i in range(49)] + [990 - 20 * i for i in range(49)]
    if n > len(out):
        raise ValueError(f"at most {len(out)} calls per variant")
    return out[:n]


def dynamo_stats() -> dict[str, int]:
    """Dynamo counters that grow when a graph is (re)compiled or a frame is (re)converted."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "frames_ok": int(counters["frames"].get("ok", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def cpu_busy_s() -> tuple[float, float] | None:
    """(seconds of CPU time used by all processes, by this process) so far; None where /proc/stat is missing."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    mine = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), mine.user + mine.system


def other_cpu_share(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float) -> float | None:
    """Average number of CPU cores kept busy by *other* processes over ``wall`` seconds (contention check)."""
    if before is None or after is None or wall <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def rel_error(out: Any, ref: Any) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def unet_out(result: Any) -> Any:
    return result.sample if hasattr(result, "sample") else result[0]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def git_dirty() -> list[str] | None:
    """Uncommitted changes under graphprune/ at start (another engineer may be editing the package)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "graphprune"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent).stdout
        return [line.strip() for line in out.splitlines()]
    except Exception:  # noqa: BLE001
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------------------------------------
# FLOP analysis

def flop_counter():
    """A FlopCounterMode that also counts the CPU flash-attention op (missing from torch's registry)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    custom = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        custom[op] = cpu_sdpa_flop
    return FlopCounterMode(display=False, custom_mapping=custom)


def module_flops(counts: dict[str, dict[Any, int]], model: Any, path: str) -> tuple[str, int]:
    """FLOPs of the module at ``path`` from FlopCounterMode.get_flop_counts(); returns (key used, flops)."""
    for key in (f"{type(model).__name__}.{path}", path):
        if key in counts:
            return key, int(sum(counts[key].values()))
    raise KeyError(f"no FlopCounterMode entry for module {path!r} (tried '{type(model).__name__}.{path}' and "
                   f"'{path}'); keys look like {list(counts)[:4]}")


class GraphFlops:
    """A backend wrapping graphprune's (with compiler="eager") that can count the FLOPs of the rewritten graphs.

    FlopCounterMode entered *around* a compiled module makes Dynamo fall back to the original Python code, so the
    counting mode is entered inside the compiled callable instead, once per graph call.
    """

    def __init__(self, options: dict[str, Any]):
        self.options = {**options, "compiler": "eager"}
        self.reports: list[Any] = []
        self.graphs = 0
        self.counting = False
        self.flops = 0

    def backend(self, gm: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        from graphprune.backend import graphprune_backend

        fn = graphprune_backend(gm, example_inputs, options=self.options, reports=self.reports)
        self.graphs += 1

        def call(*args: Any) -> Any:
            if not self.counting:
                return fn(*args)
            with flop_counter() as fc:
                out = fn(*args)
            self.flops += fc.get_total_flops()
            return out

        return call


def flop_analysis(unet: Any, inputs: tuple[tuple[Any, ...], dict[str, Any]], configs: dict[str, dict[str, Any]],
                  with_tomesd: bool) -> dict[str, Any]:
    import torch

    args, kwargs = inputs
    with torch.no_grad(), flop_counter() as fc:
        unet(*args, **kwargs)
    total = int(fc.get_total_flops())
    counts = fc.get_flop_counts()
    key_format = next((k for k in counts if k.endswith("conv_in")), None)
    log.info("unpruned eager FLOPs: %.4g (FlopCounterMode key example: %r)", total, key_format)
    result: dict[str, Any] = {"total_unpruned": total, "key_example": key_format, "configs": {}}

    def run_captured(options: dict[str, Any]) -> GraphFlops:
        torch._dynamo.reset()
        cap = GraphFlops(options)
        compiled = torch.compile(unet, backend=cap.backend)
        with torch.no_grad():
            compiled(*args, **kwargs)  # trace + rewrite
            cap.counting = True
            compiled(*args, **kwargs)
            cap.counting = False
        torch._dynamo.reset()
        return cap

    # coverage check: the same capture path with ratio 0 must see all of the model's FLOPs
    check = run_captured({"method": "tome", "ratio": 0.0})
    result["capture_check"] = {"flops_ratio0": check.flops, "graphs": check.graphs,
                               "covers_model": check.flops == total}
    if check.flops != total:
        log.warning("FLOP capture covers %d of %d FLOPs (%d graphs): FLOP bounds are approximate",
                    check.flops, total, check.graphs)

    for name, options in configs.items():
        cap = run_captured(options)
        sites = [s for r in cap.reports for s in r.sites]
        pruned = [s for s in sites if s.status == "pruned"]
        site_flops = {}
        for s in pruned:
            key, fl = module_flops(counts, unet, s.module_path)
            site_flops[s.module_path] = {"key": key, "flops": fl, "N": s.N, "K": s.K}
        pruned_share = sum(v["flops"] for v in site_flops.values()) / total
        total_pruned = cap.flops + (total - check.flops)  # ops outside the graphs (if any) count as unpruned
        result["configs"][name] = {
            "options": options, "graphs": cap.graphs, "pruned_sites": site_flops,
            "site_summary": [f"{s.module_path} {s.kind} N={s.N} K={s.K} {s.status}" for s in sites],
            "f": pruned_share, "ideal_bound": 1.0 / (1.0 - pruned_share) if pruned_share < 1 else float("inf"),
            "total_pruned": total_pruned, "flop_bound": total / total_pruned,
        }
        log.info("%s: %d pruned sites, f=%.3f, ideal 1/(1-f)=%.2f, FLOPs %.4g -> %.4g (bound %.2fx)", name,
                 len(pruned), pruned_share, result["configs"][name]["ideal_bound"], total, total_pruned,
                 total / total_pruned)

    if with_tomesd:
        import tomesd

        patched = copy.deepcopy(unet)
        tomesd.apply_patch(patched, ratio=TOMESD_RATIO)
        torch.manual_seed(0)
        with torch.no_grad(), flop_counter() as fc2:
            patched(*args, **kwargs)
        tflops = int(fc2.get_total_flops())
        # tomesd swaps the class of every transformer block; it merges only where downsample <= max_downsample
        patched_blocks = sorted(n for n, m in patched.named_modules() if type(m).__name__.startswith("ToMe"))
        result["tomesd_measured"] = {"total_pruned": tflops, "flop_bound": total / tflops,
                                     "blocks_with_patched_class": patched_blocks}
        proxy = result["configs"].get(TOMESD_PROXY)
        if proxy is not None:
            result["tomesd_measured"]["same_flops_as_" + TOMESD_PROXY] = tflops == proxy["total_pruned"]
        log.info("tomesd eager (measured directly): FLOPs %.4g -> %.4g (bound %.2fx)", total, tflops, total / tflops)
        del patched
        gc.collect()
    return result


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
