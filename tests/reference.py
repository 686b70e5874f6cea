"""Independent eager references of the methods, written the way the official code does it (argsorts, the full
cosine matrix, scatter_reduce), and a diffusers attention processor that applies them to a real UNet.

Nothing here imports graphprune: these are what graphprune's static-shape rewrite is checked against.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

Prune = Callable[[torch.Tensor], torch.Tensor]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def ref_tome(metric: torch.Tensor, h: int, w: int, ratio: float, sx: int = 2, sy: int = 2) -> tuple[Prune, Prune]:
    """tomesd's bipartite_soft_matching_random2d with no_rand=True (top-left destinations)."""
    B, N, _ = metric.shape
    hsy, wsx = h // sy, w // sx
    buf = torch.zeros(h, w, dtype=torch.int64)
    buf[: hsy * sy: sy, : wsx * sx: sx] = -1
    order = buf.flatten().argsort(stable=True)
    D = hsy * wsx
    b_idx, a_idx = order[:D], order[D:]
    S = N - D
    r = min(int(N * ratio), S)
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True, stable=True)
    src_idx, unm_idx = edge[:, :r], edge[:, r:]
    dst_idx = node_idx.gather(1, src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, a_idx], x[:, b_idx]
        unm, moving = _gather(src, unm_idx), _gather(src, src_idx)
        dst = dst.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, x.shape[-1]), moving, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c = y.shape[-1]
        unm, dst = y[:, : S - r], y[:, S - r:]
        out = torch.zeros(B, N, c, dtype=y.dtype)
        out[:, b_idx] = dst
        out.scatter_(1, a_idx.expand(B, S).gather(1, unm_idx)[..., None].expand(-1, -1, c), unm)
        out.scatter_(1, a_idx.expand(B, S).gather(1, src_idx)[..., None].expand(-1, -1, c), _gather(dst, dst_idx))
        return out

    return merge, unmerge


def ref_sito(metric: torch.Tensor, H: int, W: int, ratio: float, noise: torch.Tensor | None = None,
             alpha: float = 0.1, beta: float = 1.0, recover: str = "kept", sx: int = 2, sy: int = 2,
             score: torch.Tensor | None = None, align_cfg: bool = False) -> tuple[Prune, Prune, torch.Tensor]:
    """SiTo's prune_and_recover_tokens (official code, fp32, stable sorts). Returns (prune, recover, kept idx).

    DaTo's variant (its dato.py): ``score`` (B, N) replaces SimScore + noise as the base-token score, and with
    ``align_cfg`` the second half of the batch takes the first half's window choice.
    """
    B, N, _ = metric.shape
    m = F.normalize(metric, dim=-1)
    cos = m @ m.transpose(1, 2)  # (B, N, N): the full cosine graph, as the official code builds it
    if score is None:
        score = beta * cos.sum(dim=-1)
        if noise is not None:
            score = score + alpha * noise
    hp, wp = H // sy, W // sx
    P, R = hp * wp, int(N * ratio)
    g = score.view(B, H, W)[:, : hp * sy, : wp * sx].reshape(B, hp, sy, wp, sx).permute(0, 1, 3, 2, 4)
    _, loc = g.reshape(B, hp, wp, sy * sx).max(dim=-1)
    if align_cfg:
        loc = loc.clone()
        loc[B // 2:] = loc[: B // 2]
    buf = torch.zeros(B, hp, wp, sy * sx, dtype=torch.int64).scatter_(3, loc[..., None], -1)
    full = torch.zeros(B, H, W, dtype=torch.int64)
    full[:, : hp * sy, : wp * sx] = buf.view(B, hp, wp, sy, sx).permute(0, 1, 3, 2, 4).reshape(B, hp * sy, wp * sx)
    order = full.view(B, N).argsort(dim=1, stable=True)
    b_idx, a_idx = order[:, :P], order[:, P:]
    sim_ab = cos.gather(1, a_idx[..., None].expand(-1, -1, N)).gather(2, b_idx[:, None].expand(-1, N - P, -1))
    best, best_j = sim_ab.max(dim=-1)
    o = (-best).argsort(dim=1, stable=True)
    a_src, a_unm = a_idx.gather(1, o[:, :R]), a_idx.gather(1, o[:, R:])
    kept = torch.cat([a_unm, b_idx], dim=1)
    Ku = a_unm.shape[1]
    if recover == "kept":
        sim = cos.gather(1, kept[..., None].expand(-1, -1, N)).gather(2, a_src[:, None].expand(-1, kept.shape[1], -1))
        src_slot = sim.max(dim=1).indices  # (B, R)
    else:
        src_slot = Ku + best_j.gather(1, o[:, :R])

    def prune(x: torch.Tensor) -> torch.Tensor:
        return _gather(x, kept)

    def recover_fn(y: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(B, N, y.shape[-1], dtype=y.dtype)
        out.scatter_(1, kept[..., None].expand(-1, -1, y.shape[-1]), y)
        out.scatter_(1, a_src[..., None].expand(-1, -1, y.shape[-1]), _gather(y, src_slot))
        return out

    return prune, recover_fn, kept


class RefPruneProcessor:
    """An attn1 processor: plan from the block input (stored by a pre-hook), prune the norm1 output, run diffusers'
    own SDPA processor on the kept tokens, recover. Prunes when the token count equals the latent's H*W."""

    def __init__(self, method: str, ratio: float, state: dict, **kw):
        self.method, self.ratio, self.state, self.kw = method, ratio, state, kw
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        H, W = self.state["latent"]
        N = hidden_states.shape[1]
        if encoder_hidden_states is not None or N != H * W:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        metric = self.state.pop("block_input")
        if self.method == "tome":
            reduce, restore = ref_tome(metric, H, W, self.ratio)
        elif self.method == "dato":  # score = gamma * dynamics (B, N), provided by the test per UNet call
            reduce, restore, _ = ref_sito(metric, H, W, self.ratio, score=self.kw["gamma"] * self.state["dynamics"],
                                          align_cfg=True)
        else:
            reduce, restore, _ = ref_sito(metric, H, W, self.ratio, **self.kw)
        return restore(self.inner(attn, reduce(hidden_states)))


def install_reference(unet: torch.nn.Module, method: str, ratio: float, **kw) -> torch.nn.Module:
    """Patch a UNet (in place) with the reference pruning on the full-resolution self-attentions."""
    from diffusers.models.attention import BasicTransformerBlock

    state: dict = {}
    unet.register_forward_pre_hook(lambda mod, args: state.__setitem__("latent", tuple(args[0].shape[2:])))
    for mod in unet.modules():
        if isinstance(mod, BasicTransformerBlock):
            mod.register_forward_pre_hook(
                lambda mod, args, kwargs: state.__setitem__("block_input", args[0] if args else
                                                            kwargs["hidden_states"]), with_kwargs=True)
            mod.attn1.set_processor(RefPruneProcessor(method, ratio, state, **kw))
    unet.reference_state = state  # tests feed per-call inputs through it (DaTo: "dynamics" (B, N))
    return unet


def hooked_unet(model, sample, t, ctx, cached=None):
    """The original UNet, eagerly; captures (or, with ``cached``, replaces) the non-skip part of the input of the
    last up-path ResNet. Returns (output, captured feature)."""
    resnet = model.up_blocks[-1].resnets[-1]
    seen = {}

    def pre(mod, args):
        x = args[0]
        c = x.shape[1] - model.conv_in.out_channels  # cat([hidden, skip]): the skip is conv_in's output
        seen["feature"] = x[:, :c].clone()
        if cached is not None:
            return (torch.cat([cached, x[:, c:]], dim=1),) + tuple(args[1:])
        return None

    handle = resnet.register_forward_pre_hook(pre)
    try:
        out = model(sample, torch.tensor(t), ctx).sample
    finally:
        handle.remove()
    return out, seen["feature"]
