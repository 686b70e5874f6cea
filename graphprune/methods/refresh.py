"""Refresh steps of CA-ToMe: at which UNet calls of a generation the token match is recomputed.

The official configs (``ca_tome.confs.CacheConf``, research/catome.md section 3) list *1-based* step numbers: the
official pipeline passes ``inference_step = i + 1`` for loop index i, so its step s is our 0-based call s - 1, and
its entry 0 never matches. With SD1.5's default PNDM scheduler, 50 PLMS steps make 51 UNet calls (steps 1..51),
which is why some configs list 50 and 51; with a one-call-per-step sampler (DDIM, Euler) entries beyond the last call
simply never happen. Call 0 of every generation always refreshes: the official cache is never reset between images
(its second image reuses the first image's last match until its first listed step); graphprune does not do that.

    build_refresh("config3").steps   # (0, 7, 10, 12, 19, 24, 29, 34, 44, 45, 46, 47, 48)
    build_refresh(5).is_refresh(10)  # True: every 5th call (0, 5, 10, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The official refresh lists (1-based step numbers), name -> (steps, description).
OFFICIAL_CONFIGS: dict[str, tuple[tuple[int, ...], str]] = {
    "config1": ((0, 1, 2, 3, 5, 10, 15, 25, 35), "CONFIG_1: dense early"),
    "config2": ((0, 10, 11, 12, 15, 20, 25, 30, 35, 45), "CONFIG_2 (a 1.24x headline config)"),
    "config3": ((0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49), "CONFIG_3: best FID in the official table"),
    "config4": ((0, 9, 13, 14, 15, 28, 29, 32, 36, 45), "CONFIG_4"),
    "adaptive": ((0, 1, 5, 7, 10, 12, 15, 35, 40, 45, 46, 47, 48, 49, 50, 51), "ADAPTIVE"),
    "every5": ((0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50), "CONFIG_Five: official steps 5, 10, ..., 50"),
}


@dataclass(frozen=True)
class RefreshSchedule:
    """Which 0-based UNet calls recompute the match: an explicit set (``steps``) or every ``interval``-th call."""

    name: str
    steps: tuple[int, ...] | None = None
    interval: int | None = None

    def is_refresh(self, step: int) -> bool:
        """Whether call ``step`` (0-based within a generation) recomputes the match; call 0 always does."""
        if step == 0:
            return True
        if self.interval is not None:
            return step % self.interval == 0
        return step in (self.steps or ())

    def refresh_steps(self, num_calls: int) -> list[int]:
        """The refreshing calls among the first ``num_calls``."""
        return [s for s in range(num_calls) if self.is_refresh(s)]

    def describe(self) -> str:
        if self.interval is not None:
            return f"refresh every {self.interval} call(s)"
        return f"refresh {self.name} at calls {list(self.steps or ())}"


def translate_official(steps: tuple[int, ...]) -> tuple[int, ...]:
    """Official 1-based step numbers -> our 0-based call indices (entry 0 never matches: dropped), plus call 0."""
    return tuple(sorted({0} | {s - 1 for s in steps if s >= 1}))


def build_refresh(refresh: Any) -> RefreshSchedule:
    """A preset name, an int interval or a list of 0-based calls -> a :class:`RefreshSchedule` (ValueError if bad)."""
    if isinstance(refresh, str):
        key = refresh.lower()
        if key not in OFFICIAL_CONFIGS:
            raise ValueError(f"catome: unknown refresh preset {refresh!r}; presets are {sorted(OFFICIAL_CONFIGS)}, "
                             "or pass an int (every n calls) or a list of 0-based call indices")
        return RefreshSchedule(name=key, steps=translate_official(OFFICIAL_CONFIGS[key][0]))
    if isinstance(refresh, bool):
        raise ValueError(f"catome: refresh must be a preset name, an int or a list of call indices, got {refresh!r}")
    if isinstance(refresh, int):
        if refresh < 1:
            raise ValueError(f"catome: a refresh interval must be >= 1 (1 = recompute at every call), got {refresh}")
        return RefreshSchedule(name=f"every-{refresh}", interval=refresh)
    if isinstance(refresh, (list, tuple)):
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in refresh):
            raise ValueError(f"catome: refresh lists hold 0-based call indices >= 0, got {list(refresh)!r}")
        return RefreshSchedule(name="list", steps=tuple(sorted({0, *refresh})))
    raise ValueError(f"catome: refresh must be a preset name {sorted(OFFICIAL_CONFIGS)}, an int or a list of call "
                     f"indices, got {refresh!r}")


__all__ = ["RefreshSchedule", "build_refresh", "translate_official", "OFFICIAL_CONFIGS"]
