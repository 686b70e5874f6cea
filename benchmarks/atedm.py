#!/usr/bin/env python
"""AT-EDM vs ToMe and SiTo at equal FLOPs (scope="block") on the SDXL architecture, one process.

    python benchmarks/atedm.py --quick                                  # tiny SDXL-style UNet, latent 16 (smoke)
    python benchmarks/atedm.py --arch sdxl --latent 64 --out results/atedm_sdxl64_cpu.json          # -fx set
    python benchmarks/atedm.py --arch sdxl --latent 64 --inductor --out results/atedm_sdxl64_ind.json

Per UNet call (batch 2 = CFG, fp32, random weights, structured latents), every variant compiled through Dynamo:

* baseline: the unpruned UNet (``eager`` for the ``-fx`` set, ``inductor`` with ``--inductor``);
* ``atedm`` default (ratio 0.63, G-WPR after layer 1 of every attention block) in both DSAP phases (``late``: all
  blocks pruned; ``early``: the DSAP blocks unpruned) and AT-EDM-dagger (no pruning at the finest level);
* ``tome`` and ``sito`` with ``scope="block"`` at the FLOPs of ``atedm`` late: their ratio is solved from FLOP
  counts on the meta device (FLOPs are quadratic in the ratio: 3 counts, a quadratic fit, one check).

Reported: median seconds of ``--runs`` calls after ``--warmup`` calls, speedup vs the baseline, TFLOPs per call
(FlopCounterMode on the rewritten graph, meta device), the FLOP bound (unpruned / variant FLOPs), the FLOP and the
measured-time share of the ranking side computation (the plan: G-WPR + copy sources for AT-EDM, similarities for
ToMe/SiTo; time measured on the ``-fx`` variants, where the plan runs as Python, by timing ``method.plan``), the
relative error of the output vs the unpruned eager output, and for AT-EDM the DSAP-weighted time of a
``--num-steps`` generation (``dsap_steps`` early calls, the rest late).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("atedm-bench")

ATEDM = {"method": "atedm"}
SDXL_TINY = {  # tests/models.py's SDXL-style tiny config (2 transformer layers at the coarser levels)
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "cross_attention_dim": 32,
    "attention_head_dim": [2, 4, 4], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
    "transformer_layers_per_block": [1, 2, 2], "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 32,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--arch", default="sdxl", help="built-in architecture (graphprune.archs), or 'sdxl-tiny'")
    p.add_argument("--latent", type=int, default=64, help="latent size (latent x latent)")
    p.add_argument("--batch", type=int, default=2, help="batch (2 = classifier-free guidance)")
    p.add_argument("--runs", type=int, default=3, help="timed calls per variant (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) call")
    p.add_argument("--ratio", type=float, default=0.63, help="AT-EDM ratio")
    p.add_argument("--dsap-steps", type=int, default=10, help="AT-EDM tau (early calls of a generation)")
    p.add_argument("--num-steps", type=int, default=50, help="UNet calls per generation for the DSAP-weighted time")
    p.add_argument("--methods", default="atedm,atedm-dagger,tome,sito", help="comma-separated subset")
    p.add_argument("--inductor", action="store_true", help="compile with Inductor (slow on CPU for SDXL) instead "
                   "of running the rewritten graphs eagerly (-fx)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="results/atedm.json", help="JSON output")
    p.add_argument("--quick", action="store_true", help="tiny SDXL-style UNet, latent 16, 2 runs (smoke test)")
    p.add_argument("--flops-only", action="store_true", help="only the FLOP table of the AT-EDM variants (meta "
                   "device: no weights allocated; e.g. --arch sdxl --latent 128 --batch 1, the paper's setting)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.arch, opts.latent, opts.runs, opts.warmup = "sdxl-tiny", 16, 2, 1
    return opts


def build(opts: argparse.Namespace) -> Any:
    import diffusers
    import torch

    from graphprune.archs import build_model

    if opts.arch == "sdxl-tiny":
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(**SDXL_TINY).eval(), dict(SDXL_TINY)
    from graphprune.archs import unet_config

    return build_model(opts.arch), unet_config(opts.arch)


def flops_of(opts: argparse.Namespace, config: dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any]:
    """FLOPs of one call on the meta device (batch ``opts.batch``)."""
    import diffusers
    import torch

    from graphprune.bench.flops import graph_flops

    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**config).eval()
    args, kwargs = inputs_for(model, opts, device="meta")
    r = graph_flops(model, args, kwargs, options)
    return {"total": int(r["total"]), "side": int(r["side"])}


def inputs_for(model: Any, opts: argparse.Namespace, device: str = "cpu") -> tuple[tuple, dict]:
    import torch

    from graphprune.archs import example_inputs

    if device == "meta":
        cfg = model.config
        kw = {}
        if cfg.addition_embed_type == "text_time":
            td = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(opts.batch, td, device="meta"),
                                       "time_ids": torch.randn(opts.batch, 6, device="meta")}
        return (torch.randn(opts.batch, cfg.in_channels, opts.latent, opts.latent, device="meta"),
                torch.tensor(500, device="meta"), torch.randn(opts.batch, 77, cfg.cross_attention_dim, device="meta")), kw
    return example_inputs(model, opts.latent, batch=opts.batch)


def equal_flops_ratio(opts: argparse.Namespace, config: dict[str, Any], method: str, target: int,
                      extra: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """The ``scope="block"`` ratio of ``method`` whose FLOPs equal ``target`` (quadratic fit of 3 counts)."""
    import numpy as np

    rs = [0.2, 0.45, 0.7]
    fs = [flops_of(opts, config, {"method": method, "ratio": r, "scope": "block", "max_downsample": 64, **extra})
          ["total"] for r in rs]
    a, b, c = np.polyfit(rs, fs, 2)
    roots = [r.real for r in np.roots([a, b, c - target]) if abs(r.imag) < 1e-9 and 0 < r.real < 0.75]
    ratio = round(min(roots, key=lambda r: abs(r - 0.5)) if roots else 0.7, 4)
    check = flops_of(opts, config, {"method": method, "ratio": ratio, "scope": "block", "max_downsample": 64, **extra})
    log.info("%s block: ratio %.4f -> %.4g FLOPs (target %.4g)", method, ratio, check["total"], target)
    return ratio, check


class PlanTimer:
    """Wall time spent inside ``method.plan`` (eager-compiled graphs call it as Python)."""

    def __init__(self, name: str):
        from graphprune.methods import registered_methods

        self.cls = type(registered_methods()[name])
        self.orig = self.cls.plan
        self.seconds = 0.0

    def __enter__(self) -> "PlanTimer":
        timer, orig = self, self.orig

        def plan(this, *a, **k):
            t0 = time.perf_counter()
            out = orig(this, *a, **k)
            timer.seconds += time.perf_counter() - t0
            return out

        self.cls.plan = plan
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cls.plan = self.orig


def time_variant(model: Any, options: dict[str, Any] | None, inputs: tuple[tuple, dict], opts: argparse.Namespace,
                 ref: Any) -> dict[str, Any]:
    import torch

    from graphprune.bench.common import rel_error, timestep_schedule, unet_out

    torch._dynamo.reset()
    if options is None:
        fn = torch.compile(model) if opts.inductor else model
    else:
        fn = torch.compile(model, backend="graphprune",
                           options={**options, "compiler": "inductor" if opts.inductor else "eager"})
    args, kwargs = inputs
    ts = timestep_schedule(1 + opts.warmup + opts.runs)
    with torch.no_grad():
        t0 = time.perf_counter()
        fn(args[0], torch.tensor(ts[0]), args[2], **kwargs)
        first = time.perf_counter() - t0
        for t in ts[1:1 + opts.warmup]:
            fn(args[0], torch.tensor(t), args[2], **kwargs)
        times, plan_s = [], 0.0
        method = options["method"] if options else None
        for t in ts[1 + opts.warmup:]:
            if method and not opts.inductor:
                with PlanTimer(method) as pt:
                    t0 = time.perf_counter()
                    fn(args[0], torch.tensor(t), args[2], **kwargs)
                    times.append(time.perf_counter() - t0)
                plan_s += pt.seconds
            else:
                t0 = time.perf_counter()
                fn(args[0], torch.tensor(t), args[2], **kwargs)
                times.append(time.perf_counter() - t0)
        err = rel_error(unet_out(fn(*args, **kwargs)), ref)
    torch._dynamo.reset()
    return {"first_s": first, "times": times, "median_s": statistics.median(times),
            "plan_time_share": (plan_s / sum(times)) if method and not opts.inductor else None, "rel_err": err}


def flops_table(opts: argparse.Namespace) -> int:
    """FLOPs per UNet call: unpruned, AT-EDM and AT-EDM-dagger in both DSAP phases, and their DSAP-weighted means."""
    import torch

    from graphprune.bench.common import git_commit
    from graphprune.bench.flops import arch_flops

    if opts.arch == "sdxl-tiny":
        raise SystemExit("--flops-only needs a built-in architecture (--arch sdxl)")
    base = {**ATEDM, "ratio": opts.ratio, "dsap_steps": opts.dsap_steps}
    variants = {"unpruned": None, "atedm late": {**base, "dsap_phase": "late"},
                "atedm early": {**base, "dsap_phase": "early"},
                "atedm-dagger late": {**base, "dsap_phase": "late", "dagger": True},
                "atedm-dagger early": {**base, "dsap_phase": "early", "dagger": True}}
    r = arch_flops(opts.arch, opts.latent, variants, batch=opts.batch)
    tau, n = min(opts.dsap_steps, opts.num_steps), opts.num_steps
    rows = [f"{opts.arch}, latent {opts.latent}x{opts.latent}, batch {opts.batch}, torch {torch.__version__}, "
            f"git {git_commit()}; TFLOPs per UNet call (2 FLOPs per MAC); side = ranking plan nodes", "",
            "| variant | TFLOPs | of which side | without side | vs unpruned | pruned blocks |", "|---|---|---|---|---|---|"]
    for name, v in r.items():
        rows.append(f"| {name} | {v['tflops']:.3f} | {v['side_tflops']:.3f} | {v['tflops'] - v['side_tflops']:.3f} | "
                    f"{v['vs_unpruned']:.3f} | {len(v['pruned_blocks'])} |")
    for tag in ("atedm", "atedm-dagger"):
        e, l_ = r[f"{tag} early"], r[f"{tag} late"]
        mean = (tau * e["tflops"] + (n - tau) * l_["tflops"]) / n
        side = (tau * e["side_tflops"] + (n - tau) * l_["side_tflops"]) / n
        rows.append(f"| {tag}, DSAP mean ({tau} early of {n}) | {mean:.3f} | {side:.3f} | {mean - side:.3f} | "
                    f"{mean / r['unpruned']['tflops']:.3f} | |")
    text = "\n".join(rows)
    print(text)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"flops": r, "table": text}, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    opts = parse_args(argv)
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    from graphprune.bench.common import cpu_model, git_commit, unet_out

    if opts.flops_only:
        return flops_table(opts)
    model, config = build(opts)
    inputs = inputs_for(model, opts)
    head = {"arch": opts.arch, "config": config, "latent": opts.latent, "batch": opts.batch, "dtype": "float32",
            "device": "cpu", "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "git": git_commit(), "compiler": "inductor" if opts.inductor else "eager (-fx)",
            "sample_shape": list(inputs[0][0].shape), "context_shape": list(inputs[0][2].shape)}
    print(json.dumps(head, indent=1))
    with torch.no_grad():
        ref = unet_out(model(*inputs[0], **inputs[1]))
    methods = opts.methods.split(",")
    base_at = {**ATEDM, "ratio": opts.ratio, "dsap_steps": opts.dsap_steps}
    variants: dict[str, dict[str, Any] | None] = {"unpruned": None}
    if "atedm" in methods:
        variants["atedm late"] = {**base_at, "dsap_phase": "late"}
        variants["atedm early"] = {**base_at, "dsap_phase": "early"}
    if "atedm-dagger" in methods:
        variants["atedm-dagger late"] = {**base_at, "dsap_phase": "late", "dagger": True}
        variants["atedm-dagger early"] = {**base_at, "dsap_phase": "early", "dagger": True}
    flops = {name: flops_of(opts, config, o) for name, o in variants.items()}
    target = flops.get("atedm late", flops["unpruned"])["total"]
    for m, extra in (("tome", {"use_rand": False}), ("sito", {"noise_alpha": 0.1})):
        if m in methods:
            ratio, f = equal_flops_ratio(opts, config, m, target, extra)
            name = f"{m} block r={ratio}"
            variants[name] = {"method": m, "ratio": ratio, "scope": "block", "max_downsample": 64, **extra}
            flops[name] = f
    results: dict[str, Any] = {}
    for name, o in variants.items():
        log.info("timing %s", name)
        results[name] = {"options": o, **time_variant(model, o, inputs, opts, ref), "flops": flops[name]}
    base = results["unpruned"]
    rows = ["| variant | median s | speedup | TFLOPs/call | FLOP bound | side FLOP share | side time share | "
            "rel. err |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        f = r["flops"]
        r["speedup"] = base["median_s"] / r["median_s"]
        r["flop_bound"] = flops["unpruned"]["total"] / f["total"]
        share = r["plan_time_share"]
        rows.append(f"| {name} | {r['median_s']:.3f} | {r['speedup']:.3f} | {f['total'] / 1e12:.4f} | "
                    f"{r['flop_bound']:.3f} | {f['side'] / f['total']:.4f} | "
                    f"{'-' if share is None else f'{share:.4f}'} | {r['rel_err']:.4f} |")
    for tag in ("atedm", "atedm-dagger"):
        if f"{tag} late" in results:
            e, l_ = results[f"{tag} early"], results[f"{tag} late"]
            tau, n = min(opts.dsap_steps, opts.num_steps), opts.num_steps
            gen = tau * e["median_s"] + (n - tau) * l_["median_s"]
            gen_flops = (tau * e["flops"]["total"] + (n - tau) * l_["flops"]["total"]) / n
            results[f"{tag} DSAP generation"] = {"seconds": gen, "speedup": n * base["median_s"] / gen,
                                                 "mean_tflops": gen_flops / 1e12}
            rows.append(f"| {tag} DSAP ({tau} early of {n}) | {gen / n:.3f} (mean) | {n * base['median_s'] / gen:.3f} | "
                        f"{gen_flops / 1e12:.4f} (mean) | {flops['unpruned']['total'] / gen_flops:.3f} | | | |")
    table = "\n".join(rows)
    print(table)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": head, "results": results, "table": table}, indent=1, default=str))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
