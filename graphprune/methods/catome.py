"""CA-ToMe (Cached Adaptive Token Merging) in static-shape form, exact for any data-dependent merge count.

Semantics (research/catome.md sections 2-4, the official ``bipartite_soft_matching_random2d``): tomesd's split into
one destination per sy x sx cell and S sources; cosine similarity of the pre-norm block input; each source's best
destination (``node_max``, ``node_idx``); sources ranked by ``node_max`` (descending). The merge count is
data-dependent: r = max over the batch of #{node_max >= T} (``threshold_rule="batch-max"``, code-exact: every row
merges its top r) or each row's own count (``"per-row"``). Merge = mean into the destination, unmerge = copy.

Static shapes (catome.md section 6 (E)): a compiled variant fixes ``r_lo = geo.bucket`` tokens that are always
merged; the K = N - r_lo tokens are [ranks r_lo..S-1 as *optional slots* | P destinations]. An optional slot whose
rank is merged at run time adds itself to its destination's mean (weight 1) and is hidden from the self-attention
keys (bias -inf); after attention it copies its destination's output. The result equals the official code whenever
``r_lo <= r`` (the runtime checks this at refresh steps and reruns the step if not).

The plan is carried across steps: :meth:`CaToMe.state_of` returns (offsets, rank order, best destination, merge
decisions, counts); cached steps rebuild the plan from them with :meth:`CaToMe.plan_from_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import PruneConfig, check_choice, check_int
from .base import Plan, RandomSpec, SiteGeometry, SiteSkip, StateSpec, TokenMethod
from .refresh import build_refresh
from .tokens import best_match, cell_split, gather_tokens, scatter_slots

THRESHOLD_RULES = ("batch-max", "per-row")
BUCKET_SCOPES = ("level", "site")


@dataclass(frozen=True)
class CaToMeConfig(PruneConfig):
    """CA-ToMe: tomesd's bipartite matching where a cosine threshold decides how many tokens merge, and the match is
    recomputed only at *refresh* steps and reused in between (official code semantics, research/catome.md).

    Important args:
        threshold: cosine-similarity threshold T (official default 0.7). ``T >= 1`` merges nothing (the UNet runs
            unchanged); ``T = -1`` merges every source token (tomesd at ratio 0.75).
        refresh: the steps at which the match is recomputed (step 0 of every generation always is). A named preset
            of the official configs (``"config1"`` .. ``"config4"``, ``"adaptive"``, ``"every5"``; their 1-based
            step numbers translated to 0-based UNet calls, see :mod:`graphprune.refresh`), an int n (every n-th
            call: 0, n, 2n, ...), or an explicit list of 0-based call indices.
        exact: ``True`` (default): the merge count follows T exactly. The host reads the count at refresh steps (as
            the official code does) and runs the graph compiled for the largest budget bucket below it; merges
            above the bucket are applied inside the graph by masking. ``False``: one graph with a fixed count per
            site (``fixed_ratio``, or calibrated from T on the first call), no host reads at all (for TensorRT and
            CUDA graphs).

    Args to tinker with:
        ratio: an upper bound on the merged fraction of each site (default: the cap ``1 - 1/(sx*sy)``, i.e. only T
            limits it, as in the official code).
        threshold_rule: ``"batch-max"`` (official code: one count r = max over the batch of #{best-match >= T},
            every row merges its top r) or ``"per-row"`` (each row merges exactly its pairs >= T: the paper's words).
        buckets: the budget buckets, as merged fractions of N (0 is always added); each compiled variant fixes one
            bucket per group of sites.
        bucket_scope: ``"level"`` (one bucket per resolution level: the smallest its sites allow; fewer variants)
            or ``"site"`` (one per site).
        max_variants: the most compiled graphs the runtime may hold; beyond it the best compiled variant that is
            still exact is reused.
        fixed_ratio: ``exact=False`` only: the merged fraction of every site (None: calibrate from T).
        use_rand, seed: random destination per 2x2 cell (drawn at refresh steps from graphprune's own generator,
            shared by the batch; off for odd batches, as tomesd).
    """

    method: ClassVar[str] = "catome"
    ratio: float | None = None  # type: ignore[assignment]  (None: the cap, only the threshold limits merging)
    threshold: float = 0.7
    refresh: Any = "config3"
    exact: bool = True
    threshold_rule: str = "batch-max"
    buckets: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    bucket_scope: str = "level"
    max_variants: int = 8
    fixed_ratio: float | None = None
    use_rand: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ratio is None:
            object.__setattr__(self, "ratio", self.max_ratio())
        super().__post_init__()
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < -1:
            raise ValueError(f"catome: threshold must be a cosine similarity >= -1 (T >= 1 merges nothing), got "
                             f"{self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if "block" in self.scope:
            raise ValueError("catome: scope='block' is not supported (the match is made and cached per transformer "
                             "layer); use 'self' (official), 'self+cross' or 'self+cross+ff'")
        check_choice("catome", "threshold_rule", self.threshold_rule, THRESHOLD_RULES)
        check_choice("catome", "bucket_scope", self.bucket_scope, BUCKET_SCOPES)
        buckets = self.buckets if isinstance(self.buckets, (list, tuple)) else (self.buckets,)
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in buckets):
            raise ValueError(f"catome: buckets are merged fractions in [0, 1), got {self.buckets!r}")
        object.__setattr__(self, "buckets", tuple(sorted({0.0, *map(float, buckets)})))
        check_int("catome", "max_variants", self.max_variants, 2)
        if self.fixed_ratio is not None:
            if self.exact:
                raise ValueError("catome: fixed_ratio is the merge fraction of exact=False; pass exact=False too")
            if not 0 < self.fixed_ratio <= self.max_ratio():
                raise ValueError(f"catome: fixed_ratio must be in (0, {self.max_ratio():.4f}], got {self.fixed_ratio}")
        if isinstance(self.refresh, list):
            object.__setattr__(self, "refresh", tuple(self.refresh))
        build_refresh(self.refresh)  # validates the refresh steps


def site_counts(config: CaToMeConfig, geo: SiteGeometry) -> tuple[int, int, int]:
    """(S sources, P destinations, cap on merged tokens) of a site."""
    P = geo.cells(config.sx, config.sy)
    S = geo.N - P
    return S, P, min(int(geo.N * config.ratio), S)


def bucket_merges(config: CaToMeConfig, geo: SiteGeometry) -> list[int]:
    """The site's bucket values as merged-token counts r_lo (ascending, distinct, each <= the cap)."""
    _, _, cap = site_counts(config, geo)
    return sorted({min(int(geo.N * b), cap) for b in config.buckets})


def bucket_for(config: CaToMeConfig, geo: SiteGeometry, r: int) -> int:
    """The largest bucket r_lo <= r (r: the merge count the data allows at this site)."""
    return max(b for b in bucket_merges(config, geo) if b <= r)


class CaToMe(TokenMethod[CaToMeConfig]):
    """Threshold-driven bipartite merging with masked optional slots (exact for any r >= the variant's bucket)."""

    name = "catome"
    config_type = CaToMeConfig
    stateful = True
    masks_keys = True
    count_state = "stats"

    def every_step_options(self, ratio: float) -> dict[str, Any]:
        if ratio == 0:
            return {"ratio": 0.0}
        return {"exact": False, "fixed_ratio": ratio, "refresh": 1}  # a fixed count, matched at every call

    def runtime(self, config: CaToMeConfig) -> str:
        # T >= 1 merges nothing (the official code returns identity): one plain graph, every site unchanged
        return "match-cache" if self.unchanged_reason(config) is None else "none"

    def unchanged_reason(self, config: CaToMeConfig) -> str | None:
        if config.threshold >= 1:
            return f"threshold {config.threshold:g} >= 1 merges nothing: unchanged"
        return super().unchanged_reason(config)

    def budget(self, config: CaToMeConfig, geo: SiteGeometry) -> int:
        geo.require_cells(config.sx, config.sy)
        S, P, cap = site_counts(config, geo)
        if cap <= 0:
            raise SiteSkip(f"ratio cap {config.ratio} allows no merge at N={geo.N}")
        if not 0 <= geo.bucket <= cap:
            raise ValueError(f"catome: bucket {geo.bucket} outside [0, {cap}] at N={geo.N}")
        return geo.N - geo.bucket

    def bucket_for(self, config: CaToMeConfig, geo: SiteGeometry, r: int) -> int:
        return bucket_for(config, geo, r)

    def fixed_bucket(self, config: CaToMeConfig, geo: SiteGeometry) -> int:
        return min(int(geo.N * config.fixed_ratio), site_counts(config, geo)[2])

    def random_inputs(self, config: CaToMeConfig, geo: SiteGeometry) -> tuple[RandomSpec, ...]:
        if config.use_rand and geo.B % 2 == 0:  # odd batches: top-left destinations, as tomesd/CA-ToMe
            return (RandomSpec((1, geo.cells(config.sx, config.sy)), "randint", config.sx * config.sy),)
        return ()

    def state_specs(self, config: CaToMeConfig, geo: SiteGeometry) -> tuple[StateSpec, ...]:
        S, P, _ = site_counts(config, geo)
        return (StateSpec("offsets", (1, P), torch.int64), StateSpec("order", (geo.B, S), torch.int64),
                StateSpec("best_dst", (geo.B, S), torch.int64), StateSpec("merge", (geo.B, S), torch.bool),
                StateSpec("stats", (2,), torch.int64))

    def plan(self, config: CaToMeConfig, geo: SiteGeometry, metric: torch.Tensor, *rand: torch.Tensor) -> Plan:
        """metric: (B, N, C) block input -> the plan (see :meth:`_plan`); the match is computed from scratch."""
        B = metric.shape[0]
        S, P, cap = site_counts(config, geo)
        loc = rand[0] if rand else torch.zeros(1, P, dtype=torch.int64, device=metric.device)
        dst_pos, src_pos = cell_split(loc, geo.H, geo.W, config.sx, config.sy)  # (1, P), (1, S)
        m = metric / metric.norm(dim=-1, keepdim=True)  # no epsilon, model dtype (as the official code)
        # best match over the (B, S, P) scores
        node_max, node_idx = best_match(gather_tokens(m, src_pos), gather_tokens(m, dst_pos), config.compiler)
        order = torch.sort(node_max, dim=1, descending=True, stable=True).indices  # rank -> source index
        above = node_max.gather(1, order) >= config.threshold  # (B, S): a prefix of each row
        count = above.sum(dim=1).clamp(max=cap)  # (B,)
        ranks = torch.arange(S, device=metric.device)
        if not config.exact:  # a fixed count per site (the variant's bucket); T only calibrated it
            merge = (ranks < geo.bucket).expand(B, S)
            safe = count.new_full((), geo.bucket)  # derived from count: a fake tensor under fake mode too
        elif config.threshold_rule == "batch-max":  # official: one r for the batch, every row merges its top r
            r = count.max()
            merge = (ranks < r).expand(B, S)
            safe = r
        else:  # each row merges exactly its own pairs >= T
            merge = ranks < count[:, None]
            safe = count.min()
        stats = torch.stack([safe, merge.sum()])  # [r the buckets may rely on, merged tokens over the batch]
        return self._plan(config, geo, loc, order, node_idx, merge, stats)

    def plan_from_state(self, config: CaToMeConfig, geo: SiteGeometry, *state: torch.Tensor) -> Plan:
        return self._plan(config, geo, *state)

    def state_of(self, config: CaToMeConfig, geo: SiteGeometry, plan: Plan) -> tuple[torch.Tensor, ...]:
        # dense copies: the next graph is compiled for contiguous inputs (an expanded (B, S) mask has stride 0)
        return tuple(t.contiguous() for t in plan[7:])

    def _plan(self, config: CaToMeConfig, geo: SiteGeometry, loc: torch.Tensor, order: torch.Tensor,
              node_idx: torch.Tensor, merge: torch.Tensor, stats: torch.Tensor) -> Plan:
        """-> (src_pos (1, S), dst_pos (1, P), order (B, S), tgt (B, S) destination of each rank, weight (B, S) 1 for
        merged ranks, slot (B, N) unmerge map, bias (B, 1, 1, K), then the state: loc, order, node_idx, merge, stats).
        Ranks < r_lo are merged whatever ``merge`` says (exact when r >= r_lo)."""
        B, S = order.shape
        P = loc.shape[1]
        r_lo = geo.bucket
        n_opt = S - r_lo
        device = order.device
        dst_pos, src_pos = cell_split(loc, geo.H, geo.W, config.sx, config.sy)
        ranks = torch.arange(S, device=device)
        merged = merge | (ranks < r_lo)  # (B, S)
        tgt = node_idx.gather(1, order)  # (B, S) destination slot of each rank
        # Unmerge map: destination d -> slot n_opt + d; rank p -> its own slot p - r_lo, or its destination's.
        idx = torch.cat([dst_pos.expand(B, P), src_pos.expand(B, S).gather(1, order)], dim=1)
        slots = torch.cat([(n_opt + torch.arange(P, device=device)).expand(B, P),
                           torch.where(merged, n_opt + tgt, ranks - r_lo)], dim=1)
        slot = scatter_slots(idx, slots, geo.N)
        hidden = merged[:, r_lo:]  # optional slots merged at run time: not a key
        bias = torch.cat([torch.where(hidden, float("-inf"), 0.0),
                          torch.zeros(B, P, device=device)], dim=1)[:, None, None, :]
        return (src_pos, dst_pos, order, tgt, merged.float(), slot, bias, loc, order, node_idx, merge, stats)

    def uses_key_bias(self, config: CaToMeConfig) -> bool:
        return config.exact  # exact=False merges exactly the bucket: no optional slot is ever hidden

    def key_bias(self, config: CaToMeConfig, plan: Plan) -> torch.Tensor:
        return plan[6]

    def reduce(self, config: CaToMeConfig, plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, K, C) = [optional slots in rank order, destinations averaged with merged sources]."""
        src_pos, dst_pos, order, tgt, weight, _, bias = plan[:7]
        B, _, C = x.shape
        P = dst_pos.shape[1]
        n_opt = bias.shape[-1] - P
        xr = gather_tokens(gather_tokens(x, src_pos), order)  # (B, S, C) sources in rank order
        w = weight.to(x.dtype)
        summed = gather_tokens(x, dst_pos).scatter_add(1, tgt[..., None].expand(-1, -1, C), xr * w[..., None])
        counts = torch.ones(B, P, dtype=x.dtype, device=x.device).scatter_add(1, tgt, w)
        return torch.cat([xr[:, xr.shape[1] - n_opt:], summed / counts[..., None]], dim=1)

    def restore(self, config: CaToMeConfig, plan: Plan, y: torch.Tensor) -> torch.Tensor:
        """y: (B, K, c) -> (B, N, c); merged sources copy their destination's output."""
        return gather_tokens(y, plan[5])
