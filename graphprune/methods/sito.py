"""SiTo (Zhang et al., AAAI 2025): similarity-based token pruning with copy recovery, static-shape form.

Semantics of the official code (research/sito.md sections 3 and 9), per batch element:
1. m = L2-normalized pre-norm block input; SimScore_i = sum_j cos(i, j) = m_i . sum_j m_j (exact O(NC) identity of
   the official O(N^2 C) row sum).
2. score = sim_beta * SimScore + noise_alpha * eps, eps ~ N(0, 1) (B, N) drawn per call by graphprune's own
   generator and fed as a graph input; the base token of each sy x sx cell is the cell's argmax.
3. Each other token ("candidate") gets its best cosine to any base token; the R = int(N * ratio) candidates with the
   highest value are pruned. Kept: [unpruned candidates..., base...], K = N - R.
4. Recovery: each pruned token copies the output of its most similar kept token (``recover="kept"``, the code) or
   of its most similar base token (``recover="base"``, the paper's figure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import PruneConfig, check_choice
from .base import KeepSlotRecovery, Plan, RandomSpec, SiteGeometry, SiteSkip, TokenMethod
from .tokens import best_match, cell_argmax, cell_split, gather_tokens, scatter_slots, top_and_rest

PLAN_DTYPES = (None, "float16", "bfloat16", "float32", "float64")
RECOVERIES = ("kept", "base")


@dataclass(frozen=True)
class SiToConfig(PruneConfig):
    """SiTo: similarity-based base-token selection, pruning, copy recovery (AAAI 2025, official code semantics).

    Args to tinker with:
        noise_alpha, sim_beta: score = sim_beta * SimScore + noise_alpha * N(0, 1) noise per token.
        recover: ``"kept"`` (official code: copy the most similar kept token) or ``"base"`` (paper figure: copy
            the most similar base token; cheaper).
        seed: seed of graphprune's own generator that draws the noise (one (B, N) draw per site and call).
        plan_dtype: dtype of the similarity computations; ``None`` uses the model's dtype. The official code
            computes in float16 (where the noise rarely changes a score; see the README).
    """

    method: ClassVar[str] = "sito"
    noise_alpha: float = 0.1
    sim_beta: float = 1.0
    recover: str = "kept"
    seed: int = 0
    plan_dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("", "recover", self.recover, RECOVERIES)
        check_choice("", "plan_dtype", self.plan_dtype, PLAN_DTYPES)


def prune_count(config: PruneConfig, geo: SiteGeometry) -> tuple[int, int, int]:
    """(R pruned, Nc candidates, P base tokens) for a site (SiTo's and DaTo's counts)."""
    P = geo.cells(config.sx, config.sy)
    return int(geo.N * config.ratio), geo.N - P, P


def prune_budget(config: PruneConfig, geo: SiteGeometry) -> int:
    """K = N - R kept tokens of SiTo's (and DaTo's) pruning, or :class:`SiteSkip` with the reason."""
    geo.require_cells(config.sx, config.sy)
    R, Nc, _ = prune_count(config, geo)
    if R <= 0:
        raise SiteSkip(f"ratio {config.ratio} prunes no token of N={geo.N}")
    if R > Nc:
        raise SiteSkip(f"R={R} pruned tokens exceed the {Nc} non-base tokens; lower the ratio")
    return geo.N - R


def prune_similar_to_base(m: torch.Tensor, base: torch.Tensor, cand: torch.Tensor, R: int, recover: str,
                          compiler: str = "eager") -> Plan:
    """SiTo stages 2 and 3 (also DaTo's): prune the R candidates most similar to some base token; copy recovery.

    m: (B, N, C) L2-normalized tokens; base: (B, P) and cand: (B, Nc) token indices (a partition of [0, N)).
    Returns keep (B, K) = [unpruned candidates..., base...] with K = N - R, and slot (B, N): the kept slot each
    token reads after attention (a pruned token reads its most similar kept token with ``recover="kept"``, its most
    similar base token with ``"base"``).
    """
    N = m.shape[1]
    Nc = cand.shape[1]
    K, Ku = N - R, Nc - R
    B = m.shape[0]
    # Stage 2: prune the R candidates most similar to some base token.
    mc = gather_tokens(m, cand)
    best, best_base = best_match(mc, gather_tokens(m, base), compiler)  # (B, Nc)
    pruned, unpruned = top_and_rest(best, R)
    keep = torch.cat([cand.gather(1, unpruned), base], dim=1)  # (B, K)
    # Stage 3: recovery source of each pruned token, as a slot in [0, K).
    base_val, base_src = best.gather(1, pruned), Ku + best_base.gather(1, pruned)  # best base of each pruned
    if recover == "kept" and Ku > 0:
        # argmax over all K kept = [unpruned candidates, base]: the base half is already known from stage 2,
        # so only the (R, Ku) block is computed (half the official (R, K) work); ties prefer the candidate,
        # as the first-index argmax over [candidates, base] does.
        mp = gather_tokens(mc, pruned)  # (B, R, C)
        cand_val, cand_src = best_match(mp, gather_tokens(mc, unpruned), compiler)  # (B, R)
        src = torch.where(cand_val >= base_val, cand_src, base_src)
    else:
        src = base_src
    ar = torch.arange(K, device=m.device).expand(B, K)
    slot = scatter_slots(torch.cat([keep, cand.gather(1, pruned)], 1), torch.cat([ar, src], 1), N)
    return keep, slot


class SiTo(KeepSlotRecovery, TokenMethod[SiToConfig]):
    """Similarity-based base selection, pruning and copy recovery."""

    name = "sito"
    config_type = SiToConfig

    def budget(self, config: SiToConfig, geo: SiteGeometry) -> int:
        return prune_budget(config, geo)

    def random_inputs(self, config: SiToConfig, geo: SiteGeometry) -> tuple[RandomSpec, ...]:
        return (RandomSpec((geo.B, geo.N), "normal"),) if config.noise_alpha != 0 else ()

    def plan(self, config: SiToConfig, geo: SiteGeometry, metric: torch.Tensor, *rand: torch.Tensor) -> Plan:
        """metric: (B, N, C) block input, rand: optional noise (B, N) -> (keep (B, K), slot (B, N))."""
        B, N = metric.shape[:2]
        H, W, sx, sy = geo.H, geo.W, config.sx, config.sy
        R, Nc, P = prune_count(config, geo)
        dtype = getattr(torch, config.plan_dtype) if config.plan_dtype else metric.dtype
        m = F.normalize(metric.to(dtype), dim=-1)
        # Stage 1: SimScore (row sum of the cosine graph) plus noise; base = argmax of each cell.
        score = config.sim_beta * (m @ m.sum(dim=1)[..., None]).squeeze(-1)  # (B, N)
        if rand:
            score = score + config.noise_alpha * rand[0].to(dtype)
        loc = cell_argmax(score, H, W, sx, sy)  # (B, P)
        base, cand = cell_split(loc, H, W, sx, sy)  # (B, P), (B, Nc)
        return prune_similar_to_base(m, base, cand, R, config.recover, config.compiler)
