"""Where the time of one UNet call goes: self time per op (torch.profiler) per variant, and time per module.

    graphprune bench profile --latent 64 --variants inductor,tome0.5,tomesd --out results/profile64.json
    python benchmarks/profile.py --quick                       # tiny UNet, latent 16 (smoke)
    result = run(ProfileOptions(latent=64, variants=("inductor", "tome0.5")))

Two views, in one process, on one model (random weights, batch 2, the benchmark's dtype and threads):

* **ops** (per variant): every variant is built (``inductor`` = ``torch.compile(unet)``, graphprune configs with
  Inductor inside, tomesd eager, ...), called ``warmup`` times, then ``calls`` calls run under
  ``torch.profiler`` (CPU activity); the table gives the self time per op and call, grouped into categories
  (:data:`CATEGORIES`: convolution, SDPA attention, matmuls, the planning ops, Inductor's fused kernels, ...).
  With ``kernel_profile`` (the default) Inductor's generated C++ kernels record themselves
  (``torch._inductor.config.cpp.enable_kernel_profile``), so a fused kernel shows under its name
  (``cpp_fused_gather_scatter_add_...``: the ops it fused); without it they are summed in the graph's
  ``## Call CompiledFxGraph`` entry. Profiling adds a small cost per op; the speedups are measured by
  ``graphprune bench speed`` / ``pareto`` (paired), not here.
* **modules** (eager, the unpruned model): inclusive wall time of every module per call (forward hooks), summed by
  kind and token count N: self-attention core and projections, cross-attention, feed-forward, the rest of the
  transformer blocks, ``proj_in``/``proj_out``, ResNets, samplers. From these shares :func:`time_bound` estimates
  the time a pruning scope could remove at most (selection free), per config: the *time* Amdahl bound, which on
  CPU differs from the FLOP bound because attention at large N runs slower per FLOP than convolutions.
"""

from __future__ import annotations

import gc
import logging
import math
import re
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

from .calls import timestep_calls
from .env import environment, format_header, loadavg
from .options import ProfileOptions
from .output import render_table, write_json
from .timing import reset, torch_setup
from .variants import build_model, variants

log = logging.getLogger(__name__)

#: (category, regular expression on the profiler's op name); the first match wins
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("convolution", r"conv"),
    ("attention (SDPA)", r"scaled_dot_product|flash_attention|efficient_attention"),
    ("similarity matmul (bmm)", r"aten::(bmm|baddbmm)\b"),
    ("linear (mm, addmm)", r"aten::(mm|addmm|linear|matmul)\b|mkl_linear|mkldnn_linear"),
    ("selection (topk, sort, argmax)", r"aten::(topk|sort|argsort|argmax|max|kthvalue)\b"),
    ("Dynamo/AOT wrappers", r"Torch-Compiled Region|TorchDynamo|Pregraph|AOTDispatcher|CompiledFunction"),
    ("fused gather/scatter/select (Inductor)", r"cpp_fused.*(gather|scatter|index|topk|sort|argmax|max_|cumsum)"),
    ("fused pointwise/norm (Inductor)", r"cpp_fused|CompiledFxGraph"),
    ("gather/scatter/index (aten)", r"gather|scatter|index"),
    ("norm (aten)", r"norm"),
    ("copies, layout, allocation", r"copy|contiguous|clone|aten::cat\b|empty|view|reshape|transpose|permute|"
                                   r"as_strided|expand|resize|slice|select|unsqueeze|squeeze|stack|detach|t\b"),
)
OTHER = "other"


def category(name: str) -> str:
    """The :data:`CATEGORIES` entry an op name falls into (``other`` when none matches)."""
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return OTHER


def op_profile(call: Callable[[int], Any], first: int, calls: int) -> dict[str, Any]:
    """Run ``call(first) .. call(first + calls - 1)`` under torch.profiler (CPU); self seconds per op and call.

    Returns ``{"wall_s": mean wall seconds per call (profiled), "ops": [{"name", "self_s", "count"}...] (per call,
    descending), "categories": {category: self seconds per call}, "self_total_s"}``.
    """
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(first, first + calls):
            call(i)
    wall = (time.perf_counter() - start) / calls
    ops = []
    for e in prof.key_averages():
        self_s = e.self_cpu_time_total / 1e6 / calls
        if self_s > 0:
            ops.append({"name": e.key, "self_s": self_s, "count": e.count / calls})
    ops.sort(key=lambda o: -o["self_s"])
    cats: dict[str, float] = defaultdict(float)
    for o in ops:
        o["category"] = category(o["name"])
        cats[o["category"]] += o["self_s"]
    total = sum(o["self_s"] for o in ops)
    return {"wall_s": wall, "self_total_s": total, "ops": ops,
            "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1]))}


# ------------------------------------------------------------------------------------------------ module times

def module_times(model: torch.nn.Module, call: Callable[[int], Any], calls: int) -> dict[str, Any]:
    """Inclusive wall seconds per module path and call (eager, forward pre/post hooks), with the token count N of
    each module's input (``(B, N, C)`` tokens or ``(B, C, H, W)`` -> H*W). Returns ``{"total_s", "modules":
    {path: {"s", "N", "type"}}}``; the first call is a warm-up."""
    starts: dict[str, list[float]] = defaultdict(list)
    spent: dict[str, float] = defaultdict(float)
    tokens: dict[str, int] = {}
    types = {path: type(m).__name__ for path, m in model.named_modules() if path}
    handles = []

    def pre(path: str) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None and path not in tokens:
                tokens[path] = int(x.shape[1]) if x.dim() == 3 else int(x.shape[-1] * x.shape[-2]) if x.dim() == 4 else 0
            starts[path].append(time.perf_counter())
        return hook

    def post(path: str) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, _args: tuple[Any, ...], _out: Any) -> None:
            spent[path] += time.perf_counter() - starts[path].pop()
        return hook

    for path, m in model.named_modules():
        if path:
            handles.append(m.register_forward_pre_hook(pre(path)))
            handles.append(m.register_forward_hook(post(path)))
    try:
        with torch.no_grad():
            call(0)
            spent.clear()
            start = time.perf_counter()
            for i in range(1, 1 + calls):
                call(i)
            total = (time.perf_counter() - start) / calls
    finally:
        for h in handles:
            h.remove()
    return {"total_s": total, "modules": {p: {"s": s / calls, "N": tokens.get(p, 0), "type": types[p]}
                                          for p, s in spent.items()}}


#: attention module attribute names of diffusers' BasicTransformerBlock / Attention
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


def module_shares(times: dict[str, Any]) -> list[dict[str, Any]]:
    """Seconds per (kind, N), exclusive, summing to the call: ``attn1 core`` (attention minus its projections),
    ``attn1 q``/``k``/``v``/``out`` projections, ``attn2`` (cross-attention), ``ff``, ``block rest`` (norms and
    residuals of the transformer blocks), ``proj_in/out + norm`` of the transformer stacks, ``resnet``,
    ``sampler``, ``other`` (the rest: conv_in/out, time embedding, ...)."""
    mods, total = times["modules"], times["total_s"]
    out: dict[tuple[str, int], float] = defaultdict(float)
    covered = 0.0

    def add(kind: str, n: int, s: float) -> None:
        nonlocal covered
        out[(kind, n)] += s
        covered += s

    for path, m in mods.items():
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        leaf = path.rsplit(".", 1)[-1]
        ptype = mods.get(parent, {}).get("type", "")
        if m["type"] == "BasicTransformerBlock":
            inner = sum(mods.get(f"{path}.{c}", {}).get("s", 0.0) for c in ("attn1", "attn2", "ff"))
            add("block rest", m["N"], m["s"] - inner)
        elif ptype == "BasicTransformerBlock" and leaf in ("attn1", "attn2", "ff"):
            if leaf == "attn1":
                proj = 0.0
                for p in PROJECTIONS:
                    sub = mods.get(f"{path}.{p}") or mods.get(f"{path}.{p}.0") or {}  # to_out = [Linear, Dropout]
                    s = sub.get("s", 0.0)
                    add(f"attn1 {p[3:]}", m["N"], s)
                    proj += s
                add("attn1 core", m["N"], m["s"] - proj)
            else:
                add(leaf, m["N"], m["s"])
        elif m["type"] in ("Transformer2DModel", "SpatialTransformer"):
            blocks = sum(v["s"] for p, v in mods.items() if p.startswith(path + ".transformer_blocks.")
                         and p.count(".") == path.count(".") + 2)
            add("proj_in/out + norm", m["N"], m["s"] - blocks)
        elif m["type"].startswith("ResnetBlock"):
            add("resnet", m["N"], m["s"])
        elif m["type"] in ("Downsample2D", "Upsample2D"):
            add("sampler", m["N"], m["s"])
    add("other", 0, max(0.0, total - covered))
    rows = [{"kind": k, "N": n, "s": s, "share": s / total} for (k, n), s in out.items()]
    return sorted(rows, key=lambda r: (-r["N"], r["kind"]))


def levels_of(shares: list[dict[str, Any]]) -> dict[int, int]:
    """Token count N -> attention level (1 = the finest attention grid, 2 = the next coarser, ...)."""
    ns = sorted({r["N"] for r in shares if r["kind"].startswith("attn1") and r["N"]}, reverse=True)
    return {n: 1 + int(round(math.log(ns[0] / n, 4))) for n in ns}


def time_bound(shares: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, float]:
    """The most time a config could remove if its selection were free, from eager module shares.

    Token pruning at ratio r (tome, sito, random) on the levels ``<= max_downsample``: the self-attention's
    projections scale with the tokens (1 - r), its core with the tokens squared ((1 - r)^2); with ``cross`` the
    cross-attention (queries: linear), with ``ff`` the feed-forward, with ``block`` both and the block's norms.
    ToDo (factor f per level): the keys/values (k, v projections and the core) shrink by 1/f^2. Returns ``removed``
    (share of the call) and ``bound`` = 1 / (1 - removed).
    """
    from ..methods import parse_options

    config = parse_options(options)
    levels = levels_of(shares)
    removed = 0.0
    for row in shares:
        level = levels.get(row["N"])
        if level is None or level > config.max_downsample:
            continue
        kind, s = row["kind"], row["share"]
        if config.method == "todo":
            f = (config.effective_factor or (1 - config.ratio) ** -0.5) if level == 1 else config.factor_level_2
            keep = 1.0 / f ** 2
            if kind in ("attn1 k", "attn1 v", "attn1 core"):
                removed += s * (1 - keep)
            continue
        r = config.ratio
        scope = set(config.scope)
        if kind == "attn1 core":
            removed += s * (1 - (1 - r) ** 2)
        elif kind.startswith("attn1 "):
            removed += s * r
        elif kind == "attn2" and ({"cross", "block"} & scope):
            removed += s * r
        elif kind == "ff" and ({"ff", "block"} & scope):
            removed += s * r
        elif kind == "block rest" and "block" in scope:
            removed += s * r
    return {"removed": removed, "bound": 1.0 / (1.0 - removed) if removed < 1 else math.inf}


# ------------------------------------------------------------------------------------------------------ the run

def run(opts: ProfileOptions) -> dict[str, Any]:
    """Profile every variant (ops) and the unpruned eager model (modules); returns the result (JSON in
    ``opts.out``) with ``table`` and ``failed``."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..archs import example_inputs

    opts.check()
    chosen = variants(opts.variants)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch_setup(opts.threads, opts.keep_inductor_cache, prefix="profile"), logging_redirect_tqdm():
        if opts.kernel_profile:
            torch._inductor.config.cpp.enable_kernel_profile = True
        unet = build_model(opts.arch, dtype=dtype, seed=opts.seed).to(device)
        template = example_inputs(unet, latent=opts.latent, batch=opts.batch, structured=True)
        header = environment(device, dtype, module=unet, template=template, model=opts.arch, latent=opts.latent,
                             batch=opts.batch, variants=[v.key for v in chosen], calls=opts.calls,
                             warmup=opts.warmup, kernel_profile=opts.kernel_profile,
                             inductor_cache_fresh=not opts.keep_inductor_cache, options=opts.as_dict())
        log.info("%s", format_header(header))
        result: dict[str, Any] = {"header": header, "variants": {}}
        n = 1 + opts.warmup + opts.calls
        if opts.modules:
            log.info("module times (eager, %d calls)", opts.calls)
            times = module_times(unet, timestep_calls(unet, template, 1 + opts.calls), opts.calls)
            shares = module_shares(times)
            result["modules"] = {"total_s": times["total_s"], "shares": shares,
                                 "bounds": {v.key: time_bound(shares, _options(v)) for v in chosen
                                            if v.kind == "graphprune" and _options(v) is not None}}
        for v in tqdm(chosen, desc="profile", unit="variant"):
            log.info("variant %s", v.key)
            try:
                built = v.build(unet)
                call = timestep_calls(built.fn, template, n)
                start = time.perf_counter()
                with torch.no_grad():
                    call(0)
                first = time.perf_counter() - start
                warm = []
                with torch.no_grad():
                    for i in range(1, 1 + opts.warmup):
                        t0 = time.perf_counter()
                        call(i)
                        warm.append(time.perf_counter() - t0)
                    prof = op_profile(call, 1 + opts.warmup, opts.calls)
                prof.update(first_call_s=first, warmup_s=warm, loadavg=loadavg(), label=v.label)
                prof["ops"] = prof["ops"][: opts.keep_ops]
                result["variants"][v.key] = prof
                built.close()
            except Exception:  # noqa: BLE001
                result["variants"][v.key] = {"error": traceback.format_exc()}
                log.error("%s failed:\n%s", v.key, result["variants"][v.key]["error"])
            finally:
                built = call = None
                gc.collect()
            write_json(result, opts.out)
        header["loadavg_end"] = loadavg()
        if opts.kernel_profile:
            torch._inductor.config.cpp.enable_kernel_profile = False
        reset()
    result["table"] = "\n\n".join([format_header(header), table(result, opts.rows)])
    result["failed"] = [k for k, r in result["variants"].items() if "error" in r]
    write_json(result, opts.out)
    log.info("wrote %s", Path(opts.out))
    return result


def _options(v: Any) -> dict[str, Any] | None:
    if v.kind != "graphprune":
        return None
    return {k: x for k, x in v.options.items() if k != "compiler" and x is not None}


def table(result: dict[str, Any], rows: int = 20) -> str:
    """The category table (one column per variant), each variant's top ops, and the module shares."""
    ok = {k: r for k, r in result["variants"].items() if "error" not in r}
    parts = []
    if ok:
        cats = list(dict.fromkeys(c for r in ok.values() for c in r["categories"]))
        body = []
        for c in cats:
            body.append([c] + [f"{r['categories'].get(c, 0.0):.3f} ({r['categories'].get(c, 0.0) / r['self_total_s']:.1%})"
                               for r in ok.values()])
        body.append(["total self time"] + [f"{r['self_total_s']:.3f}" for r in ok.values()])
        body.append(["wall per call (profiled)"] + [f"{r['wall_s']:.3f}" for r in ok.values()])
        parts.append("self seconds per call by category (share of the variant's self time)\n"
                     + render_table(["category"] + [r["label"] for r in ok.values()], body, markdown=True))
        for key, r in ok.items():
            top = [[o["name"][:70], f"{o['self_s']:.4f}", f"{o['self_s'] / r['self_total_s']:.1%}", f"{o['count']:g}",
                    o["category"]] for o in r["ops"][:rows]]
            parts.append(f"{r['label']}: top ops by self time per call\n"
                         + render_table(["op", "self s", "share", "calls", "category"], top, markdown=True))
    mods = result.get("modules")
    if mods:
        body = [[r["kind"], str(r["N"] or "-"), f"{r['s']:.3f}", f"{r['share']:.1%}"] for r in mods["shares"]
                if r["share"] >= 0.002]
        parts.append(f"eager module time per call ({mods['total_s']:.3f} s), exclusive, by kind and tokens N\n"
                     + render_table(["kind", "N", "s", "share"], body, markdown=True))
        if mods["bounds"]:
            body = [[k, f"{b['removed']:.1%}", f"{b['bound']:.3f}"] for k, b in mods["bounds"].items()]
            parts.append("time bound of each config (selection free): share of the eager call it removes\n"
                         + render_table(["config", "removable time", "time bound 1/(1-x)"], body, markdown=True))
    failed = [f"FAILED {k}: {r['error'].strip().splitlines()[-1]}" for k, r in result["variants"].items()
              if "error" in r]
    return "\n\n".join(parts + failed)


__all__ = ["run", "op_profile", "module_times", "module_shares", "time_bound", "levels_of", "category", "table",
           "CATEGORIES", "ProfileOptions"]
