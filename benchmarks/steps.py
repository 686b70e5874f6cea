#!/usr/bin/env python
"""Whole denoising loops: step caching (deepcache, dato) vs Inductor, sito and the DeepCache package, one process.

    python benchmarks/steps.py --quick                                  # tiny UNet, latent 16, 10 steps (smoke)
    python benchmarks/steps.py --latent 32 --out results/steps_cpu32.json --plot results/steps_cpu32.png
    python benchmarks/steps.py --latent 64 --variants inductor,deepcache3,dato-coco
    python benchmarks/steps.py --front --latent 32 --threads 1 --out docs/steps_policies_sd15_latent32_cpu  # policies

A seeded 50-step DDIM loop (diffusers' DDIMScheduler, SD1.5's scheduler settings) with classifier-free guidance
(batch 2: [uncond; cond] random text embeddings, guidance 7.5) on a built-in architecture with random weights.
Every variant starts from the same initial latent (scikit-image photo latents noised to the first timestep) and
runs one warm-up generation (which compiles every graph it needs), then ``--runs`` timed generations (median).
Reported per variant: seconds per generation, speedup vs the Inductor baseline, relative error of the final latent
vs the baseline's final latent, the step kinds of a generation, the compiled variants, and the FLOP bound: the
unpruned FLOPs of all steps over the FLOPs this variant runs (full / shallow graphs counted with FlopCounterMode
on the rewritten graphs run eagerly; reuse steps cost nothing).

``--front`` runs the step policies' speed-vs-error front instead (:func:`run_front`): fixed intervals, DaTo's presets,
first-block and magcache, each with and without the Taylor forecast and with and without DaTo's pruning, every
generation timed between two generations of the full-step baseline (paired; wall and CPU seconds of this
single-threaded process, the latter insensitive to other jobs on a shared machine), the FLOP bound of each variant,
the final-latent error against the baseline's.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import (cpu_model, flop_counter, git_commit, git_dirty, rel_error, sync, unet_out)  # noqa: E402

log = logging.getLogger("steps")

#: key -> (display name, kind, options)
VARIANTS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "eager": ("eager", "eager", None),
    "inductor": ("inductor (baseline)", "inductor", None),
    "deepcache3": ("graphprune deepcache N=3", "graphprune", {"method": "deepcache", "cache_interval": 3}),
    "deepcache5": ("graphprune deepcache N=5", "graphprune", {"method": "deepcache", "cache_interval": 5}),
    "dato3": ("graphprune dato r=0.4 N=3", "graphprune", {"method": "dato", "cache_interval": 3}),
    "dato-imagenet": ("graphprune dato r=0.4 S_A", "graphprune", {"method": "dato", "schedule": "dato-imagenet"}),
    "dato-coco": ("graphprune dato r=0.4 S_B", "graphprune", {"method": "dato", "schedule": "dato-coco"}),
    "sito0.5": ("graphprune sito r=0.5", "graphprune", {"method": "sito", "ratio": 0.5}),
    # the rewritten graphs without Inductor (compiler="eager"): what step caching saves, without compile time
    "deepcache3-fx": ("graphprune deepcache N=3 (fx)", "graphprune", {"method": "deepcache", "cache_interval": 3,
                                                                      "compiler": "eager"}),
    "dato-imagenet-fx": ("graphprune dato S_A (fx)", "graphprune", {"method": "dato", "schedule": "dato-imagenet",
                                                                    "compiler": "eager"}),
    "dato-coco-fx": ("graphprune dato S_B (fx)", "graphprune", {"method": "dato", "schedule": "dato-coco",
                                                                "compiler": "eager"}),
    "sito0.5-fx": ("graphprune sito r=0.5 (fx)", "graphprune", {"method": "sito", "ratio": 0.5, "compiler": "eager"}),
    # CA-ToMe (T = 0.7): official refresh configs and refresh-every-call; "tome-matched" merges the mean fraction
    # the first catome variant of the run measured (filled in at run time)
    "catome-config3": ("graphprune catome T=0.7 config3", "graphprune", {"method": "catome", "refresh": "config3"}),
    "catome-every5": ("graphprune catome T=0.7 every5", "graphprune", {"method": "catome", "refresh": "every5"}),
    "catome-every1": ("graphprune catome T=0.7 every call", "graphprune", {"method": "catome", "refresh": 1}),
    "tome-matched": ("graphprune tome r=catome's mean", "graphprune", {"method": "tome", "ratio": None}),
    "catome-config3-fx": ("graphprune catome T=0.7 config3 (fx)", "graphprune",
                          {"method": "catome", "refresh": "config3", "compiler": "eager"}),
    "catome-every5-fx": ("graphprune catome T=0.7 every5 (fx)", "graphprune",
                         {"method": "catome", "refresh": "every5", "compiler": "eager"}),
    "catome-every1-fx": ("graphprune catome T=0.7 every call (fx)", "graphprune",
                         {"method": "catome", "refresh": 1, "compiler": "eager"}),
    # T = 0.4: on random weights T = 0.7 merges almost nothing (0.04% at the first step, latent 32); 0.4 merges ~67%
    "catome0.4-config3-fx": ("graphprune catome T=0.4 config3 (fx)", "graphprune",
                             {"method": "catome", "threshold": 0.4, "refresh": "config3", "compiler": "eager"}),
    "catome0.4-every5-fx": ("graphprune catome T=0.4 every5 (fx)", "graphprune",
                            {"method": "catome", "threshold": 0.4, "refresh": "every5", "compiler": "eager"}),
    "catome0.4-every1-fx": ("graphprune catome T=0.4 every call (fx)", "graphprune",
                            {"method": "catome", "threshold": 0.4, "refresh": 1, "compiler": "eager"}),
    "tome-matched-fx": ("graphprune tome r=catome's mean (fx)", "graphprune",
                        {"method": "tome", "ratio": None, "compiler": "eager"}),
    "DeepCache3": ("DeepCache pkg N=3 (eager)", "peer", {"cache_interval": 3}),
    "DeepCache3+inductor": ("DeepCache pkg N=3 + inductor", "peer-inductor", {"cache_interval": 3}),
}
DEFAULT = "inductor,deepcache3,deepcache5,dato-imagenet,dato-coco,sito0.5,eager,DeepCache3"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="sd15", help="built-in architecture: sd15, sd2, sdxl, tiny (default sd15)")
    p.add_argument("--latent", type=int, default=32, help="latent height and width (default 32)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50; the DaTo presets need 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--runs", type=int, default=1, help="timed generations per variant after the warm-up one")
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="write a speedup-vs-error plot (PNG) here")
    p.add_argument("--quick", action="store_true", help="tiny UNet, latent 16, 10 steps, few variants (smoke)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--front", action="store_true", help="the step policies' speed-vs-error front (writes front.json, "
                   "front.md, front.png and the MagCache calibration into the --out folder)")
    p.add_argument("--pair-every", type=int, default=3, help="--front: variants between two baseline generations")
    p.add_argument("--report-only", action="store_true", help="--front: rewrite front.md and front.png from the "
                   "front.json in --out (no measurement)")
    opts = p.parse_args(argv)
    if opts.front:
        if opts.quick:
            opts.arch, opts.latent, opts.steps = "tiny", 16, 12
        opts.variant_list = []
        return opts
    if opts.quick:
        opts.arch, opts.latent, opts.steps = "tiny", 16, 10
        if opts.variants == DEFAULT:
            opts.variants = "inductor,deepcache3,dato3,DeepCache3"
    opts.variant_list = [v.strip() for v in opts.variants.split(",") if v.strip()]
    bad = [v for v in opts.variant_list if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if opts.steps != 50 and any(v.startswith("dato-") for v in opts.variant_list):
        p.error("the DaTo presets (dato-imagenet, dato-coco) are defined for 50 steps; use --steps 50 or dato3")
    return opts


def make_scheduler(steps: int) -> Any:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    return sched


def initial_latents(unet: Any, latent: int, sched: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(latent (1, c, h, w), text context (2, 77, d) = [uncond; cond], added kwargs): photo latents noised to t0."""
    import torch

    from graphprune.archs import example_inputs

    (photo, _, ctx), kwargs = example_inputs(unet, latent, batch=2, seed=0, structured=True)
    noise = torch.randn(photo[:1].shape, generator=torch.Generator().manual_seed(1)).to(photo)
    start = sched.add_noise(photo[:1], noise, sched.timesteps[:1])
    return start, ctx, kwargs


def generate(fn: Callable[..., Any], start: Any, ctx: Any, kwargs: dict[str, Any], sched: Any, guidance: float,
             device: Any, on_step: Callable[[int, float], None] | None = None) -> Any:
    """One CFG DDIM generation; returns the final latent. ``on_step(i, seconds)`` gets each UNet call's time."""
    import torch

    latents = start.clone()
    for i, t in enumerate(sched.timesteps):
        x = torch.cat([latents] * 2)
        sync(device)
        t0 = time.perf_counter()
        eps = unet_out(fn(x, t, ctx, **kwargs))
        sync(device)
        if on_step is not None:
            on_step(i, time.perf_counter() - t0)
        uncond, cond = eps.chunk(2)
        latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents


def make_callable(key: str, unet: Any, sched: Any) -> tuple[Callable[..., Any], Any]:
    """The UNet callable of a variant and the object that knows its step kinds (runtime or helper) or None."""
    import torch

    _, kind, options = VARIANTS[key]
    if kind == "eager":
        return unet, None
    if kind == "inductor":
        return torch.compile(unet), None
    if kind == "graphprune":
        stateful = options["method"] in ("deepcache", "dato", "catome")
        return torch.compile(unet, backend="graphprune", options=dict(options)), "runtime" if stateful else None
    from types import SimpleNamespace

    from DeepCache import DeepCacheSDHelper

    peer = copy.deepcopy(unet)
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=peer, scheduler=sched))
    helper.set_params(cache_interval=options["cache_interval"], cache_branch_id=0)
    helper.enable()
    fn = torch.compile(peer) if kind == "peer-inductor" else peer
    return fn, helper


def kinds_of(fn: Any, tracker: Any, steps: int, before: set[int]) -> list[str]:
    """The step kinds of the last generation (``before``: ids of the runtimes that existed before this variant)."""
    import graphprune

    if tracker == "runtime":
        found = [r for r in graphprune.runtimes(fn) if id(r) not in before]
        return list(found[-1].previous_kinds or found[-1].kinds) if found else []
    if tracker is not None:  # the DeepCache helper: uniform interval
        n = tracker.params["cache_interval"]
        return ["full" if i % n == 0 else "shallow" for i in range(steps)]
    return ["full"] * steps


def flops_per_kind(unet: Any, options: dict[str, Any] | None, start: Any, ctx: Any, kwargs: dict[str, Any],
                   sched: Any) -> dict[str, float]:
    """FLOPs of one UNet call per step kind: the rewritten graphs run eagerly under FlopCounterMode."""
    import torch

    import graphprune

    counts: dict[str, float] = {}
    if options is None:
        with flop_counter() as fc:
            unet(torch.cat([start] * 2), sched.timesteps[0], ctx, **kwargs)
        return {"full": float(fc.get_total_flops())}
    from graphprune.backend import graphprune_backend

    def counting(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:  # runs inside the compiled frame: the eager FX graph's aten ops are counted
            with flop_counter() as fc:
                out = fn(*args)
            counts.setdefault(kind, float(fc.get_total_flops()))
            return out
        return run

    made: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        fn = graphprune_backend(gm, example_inputs, options={**options, "compiler": "eager"})
        made.append(fn)
        return fn if isinstance(fn, graphprune.StepRuntime) else counting("full", fn)

    torch._dynamo.reset()
    fast = torch.compile(unet, backend=backend)
    x = torch.cat([start] * 2)
    wrapped: set[int] = set()
    for t in sched.timesteps:
        for rt in made:
            for variant in getattr(rt, "variants", {}).values():
                if id(variant) not in wrapped:
                    variant.fn = counting(variant.kind, variant.fn)
                    wrapped.add(id(variant))
        fast(x, t, ctx, **kwargs)
        stateful = any(isinstance(m, graphprune.StepRuntime) for m in made)
        if "full" in counts and (not stateful or "shallow" in counts):
            break
    torch._dynamo.reset()
    return counts


def catome_flops(rt: Any, fn: Callable[..., Any], call_args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[float, dict[str, float]]:
    """CA-ToMe: FLOPs of the last generation = sum over its graph runs (reruns included) of the FLOPs of the variant
    each used (every variant's graph run once eagerly under FlopCounterMode; FLOPs depend on shapes only). One extra
    call of ``fn`` captures the graph's full argument list (Dynamo lifts parameters to inputs)."""
    keys = list(rt.call_keys)
    captured: dict[str, Any] = {}
    original = rt._run

    def spy(variant: Any, args: tuple[Any, ...], flag: Any = None) -> Any:
        captured.setdefault("args", args)
        return original(variant, args, flag)

    rt._run = spy
    try:
        fn(*call_args, **kwargs)
    finally:
        rt._run = original
    per_variant: dict[str, float] = {}
    for (kind, buckets), variant in rt.variants.items():
        extra = rt.extra_inputs(variant, flag=True)  # the state the extra call left: valid index maps
        with flop_counter() as fc:
            variant.gm(*captured["args"], *extra)
        per_variant[f"{kind}{list(buckets)}"] = float(fc.get_total_flops())
    return sum(per_variant[f"{k}{list(b)}"] for k, b in keys), per_variant


def run(opts: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch
    from tqdm import tqdm

    import graphprune
    from graphprune.archs import build_unet, unet_config

    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = build_unet(opts.arch, dtype=dtype).to(device)
    sched = make_scheduler(opts.steps)
    start, ctx, kwargs = initial_latents(unet, opts.latent, sched)
    header = {"torch": torch.__version__, "diffusers": diffusers.__version__, "graphprune": graphprune.__version__,
              "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
              "cpu": cpu_model(), "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
              "arch": opts.arch, "latent": opts.latent, "batch": 2, "steps": opts.steps, "guidance": opts.guidance,
              "scheduler": "DDIM", "runs": opts.runs, "git_commit": git_commit(), "uncommitted": git_dirty(),
              "config_blocks": unet_config(opts.arch).get("block_out_channels"),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "loadavg_start": os.getloadavg()}
    log.info("%s", json.dumps(header))
    results: dict[str, Any] = {"header": header, "variants": {}}
    flops_base = None
    baseline_final = None
    for key in tqdm(opts.variant_list, desc="variants"):
        name, kind, options = VARIANTS[key]
        torch._dynamo.reset()
        before = {id(r) for r in graphprune.runtimes()}
        if kind == "graphprune" and options.get("ratio", 0) is None:  # tome at catome's measured mean fraction
            measured = [r["mean_merged_fraction"] for r in results["variants"].values()
                        if r.get("mean_merged_fraction")]
            if not measured:
                raise SystemExit(f"{key} needs a catome variant earlier in --variants (it merges catome's mean)")
            options = {**options, "ratio": round(measured[0], 4)}
            name = f"{name.split(' r=')[0]} r={options['ratio']:.3f}" + (" (fx)" if key.endswith("-fx") else "")
            VARIANTS[key] = (name, kind, options)
        if kind == "graphprune" and options.get("schedule", "").startswith("dato-"):
            options = {**options, "num_steps": opts.steps}  # the presets' one-call-per-step (DDIM) form
            VARIANTS[key] = (name, kind, options)
        fn, tracker = make_callable(key, unet, sched)
        step_times: list[list[float]] = []
        with torch.no_grad():
            t0 = time.perf_counter()
            generate(fn, start, ctx, kwargs, sched, opts.guidance, device)  # warm-up: compiles every variant
            warm = time.perf_counter() - t0
            gens, finals = [], []
            rt_before = [r for r in graphprune.runtimes(fn) if id(r) not in before] if tracker == "runtime" else []
            stats0 = dict(getattr(rt_before[-1], "stats", {})) if rt_before else {}
            for _ in range(opts.runs):
                per_step: list[float] = []
                t0 = time.perf_counter()
                finals.append(generate(fn, start, ctx, kwargs, sched, opts.guidance, device,
                                       on_step=lambda i, s: per_step.append(s)))
                gens.append(time.perf_counter() - t0)
                step_times.append(per_step)
        kinds = kinds_of(fn, tracker, opts.steps, before)
        if tracker is not None and tracker != "runtime":
            tracker.disable()
        variants = []
        extra: dict[str, Any] = {}
        if tracker == "runtime":
            rts = [r for r in graphprune.runtimes(fn) if id(r) not in before]
            variants = [v["kind"] + (str(v["buckets"]) if "buckets" in v else "")
                        for v in rts[-1].describe()["variants"]] if rts else ["full"]
            if rts and isinstance(rts[-1], graphprune.MatchCacheRuntime):
                rt = rts[-1]
                st = rt.stats
                extra = {"mean_merged_fraction": rt.mean_merged_fraction(),
                         "refresh_seconds": (st["refresh_seconds"] - stats0.get("refresh_seconds", 0)) / opts.runs,
                         "cached_seconds": (st["cached_seconds"] - stats0.get("cached_seconds", 0)) / opts.runs,
                         "reruns": (st["reruns"] - stats0.get("reruns", 0)) / opts.runs}
        final = finals[-1]
        if key == "inductor" or (key == "eager" and "inductor" not in opts.variant_list):
            baseline_final = final  # the unpruned reference of the error column
        with torch.no_grad():
            if flops_base is None:
                flops_base = flops_per_kind(unet, None, start, ctx, kwargs, sched)["full"]
            if extra:  # catome: per-variant FLOPs x the variant of every call
                run_flops, fl = catome_flops(rts[-1], fn, (torch.cat([start] * 2), sched.timesteps[0], ctx), kwargs)
            else:
                fl = flops_per_kind(unet, options if kind == "graphprune" else
                                    ({"method": "deepcache", **options} if kind.startswith("peer") else None),
                                    start, ctx, kwargs, sched)
                run_flops = sum(fl.get(k, 0.0) for k in kinds if k != "reuse")
        by_kind = {}
        for k in ("full", "shallow", "reuse", "refresh", "cached"):
            times = [s for per in step_times for s, kk in zip(per, kinds) if kk == k]
            if times:
                by_kind[k] = {"count": kinds.count(k), "median_s": statistics.median(times)}
        results["variants"][key] = {
            "name": name, "seconds": statistics.median(gens), "all_seconds": gens, "warmup_seconds": warm,
            "kinds": {k: kinds.count(k) for k in ("full", "shallow", "reuse", "refresh", "cached") if k in kinds
                      or k in ("full", "shallow", "reuse")}, "per_kind": by_kind, **extra,
            "compiled_variants": variants, "flops_per_kind": fl,
            "flop_bound": flops_base * opts.steps / run_flops if run_flops else None, "final": final,
        }
        log.info("%s: %.2f s/generation", name, statistics.median(gens))
    header["loadavg_end"] = os.getloadavg()  # other processes on the machine skew every time
    base = results["variants"].get("inductor", {}).get("seconds")
    eager = results["variants"].get("eager", {}).get("seconds")
    for key, r in results["variants"].items():
        r["speedup"] = base / r["seconds"] if base else None
        r["vs_eager"] = eager / r["seconds"] if eager else None
        r["error"] = rel_error(r.pop("final"), baseline_final) if baseline_final is not None else None
    return results


def catome_table(results: dict[str, Any]) -> str:
    """The CA-ToMe columns: refresh / cached calls, reruns, merged fraction, time at refresh and cached calls."""
    rows = ["| variant | refresh / cached calls | reruns | mean merged fraction | s at refresh calls | "
            "s at cached calls | compiled graphs |", "|---|---|---|---|---|---|---|"]
    for r in results["variants"].values():
        if r.get("mean_merged_fraction") is None:
            continue
        rows.append(f"| {r['name']} | {r['kinds'].get('refresh', 0)} / {r['kinds'].get('cached', 0)} | "
                    f"{r['reruns']:g} | {r['mean_merged_fraction']:.3f} | {r['refresh_seconds']:.2f} | "
                    f"{r['cached_seconds']:.2f} | {len(r['compiled_variants'])} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def table(results: dict[str, Any]) -> str:
    rows = ["| variant | s / generation | vs Inductor | vs eager | FLOP bound | final-latent rel. err | "
            "full / shallow / reuse | compiled graphs |", "|---|---|---|---|---|---|---|---|"]
    for r in results["variants"].values():
        k = r["kinds"]
        ve = f"{r['vs_eager']:.2f}x" if r.get("vs_eager") else "-"
        vi = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        err = f"{r['error']:.3g}" if r.get("error") is not None else "-"
        rows.append(f"| {r['name']} | {r['seconds']:.2f} | {vi} | {ve} | {r['flop_bound']:.2f}x | {err} | "
                    f"{k['full']} / {k['shallow']} / {k['reuse']} | {', '.join(r['compiled_variants']) or '-'} |")
    return "\n".join(rows)


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results["variants"].values():
        speed = r.get("speedup") or r.get("vs_eager")
        if speed is None or r.get("error") is None:
            continue
        ax.scatter(max(r["error"], 1e-7), speed, s=40)
        ax.annotate(r["name"], (max(r["error"], 1e-7), speed), fontsize=7, xytext=(4, 3), textcoords="offset points")
    h = results["header"]
    ax.set_xscale("log")
    base = "Inductor" if any(r.get("speedup") for r in results["variants"].values()) else "eager"
    ax.set_xlabel(f"relative error of the final latent vs the unpruned {base} run")
    ax.set_ylabel(f"speedup vs {base} (s / generation)")
    ax.set_title(f"{h['arch']} {h['latent']}x{h['latent']}, {h['steps']} DDIM steps, CFG, {h['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------------
# --front: the step policies (fixed, DaTo presets, first-block, magcache) x forecast x DaTo's pruning
FRONT_INTERVALS = (2, 3, 4, 5, 6)
FRONT_SKIPS = 5  # first-block and magcache: at most 5 cached calls in a row, so interval 6's call count is reachable
MAGCACHE_RETENTION = 0.0  # as the fixed rules: with MagCache's 0.2 (or FLUX's 0.1) and K = 5 the calibrated rule
# could not come down to the call counts of intervals 5 and 6 (warm-up calls are full calls)


class DirectBaseline:
    """The full-step baseline: the traced UNet's graphs through graphprune with every call full (``deepcache``,
    ``cache_interval=1``, the FX graph run as is, as the variants), called directly with the graph's flat argument
    list, so no Dynamo cache is shared with the variants (they reset Dynamo between them)."""

    def __init__(self, unet: Any, start: Any, ctx: Any, kwargs: dict[str, Any], sched: Any):
        import torch

        from graphprune.backend import graphprune_backend

        captured: dict[str, Any] = {}

        def backend(gm: Any, example_inputs: Any) -> Any:
            runtime = graphprune_backend(gm, example_inputs, register_runtime=False,
                                         options={"method": "deepcache", "cache_interval": 1, "compiler": "eager"})
            captured["runtime"] = runtime

            def spy(*args: Any) -> Any:
                captured.setdefault("args", args)
                return runtime(*args)
            return spy

        x, t = torch.cat([start] * 2), sched.timesteps[0]
        torch._dynamo.reset()
        torch.compile(unet, backend=backend)(x, t, ctx, **kwargs)
        args = list(captured["args"])
        self.runtime = captured["runtime"]
        self.positions = {name: next(i for i, a in enumerate(args) if a is obj)
                          for name, obj in (("x", x), ("t", t), ("ctx", ctx))}
        self.args = args
        self.runtime.reset()

    def __call__(self, x: Any, t: Any, ctx: Any, **kwargs: Any) -> Any:
        args = list(self.args)
        args[self.positions["x"]], args[self.positions["t"]], args[self.positions["ctx"]] = x, t, ctx
        return self.runtime(*args)


def full_calls(steps: int, interval: int) -> int:
    return -(-steps // interval)


def first_stage_outputs(unet: Any, xs: list[Any], timesteps: Any, ctx: Any, kwargs: dict[str, Any]) -> list[Any]:
    """The first down stage's output of each call (the first-block probe's tensor), eagerly: the UNet runs until
    ``down_blocks[0]`` returns (a hook stops it there)."""
    class _Stop(Exception):
        pass

    seen: list[Any] = []

    def hook(module: Any, args: Any, out: Any) -> None:
        seen.append(out[0].detach().clone())
        raise _Stop

    handle = unet.down_blocks[0].register_forward_hook(hook)
    try:
        for x, t in zip(xs, timesteps):
            try:
                unet(x, t, ctx, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def simulate_first_block(probes: list[Any], threshold: float, max_skips: int) -> list[str]:
    """graphprune's FirstBlockPolicy over recorded probe outputs (every call's output known: a calibration run)."""
    from graphprune.policy import FirstBlockPolicy

    policy, kinds, ref = FirstBlockPolicy(threshold, max_skips), [], None
    for i, p in enumerate(probes):
        signal = None if ref is None else float((p - ref).abs().mean() / ref.abs().mean())
        kind = policy.decide(i, frozenset(["full", "shallow"]) if i else frozenset(["full"]), signal).kind
        ref = p if kind == "full" else ref
        kinds.append(kind)
    return kinds


def pick_knob(count_full: Callable[[float], int], target: int, lo: float = 1e-5, hi: float = 10.0) -> float:
    """The knob (threshold, error budget) whose schedule makes ``target`` full calls (the count falls as the knob
    rises); bisection in log space; the closest count when none is exact."""
    import math

    best = (abs(count_full(hi) - target), hi)
    for _ in range(48):
        mid = math.sqrt(lo * hi)
        n = count_full(mid)
        best = min(best, (abs(n - target), mid))
        if n == target:
            return mid
        lo, hi = (mid, hi) if n > target else (lo, mid)
    return best[1]


def front_variants(steps: int, thresholds: dict[int, float], budgets: dict[int, float], calibration: str,
                   intervals: tuple[int, ...] = FRONT_INTERVALS) -> list[dict[str, Any]]:
    """Every variant of the front: (rule, knob) x forecast {none, taylor order 1} x {deepcache, dato r=0.4}."""
    rules: list[tuple[str, str, dict[str, Any]]] = []
    for n in intervals:
        rules.append(("fixed", f"N={n}", {"cache_interval": n}))
    for preset, label in (("dato-imagenet", "S_A"), ("dato-coco", "S_B")):
        if steps == 50:
            rules.append(("dato-preset", label, {"schedule": preset, "num_steps": steps}))
    for n in intervals:
        target = full_calls(steps, n)
        rules.append(("first-block", f"T={thresholds[target]:.3g}", {"policy": "first-block",
                                                                     "threshold": thresholds[target],
                                                                     "max_skips": FRONT_SKIPS}))
        rules.append(("magcache", f"B={budgets[target]:.3g}", {"policy": "magcache", "calibration": calibration,
                                                               "error_budget": budgets[target],
                                                               "max_skips": FRONT_SKIPS,
                                                               "retention_ratio": MAGCACHE_RETENTION}))
    out = []
    for method in ("deepcache", "dato"):
        for forecast in ("none", "taylor"):
            for rule, knob, options in rules:
                extra = {"forecast": "taylor", "order": 1} if forecast == "taylor" else {}
                name = f"{method} {rule} {knob}" + (" +taylor" if forecast == "taylor" else "")
                out.append({"name": name, "rule": rule, "knob": knob, "method": method, "forecast": forecast,
                            "options": {"method": method, **options, **extra}})
    return out


def family_flops(unet: Any, method: str, forecast: str, probe: bool, start: Any, ctx: Any, kwargs: dict[str, Any],
                 sched: Any) -> dict[str, float]:
    """FLOPs of one call per graph (full, shallow, probe) of a family of variants (FlopCounterMode on the rewritten
    graphs run eagerly; the schedule does not change them)."""
    options: dict[str, Any] = {"method": method}
    options.update({"forecast": "taylor", "order": 1} if forecast == "taylor" else {})
    options.update({"policy": "first-block", "threshold": 1e9, "max_skips": 1} if probe else {"cache_interval": 2})
    return flops_per_kind(unet, options, start, ctx, kwargs, sched)


def time_variant(unet: Any, options: dict[str, Any], start: Any, ctx: Any, kwargs: dict[str, Any], sched: Any,
                 guidance: float, device: Any) -> dict[str, Any]:
    """Warm up (one call: Dynamo traces, every graph is built), then one timed generation."""
    import torch

    from graphprune.backend import graphprune_backend

    made: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        runtime = graphprune_backend(gm, example_inputs, options={**options, "compiler": "eager"},
                                     register_runtime=False)
        made.append(runtime)
        return runtime

    torch._dynamo.reset()
    fast = torch.compile(unet, backend=backend)
    fast(torch.cat([start] * 2), sched.timesteps[0], ctx, **kwargs)
    runtime = made[-1]
    runtime.build_variants()
    runtime.reset()
    probe = runtime.variants.get(("probe", runtime.config.ratio))
    probe_before = probe.calls if probe is not None else 0
    t0, c0 = time.perf_counter(), time.process_time()
    final = generate(fast, start, ctx, kwargs, sched, guidance, device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    kinds = list(runtime.kinds)
    records = [{"kind": r.kind, "signal": r.signal, "accumulated": r.accumulated} for r in runtime.records]
    probe_calls = probe.calls - probe_before if probe is not None else 0
    del fast, made
    torch._dynamo.reset()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "final": final, "kinds": kinds, "records": records,
            "probe_calls": probe_calls}


def run_front(opts: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The front (see the module docstring); writes ``front.json`` after every variant (a long run keeps what it
    measured), then ``front.md`` and ``front.png``."""
    import diffusers
    import torch
    from tqdm import tqdm

    import graphprune
    from graphprune.archs import build_unet
    from graphprune.bench.ddim import psnr
    from graphprune.policy import magcache_schedule

    torch.set_num_threads(opts.threads or 1)
    torch.set_grad_enabled(False)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    unet = build_unet(opts.arch)
    sched = make_scheduler(opts.steps)
    start, ctx, kwargs = initial_latents(unet, opts.latent, sched)
    header = {"torch": torch.__version__, "diffusers": diffusers.__version__, "cpu": cpu_model(),
              "threads": torch.get_num_threads(), "dtype": "float32", "arch": opts.arch, "latent": opts.latent,
              "batch": 2, "steps": opts.steps, "guidance": opts.guidance, "scheduler": "DDIM", "git_commit": git_commit(),
              "uncommitted": git_dirty(), "pair_every": opts.pair_every, "compiler": "eager (FX graphs, no Inductor)",
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "loadavg_start": os.getloadavg()}
    log.info("%s", json.dumps(header))
    results: dict[str, Any] = {"header": header, "variants": {}, "baselines": []}
    baseline = DirectBaseline(unet, start, ctx, kwargs, sched)

    def run_baseline() -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        final = generate(baseline, start, ctx, kwargs, sched, opts.guidance, device)
        results["baselines"].append({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                                     "loadavg": os.getloadavg()})
        log.info("baseline generation: %.1f s (%.1f s CPU)", results["baselines"][-1]["seconds"],
                 results["baselines"][-1]["cpu_seconds"])
        return final

    base_final = run_baseline()
    # calibration on another generation (other noise, other text): MagCache's ratios, and the probe outputs that
    # place the first-block thresholds at the fixed intervals' call counts
    g = torch.Generator().manual_seed(11)
    cal_ctx = torch.randn(ctx.shape, generator=g).to(ctx)
    cal_start = sched.add_noise(start, torch.randn(start.shape, generator=g).to(start), sched.timesteps[:1])
    seen: list[Any] = []

    def recording(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(x: Any, *args: Any, **kw: Any) -> Any:
            seen.append(x.clone())
            return fn(x, *args, **kw)
        return call

    calibration = graphprune.calibrate(
        unet, lambda fast: generate(recording(fast), cal_start, cal_ctx, kwargs, sched, opts.guidance, device),
        loop={"num_steps": opts.steps, "scheduler": "DDIM", "guidance": opts.guidance, "latent": opts.latent,
              "seed": 11, "arch": opts.arch})
    cal_path = calibration.save(out / "calibration.json")
    calibration.plot(out / "calibration.png")
    probes = first_stage_outputs(unet, seen, sched.timesteps, cal_ctx, kwargs)
    ratios = calibration.ratios["batch"]
    warmup = int(MAGCACHE_RETENTION * opts.steps + 0.5)
    intervals = FRONT_INTERVALS if opts.steps >= 30 else (2, 3)
    thresholds, budgets = {}, {}
    for n in intervals:
        target = full_calls(opts.steps, n)
        thresholds[target] = pick_knob(lambda th: simulate_first_block(probes, th, FRONT_SKIPS).count("full"), target)
        budgets[target] = pick_knob(lambda b: [r.kind for r in magcache_schedule(ratios, b, FRONT_SKIPS, warmup)]
                                    .count("full"), target)
    results["calibration"] = {"path": str(cal_path), "thresholds": thresholds, "budgets": budgets,
                              "max_skips": FRONT_SKIPS, "magcache_retention": MAGCACHE_RETENTION}
    log.info("thresholds (first-block) %s, budgets (magcache) %s", thresholds, budgets)
    flops_base = flops_per_kind(unet, None, start, ctx, kwargs, sched)["full"]
    families = {}
    for method in ("deepcache", "dato"):
        for forecast in ("none", "taylor"):
            for probe in (False, True):
                families[(method, forecast, probe)] = family_flops(unet, method, forecast, probe, start, ctx, kwargs,
                                                                   sched)
    results["flops"] = {"full_unpruned": flops_base,
                        **{f"{m}/{f}/{'probe' if p else 'cut'}": v for (m, f, p), v in families.items()}}
    variants = front_variants(opts.steps, thresholds, budgets, str(cal_path), intervals)
    chunk: list[str] = []
    before = results["baselines"][-1]
    for i, variant in enumerate(tqdm(variants, desc="front", unit="variant")):
        r = time_variant(unet, variant["options"], start, ctx, kwargs, sched, opts.guidance, device)
        kinds = r.pop("kinds")
        fl = families[(variant["method"], variant["forecast"], variant["rule"] == "first-block")]
        run_flops = sum(fl.get(k, 0.0) for k in kinds if k != "reuse") + r["probe_calls"] * fl.get("probe", 0.0)
        final = r.pop("final")
        results["variants"][variant["name"]] = {
            **variant, **r, "counts": {k: kinds.count(k) for k in ("full", "shallow", "reuse")},
            "kinds": kinds, "flops_per_kind": fl, "flop_bound": flops_base * opts.steps / run_flops,
            "error": rel_error(final, base_final), "psnr": psnr(final, base_final), "baseline_before": before}
        chunk.append(variant["name"])
        log.info("%s: %.1f s, full/shallow/reuse %s, error %.3g", variant["name"], r["seconds"],
                 results["variants"][variant["name"]]["counts"], results["variants"][variant["name"]]["error"])
        if len(chunk) == opts.pair_every or i == len(variants) - 1:
            final_b = run_baseline()
            if not torch.equal(final_b, base_final):
                log.warning("the baseline generation is not reproducible")
            after = results["baselines"][-1]
            for name in chunk:  # bracketed: the baseline generations just before and just after
                v = results["variants"][name]
                b = v.pop("baseline_before")
                v["baseline_seconds"] = (b["seconds"] + after["seconds"]) / 2
                v["baseline_cpu_seconds"] = (b["cpu_seconds"] + after["cpu_seconds"]) / 2
                v["wall_speedup"] = v["baseline_seconds"] / v["seconds"]
                v["speedup"] = v["baseline_cpu_seconds"] / v["cpu_seconds"]  # CPU time: robust to other jobs
            chunk, before = [], after
        (out / "front.json").write_text(json.dumps(results, indent=1, default=str))
    header["loadavg_end"] = os.getloadavg()
    (out / "front.json").write_text(json.dumps(results, indent=1, default=str))
    write_front_report(results, out)
    return results


def write_front_report(results: dict[str, Any], out: Path) -> None:
    """front.md (the summary, the equal-calls comparison, every variant) and front.png."""
    text = ["## Summary (speedup from paired CPU seconds; error of the final latent vs the full-step run)", "",
            summary_table(results), "", "## At the call count of each fixed interval", "", equal_calls_table(results),
            "", "## Every variant", "", front_table(results), ""]
    (out / "front.md").write_text("\n".join(text))
    front_plot(results, out / "front.png")


def summary_table(results: dict[str, Any]) -> str:
    """One row per (family, fixed interval's call count): each rule's error and paired speedup at that count (the
    adaptive rules' points placed at it by their knob; their actual counts in brackets when they differ)."""
    rows = ["| family | full calls (interval) | fixed: error, speedup | first-block: error, speedup | "
            "magcache: error, speedup | FLOP bound fixed / first-block |", "|---|---|---|---|---|---|"]
    variants = list(results["variants"].values())
    targets = sorted({int(k) for k in results["calibration"]["thresholds"]}, reverse=True)

    def cell(v: dict[str, Any] | None, target: int) -> str:
        if v is None:
            return "-"
        n = v["counts"]["full"]
        speed = f"{v['speedup']:.2f}x" if v.get("speedup") else "-"
        return f"{v['error']:.4f}, {speed}" + (f" ({n} calls)" if n != target else "")

    for method in ("deepcache", "dato"):
        for forecast in ("none", "taylor"):
            fam = [v for v in variants if v["method"] == method and v["forecast"] == forecast]
            label = f"{method}{' +taylor' if forecast == 'taylor' else ''}"
            for target in targets:
                by_rule = {}
                for rule in ("fixed", "first-block", "magcache"):
                    knob = {"fixed": None, "first-block": results["calibration"]["thresholds"],
                            "magcache": results["calibration"]["budgets"]}[rule]
                    match = [v for v in fam if v["rule"] == rule and (
                        v["counts"]["full"] == target if rule == "fixed" else
                        abs(float(v["knob"].split("=")[1]) - float(f"{knob[str(target)]:.3g}")) < 1e-12)]
                    by_rule[rule] = match[0] if match else None
                fixed = by_rule["fixed"]
                interval = fixed["knob"] if fixed else "-"
                bounds = " / ".join(f"{by_rule[r]['flop_bound']:.2f}x" if by_rule[r] else "-"
                                    for r in ("fixed", "first-block"))
                rows.append(f"| {label} | {target} ({interval}) | {cell(fixed, target)} | "
                            f"{cell(by_rule['first-block'], target)} | {cell(by_rule['magcache'], target)} | {bounds} |")
            for v in sorted((v for v in fam if v["rule"] == "dato-preset"), key=lambda v: v["knob"]):
                c = v["counts"]
                rows.append(f"| {label} | {c['full']} / {c['shallow']} / {c['reuse']} full/shallow/reuse ({v['knob']}) | "
                            f"{cell(v, v['counts']['full'])} | - | - | {v['flop_bound']:.2f}x / - |")
    return "\n".join(rows)


def front_table(results: dict[str, Any]) -> str:
    """Every variant: calls by kind, seconds, paired speedup, FLOP bound, error, PSNR."""
    rows = ["| variant | full / shallow / reuse (+probe) | CPU s / generation | baseline CPU s (paired) | speedup "
            "(CPU s) | speedup (wall s) | FLOP bound | final-latent rel. err | PSNR dB |",
            "|---|---|---|---|---|---|---|---|---|"]
    on_front = {v["name"] for v in pareto_front(list(results["variants"].values()))}
    for v in sorted(results["variants"].values(), key=lambda v: (v["method"], v["forecast"], v["rule"],
                                                                -v["counts"]["full"])):
        c = v["counts"]
        probe = f" (+{v['probe_calls']})" if v["probe_calls"] else ""
        name = f"**{v['name']}** (front)" if v["name"] in on_front else v["name"]
        rows.append(f"| {name} | {c['full']} / {c['shallow']} / {c['reuse']}{probe} | {v['cpu_seconds']:.1f} | "
                    f"{v.get('baseline_cpu_seconds', float('nan')):.1f} | {v.get('speedup', float('nan')):.2f}x | "
                    f"{v.get('wall_speedup', float('nan')):.2f}x | {v['flop_bound']:.2f}x | {v['error']:.4f} | "
                    f"{v['psnr']:.1f} |")
    return "\n".join(rows)


def equal_calls_table(results: dict[str, Any]) -> str:
    """At each fixed interval's number of full calls: the fixed rule's error and the adaptive rules' errors at the
    same count (their own point when the count matches, else interpolated in log error between their two nearest
    counts), per family (method x forecast)."""
    import math

    def at(points: list[tuple[int, float]], calls: int) -> float | None:
        exact = [e for n, e in points if n == calls]
        if exact:
            return exact[0]
        below = max((p for p in points if p[0] < calls), default=None)
        above = min((p for p in points if p[0] > calls), default=None)
        if below is None or above is None:
            return None
        w = (calls - below[0]) / (above[0] - below[0])
        return math.exp((1 - w) * math.log(below[1]) + w * math.log(above[1]))

    rows = ["| family | fixed interval | full calls | fixed error | first-block error (ratio) | "
            "magcache error (ratio) |", "|---|---|---|---|---|---|"]
    variants = list(results["variants"].values())
    for method in ("deepcache", "dato"):
        for forecast in ("none", "taylor"):
            fam = [v for v in variants if v["method"] == method and v["forecast"] == forecast]
            curves = {rule: sorted((v["counts"]["full"], v["error"]) for v in fam if v["rule"] == rule)
                      for rule in ("first-block", "magcache")}
            for v in sorted((v for v in fam if v["rule"] == "fixed"), key=lambda v: -v["counts"]["full"]):
                n = v["counts"]["full"]
                cells = []
                for rule in ("first-block", "magcache"):
                    e = at(curves[rule], n)
                    cells.append("-" if e is None else f"{e:.4f} ({e / v['error']:.2f})")
                rows.append(f"| {method}{' +taylor' if forecast == 'taylor' else ''} | {v['knob']} | {n} | "
                            f"{v['error']:.4f} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def pareto_front(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The variants no other variant beats on both speedup and error, by rising error."""
    timed = sorted((v for v in variants if v.get("speedup")), key=lambda v: (v["error"], -v["speedup"]))
    front: list[dict[str, Any]] = []
    for v in timed:
        if not front or v["speedup"] > front[-1]["speedup"]:
            front.append(v)
    return front


def front_plot(results: dict[str, Any], path: Path) -> None:
    """Left: paired speedup vs final-latent error (the front); right: error vs full calls (the equal-calls view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fixed": "tab:blue", "dato-preset": "tab:purple", "first-block": "tab:orange", "magcache": "tab:green"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    variants = list(results["variants"].values())
    for v in variants:
        marker = "^" if v["forecast"] == "taylor" else "o"
        face = colors[v["rule"]] if v["method"] == "dato" else "none"
        kw = dict(marker=marker, s=42, edgecolors=colors[v["rule"]], facecolors=face, linewidths=1.3)
        if v.get("speedup"):
            ax.scatter(v["error"], v["speedup"], **kw)
        ax2.scatter(v["counts"]["full"], v["error"], **kw)
    for method, style in (("deepcache", "-"), ("dato", "--")):
        for forecast in ("none", "taylor"):
            for rule in ("fixed", "first-block", "magcache"):
                pts = sorted((v["counts"]["full"], v["error"]) for v in variants if v["rule"] == rule
                             and v["method"] == method and v["forecast"] == forecast)
                if pts:
                    ax2.plot(*zip(*pts), style, color=colors[rule], alpha=0.5 if forecast == "taylor" else 0.9, lw=1)
    front = pareto_front(variants)
    if front:
        ax.plot([v["error"] for v in front], [v["speedup"] for v in front], ls=":", color="gray", lw=1,
                label="front", zorder=0)
    for ax_ in (ax, ax2):
        ax_.set_yscale("log" if ax_ is ax2 else "linear")
        ax_.grid(alpha=0.3)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("final-latent relative error vs the full-step run")
    ax.set_ylabel("speedup: full-step CPU s / variant CPU s (paired)")
    ax2.set_xlabel("full UNet calls per generation")
    ax2.set_ylabel("final-latent relative error")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=c, label=r) for r, c in colors.items()]
    handles += [Line2D([], [], marker="o", ls="", mfc="none", color="gray", label="deepcache (hollow)"),
                Line2D([], [], marker="o", ls="", color="gray", label="+ DaTo pruning (filled)"),
                Line2D([], [], marker="^", ls="", color="gray", label="+ Taylor forecast (triangle)")]
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    h = results["header"]
    fig.suptitle(f"{h['arch']} {h['latent']}x{h['latent']}, {h['steps']} DDIM steps, CFG {h['guidance']}, CPU "
                 f"{h['threads']} thread(s), random weights (errors rank the rules only)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("graphprune").setLevel(logging.WARNING)
    if opts.front:
        out = Path(opts.out or "results/steps_policies")
        if opts.report_only:
            results = json.loads((out / "front.json").read_text())
            write_front_report(results, out)
        else:
            results = run_front(opts, out)
        print(summary_table(results))
        print()
        print(equal_calls_table(results))
        return 0
    results = run(opts)
    print(table(results))
    print(catome_table(results))
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(results, indent=1, default=str))
    if opts.plot:
        plot(results, opts.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
