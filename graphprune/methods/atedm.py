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

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import PruneConfig
from ..schedule import PhaseSchedule
from .base import KeepSlotRecovery, Plan, SiteGeometry, SiteSkip, TokenMethod
from .gwpr import copy_sources, gwpr_scores, select_kept, split_heads
from .tokens import scatter_slots

HEAD_AGGREGATIONS = ("mean", "eir")
COPY_SIMILARITIES = ("logits", "probs")
K_ROUNDINGS = ("floor", "round", "ceil")
DSAP_PHASES = (None, "early", "late")


@dataclass(frozen=True)
class AtEdmConfig(PruneConfig):
    """AT-EDM (Wang et al., CVPR 2024): tokens ranked by G-WPR on a self-attention map, pruned once per transformer
    stack, the rest of the stack run on K tokens, pruned tokens refilled by copying their most attended kept token;
    DSAP leaves some stacks unpruned in early denoising steps (research/atedm.md; defaults = its section 11).

    Important args:
        ratio: fraction of tokens pruned at each pruning point (paper: 0.63, the 4.1-TFLOPs SD-XL budget).
            K = N - R with R = floor(N * ratio) (``k_rounding``).
        prune_layer: the 1-based layer of each stack whose self-attention map ranks the tokens. Its output is pruned
            when the stack has more layers (paper: after layer 1); in a one-layer stack (SD1.5) the pruning point
            is right after that layer's self-attention, so its cross-attention and feed-forward run on K tokens.
        dsap_steps: DSAP's tau: for the first ``dsap_steps`` UNet calls of a generation the ``dsap_blocks`` are not
            pruned, afterwards every stack is (two compiled variants). 0 turns DSAP off. [?] in the paper; 10.
        dagger: AT-EDM-dagger: no pruning at the finest attention level (SD-XL's 64x64 level).

    Args to tinker with:
        iterations: G-WPR power iterations T (s <- A^T s from s = 1/N). [?]; 1 = the column mean of the map.
        head_aggregation: ``"mean"`` (one G-WPR on the head-mean map) or ``"eir"`` (G-WPR per head, combined as
            sqrt(sum_h s_h^2), Zero-TPrune's "emphasizing informative region"). [?]
        query_subsample: > 1 estimates the T = 1 score from the queries on a strided ``q x q`` sub-grid (cost / q^2;
            not exact; needs iterations=1).
        query_chunk: queries per chunk of the streamed softmax (memory B*H*chunk*N per chunk).
        copy_similarity: copy source of a pruned token = argmax over kept tokens of its row of the ranking map:
            ``"logits"`` (head-mean q.k; exact argmax per head) or ``"probs"`` (head-mean softmax). [?]
        cfg_shared: the two halves of an even batch (CFG [uncond; cond]) share one plan (scores and copy
            similarities averaged over the halves). [?] default False: per sample.
        k_rounding: R = floor / round / ceil(N * ratio). [?]
        dsap_blocks: ``"auto"`` (the first attention block of each down stage and the last of each up stage) or a
            list of attention-block module paths (e.g. ``["down_blocks.1.attentions.0"]``).
        dsap_phase: ``None`` (the runtime switches phases by step), or ``"early"`` / ``"late"`` to compile one
            phase's graph as a stateless model (e.g. for FLOP counts).
        topk_max: the largest k a TopK may take (TensorRT: 3840); above it the kept set comes from chunked rank
            counting instead.
    """

    method: ClassVar[str] = "atedm"
    ratio: float = 0.63
    scope: tuple[str, ...] = ("block",)
    max_downsample: int = 64
    prune_layer: int = 1
    iterations: int = 1
    head_aggregation: str = "mean"
    query_subsample: int = 1
    query_chunk: int = 512
    copy_similarity: str = "logits"
    cfg_shared: bool = False
    k_rounding: str = "floor"
    dsap_steps: int = 10
    dsap_blocks: Any = "auto"
    dsap_phase: str | None = None
    dagger: bool = False
    topk_max: int = 3840

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope != ("block",):
            raise ValueError(f"atedm: scope must be 'block' (got {'+'.join(self.scope)!r}): AT-EDM prunes a whole "
                             "transformer stack after its ranking layer")
        for name, low in (("prune_layer", 1), ("iterations", 1), ("query_subsample", 1), ("query_chunk", 1),
                          ("dsap_steps", 0), ("topk_max", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"atedm: {name} must be an integer >= {low}, got {value!r}")
        if self.head_aggregation not in HEAD_AGGREGATIONS:
            raise ValueError(f"atedm: head_aggregation must be one of {HEAD_AGGREGATIONS}, got "
                             f"{self.head_aggregation!r}")
        if self.copy_similarity not in COPY_SIMILARITIES:
            raise ValueError(f"atedm: copy_similarity must be one of {COPY_SIMILARITIES}, got "
                             f"{self.copy_similarity!r}")
        if self.k_rounding not in K_ROUNDINGS:
            raise ValueError(f"atedm: k_rounding must be one of {K_ROUNDINGS}, got {self.k_rounding!r}")
        if self.dsap_phase not in DSAP_PHASES:
            raise ValueError(f"atedm: dsap_phase must be one of {DSAP_PHASES}, got {self.dsap_phase!r}")
        if self.query_subsample > 1 and self.iterations > 1:
            raise ValueError("atedm: query_subsample > 1 estimates the one-iteration score only (the sub-map is not "
                             "square); use iterations=1 or query_subsample=1")
        blocks = self.dsap_blocks
        if isinstance(blocks, list):
            blocks = tuple(blocks)
            object.__setattr__(self, "dsap_blocks", blocks)
        if not (blocks == "auto" or (isinstance(blocks, tuple) and all(isinstance(b, str) for b in blocks))):
            raise ValueError(f"atedm: dsap_blocks must be 'auto' or a list of attention-block module paths, got "
                             f"{blocks!r}")

    def max_ratio(self) -> float:
        return 1.0  # no cells: any K >= 1 works

    def pruned_count(self, n: int) -> int:
        """R, the tokens pruned of ``n`` (``k_rounding`` of n * ratio, at most n - 1)."""
        x = n * self.ratio
        r = {"floor": math.floor, "ceil": math.ceil, "round": lambda v: math.floor(v + 0.5)}[self.k_rounding](x)
        return min(int(r), n - 1)

    @property
    def step_aware(self) -> bool:
        """DSAP needs the step-aware runtime (two variants), unless a phase is forced or nothing is pruned."""
        return self.dsap_steps > 0 and self.dsap_phase is None and self.ratio > 0

    @property
    def max_variants(self) -> int:
        return 2

    def phase_config(self, kind: str) -> "AtEdmConfig":
        """The config of one DSAP phase's variant (``kind`` "early" or "late")."""
        return dataclasses.replace(self, dsap_phase=kind)

    def step_schedule(self) -> PhaseSchedule:
        return PhaseSchedule(boundary=self.dsap_steps)

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


class AtEdm(KeepSlotRecovery, TokenMethod[AtEdmConfig]):
    """G-WPR ranking of a self-attention map, top-K pruning of a transformer stack, attention-argmax copy refill."""

    name = "atedm"
    config_type = AtEdmConfig
    uses_metric = False
    plan_source = "attention"

    def every_step_options(self, ratio: float) -> dict[str, Any]:
        return {"ratio": ratio, "dsap_steps": 0}  # DSAP off: every call runs the all-pruned graph

    def runtime(self, config: AtEdmConfig) -> str:
        return "steps" if config.step_aware else "none"  # DSAP: two variants picked by step

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
