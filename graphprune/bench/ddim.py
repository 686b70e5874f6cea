"""A seeded DDIM loop with classifier-free guidance, started from photo latents: the quality probe of the harness.

    template = example_inputs(model, latent=32, batch=2)              # (args, kwargs): uncond row 0, cond row 1
    start = loop_start(model, latent=32, images=1, seed=0)            # photo latents + seeded noise
    final = ddim_loop(model, template, start, LoopSpec(steps=20))     # (images, C, H, W), float32

The start is img2img-style: the photo latent ``x0`` (from the images bundled with scikit-image,
:func:`graphprune.inputs.image_latents`) is noised to the loop's first timestep with
``scheduler.add_noise(x0, noise, t0)``. ``strength`` sets how far: the schedule has ``round(steps / strength)``
steps and the loop runs its last ``steps``, so ``steps`` UNet calls (each with batch 2 for CFG) start at
``t0 ~ strength * 1000``. At strength 1 the photo is drowned in noise (alpha_bar(999) ~ 0.005) and the tokens
lose the structure that similarity-based methods use; 0.7 keeps it visible (alpha_bar ~ 0.07 at t0 = 700).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .calls import Template, model_output, rel_error, with_sample_and_timestep
from .options import LoopSpec

log = logging.getLogger(__name__)

#: SD1.x's DDIM scheduler config (diffusers' scheduler_config.json of SD1.5, with DDIM's own keys); built locally.
SD_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1, prediction_type="epsilon")


@dataclass
class LoopStart:
    """Photo latents ``x0`` (images, C, H, W) and seeded Gaussian ``noise`` of the same shape."""

    x0: torch.Tensor
    noise: torch.Tensor


def make_scheduler(config: dict[str, Any] | None = None) -> Any:
    """A diffusers ``DDIMScheduler`` from a config dict (default :data:`SD_SCHEDULER`; no download)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(config or SD_SCHEDULER))


def loop_timesteps(scheduler: Any, spec: LoopSpec) -> torch.Tensor:
    """The ``spec.steps`` timesteps the loop runs (descending): the tail of a ``round(steps / strength)`` schedule."""
    total = max(spec.steps, int(round(spec.steps / spec.strength)))
    scheduler.set_timesteps(total)
    return scheduler.timesteps[total - spec.steps:]


def loop_start(model: torch.nn.Module, latent: int, images: int = 1, seed: int = 0) -> LoopStart:
    """Photo latents (images, C, latent, latent), C = the model's ``in_channels``, and seeded noise like them."""
    from ..inputs import image_latents

    channels = int(model.config.in_channels)
    x0 = image_latents(images, channels, latent, latent)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return LoopStart(x0=x0, noise=noise)


def ddim_loop(fn: Callable[..., Any], template: Template, start: LoopStart, spec: LoopSpec,
              scheduler_config: dict[str, Any] | None = None, progress: str | None = None,
              on_call: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """Run the seeded CFG DDIM loop for every photo in ``start``; returns the final latents (images, C, H, W), fp32.

    ``fn``: the model (or a compiled/patched version of it), called as ``fn(*args, **kwargs)`` with the
    ``template``'s conditioning (batch 2: row 0 unconditional, row 1 conditional) and the current latent repeated
    twice. Guidance: ``eps = eps_u + g * (eps_c - eps_u)``. Same ``start`` and ``spec`` -> same noise, same steps.
    ``on_call(i, seconds)``: the wall time of the i-th model call of each loop (device synchronized around it).
    """
    from tqdm import tqdm

    args, _ = template
    dtype, device = args[0].dtype, args[0].device
    channels = start.x0.shape[1]
    finals = []
    for i in range(start.x0.shape[0]):
        scheduler = make_scheduler(scheduler_config)
        timesteps = loop_timesteps(scheduler, spec)
        x = scheduler.add_noise(start.x0[i:i + 1], start.noise[i:i + 1], timesteps[:1]).to(device, dtype)
        for step, t in enumerate(tqdm(timesteps, desc=progress or "ddim", leave=False, unit="step",
                                      disable=progress is None)):
            call_args, call_kwargs = with_sample_and_timestep(template, torch.cat([x, x]), t)
            if on_call is None:
                eps = model_output(fn(*call_args, **call_kwargs), channels)
            else:
                _sync(device)
                t0 = time.perf_counter()
                eps = model_output(fn(*call_args, **call_kwargs), channels)
                _sync(device)
                on_call(step, time.perf_counter() - t0)
            eps_u, eps_c = eps[0:1], eps[1:2]
            eps = eps_u + spec.guidance * (eps_c - eps_u)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        finals.append(x.float())
    return torch.cat(finals)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of ``out`` against ``ref`` with the reference's dynamic range as the peak: 10 log10(range^2/MSE)."""
    out, ref = out.double(), ref.double()
    mse = float(((out - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


__all__ = ["LoopSpec", "LoopStart", "SD_SCHEDULER", "make_scheduler", "loop_timesteps", "loop_start", "ddim_loop",
           "with_sample_and_timestep", "model_output", "rel_error", "psnr"]
