"""The steps a speed-quality sweep takes for every point, shared by the random-weights sweep
(:mod:`graphprune.bench.pareto`) and the real-weights one (:mod:`graphprune.bench.realweights`).

    timer, rows = unpruned_timer(model, template, opts, device)   # baseline timed alone; eager paired with it
    point["speed"] = time_point(v, model, template, timer, opts)  # one variant, every timed call paired
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch

from .calls import Template, timestep_calls
from .env import environment
from .frontier import SCHEMA_VERSION
from .options import ParetoOptions
from .timing import PairedTimer
from .variants import TOMESD, Built, Variant, variant

log = logging.getLogger(__name__)


def sweep_header(opts: ParetoOptions, model: torch.nn.Module, template: Template, device: torch.device,
                 dtype: torch.dtype, methods: Sequence[str]) -> dict[str, Any]:
    """The environment header of a sweep plus what it swept and how it timed."""
    return environment(device, dtype, module=model, template=template, schema=SCHEMA_VERSION,
                       model=opts.model or opts.arch, methods=list(methods), ratios=list(opts.ratios),
                       speed_compiler=opts.speed_compiler, quality_compiler=opts.quality_compiler, runs=opts.runs,
                       warmup=opts.warmup, inductor_cache_fresh=not opts.keep_inductor_cache,
                       protocol=opts.protocol().describe() + ("" if opts.interleave else " (--no-interleave: "
                                                              "variants timed alone, median / median)"),
                       options=dataclasses.asdict(opts))


def unpruned_timer(model: torch.nn.Module, template: Template, opts: ParetoOptions, device: torch.device
                   ) -> tuple[PairedTimer, dict[str, Any]]:
    """The unpruned model under ``opts.speed_compiler``, timed alone: the baseline of every speedup, kept compiled
    for the pairs. Returns the timer and the baseline rows (``inductor`` and ``eager``, eager paired with the
    compiled baseline)."""
    n = opts.protocol().calls()
    base = variant(opts.speed_compiler).build(model).fn
    timer = PairedTimer(opts.protocol(), timestep_calls(base, template, n), device=device, paired=opts.interleave,
                        desc=f"{opts.speed_compiler} (unpruned)")
    rows: dict[str, Any] = {opts.speed_compiler: timer.baseline, "speed_baseline": opts.speed_compiler}
    if opts.speed_compiler != "eager":
        rows["eager"] = timer.time(timestep_calls(model, template, n), "eager (unpruned)")
    return timer, rows


def time_point(v: Variant, model: torch.nn.Module, template: Template, timer: PairedTimer, opts: ParetoOptions,
               built: Built | None = None) -> dict[str, Any]:
    """Speed of one point: graphprune under ``opts.speed_compiler``, tomesd eager (its monkey-patch; ``built``
    reuses an already patched copy). Returns ``{"speed": ..., "speedup": ...}`` and with ``--tomesd-inductor``
    tomesd's copy under ``torch.compile`` too (``speed_inductor``, ``speedup_inductor``)."""
    n = opts.protocol().calls()
    out: dict[str, Any] = {}
    if v.method == TOMESD:
        built = built or v.build(model)
        out["speed"] = timer.time(timestep_calls(built.fn, template, n), f"{v.label} (eager)")
        out["speed_note"] = f"tomesd eager (monkey-patched modules) vs the unpruned model ({opts.speed_compiler})"
        if opts.tomesd_inductor:
            compiled = torch.compile(built.patched)
            out["speed_inductor"] = timer.time(timestep_calls(compiled, template, n), f"{v.label} + inductor")
            timer.reset()  # the patched copy's graph breaks leave the UNet's forward uncompiled for later variants
            out["speedup_inductor"] = out["speed_inductor"]["speedup"]
    else:
        fn = v.build(model, compiler=opts.speed_compiler).fn
        out["speed"] = timer.time(timestep_calls(fn, template, n), v.label)
    out["speedup"] = out["speed"]["speedup"]
    return out


__all__ = ["sweep_header", "unpruned_timer", "time_point"]
