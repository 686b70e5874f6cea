"""Tiny models for the tests: diffusers configs of each supported family, and hand-written attention modules.

Each hand-written module is a plain torch reference of one attention form the matcher must recognise.
"""

from __future__ import annotations

import math

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


# ------------------------------------------------------------------------------------------------------------------
# The UNet code SD users run (ComfyUI, Stability's sgm, CompVis ldm, ADM / k-diffusion), one small module per
# implementation style. Written here from the styles' descriptions; no third-party model code is copied.
# ------------------------------------------------------------------------------------------------------------------

def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's default on NVIDIA (``attention_pytorch``): (B, L, h*d) -> view/transpose -> SDPA -> (B, L, h*d)."""
    b, _, dim = q.shape
    d = dim // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def attention_einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """CompVis ldm's CrossAttention: einops head folding, einsum -> softmax -> einsum."""
    from einops import rearrange

    d = q.shape[-1] // heads
    q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=heads) for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * d ** -0.5
    out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
    return rearrange(out, "(b h) n d -> b n (h d)", h=heads)


def attention_basic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's ``attention_basic``: unsqueeze/reshape/permute head folding, fp32 einsum, softmax, einsum, cast."""
    b, _, dim = q.shape
    d = dim // heads
    q, k, v = (t.unsqueeze(3).reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d).contiguous()
               for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", q.float(), k.float()) * d ** -0.5
    out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1).to(v.dtype), v)
    return out.unsqueeze(0).reshape(b, heads, -1, d).permute(0, 2, 1, 3).reshape(b, -1, heads * d)


def attention_sdp_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Stability sgm's CrossAttention: einops head split, SDPA inside ``torch.backends.cuda.sdp_kernel(...)``."""
    from einops import rearrange
    from torch.backends.cuda import sdp_kernel

    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    with sdp_kernel(enable_math=True, enable_flash=True, enable_mem_efficient=True):  # deprecated; sgm calls it
        out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h n d -> b n (h d)")


def _fold_heads_key_t(q, k, v, heads):
    """Sub-quadratic style folding: q, v (B*h, L, d) and the key pre-transposed (B*h, d, L)."""
    b, _, dim = q.shape
    d = dim // heads
    fold = lambda t: t.unsqueeze(3).reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d)
    key_t = k.unsqueeze(3).reshape(b, -1, heads, d).permute(0, 2, 3, 1).reshape(b * heads, d, -1)
    return fold(q), key_t, fold(v), d


def attention_query_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           chunk: int = 24) -> torch.Tensor:
    """Query-chunked attention (ComfyUI's ``sub_quad`` without its memory query): per chunk of queries
    baddbmm(empty, q_chunk, key_t, alpha=scale, beta=0) -> softmax -> bmm, chunks concatenated."""
    query, key_t, value, d = _fold_heads_key_t(q, k, v, heads)
    n = query.shape[1]
    chunks = []
    for i in range(0, n, chunk):
        qc = query[:, i:i + chunk]
        scores = torch.baddbmm(torch.empty(1, 1, 1, dtype=q.dtype), qc, key_t, alpha=d ** -0.5, beta=0)
        chunks.append(torch.bmm(scores.softmax(dim=-1), value))
    out = torch.cat(chunks, dim=1)
    return out.unflatten(0, (-1, heads)).transpose(1, 2).flatten(start_dim=2)


def attention_sub_quad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's CPU default ``sub_quad``: the query chunk size comes from a host-side free-memory query (psutil),
    which Dynamo cannot trace (a graph break between the projections and the attention)."""
    import psutil

    free = psutil.virtual_memory().available
    chunk = 4096 if free > 2 ** 20 else 256  # always 4096 here; the query itself is the point
    return attention_query_chunks(q, k, v, heads, chunk=chunk)


def attention_split_buffer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           steps: int = 2) -> torch.Tensor:
    """Split attention (ComfyUI's ``split``, diffusers' attention slicing): chunks written into a zero buffer."""
    b, _, dim = q.shape
    d = dim // heads
    q, k, v = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d) for t in (q, k, v))
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    size = q.shape[1] // steps
    for i in range(0, q.shape[1], size):
        s = torch.einsum("b i d, b j d -> b i j", q[:, i:i + size], k) * d ** -0.5
        out[:, i:i + size] = torch.einsum("b i j, b j d -> b i d", s.softmax(dim=-1), v)
    return out.reshape(b, heads, -1, d).permute(0, 2, 1, 3).reshape(b, -1, heads * d)


ATTENTION_STYLES = {"sdpa": attention_sdpa, "einsum": attention_einsum, "basic": attention_basic,
                    "sdp_kernel": attention_sdp_kernel, "query_chunks": attention_query_chunks,
                    "sub_quad": attention_sub_quad, "split": attention_split_buffer}


class CastLinear(nn.Linear):
    """ComfyUI's ``comfy.ops`` linears: the weight and bias are cast to the input's dtype (and device) per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(dtype=x.dtype, device=x.device) if self.bias is not None else None
        return F.linear(x, self.weight.to(dtype=x.dtype, device=x.device), bias)


class StyleCrossAttention(nn.Module):
    """to_q / to_k / to_v linears without bias, to_out = (Linear, Dropout): the layout every SD codebase shares;
    ``attention`` names the function that runs the heads (``ATTENTION_STYLES``); ``cast_weights``: ComfyUI's linears
    that cast their weights on the fly."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, attention: str = "sdpa",
                 cast_weights: bool = False):
        super().__init__()
        linear = CastLinear if cast_weights else nn.Linear
        self.heads, self.attention = heads, ATTENTION_STYLES[attention]
        self.to_q = linear(dim, dim, bias=False)
        self.to_k = linear(context_dim or dim, dim, bias=False)
        self.to_v = linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(self.attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLUFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.proj = nn.Linear(dim, dim * mult * 2)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class StyleTransformerBlock(nn.Module):
    """norm1 -> attn1 (self) -> + x; norm2 -> attn2 (cross) -> + x; norm3 -> ff -> + x. ``inplace``: ComfyUI's
    ``x += n`` residuals and weights cast on the fly."""

    def __init__(self, dim: int, heads: int, context_dim: int, attention: str, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = StyleCrossAttention(dim, heads, attention=attention, cast_weights=inplace)
        self.attn2 = StyleCrossAttention(dim, heads, context_dim, attention=attention, cast_weights=inplace)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # ComfyUI's blocks add in place into the token stream (proj_in's output) they own
            x += self.attn1(self.norm1(x))
            x += self.attn2(self.norm2(x), context)
            x += self.ff(self.norm3(x))
            return x
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class StyleSpatialTransformer(nn.Module):
    """GroupNorm -> proj_in (1x1 conv or linear) -> tokens -> transformer_blocks -> grid -> proj_out -> + input.

    ``layout``: how (B, C, H, W) becomes (B, H*W, C) and back: ``"movedim"`` (ComfyUI: ``x.movedim(1, 3).flatten(1,
    2)``), ``"einops"`` (sgm / ldm: ``rearrange(x, "b c h w -> b (h w) c")``) or ``"permute"``.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, attention: str = "sdpa",
                 layout: str = "movedim", use_linear: bool = True, depth: int = 1, inplace: bool = False):
        super().__init__()
        self.layout, self.use_linear = layout, use_linear
        self.norm = nn.GroupNorm(8, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if use_linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            StyleTransformerBlock(channels, heads, context_dim, attention, inplace) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if use_linear else nn.Conv2d(channels, channels, 1)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "movedim":
            return x.movedim(1, 3).flatten(1, 2).contiguous()
        if self.layout == "einops":
            from einops import rearrange

            return rearrange(x, "b c h w -> b (h w) c").contiguous()
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])

    def to_grid(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if self.layout == "movedim":
            return x.reshape(x.shape[0], h, w, x.shape[-1]).movedim(3, 1).contiguous()
        if self.layout == "einops":
            from einops import rearrange

            return rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = self.to_tokens(x)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = self.to_grid(x, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


# ---- ADM / guided-diffusion / k-diffusion / VAE style: attention on (B, C, H, W) with 1x1 conv projections ----

class GroupNorm32(nn.GroupNorm):
    """ADM's normalization: computed in fp32, cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class ADMAttentionBlock(nn.Module):
    """guided-diffusion's AttentionBlock: x (B, C, H, W) -> (B, C, T); one fused qkv Conv1d; heads split channel
    first. ``legacy``: QKVAttentionLegacy (per head [q | k | v] rows: reshape(B*h, 3*ch, T).split(ch, dim=1));
    else QKVAttention (chunk(3, dim=1), then heads). einsum("bct,bcs->bts") with sqrt(scale) on q and k."""

    def __init__(self, channels: int, heads: int, legacy: bool = True):
        super().__init__()
        self.heads, self.legacy = heads, legacy
        self.norm = GroupNorm32(8, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.heads)
        scale = 1 / math.sqrt(math.sqrt(ch))
        if self.legacy:
            q, k, v = qkv.reshape(bs * self.heads, ch * 3, length).split(ch, dim=1)
            weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        else:
            q, k, v = qkv.chunk(3, dim=1)
            weight = torch.einsum("bct,bcs->bts", (q * scale).view(bs * self.heads, ch, length),
                                  (k * scale).view(bs * self.heads, ch, length))
            v = v.reshape(bs * self.heads, ch, length)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """The block after its norm: (B, C, T) -> (B, C, T)."""
        return self.proj_out(self.attention(self.qkv(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        return (x + self.attend(self.norm(x))).reshape(b, c, *spatial)


class ConvSelfAttention2d(nn.Module):
    """k-diffusion's SelfAttention2d: fused qkv Conv2d, view(n, 3h, d, HW).transpose(2, 3).chunk(3, dim=1), SDPA,
    back to (n, c, h, w), out Conv2d."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_in = nn.GroupNorm(8, channels)
        self.qkv_proj = nn.Conv2d(channels, channels * 3, 1)
        self.out_proj = nn.Conv2d(channels, channels, 1)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The block after its norm: (n, c, h, w) -> (n, c, h, w)."""
        n, c, h, w = x.shape
        qkv = self.qkv_proj(x)
        qkv = qkv.view([n, self.heads * 3, c // self.heads, h * w]).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=1)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(2, 3).contiguous().view([n, c, h, w])
        return self.out_proj(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attend(self.norm_in(x))


class ConvAttnBlock(nn.Module):
    """The ldm/VAE AttnBlock: separate q, k, v 1x1 Conv2d, one head, bmm(q, k) and bmm(v, p^T), out 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def attend(self, h_: torch.Tensor) -> torch.Tensor:
        """The block after its norm: (b, c, h, w) -> (b, c, h, w)."""
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        w_ = torch.bmm(q, k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
        w_ = F.softmax(w_, dim=2)
        h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return self.proj_out(h_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attend(self.norm(x))


class StyleUNet(nn.Module):
    """A two-level U-Net shell in ComfyUI/ldm naming (input_blocks, middle_block, output_blocks with skip concats)
    around one attention style: transformer styles (``attention`` + ``layout``) or conv styles (``conv``:
    ``"adm-legacy"``, ``"adm"``, ``"kdiff"``, ``"vae"``). Finest grid = the latent's."""

    def __init__(self, attention: str = "sdpa", layout: str = "movedim", conv: str | None = None, ch: int = 32,
                 heads: int = 4, context_dim: int = 16, use_linear: bool = True, inplace: bool = False,
                 depth: int = 1):
        super().__init__()

        def attn(c: int) -> nn.Module:
            if conv == "adm-legacy":
                return ADMAttentionBlock(c, heads, legacy=True)
            if conv == "adm":
                return ADMAttentionBlock(c, heads, legacy=False)
            if conv == "kdiff":
                return ConvSelfAttention2d(c, heads)
            if conv == "vae":
                return ConvAttnBlock(c)
            return StyleSpatialTransformer(c, heads, context_dim, attention, layout, use_linear, depth, inplace)

        self.conv_attention = conv is not None
        self.time_embed = nn.Sequential(nn.Linear(ch, ch), nn.SiLU(), nn.Linear(ch, ch))
        self.input_blocks = nn.ModuleList([nn.Conv2d(4, ch, 3, padding=1), attn(ch),
                                           nn.Conv2d(ch, ch, 3, stride=2, padding=1)])
        self.middle_block = attn(ch)
        self.output_blocks = nn.ModuleList([nn.Conv2d(2 * ch, ch, 3, padding=1), attn(ch)])
        self.out = nn.Conv2d(ch, 4, 3, padding=1)
        self.ch = ch

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        half = self.ch // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float().reshape(-1, 1) * freqs
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        h = self.input_blocks[0](x) + emb[:, :, None, None]
        run = (lambda m, h: m(h)) if self.conv_attention else (lambda m, h: m(h, context))
        skip = h = run(self.input_blocks[1], h)
        h = run(self.middle_block, self.input_blocks[2](h))
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.output_blocks[0](torch.cat([h, skip], dim=1))
        return self.out(run(self.output_blocks[1], h))
