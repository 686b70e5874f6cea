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

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..config import check_choice
from .base import KeepSlotRecovery, Plan, RandomSpec, SiteGeometry, TokenMethod
from .caching import CachingConfig
from .sito import RECOVERIES, prune_budget, prune_count, prune_similar_to_base
from .tokens import cell_argmax, cell_split

SELECTIONS = ("dynamics", "local_random")


@dataclass(frozen=True)
class DaToConfig(CachingConfig):
    """DaTo: feature caching + SiTo-style pruning whose base tokens follow the temporal dynamics of the noise
    prediction (official code semantics, research/dato.md section 3).

    Important args:
        ratio: fraction of tokens pruned at each top-level self-attention (official constant: 0.4).
        gamma: weight of the dynamics d = mean_c |eps_(c-1) - eps_(c-2)| in the base score (official: 0.1).
        noise_alpha: weight of the N(0, 1) noise in the base score (official: 0.1).
        random_sign: flip the sign of gamma at random per site and call (the official code does; about half the
            sites then pick the least dynamic token of each cell as base).
        align_cfg: the conditional half of a CFG batch [uncond; cond] uses the unconditional half's base tokens.
        selection: ``"dynamics"`` (official default) or ``"local_random"`` (a random base position per cell,
            shared by the batch; no dynamics).
        recover: ``"kept"`` (official: copy the most similar kept token) or ``"base"``.
        seed: seed of graphprune's own generator for noise, signs and offsets.
    """

    method: ClassVar[str] = "dato"
    ratio: float = 0.4
    gamma: float = 0.1
    noise_alpha: float = 0.1
    random_sign: bool = True
    align_cfg: bool = True
    selection: str = "dynamics"
    recover: str = "kept"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune is not None:
            raise ValueError("dato prunes with its own rule (ratio, gamma, ...); prune={...} adds a per-step token "
                             "method to method='deepcache'")
        check_choice("", "selection", self.selection, SELECTIONS)
        check_choice("", "recover", self.recover, RECOVERIES)


def dynamics(eps_prev: torch.Tensor, eps_prev2: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """eps_prev, eps_prev2: (B, c, h, w) -> d: (B, H * W), mean_c |eps_prev - eps_prev2| pooled to the H x W grid."""
    d = (eps_prev - eps_prev2).abs().mean(dim=1, keepdim=True)  # (B, 1, h, w)
    if tuple(d.shape[-2:]) != (H, W):
        d = F.adaptive_avg_pool2d(d, (H, W))
    return d.flatten(1)


class DaTo(KeepSlotRecovery, TokenMethod[DaToConfig]):
    """Dynamics-aware base selection + SiTo pruning and copy recovery."""

    name = "dato"
    config_type = DaToConfig
    context_inputs = ("eps_prev", "eps_prev2")

    def every_step_options(self, ratio: float) -> dict[str, Any]:
        return {"ratio": ratio, "cache_interval": 1}  # every step full (pruned), no feature reuse

    def runtime(self, config: DaToConfig) -> str:
        return "steps"

    def budget(self, config: DaToConfig, geo: SiteGeometry) -> int:
        return prune_budget(config, geo)  # same token counts as SiTo: K = N - int(N * ratio)

    def random_inputs(self, config: DaToConfig, geo: SiteGeometry) -> tuple[RandomSpec, ...]:
        P = geo.cells(config.sx, config.sy)
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
        return prune_similar_to_base(m, base.expand(B, -1), cand.expand(B, -1), R, config.recover, config.compiler)
