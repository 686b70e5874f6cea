"""The speed-quality Pareto harness: every registered method x a ratio sweep, next to the unpruned model and tomesd.

    graphprune bench pareto --arch sd15 --latent 64 --steps 20 --methods tome,sito --ratios 0.3,0.5,0.7 -o results/
    python benchmarks/pareto.py --quick                     # tiny UNet, latent 16, 2 ratios (the test suite runs it)
    graphprune bench pareto --model /path/to/local/pipeline --prompts prompts.txt -o results/   # real weights

Entry points: :func:`main` (argv), :func:`run` (a :class:`ParetoOptions`), :func:`pareto_front`.

Per point (method, ratio), in one process:

* **speed**: one model call (batch 2 = CFG, the loop's shapes) timed under Inductor, side by side with the
  unpruned model under Inductor (the baseline of every speedup): after ``torch._dynamo.reset()``, the first
  (compiling) call, ``warmup`` calls, then the median of ``runs`` timed calls, each at a different timestep (a
  recompile would show). Contended timed calls (other processes busy, from ``/proc/stat``) are repeated. Next to
  the speedup: the Amdahl bound ``1/(1-f)`` of the pruned sites and the FLOP bound, counted on the rewritten graph.
* **quality**: the final latent of a seeded CFG DDIM loop (:mod:`graphprune.bench.ddim`, photo latents noised
  img2img-style) against the unpruned loop with the same noise: relative error and PSNR. The loop runs the
  rewritten graph with ``compiler="eager"`` by default (the same graph and math as under Inductor, no compile
  wait); ``--quality-compiler inductor`` runs it under Inductor.

Methods come from the registry (``graphprune.method_names()``), so a new method appears without edits here.
tomesd (``tomesd.apply_patch(copy, ratio=r)``, eager) is the comparison curve. Outputs in ``-o``: ``pareto.json``,
``pareto.txt`` (the table) and ``pareto.png`` (speedup vs error, one curve per method, the front marked).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .common import (cpu_busy_s, cpu_model, delta, dynamo_stats, flop_analysis, git_commit, git_dirty,
                     other_cpu_share, sync, timestep_schedule)
from .ddim import SD_SCHEDULER, LoopSpec, ddim_loop, loop_start, loop_timesteps, make_scheduler, psnr, rel_error
from .ddim import with_sample_and_timestep

log = logging.getLogger(__name__)

TOMESD = "tomesd"
SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# options

@dataclass
class ParetoOptions:
    """Everything one sweep depends on (recorded in the JSON).

    Important args:
        arch: built-in architecture (``graphprune.archs``; random weights) when ``model`` is None.
        model: a local diffusers pipeline folder: real weights, images from ``prompts`` (see ``realweights``).
        latent: latent height = width; steps, guidance, strength: the DDIM loop (:class:`~.ddim.LoopSpec`).
        methods: registered method names (None = all registered); ratios: the sweep.
        out: output folder.

    Args to tinker with: runs, warmup, retries, retry_wait, contention (speed protocol); images (photos, one loop
    each); quality_compiler; tomesd / tomesd_inductor (comparison curves); flops (Amdahl/FLOP bounds).
    """

    arch: str = "sd15"
    model: str | None = None
    latent: int = 64
    steps: int = 20
    guidance: float = 7.5
    strength: float = 0.7
    seed: int = 0
    images: int = 1
    methods: tuple[str, ...] | None = None
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    runs: int = 3
    warmup: int = 2
    retries: int = 1
    retry_wait: float = 10.0
    contention: float = 0.25
    quality_compiler: str = "eager"
    speed_compiler: str = "inductor"
    interleave: bool = True
    tomesd: bool = True
    tomesd_inductor: bool = False
    flops: bool = True
    out: str = "results"
    keep_inductor_cache: bool = False
    threads: int | None = None
    quick: bool = False
    # --model only
    prompts: str | None = None
    prompt_embeds: str | None = None
    inception: str | None = None
    clip: str | None = None
    speed: bool = True

    def loop_spec(self) -> LoopSpec:
        return LoopSpec(steps=self.steps, guidance=self.guidance, strength=self.strength, seed=self.seed)


def resolve_methods(names: Sequence[str] | None) -> tuple[str, ...]:
    """Validate method names against the registry; None -> every registered method. Raises ValueError."""
    from ..methods import method_names

    registered = method_names()
    if names is None:
        return registered
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in registered]
    if unknown or not names:
        raise ValueError(f"method(s) {unknown or list(names)} are not registered; registered methods are "
                         f"{list(registered)} (graphprune.method_names())")
    return names


@dataclass
class Variant:
    """One point of the sweep: a graphprune config, or tomesd at a ratio."""

    label: str
    method: str  # a registered method or "tomesd"
    ratio: float
    options: dict[str, Any] | None = None  # graphprune options (None for tomesd)
    error: str | None = None  # why the point cannot run (e.g. a ratio above the method's cap)


def variants_for(methods: Sequence[str], ratios: Sequence[float], with_tomesd: bool) -> list[Variant]:
    """The sweep: each method at each ratio (configs validated up front), then tomesd at each ratio."""
    from ..methods import parse_options

    out = []
    for m in methods:
        for r in ratios:
            v = Variant(label=f"{m} r={r:g}", method=m, ratio=float(r), options={"method": m, "ratio": float(r)})
            try:
                parse_options(v.options)
            except (ValueError, NotImplementedError) as exc:
                v.error = str(exc)
                log.warning("%s: skipped: %s", v.label, exc)
            out.append(v)
    if with_tomesd:
        out += [Variant(label=f"tomesd r={r:g}", method=TOMESD, ratio=float(r)) for r in ratios]
    return out


# ----------------------------------------------------------------------------------------------------------------
# model

def build_model(arch: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A built-in architecture with seeded random weights.

    Uses ``graphprune.archs.build_model(arch, dtype=..., seed=...)`` where it exists (a generic builder for UNets
    and DiTs such as ``pixart-tiny``), else ``build_unet``.
    """
    from .. import archs

    builder = getattr(archs, "build_model", None) or archs.build_unet
    return builder(arch, dtype=dtype, seed=seed)


def arch_names() -> tuple[str, ...]:
    from .. import archs

    return tuple(archs.ARCHS)


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Class, parameter count and the config keys that set the cost (JSON-ready)."""
    cfg = dict(getattr(model, "config", {}) or {})
    keys = ("block_out_channels", "layers_per_block", "attention_head_dim", "num_attention_heads",
            "cross_attention_dim", "transformer_layers_per_block", "down_block_types", "num_layers", "patch_size",
            "in_channels", "sample_size")
    return {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            **{k: cfg[k] for k in keys if k in cfg}}


# ----------------------------------------------------------------------------------------------------------------
# the Pareto front

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


# ----------------------------------------------------------------------------------------------------------------
# speed

def time_model(fn: Callable[..., Any], template: tuple[tuple[Any, ...], dict[str, Any]], opts: ParetoOptions,
               desc: str, baseline: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Time one model call: first call (compile), ``warmup`` calls, median of ``runs`` timed calls.

    Each call uses a different timestep. Timed calls during which other processes kept more than
    ``opts.contention`` cores busy are repeated up to ``opts.retries`` times; the least contended set is kept.
    With ``baseline`` (an already compiled callable), every timed call of ``fn`` is paired with one of
    ``baseline`` at the same timestep, in alternating order: ``speedup_paired`` = median of the per-pair ratios
    ``baseline / fn``, robust to a machine whose load drifts over minutes (a shared CPU).
    """
    from tqdm import tqdm

    sample = template[0][0]
    device = sample.device
    steps = timestep_schedule(1 + opts.warmup + opts.runs * (1 + opts.retries))

    def timed(model_fn: Callable[..., Any], t: int) -> float:
        args, kwargs = with_sample_and_timestep(template, sample, t)
        sync(device)
        start = time.perf_counter()
        model_fn(*args, **kwargs)
        sync(device)
        return time.perf_counter() - start

    def call(t: int) -> float:
        return timed(fn, t)

    def call_base(t: int) -> float:
        return timed(baseline, t)

    res: dict[str, Any] = {}
    bar = tqdm(total=1 + opts.warmup + opts.runs, desc=f"speed {desc}", leave=False, unit="call")
    with torch.no_grad():
        s0 = dynamo_stats()
        res["compile_s"] = call(steps[0])
        bar.update()
        s1 = dynamo_stats()
        res["warmup_s"] = []
        for t in steps[1:1 + opts.warmup]:
            res["warmup_s"].append(call(t))
            bar.update()
        s2 = dynamo_stats()
        attempts = []
        for attempt in range(1 + opts.retries):
            first = 1 + opts.warmup + attempt * opts.runs
            cpu0, wall0 = cpu_busy_s(), time.perf_counter()
            times, base_times = [], []
            for i, t in enumerate(steps[first:first + opts.runs]):
                if baseline is None:
                    times.append(call(t))
                elif i % 2 == 0:
                    base_times.append(call_base(t))
                    times.append(call(t))
                else:
                    times.append(call(t))
                    base_times.append(call_base(t))
                bar.update()
            other = other_cpu_share(cpu0, cpu_busy_s(), time.perf_counter() - wall0)
            attempts.append({"times_s": times, "other_cpu_cores": other})
            if baseline is not None:
                attempts[-1]["baseline_times_s"] = base_times
            if other is None or other <= opts.contention:
                break
            log.warning("%s: other processes used %.2f cores during the timed calls (> %.2f)%s", desc, other,
                        opts.contention, "; timing again" if attempt < opts.retries else "; no retries left")
            if attempt < opts.retries:
                time.sleep(opts.retry_wait)
                bar.total += opts.runs
        s3 = dynamo_stats()
    bar.close()
    best = min(attempts, key=lambda a: a["other_cpu_cores"] if a["other_cpu_cores"] is not None else 0.0)
    times = best["times_s"]
    res.update(times_s=times, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
               attempts=attempts, other_cpu_cores=best["other_cpu_cores"], first_call=delta(s1, s0),
               recompiles_warmup=delta(s2, s1), recompiles_timed=delta(s3, s2))
    if baseline is not None:
        bt = best["baseline_times_s"]
        res.update(baseline_times_s=bt, baseline_median_s=statistics.median(bt),
                   speedup_paired=statistics.median(b / v for b, v in zip(bt, times)))
    res["graphs"] = res["first_call"]["unique_graphs"]
    res["graph_breaks"] = res["first_call"]["graph_breaks"]
    res["no_recompiles_timed"] = not (res["recompiles_timed"]["unique_graphs"] or res["recompiles_timed"]["frames_ok"])
    log.info("%s: first call %.2fs, median %.4fs (%s), graphs %d", desc, res["compile_s"], res["median_s"],
             ", ".join(f"{x:.4f}" for x in times), res["graphs"])
    return res


# ----------------------------------------------------------------------------------------------------------------
# callables per variant

def graphprune_callable(model: torch.nn.Module, options: dict[str, Any], compiler: str) -> Callable[..., Any]:
    return torch.compile(model, backend="graphprune", options={**options, "compiler": compiler})


def tomesd_model(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """A deep copy of ``model`` patched by tomesd (``apply_patch(copy, ratio=ratio)``, its other defaults)."""
    import tomesd

    patched = copy.deepcopy(model)
    tomesd.apply_patch(patched, ratio=ratio)
    return patched


def reset() -> None:
    torch._dynamo.reset()
    gc.collect()


# ----------------------------------------------------------------------------------------------------------------
# facts

def header_facts(opts: ParetoOptions, model: torch.nn.Module, template: Any, device: torch.device,
                 dtype: torch.dtype, methods: Sequence[str]) -> dict[str, Any]:
    import diffusers

    from .. import __version__

    try:
        from importlib.metadata import version

        tomesd_version = version("tomesd")
    except Exception:  # noqa: BLE001
        tomesd_version = None
    args, kwargs = template
    shapes = {f"args[{i}]": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    shapes.update({k: list(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    return {
        "schema": SCHEMA_VERSION, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "graphprune": __version__, "tomesd": tomesd_version, "python": platform.python_version(),
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""), "model": opts.model or opts.arch, "model_config": model_summary(model),
        "call_shapes": shapes, "methods": list(methods), "ratios": list(opts.ratios),
        "speed_compiler": opts.speed_compiler, "quality_compiler": opts.quality_compiler,
        "runs": opts.runs, "warmup": opts.warmup, "inductor_cache_fresh": not opts.keep_inductor_cache,
        "git_commit": git_commit(), "graphprune_uncommitted": git_dirty(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "options": {k: v for k, v in dataclasses.asdict(opts).items()},
    }


def format_header(h: dict[str, Any]) -> str:
    lines = [
        f"torch {h['torch']} | diffusers {h['diffusers']} | graphprune {h['graphprune']} | tomesd {h['tomesd']} | "
        f"python {h['python']} | git {h['git_commit']}",
        f"device {h['device']} ({h['cpu']}, {h['cpu_count']} CPUs, {h['threads']} threads) | dtype {h['dtype']}",
        f"model {h['model']}: {json.dumps(h['model_config'])}",
        f"call shapes {h['call_shapes']} | methods {h['methods']} | ratios {h['ratios']}",
        f"speed: {h['speed_compiler']}, median of {h['runs']} calls after {h['warmup']} warm-up | quality: compiler="
        f"{h['quality_compiler']}" + (f", {h['loop']}" if "loop" in h else ""),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# the sweep (built-in architecture, random weights)

def run_sweep(opts: ParetoOptions) -> dict[str, Any]:
    """Measure every variant; returns the result dict (also written to ``opts.out``/pareto.json)."""
    from tqdm import tqdm

    from ..archs import example_inputs

    methods = resolve_methods(opts.methods)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model(opts.arch, dtype=dtype, seed=opts.seed).to(device)
    template = example_inputs(model, latent=opts.latent, batch=2, seed=opts.seed, structured=True)
    spec = opts.loop_spec()
    start = loop_start(model, opts.latent, images=opts.images, seed=opts.seed)
    timesteps = loop_timesteps(make_scheduler(), spec)

    header = header_facts(opts, model, template, device, dtype, methods)
    header["loop"] = (f"DDIM {spec.steps} steps (t {int(timesteps[0])} -> {int(timesteps[-1])}, strength "
                      f"{spec.strength}), CFG {spec.guidance}, batch 2, {opts.images} photo latent(s) "
                      f"{list(start.x0.shape[1:])} noised to t0, seed {spec.seed}")
    header["scheduler"] = SD_SCHEDULER
    log.info("%s", format_header(header))

    variants = variants_for(methods, opts.ratios, opts.tomesd)
    if type(model).__name__ != "UNet2DConditionModel":
        for v in variants:
            if v.method == TOMESD:
                v.error = f"tomesd patches SD UNets (UNet2DConditionModel), not {type(model).__name__}"
    result: dict[str, Any] = {"header": header, "baseline": {}, "points": []}

    # FLOP bounds of every graphprune config (counted on the rewritten graph, compiler="eager")
    if opts.flops:
        configs = {v.label: v.options for v in variants if v.options is not None and v.error is None}
        log.info("FLOP analysis of %d configs", len(configs))
        try:
            result["flops"] = flop_analysis(model, template, configs)
        except Exception:  # noqa: BLE001
            result["flops"] = {"error": traceback.format_exc()}
            log.error("FLOP analysis failed:\n%s", result["flops"]["error"])
        reset()

    # the unpruned reference: the same loop, eager
    log.info("reference loop (unpruned, eager)")
    with torch.no_grad():
        ref = ddim_loop(model, template, start, spec, progress="quality unpruned")
    result["baseline"]["final_latent_std"] = float(ref.std())

    base = time_baselines(model, template, opts, result)
    base_fn = result["baseline"].pop("_fn")
    base_fn = base_fn if opts.interleave else None

    for v in tqdm(variants, desc="variants", unit="variant"):
        point: dict[str, Any] = {"label": v.label, "method": v.method, "ratio": v.ratio, "options": v.options}
        if v.error:
            point["error"] = v.error
            result["points"].append(point)
            continue
        try:
            point.update(measure_variant(v, model, template, start, spec, ref, opts, base_fn))
            point["speedup"] = point["speed"].get("speedup_paired", base / point["speed"]["median_s"])
            if "speed_inductor" in point:
                si = point["speed_inductor"]
                point["speedup_inductor"] = si.get("speedup_paired", base / si["median_s"])
        except Exception:  # noqa: BLE001
            point["error"] = traceback.format_exc()
            log.error("%s failed:\n%s", v.label, point["error"])
        finally:
            gc.collect() if base_fn is not None else reset()
        attach_bounds(point, result.get("flops"))
        result["points"].append(point)
        write_json(result, opts)  # partial results survive a crash
    finish(result, opts)
    return result


def time_baselines(model: torch.nn.Module, template: Any, opts: ParetoOptions, result: dict[str, Any]) -> float:
    """Time the unpruned model eager and under the speed compiler; returns the median every speedup divides."""
    reset()
    result["baseline"]["eager"] = time_model(model, template, opts, "eager (unpruned)")
    result["baseline"]["_fn"] = model
    if opts.speed_compiler == "inductor":
        compiled = torch.compile(model)
        result["baseline"]["inductor"] = time_model(compiled, template, opts, "inductor (unpruned)")
        result["baseline"]["_fn"] = compiled  # kept compiled for the paired timings (no dynamo reset after this)
    result["baseline"]["speed_baseline"] = opts.speed_compiler
    return result["baseline"][opts.speed_compiler]["median_s"]


def measure_variant(v: Variant, model: torch.nn.Module, template: Any, start: Any, spec: LoopSpec,
                    ref: torch.Tensor, opts: ParetoOptions, base_fn: Callable[..., Any] | None = None
                    ) -> dict[str, Any]:
    """Quality (the DDIM loop) and speed (one call, Inductor; paired with ``base_fn`` when given) of one variant.

    With ``base_fn`` Dynamo is never reset here: the compiled baseline stays valid, and each variant adds its
    own cache entry (Dynamo guards on the backend, so nothing recompiles; tested).
    """
    fresh = reset if base_fn is None else gc.collect
    out: dict[str, Any] = {}
    if v.method == TOMESD:
        patched = tomesd_model(model, v.ratio)
        with torch.no_grad():
            final = ddim_loop(patched, template, start, spec, progress=f"quality {v.label}")
        out["speed"] = time_model(patched, template, opts, f"{v.label} (eager)", base_fn)
        out["speed_note"] = f"tomesd eager (monkey-patched modules) vs the unpruned model ({opts.speed_compiler})"
        if opts.tomesd_inductor:
            fresh()
            out["speed_inductor"] = time_model(torch.compile(patched), template, opts, f"{v.label} + inductor",
                                               base_fn)
    else:
        fresh()
        fn = graphprune_callable(model, v.options, opts.quality_compiler)
        with torch.no_grad():
            final = ddim_loop(fn, template, start, spec, progress=f"quality {v.label}")
        fresh()
        out["speed"] = time_model(graphprune_callable(model, v.options, opts.speed_compiler), template, opts,
                                  v.label, base_fn)
    out["quality"] = {"rel_error": rel_error(final, ref), "psnr_db": psnr(final, ref),
                      "per_image_rel_error": [rel_error(final[i], ref[i]) for i in range(ref.shape[0])]}
    log.info("%s: rel. error %.4g, PSNR %.2f dB, median %.4fs", v.label, out["quality"]["rel_error"],
             out["quality"]["psnr_db"], out["speed"]["median_s"])
    return out


def attach_bounds(point: dict[str, Any], flops: dict[str, Any] | None) -> None:
    """Copy the Amdahl / FLOP bounds of the point's config (tomesd borrows graphprune tome's at the same ratio)."""
    if not flops or "configs" not in flops:
        return
    src = point["label"] if point["method"] != TOMESD else f"tome r={point['ratio']:g}"
    c = flops["configs"].get(src)
    if c is None:
        return
    point["bounds"] = {"source": src, "f": c["f"], "ideal": c["ideal_bound"], "flop": c["flop_bound"],
                       "pruned_sites": len(c["pruned_sites"])}


# ----------------------------------------------------------------------------------------------------------------
# output

def fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def error_value(point: dict[str, Any]) -> float:
    """The error axis of the plot and the front: latent rel. error, or 1 - mean SSIM for real-weights images."""
    q = point.get("quality") or {}
    if "rel_error" in q:
        return float(q["rel_error"])
    if "ssim_mean" in q:
        return 1.0 - float(q["ssim_mean"])
    return math.nan


def finish(result: dict[str, Any], opts: ParetoOptions) -> None:
    """Mark the front (over the points and the unpruned baseline at (1, 0)), write table, JSON and plot."""
    pts = result["points"]
    xy = [(p.get("speedup", math.nan), error_value(p)) for p in pts]
    front = pareto_front([(1.0, 0.0)] + xy)
    result["baseline_on_front"] = front[0]
    for p, on in zip(pts, front[1:]):
        p["front"] = on
    result["front"] = ([f"unpruned ({result['header'].get('speed_compiler', 'inductor')})"] if front[0] else []) + [p["label"] for p in pts if p["front"]]
    result["at_ratio_0.5"] = at_ratio(result, 0.5)
    result["table"] = table(result)
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pareto.txt").write_text(result["table"] + "\n")
    try:
        result["plot"] = str(plot(result, out_dir / "pareto.png"))
    except ImportError as exc:
        result["plot"] = None
        log.warning("no plot: %s (pip install matplotlib)", exc)
    write_json(result, opts)
    log.info("wrote %s", out_dir)


def write_json(result: dict[str, Any], opts: ParetoOptions) -> Path:
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "pareto.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def at_ratio(result: dict[str, Any], ratio: float) -> list[dict[str, Any]]:
    """Per method (tomesd included) at ``ratio``: speedup, error, PSNR (the README's closing note)."""
    rows = []
    for p in result["points"]:
        if abs(p["ratio"] - ratio) < 1e-9 and "error" not in p:
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
    rows = [cols]
    b = result.get("baseline", {})
    base_key = b.get("speed_baseline", "inductor")
    for name, key in (("unpruned (inductor)", "inductor"), ("unpruned (eager)", "eager")):
        if key in b:
            s = b[key]
            rows.append([name, fmt(s["median_s"], ".4f"), fmt(b[base_key]["median_s"] / s["median_s"], ".3f"),
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
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    h = result["header"]
    lines.insert(0, f"{h['model']} | {h['device']} | {h['dtype']} | shapes {h['call_shapes']}" +
                 (f" | {h['loop']}" if "loop" in h else ""))
    paired = any("speedup_paired" in (p.get("speed") or {}) for p in result["points"])
    lines.append(f"speedup = unpruned {h['speed_compiler']} / variant, one model call (batch 2), "
                 + ("median of per-pair ratios, each variant call paired with a baseline call (the unpruned rows: "
                    "their own calls at the start, not paired); " if paired else "median / median; ")
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


def plot(result: dict[str, Any], path: Path) -> Path:
    """speedup (y) vs error (x, log), one curve per method ordered by ratio, the front circled and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in result["points"] if "error" not in p and not math.isnan(error_value(p))
           and p.get("speedup") is not None]
    h = result["header"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = list(dict.fromkeys(p["method"] for p in pts))
    markers = "osD^vP*X"
    for i, m in enumerate(methods):
        mp = sorted((p for p in pts if p["method"] == m), key=lambda p: p["ratio"])
        xs = [max(error_value(p), 1e-12) for p in mp]
        ys = [p["speedup"] for p in mp]
        style = "--" if m == TOMESD else "-"
        ax.plot(xs, ys, style, marker=markers[i % len(markers)], label=m + (" (eager)" if m == TOMESD else ""))
        for p, x, y in zip(mp, xs, ys):
            ax.annotate(f"{p['ratio']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fr = sorted((p for p in pts if p.get("front")), key=error_value)
    if fr:
        ax.plot([max(error_value(p), 1e-12) for p in fr], [p["speedup"] for p in fr], "o", ms=14, mfc="none",
                mec="black", mew=1.2, label="Pareto front")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":", label=f"unpruned ({h['speed_compiler']}) = 1")
    errs = [error_value(p) for p in pts]
    if errs and min(errs) > 0 and max(errs) / min(errs) > 10:  # log only where the errors span a decade
        ax.set_xscale("log")
    real = any("ssim_mean" in (p.get("quality") or {}) for p in pts)
    ax.set_xlabel("1 - SSIM of the images vs unpruned" if real else
                  "rel. error of the final latent vs unpruned (DDIM loop)")
    ax.set_ylabel(f"speedup vs unpruned {h['speed_compiler']} (one model call)")
    ax.set_title(f"{h['model']}, {h['call_shapes'].get('args[0]')}, {h['dtype']}, {h['device']}\n"
                 f"{h.get('loop', '')}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# command line

def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``graphprune bench pareto`` and ``benchmarks/pareto.py``."""
    d = ParetoOptions()
    g = p.add_argument_group("what to sweep")
    g.add_argument("--arch", default=d.arch, help=f"built-in architecture, random weights: {', '.join(arch_names())}")
    g.add_argument("--model", default=None, help="local diffusers pipeline folder (real weights; no hub access): "
                   "images from --prompts, PSNR/SSIM vs the unpruned images")
    g.add_argument("--methods", default=None, help="comma-separated registered methods (default: all registered)")
    g.add_argument("--ratios", default="0.3,0.5,0.7", help="comma-separated ratios (fraction of tokens removed)")
    g.add_argument("--no-tomesd", dest="tomesd", action="store_false", help="leave out the tomesd curve")
    g.add_argument("--tomesd-inductor", action="store_true", help="also time tomesd's copy under torch.compile")
    g = p.add_argument_group("the loop")
    g.add_argument("--latent", type=int, default=d.latent, help="latent height and width")
    g.add_argument("--steps", type=int, default=d.steps, help="DDIM steps run")
    g.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale")
    g.add_argument("--strength", type=float, default=d.strength,
                   help="img2img strength: the photo latents are noised to t ~ strength * 1000")
    g.add_argument("--images", type=int, default=d.images, help="photo latents (one loop each)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the weights, noise and text embeddings")
    g.add_argument("--quality-compiler", choices=("eager", "inductor"), default=d.quality_compiler,
                   help="inner compiler of graphprune for the quality loop (same rewritten graph)")
    g = p.add_argument_group("speed protocol")
    g.add_argument("--runs", type=int, default=d.runs, help="timed calls per variant (median)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="warm-up calls after the compiling call")
    g.add_argument("--retries", type=int, default=d.retries, help="repeat contended timed calls up to this often")
    g.add_argument("--retry-wait", type=float, default=d.retry_wait, help="seconds before a repeat")
    g.add_argument("--contention", type=float, default=d.contention,
                   help="cores used by other processes above which timed calls count as contended")
    g.add_argument("--speed-compiler", choices=("inductor", "eager"), default=d.speed_compiler,
                   help="compiler of the speed part: inductor (the protocol), or eager for smoke tests (the "
                        "baseline is then the eager model and graphprune runs its graph with compiler=eager)")
    g.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="time each variant alone (speedup = baseline median from the start / variant median) "
                        "instead of pairing every timed call with a call of the compiled baseline")
    g.add_argument("--no-flops", dest="flops", action="store_false", help="skip the Amdahl / FLOP bounds")
    g.add_argument("--keep-inductor-cache", action="store_true",
                   help="use the usual Inductor cache (default: a fresh temporary one)")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    g = p.add_argument_group("real weights (--model)")
    g.add_argument("--prompts", default=None, help="text file, one prompt per line")
    g.add_argument("--prompt-embeds", default=None,
                   help="torch file instead of --prompts: a tensor (P, T, D) or a dict with 'prompt_embeds' and "
                        "optionally 'negative_prompt_embeds'")
    g.add_argument("--inception", default=None, help="local Inception weights (torch-fidelity's "
                   "inception-v3-compat .pth) for FID between pruned and unpruned images")
    g.add_argument("--clip", default=None, help="local CLIP ViT-B/32 weights (torch-fidelity) for the Frechet "
                   "distance in CLIP feature space")
    g.add_argument("--no-speed", dest="speed", action="store_false", help="--model: skip the UNet timing")
    p.add_argument("-o", "--out", default=d.out, help="output folder (pareto.json, pareto.txt, pareto.png)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --arch tiny --latent 16 --steps 3 --ratios 0.3,0.5 --runs 2 --warmup 1 "
                        "--retries 0 --threads 1 (with --model: 2 steps, 1 ratio)")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="measure nothing: recompute the front, table and plot of a pareto.json (also a partial "
                        "one from an interrupted run) into -o")
    p.add_argument("--log-level", default="INFO", help="logging level")


def options_from_args(args: argparse.Namespace) -> ParetoOptions:
    opts = ParetoOptions(
        arch=args.arch, model=args.model, latent=args.latent, steps=args.steps, guidance=args.guidance,
        strength=args.strength, seed=args.seed, images=args.images,
        methods=tuple(args.methods.split(",")) if args.methods else None, ratios=_floats(args.ratios),
        runs=args.runs, warmup=args.warmup, retries=args.retries, retry_wait=args.retry_wait,
        contention=args.contention, quality_compiler=args.quality_compiler, speed_compiler=args.speed_compiler,
        interleave=args.interleave, tomesd=args.tomesd,
        tomesd_inductor=args.tomesd_inductor, flops=args.flops, out=args.out,
        keep_inductor_cache=args.keep_inductor_cache, threads=args.threads, quick=args.quick,
        prompts=args.prompts, prompt_embeds=args.prompt_embeds, inception=args.inception, clip=args.clip,
        speed=args.speed)
    if opts.quick:
        opts.runs, opts.warmup, opts.retries = 2, 1, 0
        opts.threads = opts.threads or 1  # tiny calls are dominated by thread contention on a shared machine
        if opts.model:
            opts.steps, opts.ratios = 2, opts.ratios[:1] if args.ratios != "0.3,0.5,0.7" else (0.5,)
        else:
            opts.arch, opts.latent, opts.steps = "tiny", 16, 3
            opts.ratios = opts.ratios if args.ratios != "0.3,0.5,0.7" else (0.3, 0.5)
    return opts


def check(opts: ParetoOptions) -> None:
    """Validate before any model is built (raises ValueError with the valid choices)."""
    resolve_methods(opts.methods)
    if not opts.ratios:
        raise ValueError("--ratios is empty")
    if opts.runs < 1 or opts.warmup < 1 or opts.retries < 0:
        raise ValueError("need --runs >= 1, --warmup >= 1, --retries >= 0")
    if 1 + opts.warmup + opts.runs * (1 + opts.retries) > 99:
        raise ValueError("too many calls per variant (1 + warmup + runs * (1 + retries) must be <= 99)")
    if opts.model is None and opts.arch not in arch_names():
        raise ValueError(f"unknown --arch {opts.arch!r}; built-in architectures are {arch_names()}")
    if opts.model is not None and not (opts.prompts or opts.prompt_embeds):
        raise ValueError("--model needs --prompts FILE (one prompt per line) or --prompt-embeds FILE")
    LoopSpec(steps=opts.steps, guidance=opts.guidance, strength=opts.strength)


def run(opts: ParetoOptions) -> dict[str, Any]:
    """Validate, then run the sweep (built-in arch) or the real-weights path (``opts.model``)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    check(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    fresh = None
    old_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not opts.keep_inductor_cache:
        fresh = tempfile.mkdtemp(prefix="pareto_inductor_cache_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
    try:
        with logging_redirect_tqdm(), torch.no_grad():
            if opts.model:
                from .realweights import run_model

                return run_model(opts)
            return run_sweep(opts)
    finally:
        if fresh:
            if old_cache is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old_cache
            shutil.rmtree(fresh, ignore_errors=True)


def replot(path: str | Path, opts: ParetoOptions) -> dict[str, Any]:
    """Front, table, plot and JSON again from a stored pareto.json (nothing is measured)."""
    result = json.loads(Path(path).read_text())
    if result.get("header", {}).get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: not a pareto.json of schema {SCHEMA_VERSION}")
    result.setdefault("replotted_from", str(path))
    finish(result, opts)
    return result


def run_from_args(args: argparse.Namespace) -> tuple[str, int]:
    """Run from parsed arguments -> (the table, the exit code); the command prints the table. A bad option raises
    ``ValueError`` (the command reports it and exits with 2)."""
    opts = options_from_args(args)
    if args.replot:
        return replot(args.replot, opts)["table"], 0
    check(opts)
    result = run(opts)
    failed = [p["label"] for p in result["points"] if "Traceback" in p.get("error", "")]
    if failed:
        log.error("failed points: %s", failed)
    return result["table"], 1 if failed else 0


__all__ = ["ParetoOptions", "pareto_front", "resolve_methods", "run", "run_sweep", "add_arguments",
           "table", "plot"]
