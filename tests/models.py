"""Tiny models for the tests: diffusers configs of each supported family, and hand-written attention modules.

Each hand-written module is a plain torch reference of one attention form the matcher must recognise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SD15_TINY = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, sample_size=16,
)
# SD2-style: linear proj_in/out, per-block head dims, upcast_attention.
SD2_TINY = dict(SD15_TINY, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                cross_attention_dim=48)
# SDXL-style: no attention at the top level, several transformer layers per block, text_time added conditions.
SDXL_TINY = dict(
    block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4, 4),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    transformer_layers_per_block=(1, 2, 2), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=32,
)
PIXART_TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                   cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=16, norm_num_groups=8)


def unet(config: dict, seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def unet_inputs(model: nn.Module, latent: int, batch: int = 2, seed: int = 1) -> tuple[tuple, dict]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    ctx = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}
    return (sample, torch.tensor(500), ctx), kwargs


def pixart(seed: int = 0) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**PIXART_TINY).eval()


def pixart_inputs(batch: int = 2, latent: int = 16, seed: int = 1) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    ctx = torch.randn(batch, 5, 16, generator=g)
    return (x,), {"encoder_hidden_states": ctx, "timestep": torch.tensor([500] * batch),
                  "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


class HandAttentionBlock(nn.Module):
    """Pre-norm transformer layer with attention written by hand: three linears, matmul -> scale -> softmax ->
    matmul (like LDM's CrossAttention). Tokens come from a (B, C, H, W) map flattened row-major."""

    def __init__(self, dim: int = 32, heads: int = 4, fused: bool = False, reuse_q: bool = False,
                 cross_dim: int | None = None):
        super().__init__()
        self.heads, self.fused, self.reuse_q = heads, fused, reuse_q
        self.norm = nn.LayerNorm(dim)
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim, bias=False)
            self.k = nn.Linear(cross_dim or dim, dim, bias=False)
            self.v = nn.Linear(cross_dim or dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.conv = nn.Conv2d(4, dim, 1)

    def forward(self, img: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv(img)
        B, C, H, W = h.shape
        x = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
        n = self.norm(x)
        if self.fused:
            q, k, v = self.qkv(n).chunk(3, dim=-1)
        else:
            src = n if context is None else context
            q, k, v = self.q(n), self.k(src), self.v(src)
        d = C // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B*h, L, d), LDM's head_to_batch_dim
            return t.reshape(B, -1, self.heads, d).permute(0, 2, 1, 3).reshape(B * self.heads, -1, d)

        qh, kh, vh = split(q), split(k), split(v)
        attn = (torch.matmul(qh, kh.transpose(-1, -2)) * d ** -0.5).softmax(dim=-1)
        o = torch.matmul(attn, vh)
        o = o.reshape(B, self.heads, -1, d).permute(0, 2, 1, 3).reshape(B, -1, C)
        y = x + self.out(o)
        if self.reuse_q:
            y = y + q  # an attention intermediate used outside the attention
        return y


class MaskedSDPABlock(nn.Module):
    """Self-attention through SDPA with an attention mask (not prunable: the mask indexes tokens)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.conv = nn.Conv2d(4, dim, 1)

    def forward(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv(img)
        B, C, H, W = h.shape
        x = h.flatten(2).transpose(1, 2)
        n = self.norm(x)
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for t in (self.q(n), self.k(n),
                                                                                      self.v(n)))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.out(o.transpose(1, 2).reshape(B, -1, C))
