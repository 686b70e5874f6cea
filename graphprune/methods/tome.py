"""ToMe for Stable Diffusion (tomesd's ``bipartite_soft_matching_random2d``) in static-shape form.

Semantics (research/tome.md sections 1-3): one destination token per sy x sx cell (top-left, or a random position
shared by the batch), every other token is a source; cosine similarity of the pre-norm block input between sources
and destinations; the r = min(int(N * ratio), S) sources with the highest best-match similarity are merged into their
best destination by mean (the destination counts itself, like ``scatter_reduce(mean, include_self=True)``); after
attention each merged source gets a copy of its destination's output. K = N - r.

Exportable form: the mean is ``scatter_add`` of values and counts (never ``scatter_reduce(mean)``, which ONNX turns
into a silent overwrite); unmerge is one gather through a (B, N) slot map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import PruneConfig
from .base import Plan, RandomSpec, SiteGeometry, SiteSkip, TokenMethod
from .tokens import best_match, cell_split, gather_tokens, scatter_slots, top_and_rest


@dataclass(frozen=True)
class ToMeConfig(PruneConfig):
    """ToMe for SD (tomesd): bipartite soft matching, merge by mean, unmerge by copy.

    Args to tinker with:
        use_rand: pick each cell's destination at a random position (drawn per call from a dedicated generator
            seeded with ``seed``, shared by the batch, like tomesd); ``False`` takes the top-left position.
            Turned off for odd batch sizes, as tomesd does.
        seed: seed of graphprune's own generator (the user's RNG stream is never consumed).
    """

    method: ClassVar[str] = "tome"
    use_rand: bool = True
    seed: int = 0


def merge_count(config: ToMeConfig, geo: SiteGeometry) -> tuple[int, int, int]:
    """(r merged sources, S sources, P destinations) for a site."""
    P = geo.cells(config.sx, config.sy)
    S = geo.N - P
    return min(int(geo.N * config.ratio), S), S, P


class ToMe(TokenMethod[ToMeConfig]):
    """Bipartite soft matching with mean merge and copy unmerge."""

    name = "tome"
    config_type = ToMeConfig

    def budget(self, config: ToMeConfig, geo: SiteGeometry) -> int:
        geo.require_cells(config.sx, config.sy)
        r, S, P = merge_count(config, geo)
        if r <= 0:
            raise SiteSkip(f"ratio {config.ratio} merges no token of N={geo.N}")
        return geo.N - r

    def random_inputs(self, config: ToMeConfig, geo: SiteGeometry) -> tuple[RandomSpec, ...]:
        # tomesd turns randomness off for odd batches (cond and uncond would get different splits).
        if config.use_rand and geo.B % 2 == 0:
            return (RandomSpec((1, geo.cells(config.sx, config.sy)), "randint", config.sx * config.sy),)
        return ()

    def plan(self, config: ToMeConfig, geo: SiteGeometry, metric: torch.Tensor, *rand: torch.Tensor) -> Plan:
        """metric: (B, N, C) block input -> (src_pos (B, S), dst_pos (B, P), unm (B, S-r), merged (B, r),
        tgt (B, r), slot (B, N))."""
        B = metric.shape[0]
        r, S, P = merge_count(config, geo)
        loc = rand[0] if rand else torch.zeros(1, P, dtype=torch.int64, device=metric.device)
        dst_pos, src_pos = cell_split(loc, geo.H, geo.W, config.sx, config.sy)  # (1, P), (1, S)
        dst_pos, src_pos = dst_pos.expand(B, P), src_pos.expand(B, S)
        # Cosine similarity between sources and destinations (tomesd: no epsilon, model dtype).
        m = metric / metric.norm(dim=-1, keepdim=True)
        # Each source's best destination (max over the (B, S, P) scores); merge the r best-matched sources.
        node_max, node_idx = best_match(gather_tokens(m, src_pos), gather_tokens(m, dst_pos), config.compiler)
        merged, unm = top_and_rest(node_max, r)
        tgt = node_idx.gather(1, merged)  # (B, r) destination slot of each merged source
        # Unmerge map: kept sources first (S - r slots), then all P destinations.
        n_unm = S - r
        ar = torch.arange(max(n_unm, P), device=metric.device)
        idx = torch.cat([dst_pos, src_pos.gather(1, unm), src_pos.gather(1, merged)], dim=1)
        slots = torch.cat([(n_unm + ar[:P]).expand(B, P), ar[:n_unm].expand(B, n_unm), n_unm + tgt], dim=1)
        slot = scatter_slots(idx, slots, geo.N)
        return src_pos, dst_pos, unm, merged, tgt, slot

    def reduce(self, config: ToMeConfig, plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, K, C) = [unmerged sources, destinations averaged with their merged sources]."""
        src_pos, dst_pos, unm, merged, tgt, _ = plan
        B, _, C = x.shape
        xs = gather_tokens(x, src_pos)
        xd = gather_tokens(x, dst_pos)
        moving = gather_tokens(xs, merged)  # (B, r, C)
        summed = xd.scatter_add(1, tgt[..., None].expand(-1, -1, C), moving)
        counts = torch.ones(B, xd.shape[1], dtype=x.dtype, device=x.device).scatter_add(
            1, tgt, torch.ones_like(tgt, dtype=x.dtype)
        )
        return torch.cat([gather_tokens(xs, unm), summed / counts[..., None]], dim=1)

    def restore(self, config: ToMeConfig, plan: Plan, y: torch.Tensor) -> torch.Tensor:
        """y: (B, K, c) -> (B, N, c); every merged source copies its destination's output."""
        return gather_tokens(y, plan[5])
