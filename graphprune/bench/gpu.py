"""The one-command GPU run: per-call and whole-loop times of SD1.5 and SDXL in fp16, paired against Inductor.

    benchmarks/gpu.sh --wheels wheels/                  # on the GPU machine: install the carried wheels, run
    graphprune bench gpu --models sd15:64 -o results/gpu  # SD1.5 only (512x512 images)
    graphprune bench gpu --quick -o /tmp/gpu             # dry run on CPU: tiny UNet, latent 16, 2 steps, eager

For every ``ARCH:LATENT`` of ``models`` (default SD1.5 at latent 64 = 512x512 images, SDXL at latent 128 =
1024x1024), in one process, on CUDA in fp16 (CPU fp32 when no GPU):

* **per call**: :func:`graphprune.bench.speed.run` with ``variants`` (Inductor, Inductor with CUDA graphs
  ``mode="reduce-overhead"``, graphprune's configurations under Inductor, ToDo, tomesd eager): every timed call
  paired with a call of the Inductor-compiled UNet (the paired timer), error vs eager, Amdahl/FLOP bounds;
* **whole loops**: :func:`graphprune.bench.steps.run` with ``step_variants`` (Inductor, CUDA graphs, graphprune
  deepcache N=3, the DeepCache package, graphprune tome): ``steps``-step CFG DDIM generations, each timed
  generation paired with an Inductor generation, final-latent error vs Inductor's.

Nothing here times anything itself: the two benchmarks do, with their own options (``runs``, ``warmup``, the
Inductor cache). Outputs in ``out``: ``gpu.json`` (both parts per model, the environment header), ``gpu.md``
(the tables), and each part's own JSON (``speed_<arch>.json``, ``steps_<arch>.json``).

``compiler="eager"`` (``--quick``) runs the same code path without Inductor (the baseline is then eager, the
``inductor*`` variants run Dynamo's eager backend, graphprune variants their rewritten graph without Inductor,
peers' ``+inductor`` copies are left out): the test suite's dry run, so this script never rots.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from .options import GpuOptions, SpeedOptions, StepsOptions
from .output import write_json
from .variants import CATALOGUE, variant

log = logging.getLogger(__name__)


def eager_form(name: str) -> str | None:
    """The dry-run (no Inductor) form of a variant name: ``inductor*`` -> ``dynamo-eager`` (``inductor`` itself ->
    ``eager``, the baseline), graphprune entries -> their ``-fx`` form / ``:compiler=eager``, peers' ``+inductor``
    copies -> None (left out)."""
    v = variant(name)
    if v.kind == "inductor":
        return "eager" if name == "inductor" else "dynamo-eager"
    if v.kind == "graphprune":
        return name + "-fx" if name in CATALOGUE else name + ":compiler=eager"
    return None if v.inductor else name


def resolved(names: Sequence[str], compiler: str) -> list[str]:
    """``names`` as they run under ``compiler`` (see :func:`eager_form`), duplicates dropped, order kept."""
    if compiler == "inductor":
        return list(dict.fromkeys(names))
    return [n for n in dict.fromkeys(eager_form(n) for n in names) if n is not None]


def run(opts: GpuOptions) -> dict[str, Any]:
    """Both parts for every model; returns ``{"models": {spec: {"speed": ..., "steps": ...}}, "table", "failed"}``
    (also in ``opts.out``: gpu.json, gpu.md)."""
    from . import speed, steps

    opts.check()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = dict(runs=opts.runs, warmup=opts.warmup, retries=opts.retries, retry_wait=opts.retry_wait,
                    contention=opts.contention, threads=opts.threads, keep_inductor_cache=opts.keep_inductor_cache)
    call_names, step_names = resolved(opts.variants, opts.compiler), resolved(opts.step_variants, opts.compiler)
    result: dict[str, Any] = {"options": opts.as_dict(), "models": {}}
    md = [f"# graphprune GPU run\n\nper call: {', '.join(call_names)}; whole loops ({opts.steps} steps): "
          f"{', '.join(step_names) or '-'}\n"]
    for arch, latent in opts.model_specs():
        key = f"{arch}:{latent}"
        log.info("%s: per call", key)
        part = result["models"][key] = {}
        part["speed"] = speed.run(SpeedOptions(arch=arch, latents=(latent,), variants=tuple(call_names),
                                               out=str(out / f"speed_{arch}.json"), **protocol))
        md += [f"## {arch}, latent {latent} ({latent * 8}x{latent * 8} images): one UNet call, batch 2\n",
               "```", part["speed"]["table"], "```\n"]
        if step_names:
            log.info("%s: %d-step loops", key, opts.steps)
            part["steps"] = steps.run(StepsOptions(arch=arch, latent=latent, steps=opts.steps,
                                                   variants=tuple(step_names), out=str(out / f"steps_{arch}.json"),
                                                   **{**protocol, "runs": 1, "warmup": 0}))
            md += [f"## {arch}, latent {latent}: whole {opts.steps}-step CFG DDIM generations\n",
                   part["steps"]["table"], ""]
        write_json(result, out / "gpu.json")  # partial results survive a crash
    result["failed"] = [f"{k}/speed/{f}" for k, p in result["models"].items() for f in p["speed"]["failed"]] + \
                       [f"{k}/steps/{f}" for k, p in result["models"].items() for f in p.get("steps", {}).get("failed", [])]
    result["table"] = "\n".join(md)
    (out / "gpu.md").write_text(result["table"] + "\n")
    write_json(result, out / "gpu.json")
    log.info("wrote %s (gpu.json, gpu.md)", out)
    return result


__all__ = ["run", "resolved", "eager_form", "GpuOptions"]
