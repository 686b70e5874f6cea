"""Built-in architectures (published diffusers configs and tiny test configs; random weights) and example inputs.

    unet = build_model("sd15")                                 # SD1.5 architecture, random weights
    args, kwargs = example_inputs(unet, latent=64, batch=2)    # (sample, t, text context), added_cond_kwargs
    dit = build_model("pixart-tiny")                           # DiTs: PixArt-style (ada_norm_single), DiT (ada_norm_zero)
    args, kwargs = example_inputs(dit, latent=16)              # (sample,), {"timestep": (B,), ...}
    unet = load_unet("/path/to/local/diffusers/folder")        # real weights from a local folder (no hub access)
    pipe = build_pipeline("sd15")                              # a whole pipeline (random weights, no text encoder)
    embeds = prompt_embeddings(pipe, "a red rocket")           # (prompt_embeds kwargs) where there is no tokenizer
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

#: Tiny transformer (DiT-family) configs: 2 layers, patch 2, so a 16 x 16 latent gives an 8 x 8 token grid.
PIXART_TINY: dict[str, Any] = {
    "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
    "cross_attention_dim": 16, "sample_size": 16, "patch_size": 2, "caption_channels": 16, "norm_num_groups": 8,
}
DIT_TINY: dict[str, Any] = {
    "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
    "sample_size": 16, "patch_size": 2, "norm_num_groups": 8,
}
#: transformer arch -> (diffusers class name, config)
TRANSFORMERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pixart-tiny": ("PixArtTransformer2DModel", PIXART_TINY),
    "dit-tiny": ("DiTTransformer2DModel", DIT_TINY),
}

ARCHS = ("sd15", "sd2", "sdxl", "tiny", *TRANSFORMERS)


def unet_config(arch: str) -> dict[str, Any]:
    """The diffusers config dict of a built-in architecture."""
    if arch == "tiny":
        return dict(TINY)
    if arch not in _FILES:
        raise ValueError(f"unknown architecture {arch!r}; built-in architectures are {ARCHS}")
    text = resources.files("graphprune").joinpath("archs", _FILES[arch]).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def build_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: str | None = None
                ) -> torch.nn.Module:
    """The model of a built-in architecture (a UNet2DConditionModel, or a DiT-family transformer for
    ``pixart-tiny`` / ``dit-tiny``) with seeded random weights, in eval mode. ``device="meta"``: no weights at all
    (shapes only, for ``graphprune inspect``)."""
    import diffusers

    if arch in TRANSFORMERS:
        cls_name, cfg = TRANSFORMERS[arch]
        cls, kwargs = getattr(diffusers, cls_name), dict(cfg)
    else:
        cls, kwargs = diffusers.UNet2DConditionModel, unet_config(arch)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = cls(**kwargs).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def build_unet(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The same as :func:`build_model` (kept for existing callers; it also builds the transformer archs)."""
    return build_model(arch, dtype=dtype, seed=seed)


#: VAE configs of the built-in pipelines: the SD VAE (8x down, 4 latent channels) and a tiny one with the same factor
SD_VAE: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
TINY_VAE: dict[str, Any] = {
    "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 8, "sample_size": 64, "scaling_factor": 0.18215,
}
#: the scheduler SD1.x/2.x/XL ship with (DDIM with their "scaled_linear" betas)
SD_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1,
}


def build_pipeline(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                   unet: torch.nn.Module | None = None) -> Any:
    """A diffusers pipeline of a built-in architecture with random weights and no text encoder: a
    ``StableDiffusionPipeline`` (``tiny``, ``sd15``, ``sd2``) or a ``StableDiffusionXLPipeline`` (``sdxl``), with a
    DDIM scheduler. Call it with ``**prompt_embeddings(pipe, prompt)`` (there is no tokenizer). ``unet``: use this
    UNet instead of building one."""
    import diffusers

    if arch in TRANSFORMERS:
        raise ValueError(f"build_pipeline builds UNet pipelines (tiny, sd15, sd2, sdxl), not {arch!r}")
    unet = unet if unet is not None else build_model(arch, dtype=dtype, seed=seed)
    torch.manual_seed(seed + 1)
    vae_config = dict(TINY_VAE if arch == "tiny" else SD_VAE)
    if arch == "sdxl":
        vae_config["scaling_factor"] = 0.13025
    vae = diffusers.AutoencoderKL(**vae_config).eval()
    vae = vae if dtype == torch.float32 else vae.to(dtype)
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER)
    if arch == "sdxl" or getattr(unet.config, "addition_embed_type", None) == "text_time":
        return diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=unet, scheduler=scheduler)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers pipeline from a local folder (``model_index.json``); never touches the hub. Components saved as
    missing (``[null, null]``, e.g. no text encoder or safety checker) load as None."""
    from diffusers import DiffusionPipeline

    path = Path(path)
    index = path / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{path} has no model_index.json: a local diffusers pipeline folder (saved with "
                                "pipeline.save_pretrained) is needed")
    missing = {name: None for name, value in json.loads(index.read_text()).items()
               if isinstance(value, list) and value and value[0] is None}
    return DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype, **missing)


def prompt_embeddings(pipe: Any, prompt: str, negative_prompt: str = "", length: int = 77) -> dict[str, Any]:
    """The ``prompt_embeds`` (and SDXL's pooled) keyword arguments for a pipeline without a text encoder: Gaussian
    embeddings (1, length, cross_attention_dim) seeded by the text (the same prompt always gives the same ones).
    With random weights a prompt only seeds its embeddings."""
    import zlib

    unet = pipe.unet
    unet = getattr(unet, "_orig_mod", unet)
    cfg, dtype = unet.config, next(unet.parameters()).dtype

    def embed(text: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return torch.randn(shape, generator=g).to(dtype)

    out = {"prompt_embeds": embed(prompt, (1, length, cfg.cross_attention_dim)),
           "negative_prompt_embeds": embed("negative:" + negative_prompt, (1, length, cfg.cross_attention_dim))}
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        out["pooled_prompt_embeds"] = embed("pooled:" + prompt, (1, pooled))
        out["negative_pooled_prompt_embeds"] = embed("pooled-negative:" + negative_prompt, (1, pooled))
    return out


def load_unet(path: str | Path, dtype: torch.dtype = torch.float32, weights: bool = True) -> torch.nn.Module:
    """Load a UNet from a local diffusers folder: a UNet folder or a pipeline folder with ``unet/`` inside.

    ``weights=False`` reads only its config and builds the UNet on the meta device (no weight is read or allocated:
    enough for ``graphprune inspect``)."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    sub = "unet" if (path / "unet" / "config.json").exists() else None
    if sub is None and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds neither config.json nor unet/config.json (a local diffusers folder)")
    if not weights:
        config = UNet2DConditionModel.load_config(path, subfolder=sub)
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config).to(dtype).eval()
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
    if type(unet).__name__ in ("PixArtTransformer2DModel", "DiTTransformer2DModel"):
        return _transformer_inputs(unet, sample.to(device, dtype), g, timestep)
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


def _transformer_inputs(model: torch.nn.Module, sample: torch.Tensor, g: torch.Generator, timestep: int
                        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """DiT-family call: ``((sample,), {"timestep": (B,), ...})``. PixArt gets a caption context (B, 77,
    caption_channels) and its resolution/aspect-ratio conditions where the config uses them; DiT gets class labels
    (row 0 the null class, as in classifier-free guidance, when the batch is even)."""
    cfg, (B, _, H, W) = model.config, sample.shape
    device, dtype = sample.device, sample.dtype
    kwargs: dict[str, Any] = {"timestep": torch.full((B,), timestep, device=device)}
    if type(model).__name__ == "PixArtTransformer2DModel":
        kwargs["encoder_hidden_states"] = torch.randn(B, 77, cfg.caption_channels, generator=g).to(device, dtype)
        extra = {"resolution": None, "aspect_ratio": None}
        if getattr(model, "use_additional_conditions", False):
            extra = {"resolution": torch.tensor([[H * 8, W * 8]] * B, dtype=dtype, device=device),
                     "aspect_ratio": torch.tensor([[1.0]] * B, dtype=dtype, device=device)}
        kwargs["added_cond_kwargs"] = extra
    else:
        labels = torch.randint(cfg.num_embeds_ada_norm, (B,), generator=g)
        if B % 2 == 0:
            labels[: B // 2] = cfg.num_embeds_ada_norm  # the null class (DiT's classifier-free guidance row)
        kwargs["class_labels"] = labels.to(device)
    return (sample,), kwargs
