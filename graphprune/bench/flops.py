"""FLOPs of one UNet call, unpruned vs rewritten, with the ranking side computation counted apart
(entry points: :func:`graph_flops`, :func:`arch_flops`).

Counting runs the rewritten FX graph through an :class:`torch.fx.Interpreter` inside ``FlopCounterMode`` and
attributes the FLOPs of every ``graphprune_<method>_plan`` node (AT-EDM: G-WPR and the copy-source logits; SiTo /
ToMe: similarities) to the *side* total. On the ``meta`` device nothing is allocated, so the full SDXL architecture
at a 128 x 128 latent is counted in about a minute of tracing (``arch_flops("sdxl", 128, device="meta")``).

FlopCounterMode counts 2 FLOPs per multiply-add of matmuls, convolutions and attention (softmax, norms and
elementwise ops are not counted), the convention of the FLOP figures in papers (SD-XL: 6.7 TFLOPs per call).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.fx import GraphModule

from .common import flop_counter

log = logging.getLogger(__name__)


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


__all__ = ["graph_flops", "arch_flops"]
