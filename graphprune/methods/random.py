"""Random pruning: the floor every method must beat at equal K. Rewrite form ``"tokens"`` (like SiTo).

Per call and batch element: keep K = N - int(N * ratio) tokens chosen uniformly at random, run the attention on
them, and give each pruned token a copy of the output of its nearest kept token on the H x W grid (Euclidean grid
distance; ties go to the kept token with the lowest raster index).

The randomness is a graph input: one (B, N) standard-normal draw per site and call from graphprune's own seeded
generator. The R = int(N * ratio) tokens with the largest draws are pruned: for i.i.d. continuous draws every
K-subset is equally likely, so a normal draw serves as well as a uniform one. Static shapes throughout: TopK on the
smaller side (:func:`~.tokens.top_and_rest`), the complement by cumsum + scatter, no NonZero.

Cost: the nearest-kept search is a dense (B, R, K) float32 distance table (the same size as SiTo's (R, Ku) similarity
block); at N = 16384 and ratio 0.5 that is 256 MiB per batch element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import PruneConfig
from .base import KeepSlotRecovery, Plan, RandomSpec, SiteGeometry, SiteSkip, TokenMethod
from .tokens import complement, scatter_slots, top_and_rest


@dataclass(frozen=True)
class RandomConfig(PruneConfig):
    """Random pruning, the floor every method must beat at equal K: keep K = N - int(N * ratio) tokens chosen
    uniformly at random (per call and batch element), copy each pruned token's output from its nearest kept token
    on the grid (Euclidean; ties to the lowest raster index).

    Args to tinker with:
        seed: seed of graphprune's own generator (one (B, N) noise draw per site and call).
    """

    method: ClassVar[str] = "random"
    seed: int = 0

    def max_ratio(self) -> float:
        return 1.0  # no cells: any K >= 1 works


class RandomPrune(KeepSlotRecovery, TokenMethod[RandomConfig]):
    """Uniform random kept set, nearest-kept-token copy recovery."""

    name = "random"
    config_type = RandomConfig
    uses_metric = False

    def budget(self, config: RandomConfig, geo: SiteGeometry) -> int:
        R = int(geo.N * config.ratio)
        if R <= 0:
            raise SiteSkip(f"ratio {config.ratio} prunes no token of N={geo.N}")
        return geo.N - R

    def random_inputs(self, config: RandomConfig, geo: SiteGeometry) -> tuple[RandomSpec, ...]:
        return (RandomSpec((geo.B, geo.N), "normal"),)

    def plan(self, config: RandomConfig, geo: SiteGeometry, metric: torch.Tensor, *rand: torch.Tensor) -> Plan:
        """metric: (B, N, C) (unused but for its device), rand: (noise (B, N),) -> (keep (B, K), slot (B, N)).

        ``keep`` is in ascending raster order, ``slot[b, n]`` is the kept slot whose output token n gets.
        """
        noise = rand[0]
        B, N = noise.shape
        R, W = int(N * config.ratio), geo.W
        K = N - R
        pruned, _ = top_and_rest(noise, R)  # (B, R): the R largest draws
        keep = complement(pruned, N)  # (B, K), ascending: argmin's first index is the lowest raster index
        ky, kx = (keep // W).float(), (keep % W).float()
        py, px = (pruned // W).float(), (pruned % W).float()
        d2 = (py[:, :, None] - ky[:, None, :]) ** 2 + (px[:, :, None] - kx[:, None, :]) ** 2  # (B, R, K), exact
        src = d2.argmin(dim=-1)  # (B, R) nearest kept slot, first (lowest raster index) on ties
        ar = torch.arange(K, device=noise.device).expand(B, K)
        slot = scatter_slots(torch.cat([keep, pruned], 1), torch.cat([ar, src], 1), N)
        return keep, slot
