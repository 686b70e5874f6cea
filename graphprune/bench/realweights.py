"""Real weights: a local diffusers pipeline, images per method from a prompt file, compared with the unpruned images.

    graphprune bench pareto --model /path/to/local/pipeline --prompts prompts.txt -o results/real
    graphprune bench pareto --model PATH --prompt-embeds embeds.pt --inception pt_inception-2015-12-05.pth -o r/

Entry point: :func:`run_model` (called by :func:`graphprune.bench.pareto.run` when ``opts.model`` is given).

The pipeline is loaded with ``local_files_only=True`` (no hub access). For each variant (every method x ratio,
tomesd at each ratio) the pipeline's UNet is swapped for the pruned one and every prompt is generated with the
same seed (``seed + prompt index``) as the unpruned run. Per image: PSNR and SSIM against the unpruned image
(``skimage.metrics``, RGB in [0, 1]). With ``--inception PATH`` (and/or ``--clip PATH``), the Frechet distance
between the pruned and the unpruned image sets through torch-fidelity (Inception = FID, CLIP ViT-B/32 features =
FD-CLIP); it needs many images to mean anything, and torch-fidelity itself needs torchvision. Speed: the
pipeline's UNet timed at the generation shape by the paired timer against the unpruned UNet (``--no-speed`` to skip).
"""

from __future__ import annotations

import logging
import re
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .env import format_header
from .flops import bounds_of, flop_analysis
from .frontier import finish, save
from .options import ParetoOptions, resolve_methods
from .sweep import sweep_header, time_point, unpruned_timer
from .timing import reset
from .variants import TOMESD, grid

log = logging.getLogger(__name__)


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A UNet pipeline from a local folder (:func:`graphprune.archs.load_pipeline`), progress bars off."""
    from ..archs import load_pipeline as load_local

    pipe = load_local(path, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if not hasattr(pipe, "unet"):
        raise ValueError(f"{type(pipe).__name__} has no .unet; --model supports UNet pipelines (SD1.x/2.x/XL)")
    return pipe


def read_prompts(opts: ParetoOptions) -> list[dict[str, Any]]:
    """One dict of pipeline keyword arguments per image: ``{"prompt": str}`` or precomputed embeddings.

    ``--prompts``: a text file, one prompt per line (blank lines and lines starting with '#' skipped).
    ``--prompt-embeds``: ``torch.save`` of a tensor (P, T, D), or a dict with ``prompt_embeds`` (P, T, D) and
    optionally ``negative_prompt_embeds`` (P, T, D) (zeros otherwise; pipelines need both for CFG).
    """
    if opts.prompt_embeds:
        blob = torch.load(opts.prompt_embeds, map_location="cpu", weights_only=True)
        pos = blob["prompt_embeds"] if isinstance(blob, dict) else blob
        neg = blob.get("negative_prompt_embeds") if isinstance(blob, dict) else None
        if pos.ndim != 3:
            raise ValueError(f"prompt embeddings must be (P, T, D), got {tuple(pos.shape)}")
        neg = torch.zeros_like(pos) if neg is None else neg
        return [{"prompt_embeds": pos[i:i + 1], "negative_prompt_embeds": neg[i:i + 1]} for i in range(len(pos))]
    lines = Path(opts.prompts).read_text().splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"{opts.prompts} holds no prompts")
    return [{"prompt": p} for p in prompts]


def generate(pipe: Any, prompts: list[dict[str, Any]], opts: ParetoOptions, desc: str) -> list[np.ndarray]:
    """One image (H, W, 3) float in [0, 1] per prompt, seeded ``opts.seed + i``."""
    from tqdm import tqdm

    size = opts.latent * int(getattr(pipe, "vae_scale_factor", 8))
    images = []
    for i, kw in enumerate(tqdm(prompts, desc=desc, leave=False, unit="image")):
        g = torch.Generator("cpu").manual_seed(opts.seed + i)
        out = pipe(**kw, num_inference_steps=opts.steps, guidance_scale=opts.guidance, height=size, width=size,
                   generator=g, output_type="np")
        images.append(np.clip(np.asarray(out.images[0], dtype=np.float64), 0.0, 1.0))
    return images


def image_metrics(images: list[np.ndarray], refs: list[np.ndarray]) -> dict[str, Any]:
    """Per-image PSNR (dB, data range 1) and SSIM (RGB, data range 1) against the unpruned images, and means."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnrs, ssims = [], []
    for img, ref in zip(images, refs):
        psnrs.append(float(peak_signal_noise_ratio(ref, img, data_range=1.0)) if not np.array_equal(img, ref)
                     else float("inf"))
        win = min(7, min(ref.shape[:2]) // 2 * 2 - 1)
        ssims.append(float(structural_similarity(ref, img, data_range=1.0, channel_axis=-1, win_size=win)))
    return {"psnr_per_image": psnrs, "ssim_per_image": ssims, "psnr_mean": float(np.mean(psnrs)),
            "ssim_mean": float(np.mean(ssims))}


def save_images(images: list[np.ndarray], folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def fidelity(pruned: Path, unpruned: Path, opts: ParetoOptions) -> dict[str, Any]:
    """FID (``--inception``) and FD in CLIP feature space (``--clip``) between two image folders, via torch-fidelity.

    Returns ``{"fid": x, "fd_clip": y}`` for what was asked, or ``{"skipped": reason}``: no weights given, or
    torch-fidelity (which imports torchvision) not importable.
    """
    if not opts.inception and not opts.clip:
        return {"skipped": "no --inception/--clip weights given: FID/CLIP not computed (no download is attempted)"}
    try:
        import torch_fidelity
    except ImportError as exc:
        return {"skipped": f"torch-fidelity is not importable ({exc}); pip install torch-fidelity (it needs "
                           "torchvision) to get FID/CLIP"}
    out: dict[str, Any] = {}
    common = dict(input1=str(pruned), input2=str(unpruned), fid=True, cuda=torch.cuda.is_available(),
                  verbose=False, cache=False)
    for key, extractor, path, metric in (("fid", "inception-v3-compat", opts.inception, "frechet_inception_distance"),
                                         ("fd_clip", "clip-vit-b-32", opts.clip, "frechet_inception_distance")):
        if path:
            try:
                m = torch_fidelity.calculate_metrics(**common, feature_extractor=extractor,
                                                     feature_extractor_weights_path=str(path))
                out[key] = float(m[metric])
            except Exception as exc:  # noqa: BLE001
                out[key + "_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def run_model(opts: ParetoOptions) -> dict[str, Any]:
    """The real-weights sweep; writes pareto.json / pareto.txt / pareto.png and the images under ``opts.out``."""
    from tqdm import tqdm

    from ..archs import example_inputs

    methods = resolve_methods(opts.methods)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(opts.model, dtype=dtype).to(device)
    unet = pipe.unet
    prompts = read_prompts(opts)
    template = example_inputs(unet, latent=opts.latent, batch=2, seed=opts.seed, structured=True)
    header = sweep_header(opts, unet, template, device, dtype, methods)
    header["pipeline"] = type(pipe).__name__
    header["loop"] = (f"{type(pipe).__name__}: {len(prompts)} prompt(s), {opts.steps} steps "
                      f"({type(pipe.scheduler).__name__}), CFG {opts.guidance}, seeds {opts.seed}..")
    log.info("%s", format_header(header))
    out_dir = Path(opts.out)
    result: dict[str, Any] = {"header": header, "baseline": {}, "points": []}

    ref_images = generate(pipe, prompts, opts, "unpruned")
    ref_dir = save_images(ref_images, out_dir / "images" / "unpruned")
    variants = grid(methods, opts.ratios, opts.tomesd)
    timer = None
    if opts.speed:
        if opts.flops:
            configs = {v.label: v.options for v in variants if v.options is not None and v.error is None}
            try:
                result["flops"] = flop_analysis(unet, template, configs)
            except Exception:  # noqa: BLE001
                result["flops"] = {"error": traceback.format_exc()}
            reset()
        timer, rows = unpruned_timer(unet, template, opts, device)
        result["baseline"].update(rows)

    fid_note = None
    for v in tqdm(variants, desc="variants", unit="variant"):
        point: dict[str, Any] = {"label": v.label, "method": v.method, "ratio": v.ratio, "options": v.options}
        if v.error:
            point["error"] = v.error
            result["points"].append(point)
            continue
        try:
            built = v.build(unet, compiler=opts.quality_compiler)
            pipe.unet = built.fn
            try:
                images = generate(pipe, prompts, opts, v.label)
            finally:
                pipe.unet = unet
            folder = save_images(images, out_dir / "images" / _slug(v.label))
            point["quality"] = image_metrics(images, ref_images)
            point["quality"]["images"] = str(folder)
            point["quality"].update(fidelity(folder, ref_dir, opts))
            fid_note = point["quality"].get("skipped", fid_note)
            if timer is not None:
                point.update(time_point(v, unet, template, timer, opts, built=built if v.method == TOMESD else None))
            log.info("%s: PSNR %.2f dB, SSIM %.4f", v.label, point["quality"]["psnr_mean"],
                     point["quality"]["ssim_mean"])
        except Exception:  # noqa: BLE001
            point["error"] = traceback.format_exc()
            log.error("%s failed:\n%s", v.label, point["error"])
        bounds = bounds_of(result.get("flops"), v.label if v.method != TOMESD else f"tome r={v.ratio:g}")
        if bounds:
            point["bounds"] = bounds
        result["points"].append(point)
        save(result, out_dir)
    result["fidelity_note"] = fid_note or "FID/CLIP computed with torch-fidelity (pruned vs unpruned image sets)"
    finish(result, out_dir)
    if fid_note:
        log.warning("%s", fid_note)
    return result


__all__ = ["run_model", "load_pipeline", "read_prompts", "image_metrics", "fidelity"]
