"""FLOP counts and the bounds next to every speedup: what a variant *could* gain if time followed FLOPs.

    analysis = flop_analysis(unet, template, {"sito r=0.5": {"method": "sito", "ratio": 0.5}})
    bounds_of(analysis, "sito r=0.5")   # {"f": pruned share, "ideal": 1/(1-f) (Amdahl), "flop": unpruned/rewritten}
    graph_flops(model, args, kwargs, {"method": "atedm", "dsap_phase": "late"})   # total + the plans' side FLOPs
    arch_flops("sdxl", 128, {"unpruned": None, ...}, device="meta")                # no weights allocated
    flops_per_kind(unet, {"method": "deepcache"}, template, timesteps)             # per step kind (full, shallow)

FlopCounterMode counts 2 FLOPs per multiply-add of matmuls, convolutions and attention (softmax, norms and
elementwise ops are not counted), the convention of the FLOP figures in papers (SD-XL: 6.7 TFLOPs per call); the
CPU flash-attention op, missing from torch's registry, is added (:func:`flop_counter`). Rewritten graphs are
counted by running them with ``compiler="eager"`` inside the counting mode (entered *inside* the compiled
callable: entered around a compiled module, Dynamo falls back to the original code), or through an
:class:`torch.fx.Interpreter` that attributes the FLOPs of every ``graphprune_<method>_plan`` node to the *side*
total (AT-EDM: G-WPR and copy-source logits; SiTo / ToMe: similarities). On the ``meta`` device nothing is
allocated, so the full SDXL architecture at a 128 x 128 latent is counted in about a minute.
"""

from __future__ import annotations

import copy
import gc
import logging
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from ..config import eager_compiler_options
from .calls import Template, with_sample_and_timestep

log = logging.getLogger(__name__)


def flop_counter():
    """A FlopCounterMode that also counts the CPU flash-attention op (missing from torch's registry)."""
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
        self.options = eager_compiler_options(options)
        self.reports: list[Any] = []
        self.graphs = 0
        self.counting = False
        self.flops = 0

    def backend(self, gm: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        from ..backend import graphprune_backend

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
                  tomesd_ratio: float | None = None, tomesd_proxy: str | None = None) -> dict[str, Any]:
    """FLOPs of the unpruned model and, per graphprune config, of the rewritten graphs (run with compiler="eager").

    ``inputs``: ``(args, kwargs)`` of one model call. ``configs``: name -> graphprune options. Returns the total,
    a ratio-0 coverage check, and per config the pruned sites' FLOP share ``f``, the Amdahl bound ``1/(1-f)`` and
    the FLOP bound (unpruned / rewritten FLOPs). With ``tomesd_ratio`` also tomesd's FLOPs measured on a patched
    eager copy (compared with the config named ``tomesd_proxy``).
    """
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

    if tomesd_ratio is not None:
        import tomesd

        patched = copy.deepcopy(unet)
        tomesd.apply_patch(patched, ratio=tomesd_ratio)
        torch.manual_seed(0)
        with torch.no_grad(), flop_counter() as fc2:
            patched(*args, **kwargs)
        tflops = int(fc2.get_total_flops())
        # tomesd swaps the class of every transformer block; it merges only where downsample <= max_downsample
        patched_blocks = sorted(n for n, m in patched.named_modules() if type(m).__name__.startswith("ToMe"))
        result["tomesd_measured"] = {"total_pruned": tflops, "flop_bound": total / tflops,
                                     "blocks_with_patched_class": patched_blocks}
        proxy = result["configs"].get(tomesd_proxy) if tomesd_proxy else None
        if proxy is not None:
            result["tomesd_measured"]["same_flops_as_" + tomesd_proxy] = tflops == proxy["total_pruned"]
        log.info("tomesd eager (measured directly): FLOPs %.4g -> %.4g (bound %.2fx)", total, tflops, total / tflops)
        del patched
        gc.collect()
    return result


def bounds_of(analysis: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The Amdahl and FLOP bounds of config ``name`` in a :func:`flop_analysis` result (None if absent)."""
    c = ((analysis or {}).get("configs") or {}).get(name)
    if c is None:
        return None
    return {"source": name, "f": c["f"], "ideal": c["ideal_bound"], "flop": c["flop_bound"],
            "pruned_sites": len(c["pruned_sites"])}


class _SideCounter(torch.fx.Interpreter):
    """Runs a graph; FLOPs spent inside plan nodes go to ``side``."""

    def __init__(self, gm: GraphModule, counter: Any):
        super().__init__(gm)
        self.counter = counter
        self.side = 0

    def run_node(self, n: Any) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        if n.op == "call_function" and getattr(n.target, "__name__", "").endswith("_plan"):
            self.side += self.counter.get_total_flops() - before
        return out


def graph_flops(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                options: dict[str, Any] | None) -> dict[str, Any]:
    """FLOPs of one call of ``model`` rewritten with graphprune ``options`` (None: unpruned).

    Returns {"total": all FLOPs, "side": FLOPs of the plan nodes, "graphs": graphs traced, "reports": site reports}.
    Step-aware configs must pin one variant (AT-EDM: ``dsap_phase="early"`` / ``"late"``, or ``dsap_steps=0``).
    """
    from ..methods import method_for, parse_options
    from ..passes.cut import copy_graph_module
    from ..passes.rewrite import prune_graph

    config = parse_options(dict(options or {"method": "tome", "ratio": 0.0}))
    if method_for(config).runtime(config) != "none":
        raise ValueError("graph_flops counts one graph: pin a variant (atedm: dsap_phase='early'/'late')")
    totals = {"total": 0, "side": 0, "graphs": 0, "reports": []}

    def backend(gm: GraphModule, example_inputs: list[Any]) -> Any:
        gm = copy_graph_module(gm)
        result = prune_graph(gm, config, method_for(config), warn_unpruned=False)
        totals["graphs"] += 1
        totals["reports"].append(result.report)
        # random inputs as zeros (their values do not change FLOPs; a meta device has no generator)
        rand = [torch.zeros(spec.shape, device=dev, dtype=torch.float32 if spec.kind == "normal" else torch.int64)
                for spec, dev in result.random_inputs]

        def run(*a: Any) -> Any:
            with flop_counter() as fc:
                interp = _SideCounter(gm, fc)
                out = interp.run(*a, *rand)
            totals["total"] += fc.get_total_flops()
            totals["side"] += interp.side
            return out

        return run

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    torch._dynamo.reset()
    return totals


def arch_flops(arch: str, latent: int, variants: dict[str, dict[str, Any] | None], batch: int = 1,
               device: str = "meta") -> dict[str, dict[str, Any]]:
    """Per variant name: FLOPs of one UNet call of a built-in architecture (random weights; ``meta`` = no memory).

    Returns name -> {"total", "side", "tflops", "vs_unpruned", "pruned_blocks"}.
    """
    import diffusers

    from ..archs import unet_config

    with torch.device(device):
        model = diffusers.UNet2DConditionModel(**unet_config(arch)).eval()
    cfg = model.config
    sample = torch.randn(batch, cfg.in_channels, latent, latent, device=device)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, device=device)
    kwargs: dict[str, Any] = {}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text_dim, device=device),
                                       "time_ids": torch.randn(batch, 6, device=device)}
    args = (sample, torch.tensor(500, device=device), ctx)
    out: dict[str, dict[str, Any]] = {}
    base = None
    for name, options in variants.items():
        r = graph_flops(model, args, kwargs, options)
        if base is None:
            base = r["total"]
        blocks = [s for rep in r["reports"] for s in rep.sites if s.kind == "block" and s.status == "pruned"]
        out[name] = {"options": options, "total": int(r["total"]), "side": int(r["side"]),
                     "tflops": r["total"] / 1e12, "side_tflops": r["side"] / 1e12, "vs_unpruned": r["total"] / base,
                     "pruned_blocks": [(s.module_path, s.N, s.K) for s in blocks]}
        log.info("%s: %.3f TFLOPs (side %.3f) per UNet call", name, r["total"] / 1e12, r["side"] / 1e12)
    return out


def flops_per_kind(unet: torch.nn.Module, options: dict[str, Any] | None, template: Template,
                   timesteps: Any) -> dict[str, float]:
    """FLOPs of one model call per step kind (``full``, ``shallow``, ...) of a graphprune config (None: the
    unpruned model): the rewritten graphs run eagerly under FlopCounterMode along ``timesteps`` until every kind
    the runtime uses was seen. ``template``: one call's ``(args, kwargs)``."""
    from ..backend import graphprune_backend
    from ..runtime.steps import StepRuntime

    sample = template[0][0]
    counts: dict[str, float] = {}
    if options is None:
        args, kwargs = with_sample_and_timestep(template, sample, timesteps[0])
        with flop_counter() as fc:
            unet(*args, **kwargs)
        return {"full": float(fc.get_total_flops())}

    def counting(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:  # runs inside the compiled frame: the eager FX graph's aten ops are counted
            with flop_counter() as fc:
                out = fn(*args)
            counts.setdefault(kind, float(fc.get_total_flops()))
            return out
        return run

    made: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        fn = graphprune_backend(gm, example_inputs, options=eager_compiler_options(options))
        made.append(fn)
        return fn if isinstance(fn, StepRuntime) else counting("full", fn)

    torch._dynamo.reset()
    fast = torch.compile(unet, backend=backend)
    wrapped: set[int] = set()
    for t in timesteps:
        for rt in made:
            for variant in getattr(rt, "variants", {}).values():
                if id(variant) not in wrapped:
                    variant.fn = counting(variant.kind, variant.fn)
                    wrapped.add(id(variant))
        args, kwargs = with_sample_and_timestep(template, sample, t)
        fast(*args, **kwargs)
        stateful = any(isinstance(m, StepRuntime) for m in made)
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


__all__ = ["flop_counter", "flop_analysis", "bounds_of", "graph_flops", "arch_flops", "flops_per_kind",
           "catome_flops", "module_flops", "GraphFlops"]
