"""AT-EDM vs ToMe and SiTo at equal FLOPs (``scope="block"``) on the SDXL architecture, one process, paired.

    graphprune bench atedm --arch sdxl --latent 64 --out results/atedm_sdxl64_cpu.json            # -fx set
    graphprune bench atedm --arch sdxl --latent 64 --inductor --out results/atedm_sdxl64_ind.json
    graphprune bench atedm --flops-only --arch sdxl --latent 128 --batch 1                        # FLOPs, meta device
    python benchmarks/atedm.py --quick                                  # tiny SDXL-style UNet, latent 16

Per UNet call (batch 2 = CFG, fp32, random weights, structured latents), every variant compiled through Dynamo:

* baseline: the unpruned UNet (``eager`` for the ``-fx`` set, ``inductor`` with ``--inductor``), timed alone;
* ``atedm`` default (ratio 0.63, G-WPR after layer 1 of every attention block) in both DSAP phases (``late``: all
  blocks pruned; ``early``: the DSAP blocks unpruned) and AT-EDM-dagger (no pruning at the finest level);
* ``tome`` and ``sito`` with ``scope="block"`` at the FLOPs of ``atedm`` late: their ratio is solved from FLOP
  counts on the meta device (FLOPs are quadratic in the ratio: 3 counts, a quadratic fit, one check).

Every variant is timed by the paired timer (each timed call paired with a baseline call at the same timestep;
speedup = median of the per-pair ratios). Reported: median seconds, speedup, TFLOPs per call (FlopCounterMode on
the rewritten graph, meta device), the FLOP bound (unpruned / variant FLOPs), the FLOP and the measured-time share
of the ranking side computation (the plan: G-WPR + copy sources for AT-EDM, similarities for ToMe/SiTo; time
measured on the ``-fx`` variants, where the plan runs as Python, by timing ``method.plan``), the relative error of
the output vs the unpruned eager output, and for AT-EDM the DSAP-weighted speedup of a ``num_steps`` generation
(``dsap_steps`` early calls, the rest late).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from .calls import Template, model_output, rel_error, timestep_calls
from .env import environment, format_header, git_commit
from .flops import arch_flops, graph_flops
from .options import AtedmOptions
from .output import render_table, write_json
from .timing import PairedTimer, torch_setup
from .variants import graphprune_variant, variant

log = logging.getLogger(__name__)

ATEDM = {"method": "atedm"}
SDXL_TINY = {  # tests/models.py's SDXL-style tiny config (2 transformer layers at the coarser levels)
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "cross_attention_dim": 32,
    "attention_head_dim": [2, 4, 4], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
    "transformer_layers_per_block": [1, 2, 2], "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 32,
}


def run(opts: AtedmOptions) -> dict[str, Any]:
    """The timed table (or with ``flops_only`` the FLOP table); JSON in ``opts.out``; ``table`` and ``failed``."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    opts.check()
    if opts.flops_only:
        return flops_table(opts)
    with torch_setup(opts.threads, opts.keep_inductor_cache, prefix="atedm"), logging_redirect_tqdm():
        return _run(opts)


def _run(opts: AtedmOptions) -> dict[str, Any]:
    from ..archs import example_inputs

    model, config = build(opts)
    template = example_inputs(model, opts.latent, batch=opts.batch)
    compiler = "inductor" if opts.inductor else "eager"
    head = environment("cpu", "float32", module=model, template=template, model=opts.arch, config=config,
                       latent=opts.latent, batch=opts.batch, protocol=opts.protocol().describe(),
                       compiler="inductor" if opts.inductor else "eager (-fx)", options=opts.as_dict())
    log.info("%s", format_header(head))
    ref = model_output(model(*template[0], **template[1]))
    configs, flops = variant_options(opts, config)

    n = opts.protocol().calls()
    base_fn = variant("inductor" if opts.inductor else "eager").build(model).fn
    timer = PairedTimer(opts.protocol(), timestep_calls(base_fn, template, n), desc="unpruned (baseline)")
    results: dict[str, Any] = {"unpruned": {"options": None, **timer.baseline, "plan_time_share": None,
                                            "rel_err": rel_error(model_output(base_fn(*template[0], **template[1])),
                                                                 ref), "flops": flops["unpruned"]}}
    for name, o in configs.items():
        if o is None:
            continue
        log.info("timing %s", name)
        fn = graphprune_variant(name, name, **o).build(model, compiler=compiler).fn
        results[name] = {"options": o, **time_variant(fn, o["method"], template, timer, opts, name),
                         "rel_err": rel_error(model_output(fn(*template[0], **template[1])), ref),
                         "flops": flops[name]}
        fn = None
        gc.collect()  # the compiled baseline stays valid: no torch._dynamo.reset() between variants
    rows = []
    for name, r in results.items():
        f = r["flops"]
        r["flop_bound"] = flops["unpruned"]["total"] / f["total"]
        share = r["plan_time_share"]
        rows.append([name, f"{r['median_s']:.3f}", f"{r['speedup']:.3f}", f"{f['total'] / 1e12:.4f}",
                     f"{r['flop_bound']:.3f}", f"{f['side'] / f['total']:.4f}", "-" if share is None else f"{share:.4f}",
                     f"{r['rel_err']:.4f}"])
    tau, steps = min(opts.dsap_steps, opts.num_steps), opts.num_steps
    for tag in ("atedm", "atedm-dagger"):
        if f"{tag} late" in results:
            e, l_ = results[f"{tag} early"], results[f"{tag} late"]
            relative = tau / e["speedup"] + (steps - tau) / l_["speedup"]  # generation time in unpruned calls
            gen_flops = (tau * e["flops"]["total"] + (steps - tau) * l_["flops"]["total"]) / steps
            results[f"{tag} DSAP generation"] = {"seconds": relative * timer.median_s, "speedup": steps / relative,
                                                 "mean_tflops": gen_flops / 1e12}
            rows.append([f"{tag} DSAP ({tau} early of {steps})", f"{relative * timer.median_s / steps:.3f} (mean)",
                         f"{steps / relative:.3f}", f"{gen_flops / 1e12:.4f} (mean)",
                         f"{flops['unpruned']['total'] / gen_flops:.3f}", "", "", ""])
    text = render_table(["variant", "median s", "speedup (paired)", "TFLOPs/call", "FLOP bound", "side FLOP share",
                         "side time share", "rel. err"], rows, markdown=True)
    out = {"header": head, "results": results, "table": format_header(head) + "\n\n" + text, "failed": []}
    write_json(out, opts.out)
    log.info("wrote %s", opts.out)
    return out


def build(opts: AtedmOptions) -> tuple[torch.nn.Module, dict[str, Any]]:
    import diffusers

    from ..archs import build_model, unet_config

    if opts.arch == "sdxl-tiny":
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(**SDXL_TINY).eval(), dict(SDXL_TINY)
    return build_model(opts.arch), unet_config(opts.arch)


def variant_options(opts: AtedmOptions, config: dict[str, Any]
                    ) -> tuple[dict[str, dict[str, Any] | None], dict[str, dict[str, Any]]]:
    """name -> graphprune options (AT-EDM's phases, AT-EDM-dagger's, tome/sito blocks at atedm late's FLOPs), and
    name -> FLOPs of one call."""
    base_at = {**ATEDM, "ratio": opts.ratio, "dsap_steps": opts.dsap_steps}
    out: dict[str, dict[str, Any] | None] = {"unpruned": None}
    if "atedm" in opts.methods:
        out["atedm late"] = {**base_at, "dsap_phase": "late"}
        out["atedm early"] = {**base_at, "dsap_phase": "early"}
    if "atedm-dagger" in opts.methods:
        out["atedm-dagger late"] = {**base_at, "dsap_phase": "late", "dagger": True}
        out["atedm-dagger early"] = {**base_at, "dsap_phase": "early", "dagger": True}
    flops = {name: flops_of(opts, config, o) for name, o in out.items()}
    target = flops.get("atedm late", flops["unpruned"])["total"]
    for m, extra in (("tome", {"use_rand": False}), ("sito", {"noise_alpha": 0.1})):
        if m in opts.methods:
            ratio, flops_at = equal_flops_ratio(opts, config, m, target, extra)
            name = f"{m} block r={ratio}"
            out[name] = {"method": m, "ratio": ratio, "scope": "block", "max_downsample": 64, **extra}
            flops[name] = flops_at
    return out, flops


def meta_inputs(model: torch.nn.Module, opts: AtedmOptions) -> Template:
    """One call's inputs on the meta device (shapes only)."""
    cfg = model.config
    kw = {}
    if cfg.addition_embed_type == "text_time":
        td = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(opts.batch, td, device="meta"),
                                   "time_ids": torch.randn(opts.batch, 6, device="meta")}
    return (torch.randn(opts.batch, cfg.in_channels, opts.latent, opts.latent, device="meta"),
            torch.tensor(500, device="meta"), torch.randn(opts.batch, 77, cfg.cross_attention_dim, device="meta")), kw


def flops_of(opts: AtedmOptions, config: dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any]:
    """FLOPs of one call on the meta device (batch ``opts.batch``)."""
    import diffusers

    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**config).eval()
    args, kwargs = meta_inputs(model, opts)
    r = graph_flops(model, args, kwargs, options)
    return {"total": int(r["total"]), "side": int(r["side"])}


def equal_flops_ratio(opts: AtedmOptions, config: dict[str, Any], method: str, target: int,
                      extra: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """The ``scope="block"`` ratio of ``method`` whose FLOPs equal ``target`` (quadratic fit of 3 counts), and the
    FLOPs at that ratio."""
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
        from ..methods import registered_methods

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


def time_variant(fn: Any, method: str, template: Template, timer: PairedTimer, opts: AtedmOptions, desc: str
                 ) -> dict[str, Any]:
    """The paired timing of one variant, and (``-fx``) the share of its timed calls spent in ``method.plan``."""
    call = timestep_calls(fn, template, opts.protocol().calls())
    plan_s: dict[int, float] = {}

    def timed(i: int) -> Any:
        if opts.inductor:
            return call(i)
        with PlanTimer(method) as pt:
            out = call(i)
        plan_s[i] = pt.seconds
        return out

    res = timer.time(timed, desc)
    first = 1 + len(res["warmup_s"]) + (res["timed_attempt_used"] - 1) * len(res["times_s"])
    kept = [plan_s[i] for i in range(first, first + len(res["times_s"])) if i in plan_s]
    res["plan_time_share"] = None if opts.inductor else sum(kept) / sum(res["times_s"])
    return res


def flops_table(opts: AtedmOptions) -> dict[str, Any]:
    """FLOPs per UNet call: unpruned, AT-EDM and AT-EDM-dagger in both DSAP phases, and their DSAP-weighted means."""
    base = {**ATEDM, "ratio": opts.ratio, "dsap_steps": opts.dsap_steps}
    variants = {"unpruned": None, "atedm late": {**base, "dsap_phase": "late"},
                "atedm early": {**base, "dsap_phase": "early"},
                "atedm-dagger late": {**base, "dsap_phase": "late", "dagger": True},
                "atedm-dagger early": {**base, "dsap_phase": "early", "dagger": True}}
    r = arch_flops(opts.arch, opts.latent, variants, batch=opts.batch)
    tau, n = min(opts.dsap_steps, opts.num_steps), opts.num_steps
    rows = [[name, f"{v['tflops']:.3f}", f"{v['side_tflops']:.3f}", f"{v['tflops'] - v['side_tflops']:.3f}",
             f"{v['vs_unpruned']:.3f}", str(len(v["pruned_blocks"]))] for name, v in r.items()]
    for tag in ("atedm", "atedm-dagger"):
        e, l_ = r[f"{tag} early"], r[f"{tag} late"]
        mean = (tau * e["tflops"] + (n - tau) * l_["tflops"]) / n
        side = (tau * e["side_tflops"] + (n - tau) * l_["side_tflops"]) / n
        rows.append([f"{tag}, DSAP mean ({tau} early of {n})", f"{mean:.3f}", f"{side:.3f}", f"{mean - side:.3f}",
                     f"{mean / r['unpruned']['tflops']:.3f}", ""])
    text = (f"{opts.arch}, latent {opts.latent}x{opts.latent}, batch {opts.batch}, torch {torch.__version__}, "
            f"git {git_commit()}; TFLOPs per UNet call (2 FLOPs per MAC); side = ranking plan nodes\n\n"
            + render_table(["variant", "TFLOPs", "of which side", "without side", "vs unpruned", "pruned blocks"],
                           rows, markdown=True))
    out = {"flops": r, "table": text, "failed": []}
    write_json(out, opts.out)
    return out


__all__ = ["run", "flops_table", "equal_flops_ratio", "AtedmOptions"]
