"""End to end: build or load a pipeline, apply a method, generate images, time them (entry point: :func:`generate`;
the command is ``graphprune generate``).

    results = generate(GenerateOptions(arch="tiny", options={"method": "tome"}, prompts=["a red rocket"], out="out/"))
    # out/000_a-red-rocket.png, and per image: seconds, s/it, and with compare=True the unpruned pipeline's time

``arch`` builds a pipeline with random weights and no text encoder (:func:`graphprune.archs.build_pipeline`; the
prompt then only seeds its embeddings, :func:`graphprune.archs.prompt_embeddings`); ``model`` loads a local diffusers
pipeline folder (real weights, its own tokenizer and text encoder). With ``compare`` every image is generated twice,
unpruned and pruned, alternately (paired, the same seed), and the line reports the ratio and the difference. The first
pruned image includes graphprune's compile; its time is reported apart.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .archs import build_pipeline, load_pipeline, prompt_embeddings
from .methods import parse_options
from .pipeline import apply, unpruned

log = logging.getLogger(__name__)


@dataclass
class GenerateOptions:
    """What :func:`generate` runs.

    Important args:
        arch / model: a built-in architecture (random weights) or a local diffusers pipeline folder.
        options: graphprune options (``{"method": "sito", "ratio": 0.5}``; ``{}`` is the default configuration).
        prompts, steps, seed, height, width, guidance: the images (one per prompt, the seed fixed per image).
        out: folder for the PNGs.
        compare: also generate each image unpruned, alternating, and report the paired speed ratio.
    """

    arch: str | None = "tiny"
    model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=lambda: ["a photo of an astronaut riding a horse"])
    negative_prompt: str = ""
    steps: int = 20
    seed: int = 0
    height: int | None = None
    width: int | None = None
    guidance: float = 7.5
    out: str = "out"
    compare: bool = False
    dtype: str = "float32"


@dataclass
class ImageResult:
    """One generated image: where it went and how long it took."""

    path: str
    prompt: str
    seconds: float
    seconds_per_step: float
    first: bool  # the first pruned image (it includes graphprune's compile)
    unpruned_seconds: float | None = None
    psnr_vs_unpruned: float | None = None

    def line(self) -> str:
        text = f"{self.path}: {self.seconds:.2f} s, {self.seconds_per_step:.3f} s/it"
        if self.first:
            text += " (includes the compile)"
        if self.unpruned_seconds is not None:
            text += f"; unpruned {self.unpruned_seconds:.2f} s -> {self.unpruned_seconds / self.seconds:.2f}x"
            if not self.first:
                text += " (paired)"
        if self.psnr_vs_unpruned is not None:
            text += f", PSNR vs unpruned {self.psnr_vs_unpruned:.1f} dB"
        return text


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "image"


def pipeline_of(opts: GenerateOptions) -> Any:
    """The pipeline of ``opts``: built from a built-in architecture, or loaded from a local folder."""
    dtype = getattr(torch, opts.dtype)
    if opts.model:
        return load_pipeline(opts.model, dtype=dtype)
    if not opts.arch:
        raise ValueError("give an architecture (arch=...) or a local pipeline folder (model=...)")
    return build_pipeline(opts.arch, dtype=dtype)


def _call(pipe: Any, opts: GenerateOptions, prompt: str, text_encoder: bool) -> np.ndarray:
    kwargs: dict[str, Any] = {"num_inference_steps": opts.steps, "guidance_scale": opts.guidance,
                              "generator": torch.Generator().manual_seed(opts.seed), "output_type": "np"}
    if opts.height:
        kwargs["height"] = opts.height
    if opts.width:
        kwargs["width"] = opts.width
    if text_encoder:
        kwargs.update(prompt=prompt, negative_prompt=opts.negative_prompt or None)
    else:
        kwargs.update(prompt_embeddings(pipe, prompt, opts.negative_prompt))
    return pipe(**kwargs).images[0]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _baseline(pipe: Any, opts: GenerateOptions) -> Any:
    """The unpruned UNet under the same inner compiler as graphprune's (plain Inductor, or eager)."""
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    original = getattr(pipe, "_graphprune_original_unet", (name, getattr(pipe, name)))[1]
    compiler = parse_options(opts.options).compiler
    if compiler == "eager":
        return original
    return torch.compile(original, backend="inductor" if compiler in ("inductor", "tensorrt") else compiler)


def generate(opts: GenerateOptions, pipe: Any = None) -> list[ImageResult]:
    """Generate one image per prompt with graphprune applied (see the module docstring); PNGs into ``opts.out``."""
    from PIL import Image

    pipe = pipe if pipe is not None else pipeline_of(opts)
    text_encoder = getattr(pipe, "text_encoder", None) is not None
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[ImageResult] = []
    apply(pipe, options=dict(opts.options))
    baseline = _baseline(pipe, opts) if opts.compare else None
    for i, prompt in enumerate(opts.prompts):
        unpruned_image = unpruned_s = None
        if baseline is not None:
            with unpruned(pipe, baseline):
                if i == 0:  # the baseline's own compile happens outside the timed call
                    _call(pipe, opts, prompt, text_encoder)
                start = time.perf_counter()
                unpruned_image = _call(pipe, opts, prompt, text_encoder)
                unpruned_s = time.perf_counter() - start
        start = time.perf_counter()
        image = _call(pipe, opts, prompt, text_encoder)
        seconds = time.perf_counter() - start
        path = out / f"{i:03d}_{_slug(prompt)}.png"
        Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
        result = ImageResult(path=str(path), prompt=prompt, seconds=seconds, seconds_per_step=seconds / opts.steps,
                             first=i == 0, unpruned_seconds=unpruned_s,
                             psnr_vs_unpruned=_psnr(image, unpruned_image) if unpruned_image is not None else None)
        log.info("%s", result.line())
        results.append(result)
    return results


__all__ = ["GenerateOptions", "ImageResult", "generate", "pipeline_of"]
