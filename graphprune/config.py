"""Typed, validated configuration: one frozen dataclass per method.

Entry points: :func:`parse_options` (the ``options`` dict of ``torch.compile``) and
:func:`config_to_dict` / :func:`config_from_dict` (JSON round trip, with a type name and version).

Every config shares the fields of :class:`PruneConfig` (ratio, scope, levels, the inner compiler);
methods add their own knobs. Unknown keys, unknown methods and out-of-range values raise
``ValueError`` naming the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

CONFIG_VERSION = 1
SCOPES = ("self", "cross", "ff", "block")
COMPILERS = ("inductor", "eager", "aot_eager", "tensorrt")
PLAN_DTYPES = (None, "float16", "bfloat16", "float32", "float64")
TODO_DOWNSAMPLE = ("nearest-exact", "nearest", "avg_pool", "max_pool")

# method name -> config class; filled by @register_config below (methods/ register their math separately).
_CONFIG_TYPES: dict[str, type["PruneConfig"]] = {}


def register_config(cls: type["PruneConfig"]) -> type["PruneConfig"]:
    """Class decorator: make ``cls`` reachable as ``options={"method": cls.method}``."""
    _CONFIG_TYPES[cls.method] = cls
    return cls


#: Methods on the roadmap: naming one raises NotImplementedError (listed in the README).
PLANNED_METHODS = {
}


def method_names() -> tuple[str, ...]:
    """Names of every registered method, sorted."""
    return tuple(sorted(_CONFIG_TYPES))


def _parse_scope(scope: Any) -> tuple[str, ...]:
    """'self' | 'self+cross' | 'self+cross+ff' | 'block' | a list of those words -> a sorted canonical tuple.

    ``'block'`` (the region form: prune once, run a whole transformer stack on K tokens, refill before its
    ``proj_out``) stands alone: it already covers self-attention, cross-attention and feed-forward."""
    if isinstance(scope, str):
        parts = [p.strip() for p in scope.replace(",", "+").split("+") if p.strip()]
    elif isinstance(scope, (list, tuple)):
        parts = [str(p) for p in scope]
    else:
        raise ValueError(f"scope must be a string like 'self+cross' or a list of {SCOPES}, got {scope!r}")
    bad = [p for p in parts if p not in SCOPES]
    if bad or not parts:
        raise ValueError(f"unknown scope part(s) {bad or parts!r}; valid parts are {SCOPES}, e.g. 'self+cross+ff'")
    if "block" in parts:
        if len(set(parts)) > 1:
            raise ValueError(f"scope 'block' stands alone (it covers self, cross and ff on the whole transformer "
                             f"stack); got {'+'.join(parts)!r}: pass scope='block'")
        return ("block",)
    if "self" not in parts:
        raise ValueError("scope must include 'self': the plan is made at the self-attention of each block")
    return tuple(p for p in SCOPES if p in parts)


@dataclass(frozen=True)
class PruneConfig:
    """Fields every method shares.

    Important args:
        ratio: fraction of the N tokens removed at each pruned site, ``0 <= ratio < 1`` (per-method caps apply:
            with 2x2 cells at most ``1 - 1/(sx*sy) = 0.75``). ``0`` leaves the model unchanged.
        scope: what runs on the K kept tokens: ``"self"`` (default), ``"self+cross"``, ``"self+cross+ff"``, or
            ``"block"``: the region form (tokens pruned once at a transformer stack's input, every layer of the stack
            runs on K tokens, N tokens refilled before its ``proj_out``).
        max_downsample: prune sites whose token grid is at most this factor coarser than the finest attention
            grid of the graph (1 = the highest-resolution level only, like tomesd's default).
        compiler: the inner compiler for the rewritten graph: ``"inductor"`` (default), ``"eager"`` (run the
            rewritten FX graph as is; for numerics and debugging), ``"aot_eager"`` or ``"tensorrt"`` (export and
            ``torch_tensorrt.dynamo.compile``, as :mod:`graphprune.export.tensorrt`; needs CUDA + torch-tensorrt).
        mode: forwarded to Inductor (``"max-autotune"``, ``"reduce-overhead"``, ...).

    Args to tinker with:
        sx, sy: the cell stride on the token grid (one destination/base token per sy x sx cell).
    """

    method: ClassVar[str] = ""
    ratio: float = 0.5
    scope: tuple[str, ...] = ("self",)
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    compiler: str = "inductor"
    mode: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", _parse_scope(self.scope))
        for name in ("sx", "sy", "max_downsample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ValueError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"ratio must satisfy 0 <= ratio < 1 (fraction of tokens removed), got {self.ratio}")
        object.__setattr__(self, "ratio", float(self.ratio))
        cap = self.max_ratio()
        if self.ratio > cap:
            raise ValueError(
                f"{self.method}: ratio {self.ratio} is above {cap:.4f} = 1 - 1/(sx*sy) with sx={self.sx}, "
                f"sy={self.sy} (one token per cell is always kept); lower the ratio or raise sx/sy"
            )
        if self.compiler not in COMPILERS:
            raise ValueError(f"unknown compiler {self.compiler!r}; valid compilers are {COMPILERS}")
        if self.mode is not None and self.compiler != "inductor":
            raise ValueError(f"mode={self.mode!r} is an Inductor option; it needs compiler='inductor'")
        if self.mode is not None:
            import torch._inductor

            valid = tuple(torch._inductor.list_mode_options())
            if self.mode not in valid:
                raise ValueError(f"unknown Inductor mode {self.mode!r}; valid modes are {valid}")

    def max_ratio(self) -> float:
        """The largest ratio this method accepts with the current cell stride."""
        return 1.0 - 1.0 / (self.sx * self.sy)

    @property
    def step_aware(self) -> bool:
        """Whether the backend returns a step-aware runtime (:class:`graphprune.runtime.StepRuntime`)."""
        return False

    @property
    def caches(self) -> bool:
        """Whether the step-aware runtime caches features across steps (needs a DeepCache-style graph cut)."""
        return False


@register_config
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


@register_config
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
        if self.recover not in ("kept", "base"):
            raise ValueError(f"recover must be 'kept' (official code) or 'base' (paper), got {self.recover!r}")
        if self.plan_dtype not in PLAN_DTYPES:
            raise ValueError(f"plan_dtype must be one of {PLAN_DTYPES}, got {self.plan_dtype!r}")


def _int_factor(ratio: float) -> int | None:
    """The integer factor f with ratio == 1 - 1/f**2 (to 1e-9), or None."""
    f = round((1.0 - ratio) ** -0.5)
    return f if abs(1.0 - 1.0 / (f * f) - ratio) < 1e-9 else None


@register_config
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
        if self.downsample_method not in TODO_DOWNSAMPLE:
            raise ValueError(f"todo: unknown downsample_method {self.downsample_method!r}; valid methods are "
                             f"{TODO_DOWNSAMPLE}")
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


@register_config
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


HEAD_AGGREGATIONS = ("mean", "eir")
COPY_SIMILARITIES = ("logits", "probs")
K_ROUNDINGS = ("floor", "round", "ceil")
DSAP_PHASES = (None, "early", "late")


@register_config
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
        import math

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

    def step_schedule(self) -> Any:
        from .schedule import PhaseSchedule

        return PhaseSchedule(boundary=self.dsap_steps)


STEP_KINDS = ("full", "shallow", "reuse")
SELECTIONS = ("dynamics", "local_random")


@dataclass(frozen=True)
class CachingConfig(PruneConfig):
    """Fields of the step-aware methods (feature caching across denoising steps; see :mod:`graphprune.schedule`).

    Important args:
        cache_interval: uniform schedule: a full step at 0, N, 2N, ... of each generation, shallow steps between
            (default 3 when no ``schedule`` is given).
        schedule: ``None``/``"uniform"`` (uses ``cache_interval``), ``"deepcache-nonuniform"`` (DeepCache's
            quadratic schedule; needs ``num_steps``), a named preset (``"dato-imagenet"``, ``"dato-coco"``), or an
            explicit list of step kinds (``"full"``, ``"shallow"``, ``"reuse"``), one per UNet call.
        cache_branch: where the graph is cut: the cached tensor is the input of the ``cache_branch``-th ResNet of the
            up path counted from the output end (0 = DeepCache's/DaTo's branch 0: only the last up stage runs).
        num_steps: UNet calls per generation; required by ``"deepcache-nonuniform"``, checked against list
            schedules, and selects the 50-call (DDIM) or 51-call (PLMS) form of the DaTo presets.

    Args to tinker with:
        nonuniform_center, nonuniform_pow: DeepCache's ``center`` and ``pow`` of the non-uniform schedule.
        max_variants: the most compiled variants (one per distinct step kind and token budget) a runtime may hold.
    """

    cache_interval: int | None = None
    schedule: Any = None
    cache_branch: int = 0
    num_steps: int | None = None
    nonuniform_center: int = 15
    nonuniform_pow: float = 1.4
    max_variants: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.schedule, list):
            object.__setattr__(self, "schedule", tuple(self.schedule))
        for name in ("cache_interval", "num_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or None), got {value!r}")
        if isinstance(self.cache_branch, bool) or not isinstance(self.cache_branch, int) or self.cache_branch < 0:
            raise ValueError(f"cache_branch must be an integer >= 0, got {self.cache_branch!r}")
        if isinstance(self.max_variants, bool) or not isinstance(self.max_variants, int) or self.max_variants < 2:
            raise ValueError(f"max_variants must be an integer >= 2, got {self.max_variants!r}")
        from .schedule import build_schedule  # validates schedule, interval and length together

        build_schedule(self)

    @property
    def step_aware(self) -> bool:
        return True

    @property
    def caches(self) -> bool:
        return True


@register_config
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


@register_config
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
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.recover not in ("kept", "base"):
            raise ValueError(f"recover must be 'kept' (official code) or 'base', got {self.recover!r}")


THRESHOLD_RULES = ("batch-max", "per-row")
BUCKET_SCOPES = ("level", "site")


@register_config
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
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"catome: threshold_rule must be one of {THRESHOLD_RULES}, got {self.threshold_rule!r}")
        if self.bucket_scope not in BUCKET_SCOPES:
            raise ValueError(f"catome: bucket_scope must be one of {BUCKET_SCOPES}, got {self.bucket_scope!r}")
        buckets = self.buckets if isinstance(self.buckets, (list, tuple)) else (self.buckets,)
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in buckets):
            raise ValueError(f"catome: buckets are merged fractions in [0, 1), got {self.buckets!r}")
        object.__setattr__(self, "buckets", tuple(sorted({0.0, *map(float, buckets)})))
        if isinstance(self.max_variants, bool) or not isinstance(self.max_variants, int) or self.max_variants < 2:
            raise ValueError(f"catome: max_variants must be an integer >= 2, got {self.max_variants!r}")
        if self.fixed_ratio is not None:
            if self.exact:
                raise ValueError("catome: fixed_ratio is the merge fraction of exact=False; pass exact=False too")
            if not 0 < self.fixed_ratio <= self.max_ratio():
                raise ValueError(f"catome: fixed_ratio must be in (0, {self.max_ratio():.4f}], got {self.fixed_ratio}")
        if isinstance(self.refresh, list):
            object.__setattr__(self, "refresh", tuple(self.refresh))
        from .refresh import build_refresh  # validates the refresh steps

        build_refresh(self.refresh)


def config_fields(cls: type[PruneConfig]) -> tuple[str, ...]:
    """The option keys a config class accepts (besides ``method``)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def parse_options(options: Mapping[str, Any] | PruneConfig | None) -> PruneConfig:
    """``torch.compile(..., options=...)`` -> a validated config.

    >>> parse_options({"method": "sito", "ratio": 0.5}).ratio
    0.5
    """
    if isinstance(options, PruneConfig):
        return options
    options = dict(options or {})
    name = options.pop("method", "tome")
    if name in PLANNED_METHODS and name not in _CONFIG_TYPES:
        raise NotImplementedError(f"method {name!r} ({PLANNED_METHODS[name]}) is not implemented yet; "
                                  f"implemented methods are {method_names()}")
    if name not in _CONFIG_TYPES:
        raise ValueError(f"unknown method {name!r}; valid methods are {method_names()}")
    cls = _CONFIG_TYPES[name]
    valid = config_fields(cls)
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid options are {('method',) + valid}")
    return cls(**options)


def config_to_dict(config: PruneConfig) -> dict[str, Any]:
    """A JSON-ready dict: ``{"_type": method, "_version": n, "_data": {...}}``."""
    data = dataclasses.asdict(config)
    data["scope"] = list(config.scope)
    for key in ("schedule", "refresh", "buckets", "dsap_blocks"):
        if isinstance(data.get(key), tuple):
            data[key] = list(data[key])
    return {"_type": config.method, "_version": CONFIG_VERSION, "_data": data}


def config_from_dict(blob: Mapping[str, Any] | str) -> PruneConfig:
    """Inverse of :func:`config_to_dict` (also takes the JSON text)."""
    if isinstance(blob, str):
        blob = json.loads(blob)
    if blob.get("_version") != CONFIG_VERSION:
        raise ValueError(f"config version {blob.get('_version')!r} is not {CONFIG_VERSION}")
    return parse_options({"method": blob["_type"], **blob["_data"]})


def with_overrides(config: PruneConfig, **changes: Any) -> PruneConfig:
    """A copy of ``config`` with fields replaced (validated again)."""
    return dataclasses.replace(config, **changes)


__all__ = [
    "PruneConfig", "ToMeConfig", "SiToConfig", "ToDoConfig", "RandomConfig", "CachingConfig", "DeepCacheConfig",
    "DaToConfig", "CaToMeConfig", "AtEdmConfig", "parse_options", "config_to_dict", "config_from_dict",
    "method_names", "register_config", "with_overrides",
]
