"""ToDo (token downsampling; Smith, Saxena, Saha, IJCAI 2024 demo), static-shape form. Rewrite form ``"kv"``.

Semantics of the reference code (research/tome.md section 6): in every self-attention of the selected levels, the
queries come from all N tokens of the attention input (B, N, C), the keys and values from a 2D downsample of it on
the H x W token grid, taken *before* the k/v projections (they are per-token linear maps, so nearest subsampling
commutes with them). No selection, no recovery: the attention output already has N tokens.

The downsample is a constant index table (a trace-time fact of H, W and the factor), so the graph holds one gather
(nearest, nearest-exact) or one gather + window reduction (avg_pool, max_pool): no sort, no scatter, no
data-dependent shape. Index rules, for an output size ``n_out`` of an input size ``n_in`` per axis:

* ``nearest``: row i picks floor(i * n_in / n_out) (i*f when f divides the size: the top-left of each block);
* ``nearest-exact``: floor((i + 0.5) * n_in / n_out) (i*f + f//2 when f divides the size);
* ``avg_pool`` / ``max_pool``: the f x f window at (i*f, j*f) (kernel = stride = f, leftover rows dropped).

These are exact integer formulas; ``F.interpolate`` computes the same picks in float32 and can land one row lower
when ``i * n_in / n_out`` is an exact integer that float32 rounds down (only when the factor does not divide the
grid, e.g. 26 -> 22; never for the official factor on divisible grids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import PruneConfig
from .base import Plan, SiteGeometry, SiteSkip, TokenMethod
from .tokens import gather_tokens

DOWNSAMPLE_METHODS = ("nearest-exact", "nearest", "avg_pool", "max_pool")


def _int_factor(ratio: float) -> int | None:
    """The integer factor f with ratio == 1 - 1/f**2 (to 1e-9), or None."""
    f = round((1.0 - ratio) ** -0.5)
    return f if abs(1.0 - 1.0 / (f * f) - ratio) < 1e-9 else None


@dataclass(frozen=True)
class ToDoConfig(PruneConfig):
    """ToDo (token downsampling, Smith et al. 2024): every query attends to keys/values of a 2D subsample of the
    attention input. No selection, no recovery; the output keeps all N tokens.

    Important args:
        factor: keys/values come from an (H // f) x (W // f) subsample of the H x W token grid at level 1 (the
            official ``downsample_factor``; default 2 when neither ``factor`` nor ``ratio`` is given).
        ratio: the fraction of keys/values removed, the alternative to ``factor`` for sweeps: the subsample is
            round(H * s) x round(W * s) with s = sqrt(1 - ratio). A ratio of the form 1 - 1/f**2 IS factor f
            (0.75 = factor 2, 0.8889 = 3, 0.9375 = 4). Giving both is allowed only when they agree.
            ``ratio=0`` (or ``factor=1``) leaves the model unchanged.

    Args to tinker with:
        factor_level_2: factor at level 2 (the next coarser attention grid; official
            ``downsample_factor_level_2``, default 1 = off); > 1 needs ``max_downsample >= 2``.
        downsample_method: ``"nearest-exact"`` (official default: the centre-ish token i*f + f//2 of each f x f
            block), ``"nearest"`` (the top-left token i*f, the official demo), ``"avg_pool"`` / ``"max_pool"``
            (f x f windows at stride f; need an integer factor).
    """

    method: ClassVar[str] = "todo"
    ratio: float | None = None  # type: ignore[assignment]  (derived from factor when omitted)
    factor: int | None = None
    factor_level_2: int = 1
    downsample_method: str = "nearest-exact"

    def __post_init__(self) -> None:
        for name in ("factor", "factor_level_2"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"todo: {name} must be an integer >= 1, got {value!r}")
        if self.ratio is None:  # the factor (official default 2) fixes the ratio; ``factor`` stays as given
            f = 2 if self.factor is None else self.factor
            object.__setattr__(self, "ratio", 1.0 - 1.0 / f ** 2)
        elif self.factor is not None and isinstance(self.ratio, (int, float)) and \
                abs(float(self.ratio) - (1.0 - 1.0 / self.factor ** 2)) > 1e-9:
            raise ValueError(f"todo: ratio {self.ratio} contradicts factor {self.factor}, which removes "
                             f"1 - 1/{self.factor}**2 = {1.0 - 1.0 / self.factor ** 2:.4f} of the keys/values; "
                             "pass only one of them")
        super().__post_init__()
        if self.downsample_method not in DOWNSAMPLE_METHODS:
            raise ValueError(f"todo: unknown downsample_method {self.downsample_method!r}; valid methods are "
                             f"{DOWNSAMPLE_METHODS}")
        if self.downsample_method.endswith("_pool") and self.effective_factor is None:
            raise ValueError(f"todo: downsample_method={self.downsample_method!r} needs an integer factor; "
                             f"ratio {self.ratio} is not 1 - 1/f**2 (pass factor=2, 3, 4, ...)")
        if self.scope != ("self",):
            raise ValueError(f"todo: scope must be 'self' (got {'+'.join(self.scope)!r}): ToDo keeps every query, "
                             "so there are no reduced tokens for cross-attention or the feed-forward to run on")
        if (self.sx, self.sy) != (2, 2):
            raise ValueError("todo: sx/sy are the cell strides of tome/sito; todo's stride is 'factor'")
        if self.factor_level_2 > 1 and self.max_downsample < 2:
            raise ValueError(f"todo: factor_level_2={self.factor_level_2} downsamples level 2, which needs "
                             f"max_downsample >= 2 (got {self.max_downsample})")

    @property
    def effective_factor(self) -> int | None:
        """The level-1 factor: ``factor`` if given, else f when ``ratio == 1 - 1/f**2``, else None (fractional)."""
        return self.factor if self.factor is not None else _int_factor(self.ratio)

    def max_ratio(self) -> float:
        return 1.0  # no cells: any factor is allowed (ratio < 1 is checked by PruneConfig)


def level_factor(config: ToDoConfig, level: int) -> int | None:
    """The integer factor at a site's level (None: level 1 with a fractional ``ratio``)."""
    return config.effective_factor if level == 1 else config.factor_level_2


def kv_grid(config: ToDoConfig, geo: SiteGeometry) -> tuple[int, int, int | None]:
    """(hk, wk, f): the size of the key/value grid at a site and the integer factor (None for a fractional ratio).

    Raises :class:`SiteSkip` when the site's level is not downsampled or the grid does not shrink.
    """
    if geo.level > 2:
        raise SiteSkip(f"ToDo downsamples levels 1 and 2 only (this site is at level {geo.level})")
    f = level_factor(config, geo.level)
    if geo.level == 2 and f == 1:
        raise SiteSkip("level 2 is not downsampled (factor_level_2=1, ToDo's default)")
    if f is not None:
        hk, wk = geo.H // f, geo.W // f
        if hk == 0 or wk == 0:
            raise SiteSkip(f"grid {geo.H}x{geo.W} is smaller than the factor {f}")
    else:
        s = math.sqrt(1.0 - config.ratio)
        hk, wk = max(1, math.floor(geo.H * s + 0.5)), max(1, math.floor(geo.W * s + 0.5))
    if hk * wk >= geo.N:
        raise SiteSkip(f"ratio {config.ratio:.4f} keeps all {geo.N} keys/values of the {geo.H}x{geo.W} grid")
    return hk, wk, f


def pick(n_in: int, n_out: int, exact: bool, device: torch.device) -> torch.Tensor:
    """(n_out,) source rows of a nearest (``exact=False``) or nearest-exact downsample from n_in to n_out."""
    i = torch.arange(n_out, device=device)
    rows = ((2 * i + 1) * n_in) // (2 * n_out) if exact else (i * n_in) // n_out
    return rows.clamp(max=n_in - 1)


class ToDo(TokenMethod[ToDoConfig]):
    """Keys and values from a strided/nearest (or pooled) 2D subsample; all queries kept."""

    name = "todo"
    config_type = ToDoConfig
    uses_metric = False
    form = "kv"

    def budget(self, config: ToDoConfig, geo: SiteGeometry) -> int:
        """M = hk * wk key/value tokens (all N queries stay)."""
        hk, wk, _ = kv_grid(config, geo)
        return hk * wk

    def plan(self, config: ToDoConfig, geo: SiteGeometry, metric: torch.Tensor, *rand: torch.Tensor) -> Plan:
        """metric: (B, N, C), used only for its device -> (idx (1, M, w),): the w source tokens of each of the
        M key/value tokens (w = 1 for nearest, f*f for a pool window)."""
        hk, wk, f = kv_grid(config, geo)
        device, W = metric.device, geo.W
        if config.downsample_method.endswith("_pool"):
            assert f is not None  # guaranteed by ToDoConfig
            off = torch.arange(f, device=device)
            rows = (torch.arange(hk, device=device)[:, None] * f + off).view(hk, 1, f, 1)  # (hk, 1, f, 1)
            cols = (torch.arange(wk, device=device)[:, None] * f + off).view(1, wk, 1, f)  # (1, wk, 1, f)
            return ((rows * W + cols).view(1, hk * wk, f * f),)
        exact = config.downsample_method == "nearest-exact"
        rows, cols = pick(geo.H, hk, exact, device), pick(W, wk, exact, device)
        return ((rows[:, None] * W + cols[None, :]).view(1, hk * wk, 1),)

    def reduce(self, config: ToDoConfig, plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) attention input -> (B, M, C), the key/value source tokens."""
        idx = plan[0]
        _, M, w = idx.shape
        picked = gather_tokens(x, idx.view(1, M * w))  # (B, M * w, C)
        if w == 1:
            return picked
        windows = picked.view(x.shape[0], M, w, x.shape[2])
        return windows.mean(dim=2) if config.downsample_method == "avg_pool" else windows.amax(dim=2)

    def restore(self, config: ToDoConfig, plan: Plan, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("todo keeps every query (rewrite form 'kv'): there is nothing to restore")
