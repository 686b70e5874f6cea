"""Built-in UNet architectures (published diffusers configs; random weights) and their example inputs.

    unet = build_unet("sd15")                                  # SD1.5 architecture, random weights
    args, kwargs = example_inputs(unet, latent=64, batch=2)    # (sample, t, text context), added_cond_kwargs
    unet = load_unet("/path/to/local/diffusers/folder")        # real weights from a local folder (no hub access)
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_FILES = {"sd15": "sd15_unet.json", "sd2": "sd21_unet.json", "sdxl": "sdxl_unet.json"}

#: A tiny SD1.5-style config for tests and quick checks: two attention levels, 1 transformer layer each.
TINY: dict[str, Any] = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "norm_num_groups": 8, "sample_size": 16,
}

ARCHS = ("sd15", "sd2", "sdxl", "tiny")


def unet_config(arch: str) -> dict[str, Any]:
    """The diffusers config dict of a built-in architecture."""
    if arch == "tiny":
        return dict(TINY)
    if arch not in _FILES:
        raise ValueError(f"unknown architecture {arch!r}; built-in architectures are {ARCHS}")
    text = resources.files("graphprune").joinpath("archs", _FILES[arch]).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def build_unet(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A UNet2DConditionModel of a built-in architecture with seeded random weights, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(arch)).eval()
    return unet if dtype == torch.float32 else unet.to(dtype)


def load_unet(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a UNet from a local diffusers folder: a UNet folder or a pipeline folder with ``unet/`` inside."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    sub = "unet" if (path / "unet" / "config.json").exists() else None
    if sub is None and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds neither config.json nor unet/config.json (a local diffusers folder)")
    return UNet2DConditionModel.from_pretrained(path, subfolder=sub, torch_dtype=dtype).eval()


def example_inputs(unet: torch.nn.Module, latent: int, batch: int = 2, seed: int = 0, timestep: int = 500,
                   structured: bool = True) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs for one UNet call: ``((sample, t, encoder_hidden_states), {"added_cond_kwargs": ...} or {})``.

    sample: (batch, in_channels, latent, latent), image-like (scikit-image photos) when ``structured``, else
    Gaussian; encoder_hidden_states: (batch, 77, cross_attention_dim). SDXL-style configs get ``text_embeds``
    and ``time_ids``.
    """
    cfg = unet.config
    dtype = next(unet.parameters()).dtype
    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    if structured:
        from .inputs import image_latents

        sample = image_latents(batch, cfg.in_channels, latent, latent)
    else:
        sample = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    kwargs: dict[str, Any] = {}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch,
                                     dtype=dtype, device=device),
        }
    t = torch.tensor(timestep, device=device)
    return (sample.to(device, dtype), t, context.to(device, dtype)), kwargs
