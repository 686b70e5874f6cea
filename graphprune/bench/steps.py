"""Whole denoising loops: step caching (deepcache, dato, catome) and pruning vs full steps, in one process, paired.

    graphprune bench steps --latent 32 --out results/steps_cpu32.json --plot results/steps_cpu32.png
    python benchmarks/steps.py --quick                 # tiny UNet, latent 16, 10 steps
    result = run(StepsOptions(latent=32, variants=("eager", "deepcache3-fx", "DeepCache3")))

A seeded ``steps``-step DDIM loop (:func:`~graphprune.bench.ddim.ddim_loop`: diffusers' DDIMScheduler with SD1.5's
settings, strength 1) with classifier-free guidance (batch 2: [uncond; cond] random text embeddings) on a built-in
architecture with random weights, started from a scikit-image photo latent noised to the first timestep. One
*call* of the paired timer is one whole generation: the baseline (``inductor``, or ``eager`` when only eager is
listed) is timed alone, then every variant's first generation (which compiles every graph it needs), ``warmup``
generations, and ``runs`` timed generations, each paired with a baseline generation; the speedup is the median of
the per-pair ratios. Every UNet call of a timed generation is timed too (per step kind).

Reported per variant: seconds per generation, speedup vs the baseline (and vs eager where eager ran: the ratio of
the two paired speedups), the final latent's relative error vs the baseline's, the step kinds of a generation, the
compiled variants, and the FLOP bound: the unpruned FLOPs of all steps over the FLOPs this variant runs (full /
shallow graphs counted with FlopCounterMode on the rewritten graphs run eagerly; reuse steps cost nothing).
"""

from __future__ import annotations

import gc
import logging
import statistics
import traceback
from typing import Any, Callable

import torch

from ..runtime.base import Runtime, runtimes
from ..runtime.match_cache import MatchCacheRuntime
from .calls import rel_error, with_sample_and_timestep
from .ddim import ddim_loop, loop_start, loop_timesteps, make_scheduler
from .env import environment, format_header, loadavg
from .flops import catome_flops, flops_per_kind
from .options import LoopSpec, StepsOptions, baseline_of
from .output import plot_speed_error, render_table, write_json
from .timing import PairedTimer, torch_setup
from .variants import Built, Variant, build_model, variants

log = logging.getLogger(__name__)

KINDS = ("full", "shallow", "reuse", "refresh", "cached")


def run(opts: StepsOptions) -> dict[str, Any]:
    """Time every variant's generations against the baseline's; returns the result (JSON in ``opts.out``, plot in
    ``opts.plot`` when given) with ``table`` (the markdown tables) and ``failed``."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..archs import example_inputs

    opts.check()
    names = list(dict.fromkeys(opts.variants))
    base_name = baseline_of(opts.baseline, names)
    chosen = variants([base_name] + [n for n in names if n != base_name])
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch_setup(opts.threads, opts.keep_inductor_cache, prefix="steps"), logging_redirect_tqdm():
        unet = build_model(opts.arch, dtype=dtype).to(device)
        template = example_inputs(unet, opts.latent, batch=2, seed=0, structured=True)
        spec = LoopSpec(steps=opts.steps, guidance=opts.guidance, strength=1.0, seed=1)
        start = loop_start(unet, opts.latent, images=1, seed=1)
        scheduler = make_scheduler()  # the DeepCache helper finds its step index in these timesteps
        timesteps = loop_timesteps(scheduler, spec)
        header = environment(device, dtype, module=unet, template=template, model=opts.arch, latent=opts.latent,
                             batch=2, steps=opts.steps, guidance=opts.guidance, scheduler="DDIM", runs=opts.runs,
                             baseline=base_name, protocol=opts.protocol().describe() + " (one call = one generation)",
                             options=opts.as_dict())
        log.info("%s", format_header(header))
        ctx = _Loop(template, start, spec, scheduler, timesteps)

        base = chosen[0].build(unet, scheduler=scheduler)
        base_out: dict[int, torch.Tensor] = {}
        timer = PairedTimer(opts.protocol(), ctx.generations(base.fn, base_out), desc=f"{base_name} (baseline)",
                            device=device)
        reference = base_out[max(base_out)]  # the unpruned final latent of the error column
        result: dict[str, Any] = {"header": header, "variants": {}}
        result["variants"][base_name] = record(chosen[0], timer.baseline, base_out, {}, base, ctx, unet)
        for pos, v in enumerate(tqdm(chosen[1:], desc="variants")):
            try:
                v = resolve(v, result, opts)
                result["variants"][v.key] = measure(v, timer, ctx, unet, device)
            except Exception as exc:  # noqa: BLE001
                log.error("%s failed: %s\n%s", v.key, exc, traceback.format_exc())
                result["variants"][v.key] = {"name": v.label, "error": traceback.format_exc()}
            gc.collect()  # no torch._dynamo.reset() here: the compiled baseline stays valid for the pairs
            if v.poisons_dynamo and pos + 2 < len(chosen):
                timer.reset()
            if opts.out:
                write_json(_json_ready(result), opts.out)  # partial results survive a crash
        header["loadavg_end"] = loadavg()  # other processes on the machine skew every time
        bound_flops(result, chosen, unet, ctx)
    eager = result["variants"].get("eager", {}).get("speedup")
    for r in result["variants"].values():
        if "error" in r:
            continue
        r["vs_eager"] = r["speedup"] / eager if eager else None
        r["rel_error"] = rel_error(r.pop("final"), reference)
    result["failed"] = [k for k, r in result["variants"].items() if "error" in r]
    result["table"] = "\n\n".join(t for t in (format_header(header), table(result), catome_table(result)) if t)
    if opts.out:
        write_json(result, opts.out)
    if opts.plot:
        plot(result, opts.plot)
    return result


class _Loop:
    """The seeded generation every variant runs (same start, same conditioning, same timesteps)."""

    def __init__(self, template: Any, start: Any, spec: LoopSpec, scheduler: Any, timesteps: Any):
        self.template, self.start, self.spec, self.scheduler, self.timesteps = template, start, spec, scheduler, timesteps

    def generations(self, fn: Callable[..., Any], finals: dict[int, torch.Tensor],
                    per_call: dict[int, list[float]] | None = None) -> Callable[[int], Any]:
        """``call(i)``: the i-th generation of ``fn``; keeps its final latent (and each UNet call's seconds)."""

        def call(i: int) -> None:
            times: list[float] = []
            finals[i] = ddim_loop(fn, self.template, self.start, self.spec,
                                  on_call=None if per_call is None else lambda k, s: times.append(s))
            if per_call is not None:
                per_call[i] = times
            finals.pop(i - 1, None)  # only the last final latent is kept

        return call


def resolve(v: Variant, result: dict[str, Any], opts: StepsOptions) -> Variant:
    """Run-time options: DaTo's presets in their one-call-per-step (DDIM) form; ``tome-matched`` at the mean merged
    fraction of the first catome variant measured before it."""
    if v.kind != "graphprune":
        return v
    if v.options.get("ratio", 0) is None:
        measured = [r["mean_merged_fraction"] for r in result["variants"].values() if r.get("mean_merged_fraction")]
        if not measured:
            raise ValueError(f"{v.key} needs a catome variant earlier in --variants (it merges catome's mean)")
        v = v.with_options(ratio=round(measured[0], 4))
        v.label = f"{v.label.split(' r=')[0]} r={v.options['ratio']:.3f}" + (" (fx)" if v.key.endswith("-fx") else "")
    if str(v.options.get("schedule", "")).startswith("dato-"):
        v = v.with_options(num_steps=opts.steps)
    return v


def measure(v: Variant, timer: PairedTimer, ctx: _Loop, unet: torch.nn.Module, device: torch.device
            ) -> dict[str, Any]:
    """One variant's generations, paired with the baseline's, its step kinds and (catome) its runtime's counters."""
    before = {id(r) for r in runtimes()}
    built = v.build(unet, scheduler=ctx.scheduler)
    finals: dict[int, torch.Tensor] = {}
    per_call: dict[int, list[float]] = {}
    stats0: dict[str, Any] = {}

    def snapshot() -> None:
        rt = _new_runtime(built, before)
        stats0.update(getattr(rt, "stats", {}) if rt is not None else {})

    res = timer.time(ctx.generations(built.fn, finals, per_call), v.label, before_timed=snapshot)
    r = record(v, res, finals, per_call, built, ctx, unet, before, stats0)
    built.close()
    return r


def _new_runtime(built: Built, before: set[int]) -> Any:
    """The stateful graphprune runtime this variant made (None for a plain graph, a compiled function such as the
    unpruned ``inductor`` variants, or a peer's helper)."""
    if built.helper is not None or not isinstance(built.fn, torch.nn.Module):
        return None
    found = [r for r in runtimes(built.fn) if id(r) not in before and isinstance(r, Runtime)]
    return found[-1] if found else None


def record(v: Variant, res: dict[str, Any], finals: dict[int, torch.Tensor], per_call: dict[int, list[float]],
           built: Built, ctx: _Loop, unet: torch.nn.Module, before: set[int] | None = None,
           stats0: dict[str, Any] | None = None) -> dict[str, Any]:
    """The variant's row: times, kinds per generation, per-kind call times, compiled variants, catome counters."""
    steps = ctx.spec.steps
    rt = _new_runtime(built, before) if before is not None else None
    if rt is not None:
        kinds = list(rt.previous_kinds or rt.kinds)
    elif built.helper is not None:  # the DeepCache helper: uniform interval
        n = built.helper.params["cache_interval"]
        kinds = ["full" if i % n == 0 else "shallow" for i in range(steps)]
    else:
        kinds = ["full"] * steps
    # per-call times of the timed generations that were kept (the least contended attempt)
    first = 1 + len(res["warmup_s"]) + (res["timed_attempt_used"] - 1) * len(res["times_s"])
    kept = [per_call[i] for i in range(first, first + len(res["times_s"])) if i in per_call]
    per_kind = {}
    for k in KINDS:
        times = [s for per in kept for s, kk in zip(per, kinds) if kk == k]
        if times:
            per_kind[k] = {"count": kinds.count(k), "median_s": statistics.median(times)}
    row: dict[str, Any] = {
        "name": v.label, "options": v.options, "seconds": res["median_s"], "all_seconds": res["times_s"],
        "warmup_seconds": res["compile_s"], "speedup": res["speedup"], "timing": res,
        "kinds": {k: kinds.count(k) for k in KINDS if k in kinds or k in ("full", "shallow", "reuse")},
        "per_kind": per_kind, "final": finals[max(finals)], "compiled_variants": [],
    }
    if rt is not None:
        row["compiled_variants"] = [d["kind"] + (str(d["buckets"]) if "buckets" in d else "")
                                    for d in rt.describe()["variants"]]
        if isinstance(rt, MatchCacheRuntime):
            gens = len(res["attempts"]) * len(res["times_s"]) or 1
            st, s0 = rt.stats, stats0 or {}
            row.update(mean_merged_fraction=rt.mean_merged_fraction(),
                       refresh_seconds=(st["refresh_seconds"] - s0.get("refresh_seconds", 0)) / gens,
                       cached_seconds=(st["cached_seconds"] - s0.get("cached_seconds", 0)) / gens,
                       reruns=(st["reruns"] - s0.get("reruns", 0)) / gens)
            args, kwargs = with_sample_and_timestep(ctx.template, ctx.template[0][0], ctx.timesteps[0])
            row["run_flops"], row["flops_per_kind"] = catome_flops(rt, built.fn, args, kwargs)
    row["kind_list"] = kinds
    return row


def bound_flops(result: dict[str, Any], chosen: list[Variant], unet: torch.nn.Module, ctx: _Loop) -> None:
    """The FLOP bound of every variant (after all timing: counting resets Dynamo)."""
    full = flops_per_kind(unet, None, ctx.template, ctx.timesteps)["full"]
    by_key = {v.key: v for v in chosen}
    for key, r in result["variants"].items():
        if "error" in r:
            continue
        if "run_flops" not in r:
            v = by_key[key]
            options = ({**(r["options"] or {})} if v.kind == "graphprune" else
                       {"method": "deepcache", "cache_interval": v.interval} if v.kind == "deepcache" else None)
            r["flops_per_kind"] = flops_per_kind(unet, options, ctx.template, ctx.timesteps)
            r["run_flops"] = sum(r["flops_per_kind"].get(k, 0.0) for k in r["kind_list"] if k != "reuse")
        r["flop_bound"] = full * ctx.spec.steps / r["run_flops"] if r["run_flops"] else None


def _json_ready(result: dict[str, Any]) -> dict[str, Any]:
    return {**result, "variants": {k: {kk: vv for kk, vv in r.items() if kk != "final"}
                                   for k, r in result["variants"].items()}}


def table(result: dict[str, Any]) -> str:
    base = result["header"]["baseline"]
    rows = []
    for r in result["variants"].values():
        if "error" in r:
            rows.append([r["name"], "FAILED"] + ["-"] * 7)
            continue
        k = r["kinds"]
        ve = f"{r['vs_eager']:.2f}x" if r.get("vs_eager") else "-"
        fb = f"{r['flop_bound']:.2f}x" if r.get("flop_bound") else "-"
        rows.append([r["name"], f"{r['seconds']:.2f}", f"{r['speedup']:.2f}x", ve, fb, f"{r['rel_error']:.3g}",
                     f"{k['full']} / {k['shallow']} / {k['reuse']}", ", ".join(r["compiled_variants"]) or "-"])
    return render_table(["variant", "s / generation", f"vs {base} (paired)", "vs eager", "FLOP bound",
                         "final-latent rel. err", "full / shallow / reuse", "compiled graphs"], rows, markdown=True)


def catome_table(result: dict[str, Any]) -> str:
    """The CA-ToMe columns: refresh / cached calls, reruns, merged fraction, time at refresh and cached calls."""
    rows = [[r["name"], f"{r['kinds'].get('refresh', 0)} / {r['kinds'].get('cached', 0)}", f"{r['reruns']:g}",
             f"{r['mean_merged_fraction']:.3f}", f"{r['refresh_seconds']:.2f}", f"{r['cached_seconds']:.2f}",
             str(len(r["compiled_variants"]))]
            for r in result["variants"].values() if r.get("mean_merged_fraction") is not None]
    if not rows:
        return ""
    return render_table(["variant", "refresh / cached calls", "reruns", "mean merged fraction", "s at refresh calls",
                         "s at cached calls", "compiled graphs"], rows, markdown=True)


def plot(result: dict[str, Any], path: str) -> None:
    h = result["header"]
    series = {r["name"]: [(r["rel_error"], r["speedup"], "")] for r in result["variants"].values()
              if "error" not in r and r["name"] != result["variants"][h["baseline"]]["name"]}
    plot_speed_error(series, path, baseline=h["baseline"],
                     xlabel=f"relative error of the final latent vs the unpruned {h['baseline']} run",
                     ylabel=f"speedup vs {h['baseline']} (s / generation, paired)",
                     title=f"{h['model']} {h['latent']}x{h['latent']}, {h['steps']} DDIM steps, CFG, {h['device']}")


__all__ = ["run", "table", "catome_table", "plot", "StepsOptions"]
