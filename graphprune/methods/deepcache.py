"""DeepCache's feature caching as a graph cut (Ma et al., CVPR 2024), with no token pruning.

The step-aware runtime (:mod:`graphprune.runtime.steps`) runs the *full* graph on full steps (it also outputs the deep
feature at the cut, :mod:`graphprune.passes.cut`), the *shallow* graph on the cached feature in between, and returns the
previous output on reuse steps. The method has no token math: every attention stays as it is (``ratio`` is 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import SiteGeometry, SiteSkip, TokenMethod
from .caching import CachingConfig


@dataclass(frozen=True)
class DeepCacheConfig(CachingConfig):
    """Feature caching alone (DeepCache's mechanism as a graph cut): full steps refresh the cached deep feature,
    shallow steps run only the outer branch of the UNet on it, reuse steps return the previous output.
    ``ratio`` must stay 0 (use ``method="dato"`` for caching plus pruning)."""

    method: ClassVar[str] = "deepcache"
    ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio != 0:
            raise ValueError("deepcache does not prune tokens (ratio must be 0); use method='dato' for feature "
                             "caching plus token pruning")


class DeepCache(TokenMethod[DeepCacheConfig]):
    """Step caching only: the runtime picks full / shallow / reuse steps; no site is pruned."""

    name = "deepcache"
    config_type = DeepCacheConfig
    uses_metric = False
    prunes_tokens = False

    def every_step_options(self, ratio: float) -> dict[str, Any]:
        return {"ratio": 0.0, "cache_interval": 1}  # every step full: the unchanged UNet

    def runtime(self, config: DeepCacheConfig) -> str:
        return "steps"

    def unchanged_reason(self, config: DeepCacheConfig) -> str | None:
        return "deepcache caches features across steps; no token is pruned"

    def budget(self, config: DeepCacheConfig, geo: SiteGeometry) -> int:
        raise SiteSkip("deepcache does not prune tokens")


__all__ = ["DeepCacheConfig", "DeepCache"]
