"""AT-EDM (Wang et al., CVPR 2024): attention-ranked pruning of a whole transformer stack, copy refill, DSAP.

Rewrite form: region (``scope="block"``, :mod:`graphprune.passes.region`). Per attention block (a diffusers
``Transformer2DModel``) with layers 1..L (research/atedm.md sections 1, 4, 6):

1. the ranking layer (``prune_layer``, default 1) runs on all N tokens; its self-attention stays fused (SDPA);
2. G-WPR scores (:mod:`.gwpr`) from that attention's q and k: the column mean of the head-mean map by default;
3. the K = N - R highest-scoring tokens are kept (static K), the layer's output is gathered to K tokens;
4. layers after it (or, in a one-layer stack, the layer's cross-attention and feed-forward) run on K tokens;
5. before ``proj_out`` the N tokens are refilled with one gather through a static (B, N) source map: a kept token
   reads its own slot, a pruned token the kept token with the largest head-mean logit in its attention row.

DSAP (section 5): for the first ``dsap_steps`` UNet calls of a generation the ``dsap_blocks`` (default: the first
attention block of each down stage and the last of each up stage) are left unpruned ("early" variant); afterwards
every block is pruned ("late" variant). The step-aware runtime holds exactly these two compiled graphs.
"""

from __future__ import annotations

import re

import torch

from ..config import AtEdmConfig
from .base import Plan, SiteGeometry, SiteSkip, TokenMethod, register_method
from .gwpr import copy_sources, gwpr_scores, select_kept, split_heads
from .tokens import gather_tokens, scatter_slots

_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)$")


def dsap_blocks(config: AtEdmConfig, paths: list[str]) -> set[str]:
    """The attention blocks DSAP leaves unpruned in early steps, from the stack paths of a graph.

    ``"auto"``: per diffusers UNet stage, the first attention block of each down stage
    (``down_blocks.i.attentions.0``) and the last of each up stage (the highest ``up_blocks.i.attentions.j``).
    """
    if config.dsap_blocks != "auto":
        return set(config.dsap_blocks)
    first_down: dict[str, tuple[int, str]] = {}
    last_up: dict[str, tuple[int, str]] = {}
    for p in paths:
        if m := _DOWN.match(p):
            cur = first_down.get(m.group(1))
            if cur is None or int(m.group(2)) < cur[0]:
                first_down[m.group(1)] = (int(m.group(2)), p)
        elif m := _UP.match(p):
            cur = last_up.get(m.group(1))
            if cur is None or int(m.group(2)) > cur[0]:
                last_up[m.group(1)] = (int(m.group(2)), p)
    return {p for _, p in first_down.values()} | {p for _, p in last_up.values()}


def query_grid(H: int, W: int, stride: int, device: torch.device) -> torch.Tensor:
    """(M,) raster indices of the queries on a strided sub-grid (rows and columns 0, s, 2s, ...)."""
    return torch.tensor([y * W + x for y in range(0, H, stride) for x in range(0, W, stride)], dtype=torch.int64,
                        device=device)


@register_method
class AtEdm(TokenMethod[AtEdmConfig]):
    """G-WPR ranking of a self-attention map, top-K pruning of a transformer stack, attention-argmax copy refill."""

    name = "atedm"
    config_type = AtEdmConfig
    uses_metric = False
    plan_source = "attention"

    def budget(self, config: AtEdmConfig, geo: SiteGeometry) -> int:
        R = config.pruned_count(geo.N)
        if R <= 0:
            raise SiteSkip(f"ratio {config.ratio} prunes no token of N={geo.N}")
        return geo.N - R

    def skip_region(self, config: AtEdmConfig, geo: SiteGeometry, path: str, paths: list[str]) -> str | None:
        if config.dagger and geo.level == 1:
            return "AT-EDM-dagger: the finest attention level is not pruned"
        if config.dsap_phase == "early" and path in dsap_blocks(config, paths):
            return f"DSAP: unpruned in the first {config.dsap_steps} steps (early variant)"
        return None

    def plan(self, config: AtEdmConfig, geo: SiteGeometry, q: torch.Tensor, k: torch.Tensor, *rand: torch.Tensor
             ) -> Plan:
        """q, k: (B, N, h*d) the ranking self-attention's projections -> (keep (B, K), slot (B, N)).

        ``slot[b, n]`` is the kept slot token n reads at the refill: its own for kept tokens, the copy source for
        pruned ones.
        """
        B, N, F = q.shape
        heads = geo.heads
        d = geo.head_dim or F // heads
        scale = geo.scale or d ** -0.5
        K = N - config.pruned_count(N)
        qh, kh = split_heads(q, heads), split_heads(k, heads)
        index = query_grid(geo.H, geo.W, config.query_subsample, q.device) if config.query_subsample > 1 else None
        score = gwpr_scores(qh, kh, scale, config.iterations, config.head_aggregation, config.query_chunk, index)
        share = config.cfg_shared and B % 2 == 0
        if share:
            h = B // 2
            score = torch.cat([0.5 * (score[:h] + score[h:])] * 2, dim=0)
        keep, pruned = select_kept(score, K, config.topk_max)
        src = copy_sources(qh, kh, scale, keep, pruned, config.copy_similarity, config.query_chunk, share)
        ar = torch.arange(K, device=q.device).expand(B, K)
        slot = scatter_slots(torch.cat([keep, pruned], 1), torch.cat([ar, src], 1), N)
        return keep, slot

    def reduce(self, config: AtEdmConfig, plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, K, C), the kept tokens."""
        return gather_tokens(x, plan[0])

    def restore(self, config: AtEdmConfig, plan: Plan, y: torch.Tensor) -> torch.Tensor:
        """y: (B, K, c) -> (B, N, c); pruned tokens copy their source slot."""
        return gather_tokens(y, plan[1])
