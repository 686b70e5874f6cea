"""The method protocol and registry: what a token-reduction method provides to the rewrite.

A method is plain torch: :meth:`TokenMethod.plan` turns the site's similarity metric into a *plan* (a tuple of
index tensors whose shapes are fixed by the trace: K is a Python int), :meth:`~TokenMethod.reduce` applies it to
tokens ``x: (B, N, C) -> (B, K, C)`` and :meth:`~TokenMethod.restore` maps ``y: (B, K, c) -> (B, N, c)``.
Randomness never comes from an RNG inside the graph: a method lists the random tensors it needs
(:class:`RandomSpec`) and the backend feeds them as graph inputs drawn from a dedicated seeded generator.

A method is one file, ``graphprune/methods/<name>.py``: its config dataclass (a :class:`~graphprune.config.PruneConfig`
subclass) beside its :class:`TokenMethod`; :mod:`.registry` lists every built-in method explicitly (no registration
by import side effect) and is the one lookup by name and by config type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from ..config import PruneConfig
from .tokens import gather_tokens

Plan = tuple[torch.Tensor, ...]
ConfigT = TypeVar("ConfigT", bound=PruneConfig)


class SiteSkip(Exception):
    """Raised by a method when it cannot prune a site; the message is the logged reason."""


@dataclass(frozen=True)
class SiteGeometry:
    """Static facts about one pruning site: batch B, tokens N = H * W (row-major grid), channels C, and the site's
    level (tomesd's downsample factor relative to the finest attention grid of the graph: 1, 2, 4, ...)."""

    B: int
    N: int
    C: int
    H: int
    W: int
    level: int = 1
    #: the compiled variant's static count of always-merged tokens (CA-ToMe's budget bucket); 0 for other methods
    bucket: int = 0
    #: the ranking attention's heads, head dim and softmax scale (methods whose plan reads attention, AT-EDM);
    #: head_dim 0 / scale 0.0 mean "C // heads" and "head_dim ** -0.5"
    heads: int = 1
    head_dim: int = 0
    scale: float = 0.0

    def cells(self, sx: int, sy: int) -> int:
        """P = (H // sy) * (W // sx): the whole sy x sx cells of the grid (leftover rows/columns fill none)."""
        return (self.H // sy) * (self.W // sx)

    def require_cells(self, sx: int, sy: int) -> int:
        """:meth:`cells`, or :class:`SiteSkip` when the grid is smaller than one cell."""
        P = self.cells(sx, sy)
        if P == 0:
            raise SiteSkip(f"grid {self.H}x{self.W} is smaller than one {sy}x{sx} cell")
        return P


@dataclass(frozen=True)
class RandomSpec:
    """A random tensor a plan needs on every call: ``kind`` 'normal' (float32) or 'randint' in [0, high)."""

    shape: tuple[int, ...]
    kind: str
    high: int = 0


@dataclass(frozen=True)
class StateSpec:
    """A tensor a stateful plan carries from one step to the next (a graph output, then a later graph's input).
    ``name`` says what it holds; runtimes find a carried tensor by name, never by position."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class TokenMethod(Generic[ConfigT]):
    """Base class of every method. Subclasses set ``name`` and ``config_type`` and implement the four hooks.

    ``form`` picks the rewrite: ``"tokens"`` (the attention, and what the scope adds, runs on the K tokens
    :meth:`reduce` keeps and :meth:`restore` brings back N) or ``"kv"`` (queries stay on all N tokens, only keys and
    values come from the K tokens :meth:`reduce` returns; the output has N tokens, so :meth:`restore` is unused).
    """

    name: str = ""
    config_type: type[PruneConfig] = PruneConfig
    #: whether the plan measures similarity on the pre-norm block input (ToMe, SiTo) or needs nothing
    uses_metric: bool = True
    #: "tokens" (reduce -> attend -> restore) or "kv" (keys/values reduced, all queries kept)
    form: str = "tokens"
    #: names of cross-step state tensors :meth:`plan` takes after the metric (before the random inputs), provided
    #: by the step-aware runtime as graph inputs (e.g. DaTo: the two previous noise predictions (B, c, h, w))
    context_inputs: tuple[str, ...] = ()
    #: whether the plan is carried across steps (CA-ToMe): a *refresh* graph outputs :meth:`state_of` its plan, a
    #: *cached* graph rebuilds the plan with :meth:`plan_from_state` from those tensors as inputs
    stateful: bool = False
    #: whether some of the K tokens must be hidden as self-attention keys (:meth:`key_bias`)
    masks_keys: bool = False
    #: what :meth:`plan` reads: ``"metric"`` (the pre-norm block input at the pruning point) or ``"attention"``
    #: (the query and key projections (B, N, h*d) of the ranking layer's self-attention, AT-EDM)
    plan_source: str = "metric"

    #: whether the method removes tokens at all (``deepcache`` only caches features: False)
    prunes_tokens: bool = True

    def every_step_options(self, ratio: float) -> dict[str, Any]:
        """Options under which every call runs the same graph with ``ratio`` of the tokens pruned (no step caching,
        no phases, a fixed count): what the conformance suite compiles, and what export needs."""
        return {"ratio": ratio}

    def runtime(self, config: ConfigT) -> str:
        """Which callable the backend returns for ``config``: ``"none"`` (one compiled graph), ``"steps"`` (the
        step-aware runtime: a graph per step kind, :mod:`graphprune.runtime.steps`) or ``"match-cache"`` (plans
        carried across steps, :mod:`graphprune.runtime.match_cache`)."""
        return "none"

    def unchanged_reason(self, config: ConfigT) -> str | None:
        """Why ``config`` asks for no pruning at all (every site is left unchanged, no warning), or None."""
        return "ratio=0: unchanged" if config.ratio == 0 else None

    def budget(self, config: ConfigT, geo: SiteGeometry) -> int:
        """Kept tokens K (a Python int, < N; for form "kv" the key/value tokens). Raise :class:`SiteSkip` with a
        reason if the site can't be pruned."""
        raise NotImplementedError

    def random_inputs(self, config: ConfigT, geo: SiteGeometry) -> tuple[RandomSpec, ...]:
        """Random tensors :meth:`plan` takes after the metric, drawn anew on every call."""
        return ()

    def plan(self, config: ConfigT, geo: SiteGeometry, metric: torch.Tensor, *rand: torch.Tensor) -> Plan:
        """metric: (B, N, C'), then the ``context_inputs`` tensors, then the random inputs -> a tuple of tensors
        with static shapes (index maps)."""
        raise NotImplementedError

    def state_specs(self, config: ConfigT, geo: SiteGeometry) -> tuple[StateSpec, ...]:
        """Stateful methods: the tensors :meth:`state_of` returns for one site."""
        return ()

    def state_of(self, config: ConfigT, geo: SiteGeometry, plan: Plan) -> tuple[torch.Tensor, ...]:
        """Stateful methods: the tensors that rebuild ``plan`` at a later step (shapes of :meth:`state_specs`)."""
        raise NotImplementedError

    def plan_from_state(self, config: ConfigT, geo: SiteGeometry, *state: torch.Tensor) -> Plan:
        """Stateful methods: the plan rebuilt from :meth:`state_of` tensors (no metric, no random inputs)."""
        raise NotImplementedError

    #: stateful methods: the name of the state tensor (B-independent, (2,) int64) holding [the merge count r the
    #: data allows, the tokens merged over the batch]; the match-cache runtime reads it at refresh steps
    count_state: str = ""

    def bucket_for(self, config: ConfigT, geo: SiteGeometry, r: int) -> int:
        """Stateful methods with budget buckets: the largest bucket (always-merged count) <= ``r`` at this site."""
        raise NotImplementedError

    def fixed_bucket(self, config: ConfigT, geo: SiteGeometry) -> int:
        """Stateful methods with budget buckets: the fixed count of the one-graph form (no host read)."""
        raise NotImplementedError

    def uses_key_bias(self, config: ConfigT) -> bool:
        """Whether the graphs of this config hide keys (only asked when ``masks_keys``)."""
        return self.masks_keys

    def key_bias(self, config: ConfigT, plan: Plan) -> torch.Tensor:
        """Methods with ``masks_keys``: an additive bias (B, 1, 1, K), 0 for live keys and -inf for hidden ones."""
        raise NotImplementedError
    def skip_region(self, config: ConfigT, geo: SiteGeometry, path: str, paths: list[str]) -> str | None:
        """For the region form (``scope="block"``): a reason to leave the transformer stack at module ``path``
        unpruned (``paths``: every stack of the graph, in graph order), or None to prune it."""
        return None

    def reduce(self, config: ConfigT, plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, K, C)."""
        raise NotImplementedError

    def restore(self, config: ConfigT, plan: Plan, y: torch.Tensor) -> torch.Tensor:
        """y: (B, K, c) -> (B, N, c)."""
        raise NotImplementedError


class KeepSlotRecovery:
    """Mixin for methods whose plan starts with ``(keep (B, K), slot (B, N))``: the kept tokens are gathered, and
    after attention every token reads its slot (a kept token its own, a pruned one its copy source). SiTo, DaTo,
    random and AT-EDM share it."""

    def reduce(self, config: PruneConfig, plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, K, C), the kept tokens."""
        return gather_tokens(x, plan[0])

    def restore(self, config: PruneConfig, plan: Plan, y: torch.Tensor) -> torch.Tensor:
        """y: (B, K, c) -> (B, N, c); pruned tokens copy their source slot."""
        return gather_tokens(y, plan[1])
