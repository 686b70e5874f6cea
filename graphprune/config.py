"""The base configuration every method shares, strict option checking, and the JSON round trip.

Generic over dataclass fields: no method's name appears here. Each method's config subclasses :class:`PruneConfig`
in the method's own file (``graphprune/methods/<name>.py``); the registry (:mod:`graphprune.methods.registry`)
maps names to config classes and turns an ``options`` dict into a config (``parse_options``).

    config_to_dict(SiToConfig(ratio=0.5))   # {"_type": "sito", "_version": 1, "_data": {"ratio": 0.5, ...}}

Unknown keys and out-of-range values raise ``ValueError`` naming the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

CONFIG_VERSION = 1
SCOPES = ("self", "cross", "ff", "block")
COMPILERS = ("inductor", "eager", "aot_eager", "tensorrt")


def parse_scope(scope: Any) -> tuple[str, ...]:
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


def check_int(owner: str, name: str, value: Any, low: int, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``low`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{name} must be an integer >= {low}{' (or None)' if optional else ''}, "
                         f"got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{name} must be one of {choices}, got {value!r}")


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
        inductor_config: ``torch._inductor.config`` settings for the rewritten graph's compile (``{name: value}``),
            applied over graphprune's own: on CPU graphprune turns Inductor's ``layout_optimization`` off (it copies
            every conv weight to channels-last on every call; SD1.5 1.33x slower at latent 32, issue 17);
            ``{"layout_optimization": True}`` restores Inductor's default.

    Args to tinker with:
        sx, sy: the cell stride on the token grid (one destination/base token per sy x sx cell).
        max_shapes: when Dynamo hands over a graph with symbolic sizes (after a change of batch or resolution, or
            ``dynamic=True``), the backend compiles one static, pruned graph per input shape and keeps the
            ``max_shapes`` most recently used ones (see "Shapes, batches and recompiles" in the README).
    """

    method: ClassVar[str] = ""
    ratio: float = 0.5
    scope: tuple[str, ...] = ("self",)
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    compiler: str = "inductor"
    mode: str | None = None
    inductor_config: Any = None
    max_shapes: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", parse_scope(self.scope))
        for name in ("sx", "sy", "max_downsample", "max_shapes"):
            check_int("", name, getattr(self, name), 1)
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
        self._check_inductor_config()

    def _check_inductor_config(self) -> None:
        if self.inductor_config is None:
            return
        if not isinstance(self.inductor_config, Mapping):
            raise ValueError(f"inductor_config must be a dict of torch._inductor.config settings, e.g. "
                             f"{{'layout_optimization': True}}, got {self.inductor_config!r}")
        if self.compiler != "inductor":
            raise ValueError("inductor_config holds Inductor settings; it needs compiler='inductor'")
        import torch._inductor.config as inductor_config

        unknown = [k for k in self.inductor_config if not hasattr(inductor_config, str(k))]
        if unknown:
            raise ValueError(f"inductor_config: unknown torch._inductor.config setting(s) {unknown}")

    def max_ratio(self) -> float:
        """The largest ratio this method accepts with the current cell stride."""
        return 1.0 - 1.0 / (self.sx * self.sy)

    @property
    def step_aware(self) -> bool:
        """Whether this config's graphs change between denoising steps (a step-aware runtime picks them)."""
        return False

    @property
    def caches(self) -> bool:
        """Whether the step-aware runtime caches features across steps (needs a DeepCache-style graph cut)."""
        return False


def config_fields(cls: type[PruneConfig]) -> tuple[str, ...]:
    """The option keys a config class accepts (besides ``method``)."""
    return tuple(f.name for f in dataclasses.fields(cls))


#: the options that only mean something to Inductor (dropped when a caller runs the rewritten graphs eagerly)
INDUCTOR_ONLY_OPTIONS = ("mode", "inductor_config")


def eager_compiler_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with ``compiler="eager"`` (the rewritten graphs run as FX code) and without Inductor's settings,
    for callers that run a user's configuration without Inductor (FLOP counting, ``-fx`` benchmark variants)."""
    return {**{k: v for k, v in options.items() if k not in INDUCTOR_ONLY_OPTIONS}, "compiler": "eager"}


def build_config(cls: type[PruneConfig], options: Mapping[str, Any]) -> PruneConfig:
    """``cls(**options)``, rejecting keys that are not fields of ``cls`` with the list of valid ones."""
    valid = config_fields(cls)
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {cls.method!r}; valid options are "
                         f"{('method',) + valid}")
    return cls(**options)


def _jsonable(value: Any) -> Any:
    """Tuples (frozen dataclass fields hold tuples for lists) -> lists, recursively."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def config_to_dict(config: PruneConfig) -> dict[str, Any]:
    """A JSON-ready dict: ``{"_type": method, "_version": n, "_data": {field: value, ...}}``."""
    data = {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return {"_type": config.method, "_version": CONFIG_VERSION, "_data": data}


def options_of_dict(blob: Mapping[str, Any]) -> dict[str, Any]:
    """The ``options`` dict (``{"method": ..., **fields}``) of a :func:`config_to_dict` blob; checks the version."""
    if blob.get("_version") != CONFIG_VERSION:
        raise ValueError(f"config version {blob.get('_version')!r} is not {CONFIG_VERSION}")
    return {"method": blob["_type"], **blob["_data"]}


def with_overrides(config: PruneConfig, **changes: Any) -> PruneConfig:
    """A copy of ``config`` with fields replaced (validated again)."""
    return dataclasses.replace(config, **changes)


__all__ = ["PruneConfig", "CONFIG_VERSION", "SCOPES", "COMPILERS", "parse_scope", "check_int", "check_choice",
           "config_fields", "build_config", "config_to_dict", "options_of_dict", "with_overrides"]
