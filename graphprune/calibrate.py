"""Calibrate MagCache on a model (entry point: :func:`calibrate`; the command is ``graphprune calibrate``).

    calib = graphprune.calibrate(unet, lambda fast: my_denoising_loop(fast))          # any loop, one generation
    calib = graphprune.calibrate(pipe, lambda pipe: pipe("a photo", num_inference_steps=50))
    calib.save("calib.json"); calib.plot("calib.png")
    torch.compile(unet, backend="graphprune", options={"method": "deepcache", "policy": "magcache",
                                                       "calibration": "calib.json", "error_budget": 0.1})

The model is compiled with ``method="deepcache"`` and every step in full (``cache_interval=1``, the rewritten graphs
run eagerly by default); after each UNet call the cut tensor of that call (the feature a cached step would reuse)
is compared with the previous call's of the same cache context: MagCache's magnitude ratio
``mean(||f_i|| / ||f_(i-1)||)`` (norms over channels, mean over batch and positions), its standard deviation and
the mean cosine distance. Several generations are averaged call by call. The result is tied to the model (its
parameter shapes and a weights checksum, :func:`graphprune.calibration.model_fingerprint`) and to the cut.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from .backend import graphprune_backend
from .calibration import Calibration, now

log = logging.getLogger(__name__)


def feature_ratio(current: torch.Tensor, previous: torch.Tensor) -> tuple[float, float, float]:
    """current, previous: (B, C, H, W) -> (mean, std of ||current|| / ||previous|| over (B, H, W), mean cosine
    distance), norms over the channel dim (MagCache's ``norm_ratio``, ``norm_std``, ``cos_dis`` with tokens =
    positions)."""
    cur, prev = current.float(), previous.float()
    ratio = cur.norm(dim=1) / (prev.norm(dim=1) + 1e-8)
    cosine = 1 - F.cosine_similarity(cur, prev, dim=1, eps=1e-8)
    return float(ratio.mean()), float(ratio.std()), float(cosine.mean())


def _version() -> str:
    try:
        return importlib.metadata.version("graphprune")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _denoiser(obj: Any) -> tuple[torch.nn.Module, str | None]:
    if isinstance(obj, torch.nn.Module):
        return obj, None
    for name in ("unet", "transformer"):
        if isinstance(getattr(obj, name, None), torch.nn.Module):
            return getattr(obj, name), name
    raise TypeError(f"expected a UNet module or a pipeline with .unet, got {type(obj).__name__}")


def calibrate(model: Any, run: Callable[[Any], Any], cache_branch: int = 0, cfg: str = "batch",
              compiler: str = "eager", loop: Mapping[str, Any] | None = None) -> Calibration:
    """Run ``run`` once with every step in full and measure the cached feature's magnitude ratios per call.

    model: a UNet module (``run`` receives the compiled module) or a diffusers pipeline (``run`` receives the
    pipeline, whose ``.unet`` is swapped for the compiled one during the call and restored after). cache_branch, cfg:
    as the runtime that will use the calibration (``cfg="split"``: one ratio list per cache context). loop: facts
    about the run to store in the file (steps, scheduler, guidance, latent size).
    """
    module, attr = _denoiser(model)
    options = {"method": "deepcache", "cache_interval": 1, "cache_branch": cache_branch, "cfg": cfg,
               "compiler": compiler}
    runtimes: list[Any] = []
    sequences: dict[tuple[int, int, str], list[tuple[float, float, float]]] = {}
    previous: dict[tuple[int, int, str], torch.Tensor] = {}

    def observe(runtime: Any, ctx: Any, record: Any, state: Any) -> None:
        key = (id(runtime), runtime.generation, ctx.name)
        feature = state.cache.detach().clone()
        if record.step == 0 or key not in previous:
            sequences[key] = [(1.0, 0.0, 0.0)]
        else:
            sequences[key].append(feature_ratio(feature, previous[key]))
        previous[key] = feature

    def backend(gm: Any, example_inputs: Any) -> Any:
        runtime = graphprune_backend(gm, example_inputs, options=dict(options), register_runtime=False)
        runtime.observers.append(lambda ctx, record, state: observe(runtime, ctx, record, state))
        runtimes.append(runtime)
        return runtime

    compiled = torch.compile(module, backend=backend)
    with torch.no_grad():
        if attr is None:
            run(compiled)
        else:
            setattr(model, attr, compiled)
            try:
                run(model)
            finally:
                setattr(model, attr, module)
    if not sequences:
        raise RuntimeError("graphprune.calibrate: the run made no UNet call through the compiled model")
    by_context: dict[str, list[list[tuple[float, float, float]]]] = {}
    for (_, _, context), seq in sequences.items():
        by_context.setdefault(context or "batch", []).append(seq)
    lengths = {len(seq) for seqs in by_context.values() for seq in seqs}
    if len(lengths) > 1:
        raise ValueError(f"graphprune.calibrate: the run's generations (or cache contexts) made different numbers of "
                         f"UNet calls {sorted(lengths)}; run generations of one length")

    def average(column: int) -> dict[str, tuple[float, ...]]:  # over generations, call by call
        return {c: tuple(sum(seq[i][column] for seq in seqs) / len(seqs) for i in range(len(seqs[0])))
                for c, seqs in by_context.items()}

    runtime = runtimes[-1]
    config = getattr(module, "config", None)
    model_info = {**runtime.model_fingerprint(), "class": type(module).__name__,
                  "config": json.loads(json.dumps(dict(config), default=str)) if isinstance(config, Mapping) else None}
    generations = len(next(iter(by_context.values())))
    calibration = Calibration(ratios=average(0), model=model_info, cache_branch=cache_branch,
                              resnet=runtime.cut.resnet, cfg=cfg, loop={**dict(loop or {}), "generations": generations},
                              std=average(1), cosine=average(2), graphprune=_version(), created=now(),
                              source="<calibrate>")
    log.info("graphprune.calibrate: %d calls per generation, context(s) %s, %d generation(s)",
             calibration.num_steps, ", ".join(calibration.ratios), generations)
    return calibration


__all__ = ["calibrate", "feature_ratio"]
