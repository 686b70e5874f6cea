"""DaTo (Zhang et al., arXiv 2501.00375): SiTo's pruning with base tokens chosen by temporal dynamics.

Per pruned self-attention site and UNet call (research/dato.md section 3, official code semantics):

1. dynamics d = mean over channels of |eps_(c-1) - eps_(c-2)|, the change of the noise prediction between the two
   previous UNet calls, (B, h, w) at latent resolution, average-pooled to the site's grid if coarser. The runtime
   feeds the two previous predictions as graph inputs (zeros at the first call, equal ones at the second and after
   a reuse step, so d = 0 there, as in the code).
2. score = g * d + noise_alpha * xi, xi ~ N(0, 1) (B, N); g = +gamma or -gamma, the sign drawn per site and call
   (``random_sign``, as the code's host ``random.random() < 0.5``). Base token of each sy x sx cell = argmax. With
   ``align_cfg`` the conditional half of a [uncond; cond] batch takes the unconditional half's base positions.
   ``selection="local_random"``: one random position per cell shared by the batch instead.
3. SiTo's stages 2 and 3 (:func:`~graphprune.methods.sito.prune_similar_to_base`): prune the R = int(N * ratio)
   candidates most similar to a base token; each pruned token copies its most similar kept token's output.

Random tensors (xi, signs, offsets) are graph inputs drawn by graphprune's own seeded generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import DaToConfig
from .base import Plan, RandomSpec, SiteGeometry, TokenMethod, register_method
from .sito import SiTo, prune_count, prune_similar_to_base
from .tokens import cell_argmax, cell_split, gather_tokens


def dynamics(eps_prev: torch.Tensor, eps_prev2: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """eps_prev, eps_prev2: (B, c, h, w) -> d: (B, H * W), mean_c |eps_prev - eps_prev2| pooled to the H x W grid."""
    d = (eps_prev - eps_prev2).abs().mean(dim=1, keepdim=True)  # (B, 1, h, w)
    if tuple(d.shape[-2:]) != (H, W):
        d = F.adaptive_avg_pool2d(d, (H, W))
    return d.flatten(1)


@register_method
class DaTo(TokenMethod[DaToConfig]):
    """Dynamics-aware base selection + SiTo pruning and copy recovery."""

    name = "dato"
    config_type = DaToConfig
    context_inputs = ("eps_prev", "eps_prev2")

    def budget(self, config: DaToConfig, geo: SiteGeometry) -> int:
        return SiTo().budget(config, geo)  # same token counts as SiTo: K = N - int(N * ratio)

    def random_inputs(self, config: DaToConfig, geo: SiteGeometry) -> tuple[RandomSpec, ...]:
        P = (geo.H // config.sy) * (geo.W // config.sx)
        if config.selection == "local_random":
            return (RandomSpec((1, P), "randint", config.sx * config.sy),)
        specs = []
        if config.noise_alpha != 0:
            specs.append(RandomSpec((geo.B, geo.N), "normal"))
        if config.random_sign and config.gamma != 0:
            specs.append(RandomSpec((1,), "randint", 2))
        return tuple(specs)

    def base_positions(self, config: DaToConfig, geo: SiteGeometry, eps_prev: torch.Tensor, eps_prev2: torch.Tensor,
                       *rand: torch.Tensor) -> torch.Tensor:
        """-> (B, P) in-cell position of each cell's base token."""
        B = geo.B
        if config.selection == "local_random":
            return rand[0].expand(B, -1)
        rand = list(rand)
        noise = rand.pop(0) if config.noise_alpha != 0 else None
        d = dynamics(eps_prev, eps_prev2, geo.H, geo.W)  # (B, N)
        gamma = config.gamma
        if config.random_sign and config.gamma != 0:  # one sign per site and call, shared by the batch
            gamma = config.gamma * (1 - 2 * rand.pop(0).to(d.dtype))  # (1,): +gamma or -gamma
        score = gamma * d
        if noise is not None:
            score = score + config.noise_alpha * noise.to(d.dtype)
        loc = cell_argmax(score, geo.H, geo.W, config.sx, config.sy)
        if config.align_cfg and B % 2 == 0:
            loc = torch.cat([loc[: B // 2], loc[: B // 2]], dim=0)
        return loc

    def plan(self, config: DaToConfig, geo: SiteGeometry, metric: torch.Tensor, *inputs: torch.Tensor) -> Plan:
        """metric: (B, N, C), eps_prev and eps_prev2: (B, c, h, w), then the random inputs
        -> (keep (B, K), slot (B, N))."""
        eps_prev, eps_prev2, *rand = inputs
        B = metric.shape[0]
        R, _, _ = prune_count(config, geo)
        m = F.normalize(metric, dim=-1)
        loc = self.base_positions(config, geo, eps_prev, eps_prev2, *rand)
        base, cand = cell_split(loc, geo.H, geo.W, config.sx, config.sy)
        return prune_similar_to_base(m, base.expand(B, -1), cand.expand(B, -1), R, config.recover)

    def reduce(self, config: DaToConfig, plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, K, C), the kept tokens."""
        return gather_tokens(x, plan[0])

    def restore(self, config: DaToConfig, plan: Plan, y: torch.Tensor) -> torch.Tensor:
        """y: (B, K, c) -> (B, N, c); pruned tokens copy their source slot."""
        return gather_tokens(y, plan[1])
