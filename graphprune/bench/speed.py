"""Per-call speed of graphprune vs Inductor, eager and tomesd on one UNet, all in one process, paired.

    graphprune bench speed --latents 64,32 --out results/speed_cpu.json
    python benchmarks/speed.py --quick                    # tiny UNet, latent 16
    result = run(SpeedOptions(latents=(32,), variants=("inductor", "sito0.5", "tomesd")))

For every latent size: one reference eager call, a FLOP analysis (:func:`~graphprune.bench.flops.flop_analysis`:
FlopCounterMode on the unpruned model and on the rewritten graphs run with ``compiler="eager"``), then the
baseline (``inductor`` by default: ``torch.compile(unet)``) is timed alone and every other variant by the paired
timer (:mod:`graphprune.bench.timing`): its first call (compile), warm-up calls, then ``runs`` timed calls each
paired with a baseline call at the same timestep; the speedup is the median of the per-pair ratios. Every call
uses a different timestep, so a recompile on the timestep's value would show (and is recorded). A last call at
``error_timestep`` is compared with the unpruned eager output.
"""

from __future__ import annotations

import gc
import logging
import traceback
from pathlib import Path
from typing import Any

import torch

from .calls import Template, model_output, rel_error, timestep_calls, with_sample_and_timestep
from .env import environment, format_header, loadavg
from .flops import bounds_of, flop_analysis
from .options import SpeedOptions, baseline_of
from .output import fmt, render_table, write_json
from .timing import PairedTimer, delta, dynamo_stats, reset, torch_setup
from .variants import Variant, build_model, variant, variants

log = logging.getLogger(__name__)

#: the graphprune config whose site set and FLOP bound the tomesd rows borrow (tomesd r=0.5, max_downsample=1
#: touches the same attn1 modules)
TOMESD_PROXY = "tome0.5"

#: baselines the Amdahl / FLOP bounds refer to (the unpruned UNet, eager or compiled)
UNPRUNED_KINDS = ("eager", "inductor", "dynamo-eager")

COLUMNS = ["variant", "compile s", "median s", "speedup vs {base}", "rel. error", "pruned share f",
           "ideal 1/(1-f)", "FLOP bound", "fraction of bound", "graphs", "recompiles warm/timed", "other CPU"]


def run(opts: SpeedOptions) -> dict[str, Any]:
    """Time every variant at every latent size; returns the result (also written to ``opts.out``) with one table
    per latent (``tables``), the printed text (``table``) and the ``failed`` variants."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    opts.check()
    names = list(dict.fromkeys(opts.variants))
    base_name = baseline_of(opts.baseline, names)
    chosen = variants([base_name] + [n for n in names if n != base_name])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch_setup(opts.threads, opts.keep_inductor_cache, prefix="speed"), logging_redirect_tqdm():
        log.info("building %s (%s, %s)", opts.arch, device, dtype)
        unet = build_model(opts.arch, dtype=dtype, seed=opts.seed).to(device)
        header = environment(device, dtype, module=unet, model=opts.arch, latents=list(opts.latents),
                             batch=opts.batch, baseline=base_name, variants=[v.key for v in chosen],
                             protocol=opts.protocol().describe(), inductor_cache_fresh=not opts.keep_inductor_cache,
                             options=opts.as_dict())
        log.info("%s", format_header(header))
        result: dict[str, Any] = {"header": header, "latents": {}}
        for latent in opts.latents:
            result["latents"][str(latent)] = run_latent(latent, unet, chosen, opts, device)
            write_json(result, opts.out)  # partial results survive a crash
        header["loadavg_end"] = loadavg()
    result["tables"] = {k: table(v, header) for k, v in result["latents"].items()}
    result["table"] = "\n\n".join([format_header(header)] + [
        f"== {opts.arch}, latent {k}x{k}, batch {opts.batch}, {header['dtype']}, {header['device']} ==\n{t}"
        for k, t in result["tables"].items()])
    result["failed"] = [f"{lat}/{k}" for lat, v in result["latents"].items() for k, r in v["variants"].items()
                        if "error" in r]
    write_json(result, opts.out)
    log.info("wrote %s", Path(opts.out))
    return result


def run_latent(latent: int, unet: torch.nn.Module, chosen: list[Variant], opts: SpeedOptions, device: torch.device
               ) -> dict[str, Any]:
    """FLOP analysis, the baseline timed alone, then every variant paired with it, at one latent size."""
    from tqdm import tqdm

    from ..archs import example_inputs

    template = example_inputs(unet, latent=latent, batch=opts.batch, structured=True, timestep=opts.error_timestep)
    log.info("latent %d: call shapes %s", latent, {k: tuple(v.shape) for k, v in enumerate(template[0])
                                                     if isinstance(v, torch.Tensor)})
    ref = model_output(unet(*template[0], **template[1])).detach().clone()

    configs = {v.key: {k: x for k, x in v.options.items() if k != "compiler"}
               for v in chosen if v.kind == "graphprune"}
    want_tomesd = any(v.kind == "tomesd" for v in chosen)
    if want_tomesd and TOMESD_PROXY not in configs:
        configs[TOMESD_PROXY] = dict(variant(TOMESD_PROXY).options)
    tomesd_ratio = next((v.ratio for v in chosen if v.kind == "tomesd"), None)
    out: dict[str, Any] = {"latent": latent, "error_timestep": opts.error_timestep, "baseline": chosen[0].key,
                           "variants": {}}
    log.info("latent %d: FLOP analysis", latent)
    out["flops"] = flop_analysis(unet, template, configs, tomesd_ratio, TOMESD_PROXY)

    from ..backend import REPORTS

    n = opts.protocol().calls()
    mark = len(REPORTS)
    base = chosen[0].build(unet)
    timer = PairedTimer(opts.protocol(), timestep_calls(base.fn, template, n), desc=f"{chosen[0].key} (baseline)",
                        device=device)
    out["variants"][chosen[0].key] = finish_variant(chosen[0], base.fn, timer.baseline, template, ref, opts, [])
    for pos, v in enumerate(tqdm(chosen[1:], desc=f"latent {latent}", unit="variant")):
        log.info("latent %d: variant %s", latent, v.key)
        try:
            mark = len(REPORTS)
            fn = v.build(unet).fn
            res = timer.time(timestep_calls(fn, template, n), v.key)
            out["variants"][v.key] = finish_variant(v, fn, res, template, ref, opts, list(REPORTS)[mark:])
        except Exception as exc:  # noqa: BLE001
            tb = traceback.format_exc()
            log.error("latent %d: variant %s failed: %s\n%s", latent, v.key, exc, tb)
            out["variants"][v.key] = {"error": tb}
        finally:
            fn = None
            gc.collect()  # no torch._dynamo.reset() here: the compiled baseline stays valid for the pairs
            if v.poisons_dynamo and pos + 2 < len(chosen):
                timer.reset()
    if chosen[0].kind in UNPRUNED_KINDS:  # bounds are speedups over the unpruned model
        attach_bounds(out, chosen)
    out["labels"] = {v.key: v.label for v in chosen}
    reset()
    return out


def finish_variant(v: Variant, fn: Any, res: dict[str, Any], template: Template, ref: torch.Tensor,
                   opts: SpeedOptions, reports: list[Any]) -> dict[str, Any]:
    """The error check (one more call at ``error_timestep``) and the pruned sites of the compile's ``reports``."""
    s0 = dynamo_stats()
    args, kwargs = with_sample_and_timestep(template, template[0][0], opts.error_timestep)
    torch.manual_seed(0)
    res["rel_error"] = rel_error(model_output(fn(*args, **kwargs)), ref)
    res["recompiles_error_call"] = delta(dynamo_stats(), s0)
    res["kind"] = v.kind
    if v.kind == "graphprune":
        res["graphprune_reports"] = len(reports)
        res["pruned_sites"] = sorted({s.module_path for r in reports for s in r.sites if s.status == "pruned"})
        res["report_summaries"] = [r.summary() for r in reports]
    grew = [d for d in (res["recompiles_warmup"], res["recompiles_timed"], res["recompiles_error_call"])
            if d["unique_graphs"] or d["frames_ok"]]
    res["no_recompiles"] = not grew
    if grew:
        log.warning("%s: recompiles after the first call: warm-up %s, timed %s, error call %s", v.key,
                    res["recompiles_warmup"], res["recompiles_timed"], res["recompiles_error_call"])
    log.info("%s: median %.3fs, speedup %.3f, rel. error %.3g, graphs %d", v.key, res["median_s"], res["speedup"],
             res["rel_error"], res["graphs"])
    return res


def attach_bounds(out: dict[str, Any], chosen: list[Variant]) -> None:
    """The Amdahl / FLOP bounds of each graphprune variant (tomesd borrows ``tome0.5``'s) and the check that the
    timed compile pruned the sites the analysis counted."""
    for v in chosen:
        r = out["variants"].get(v.key, {})
        if "error" in r:
            continue
        src = v.key if v.kind == "graphprune" else TOMESD_PROXY if v.kind == "tomesd" else None
        b = bounds_of(out["flops"], src) if src else None
        if b is None:
            continue
        r.update(bound_source=src, f=b["f"], ideal_bound=b["ideal"], flop_bound=b["flop"],
                 fraction_of_bound=r["speedup"] / b["flop"])
        if v.kind == "graphprune" and "pruned_sites" in r:
            expected = sorted(out["flops"]["configs"][src]["pruned_sites"])
            r["sites_match_analysis"] = r["pruned_sites"] == expected
            if not r["sites_match_analysis"]:
                log.warning("%s: pruned sites of the timed compile %s differ from the eager analysis %s", v.key,
                            r["pruned_sites"], expected)


def table(latent_result: dict[str, Any], header: dict[str, Any]) -> str:
    """One latent's table (aligned text) and its notes."""
    base = latent_result["baseline"]
    rows, notes = [], []
    for key, r in latent_result["variants"].items():
        name = latent_result.get("labels", {}).get(key, key)
        if "error" in r:
            rows.append([name, "FAILED"] + ["-"] * (len(COLUMNS) - 2))
            notes.append(f"{name}: {r['error'].strip().splitlines()[-1]}")
            continue
        mark = "*" if r.get("bound_source") == TOMESD_PROXY and r.get("kind") == "tomesd" else ""
        rows.append([
            name + (" (baseline)" if key == base else ""), fmt(r["compile_s"], ".1f"), fmt(r["median_s"], ".3f"),
            fmt(r.get("speedup"), ".3f"), fmt(r["rel_error"], ".2e"),
            fmt(r.get("f"), ".3f") + (mark if r.get("f") is not None else ""), fmt(r.get("ideal_bound"), ".2f"),
            fmt(r.get("flop_bound"), ".3f") + (mark if r.get("flop_bound") else ""),
            fmt(r.get("fraction_of_bound"), ".2f"),
            str(r["graphs"]) + (f" ({r['graph_breaks']} breaks)" if r["graph_breaks"] else ""),
            f"{r['recompiles_warmup']['unique_graphs']}/{r['recompiles_timed']['unique_graphs']}",
            fmt(r.get("other_cpu_cores"), ".2f") + (f" (try {r['timed_attempt_used']})"
                                                    if len(r.get("attempts", [])) > 1 else ""),
        ])
    lines = [render_table([c.format(base=base) for c in COLUMNS], rows)]
    fl = latent_result.get("flops", {})
    if any(r.get("kind") == "tomesd" for r in latent_result["variants"].values()):
        meas = fl.get("tomesd_measured")
        extra = (f"; tomesd's own FLOPs measured directly give a bound of {meas['flop_bound']:.3f}x" if meas else "")
        lines.append(f"* tomesd rows use the pruned-site set and FLOP bound of graphprune tome r=0.5 (tomesd "
                     f"r=0.5, max_downsample=1 touches the same attn1 modules){extra}")
    if fl:
        cc = fl.get("capture_check", {})
        lines.append(f"unpruned FLOPs per call: {fl['total_unpruned'] / 1e9:.2f} GFLOP (FlopCounterMode, CPU "
                     f"flash-attention counted); rewritten-graph capture covers the model: {cc.get('covers_model')}")
    lines.append(f"speedup = median over pairs of ({base} call / variant call): every timed call of a variant is "
                 f"paired with a call of the baseline ({base}) at the same timestep, in alternating order; the "
                 "baseline row is its own calls timed alone")
    lines.append("recompiles warm/timed = new Dynamo graphs during the warm-up / the timed calls; other CPU = average "
                 "cores used by other processes during the timed calls (try n: contended sets were repeated and the "
                 "n-th, least contended, is reported)")
    lines.append(f"compile s = wall time of the first call (compile + one run); rel. error = ||out - eager|| / "
                 f"||eager|| at t={latent_result['error_timestep']}; threads {header['threads']}, load average at "
                 f"start {header['loadavg_start']}")
    lines += [f"FAILED {n}" for n in notes]
    return "\n".join(lines)


__all__ = ["run", "run_latent", "table", "SpeedOptions"]
