"""One model call as the benchmarks make it: a call template, its timestep replaced, its noise prediction read back.

    template = example_inputs(model, latent=32, batch=2)          # (args, kwargs): graphprune.archs
    args, kwargs = with_sample_and_timestep(template, sample, 980)
    eps = model_output(model(*args, **kwargs), channels=4)        # (B, 4, H, W)
    timestep_schedule(5)                                          # [999, 980, 960, 940, 920]: distinct per call

A template is ``(args, kwargs)`` of one call: UNet-style ``(sample, t, context)`` or DiT-style ``(sample,)`` with
``kwargs["timestep"]``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Template = tuple[tuple[Any, ...], dict[str, Any]]


def timestep_schedule(n: int) -> list[int]:
    """n distinct timesteps 999, 980, 960, ..., 20, then 990, 970, ... (all distinct for n <= 99)."""
    out = [999] + [980 - 20 * i for i in range(49)] + [990 - 20 * i for i in range(49)]
    if n > len(out):
        raise ValueError(f"at most {len(out)} calls per variant")
    return out[:n]


def with_sample_and_timestep(template: Template, sample: torch.Tensor, t: Any) -> Template:
    """``template`` with its sample (``args[0]``) and timestep replaced.

    The timestep is ``kwargs["timestep"]`` where present (DiT-style), else ``args[1]`` (UNet-style); the new one
    keeps the template's shape, dtype and device (a scalar, or one value per batch row).
    """
    args, kwargs = template
    t = int(t)

    def like(old: Any) -> Any:
        if isinstance(old, torch.Tensor):
            return torch.full_like(old, t)
        return t

    if "timestep" in kwargs:
        return (sample, *args[1:]), {**kwargs, "timestep": like(kwargs["timestep"])}
    if len(args) < 2:
        raise ValueError("the model-call template has no timestep: expected args[1] or kwargs['timestep']")
    return (sample, like(args[1]), *args[2:]), kwargs


def model_output(result: Any, channels: int | None = None) -> torch.Tensor:
    """The noise prediction (B, channels, H, W) of a diffusers model output (``.sample``, a tuple, or a tensor).

    Models that also predict the variance (PixArt, DiT: ``out_channels = 2 * in_channels``) keep the first half
    when ``channels`` is given.
    """
    out = result.sample if hasattr(result, "sample") else result[0] if isinstance(result, (tuple, list)) else result
    return out[:, :channels] if channels is not None and out.shape[1] == 2 * channels else out


def timestep_calls(fn: Callable[..., Any], template: Template, n: int) -> Callable[[int], Any]:
    """``call(i)``: one call of ``fn`` on the template's sample at the i-th of ``n`` distinct timesteps.

    The calls the paired timer makes (:func:`graphprune.bench.timing.time_calls`): a different timestep per call,
    so a recompile on the timestep's value would show in the Dynamo counters.
    """
    steps = timestep_schedule(n)
    sample = template[0][0]

    def call(i: int) -> Any:
        args, kwargs = with_sample_and_timestep(template, sample, steps[i])
        return fn(*args, **kwargs)

    return call


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius), in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


__all__ = ["Template", "timestep_schedule", "with_sample_and_timestep", "model_output", "timestep_calls",
           "rel_error"]
