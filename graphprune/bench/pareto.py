"""The speed-quality Pareto sweep: every registered method x a ratio sweep, next to the unpruned model and tomesd.

    graphprune bench pareto --arch sd15 --latent 64 --steps 20 --methods tome,sito --ratios 0.3,0.5,0.7 -o results/
    python benchmarks/pareto.py --quick                     # tiny UNet, latent 16, 2 ratios (the test suite runs it)
    graphprune bench pareto --model /path/to/local/pipeline --prompts prompts.txt -o results/   # real weights

    result = run(ParetoOptions(arch="sd15", latent=32, methods=("tome",), out="results/"))   # the library entry

Per point (method, ratio), in one process:

* **speed**: one model call (batch 2 = CFG, the loop's shapes) under Inductor, timed by the paired timer
  (:mod:`graphprune.bench.timing`) against the unpruned model under Inductor (the baseline of every speedup): the
  first (compiling) call, ``warmup`` calls, then ``runs`` timed calls, each at a different timestep (a recompile
  would show) and each paired with a baseline call; the speedup is the median of the per-pair ratios. Next to it:
  the Amdahl bound ``1/(1-f)`` of the pruned sites and the FLOP bound, counted on the rewritten graph.
* **quality**: the final latent of a seeded CFG DDIM loop (:mod:`graphprune.bench.ddim`, photo latents noised
  img2img-style) against the unpruned loop with the same noise: relative error and PSNR. The loop runs the
  rewritten graph with ``compiler="eager"`` by default (the same graph and math as under Inductor, no compile
  wait); ``quality_compiler="inductor"`` runs it under Inductor.

Methods come from the registry (``graphprune.method_names()``), so a new method appears without edits here.
tomesd (``tomesd.apply_patch(copy, ratio=r)``, eager) is the comparison curve. Outputs in ``out``: ``pareto.json``,
``pareto.txt`` (the table) and ``pareto.png`` (speedup vs error, one curve per method, the front marked).
"""

from __future__ import annotations

import gc
import logging
import traceback
from typing import Any

import torch

from . import realweights
from .ddim import SD_SCHEDULER, LoopSpec, LoopStart, ddim_loop, loop_start, loop_timesteps, make_scheduler, psnr
from .calls import Template, rel_error
from .env import format_header
from .flops import bounds_of, flop_analysis
from .frontier import finish, replot, save
from .options import ParetoOptions, resolve_methods
from .sweep import sweep_header, time_point, unpruned_timer
from .timing import PairedTimer, reset, torch_setup
from .variants import TOMESD, Variant, build_model, grid
from .variants import variants as named_variants

log = logging.getLogger(__name__)


def run(opts: ParetoOptions) -> dict[str, Any]:
    """Validate, then run the sweep (built-in architecture, random weights) or the real-weights path
    (``opts.model``). Returns the result (also in ``opts.out``: pareto.json, pareto.txt, pareto.png) with its
    ``table`` and the ``failed`` points."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    opts.check()
    if opts.variants:
        named_variants(opts.variants)  # ValueError naming the catalogue / the valid options, before any build
    with torch_setup(opts.threads, opts.keep_inductor_cache, prefix="pareto"), logging_redirect_tqdm():
        result = realweights.run_model(opts) if opts.model else run_sweep(opts)
    result["failed"] = [p["label"] for p in result["points"] if "Traceback" in p.get("error", "")]
    if result["failed"]:
        log.error("failed points: %s", result["failed"])
    return result


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

    header = sweep_header(opts, model, template, device, dtype, methods)
    header["loop"] = (f"DDIM {spec.steps} steps (t {int(timesteps[0])} -> {int(timesteps[-1])}, strength "
                      f"{spec.strength}), CFG {spec.guidance}, batch 2, {opts.images} photo latent(s) "
                      f"{list(start.x0.shape[1:])} noised to t0, seed {spec.seed}")
    header["scheduler"] = SD_SCHEDULER
    log.info("%s", format_header(header))

    if opts.variants:  # an explicit list (configs beyond method x ratio): each point its own curve
        variants = named_variants(opts.variants)
        curves = {v.label: v.label for v in variants}
    else:
        variants = grid(methods, opts.ratios, opts.tomesd)
        curves = {}
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
    ref = ddim_loop(model, template, start, spec, progress="quality unpruned")
    result["baseline"]["final_latent_std"] = float(ref.std())

    timer = None
    if opts.speed:
        timer, rows = unpruned_timer(model, template, opts, device)
        result["baseline"].update(rows)

    for v in tqdm(variants, desc="variants", unit="variant"):
        point: dict[str, Any] = {"label": v.label, "method": v.method, "ratio": v.ratio, "options": v.options}
        if v.label in curves:
            point["curve"] = curves[v.label]
        if v.error:
            point["error"] = v.error
            result["points"].append(point)
            continue
        try:
            point.update(measure_variant(v, model, template, start, spec, ref, opts, timer))
        except Exception:  # noqa: BLE001
            point["error"] = traceback.format_exc()
            log.error("%s failed:\n%s", v.label, point["error"])
        finally:
            gc.collect()  # never torch._dynamo.reset() here: the compiled baseline stays valid for the pairs
        bounds = bounds_of(result.get("flops"), v.label if v.method != TOMESD else f"tome r={v.ratio:g}")
        if bounds:
            point["bounds"] = bounds
        result["points"].append(point)
        save(result, opts.out)  # partial results survive a crash
    finish(result, opts.out)
    return result


def measure_variant(v: Variant, model: torch.nn.Module, template: Template, start: LoopStart, spec: LoopSpec,
                    ref: torch.Tensor, opts: ParetoOptions, timer: PairedTimer | None) -> dict[str, Any]:
    """Quality (the DDIM loop) and speed (one call, paired with the baseline's calls) of one variant.

    Dynamo is never reset here: the compiled baseline stays valid, and each variant adds its own cache entry
    (Dynamo guards on the backend, so nothing recompiles; tested).
    """
    built = v.build(model, compiler=opts.quality_compiler)
    final = ddim_loop(built.fn, template, start, spec, progress=f"quality {v.label}")
    out = time_point(v, model, template, timer, opts, built=built if v.method == TOMESD else None) if timer else \
        {"speedup": None}
    out["quality"] = {"rel_error": rel_error(final, ref), "psnr_db": psnr(final, ref),
                      "per_image_rel_error": [rel_error(final[i], ref[i]) for i in range(ref.shape[0])]}
    log.info("%s: rel. error %.4g, PSNR %.2f dB, speedup %s", v.label, out["quality"]["rel_error"],
             out["quality"]["psnr_db"], "not timed" if timer is None else f"{out['speedup']:.3f}")
    return out


__all__ = ["run", "run_sweep", "measure_variant", "replot", "ParetoOptions"]
