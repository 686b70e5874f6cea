"""The one registry of methods, by name and by config type (entry points: :func:`parse_options`, :func:`method_for`).

Filled explicitly: :data:`BUILTIN` lists every built-in method class, so no import order or side effect decides
what is registered. A method of your own is one call, ``register_method(MyMethod)`` (its ``name`` and
``config_type`` say where it goes); from then on ``torch.compile(..., options={"method": MyMethod.name})`` works.

    parse_options({"method": "sito", "ratio": 0.5})      # SiToConfig(ratio=0.5, ...)
    method_for(config)                                     # the SiTo instance that serves it
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..config import PruneConfig, build_config, options_of_dict
from .atedm import AtEdm
from .base import TokenMethod
from .catome import CaToMe
from .dato import DaTo
from .deepcache import DeepCache
from .random import RandomPrune
from .sito import SiTo
from .todo import ToDo
from .tome import ToMe

#: The built-in methods, in the order they are listed to users.
BUILTIN: tuple[type[TokenMethod], ...] = (ToMe, SiTo, ToDo, RandomPrune, DeepCache, DaTo, CaToMe, AtEdm)

#: What ``options`` without a ``"method"`` key mean, everywhere: ``torch.compile(unet, backend="graphprune")``,
#: ``graphprune.apply(pipe)``, ``graphprune.compile(unet)`` and the CLI without ``--method``. Options given with it
#: override these fields (``options={"ratio": 0.3}`` is the default configuration at ratio 0.3: ToDo removing 30% of
#: the keys/values). ToDo at its default factor 2 (issue 17): at latent 64 on SD1.5 as fast per call as tome r=0.5
#: (1.135x vs 1.138x over Inductor, paired, one process) at 0.29x tomesd r=0.5's error; no RNG, no similarity, a
#: constant index table (exports as it is). README "One default everywhere".
DEFAULT_OPTIONS: dict[str, Any] = {"method": "todo"}
DEFAULT_METHOD: str = DEFAULT_OPTIONS["method"]

_BY_NAME: dict[str, TokenMethod] = {}
_BY_CONFIG: dict[type[PruneConfig], TokenMethod] = {}


def register_method(cls: type[TokenMethod], replace: bool = False) -> type[TokenMethod]:
    """Register ``cls`` (one instance serves every config of type ``cls.config_type``) under ``cls.name``.

    A name or config type that is already registered raises ``ValueError`` unless ``replace=True``. Returns ``cls``
    (so it also works as a class decorator).
    """
    if not cls.name or cls.config_type is PruneConfig or cls.config_type.method != cls.name:
        raise ValueError(f"{cls.__name__}: a method needs a name and a config_type whose ``method`` is that name "
                         f"(got name={cls.name!r}, config_type={cls.config_type.__name__})")
    if not replace and (cls.name in _BY_NAME or cls.config_type in _BY_CONFIG):
        raise ValueError(f"method {cls.name!r} is already registered; pass replace=True to replace it")
    instance = cls()
    _BY_NAME[cls.name] = instance
    _BY_CONFIG[cls.config_type] = instance
    return cls


for _cls in BUILTIN:
    register_method(_cls)


def method_names() -> tuple[str, ...]:
    """Names of every registered method, sorted."""
    return tuple(sorted(_BY_NAME))


def registered_methods() -> dict[str, TokenMethod]:
    """Method name -> implementation, for every registered method (the conformance suite iterates this)."""
    return dict(_BY_NAME)


def config_class(name: str) -> type[PruneConfig]:
    """The config class of the method called ``name`` (``ValueError`` listing the valid names if unknown)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown method {name!r}; valid methods are {method_names()}")
    return _BY_NAME[name].config_type


def method_for(config: PruneConfig) -> TokenMethod:
    """The registered method serving a config instance."""
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise ValueError(f"no method is registered for {type(config).__name__} ({config.method!r}); "
                         "register it with graphprune.register_method") from None


def parse_options(options: Mapping[str, Any] | PruneConfig | None) -> PruneConfig:
    """``torch.compile(..., options=...)`` -> a validated config of the method it names (no method: the default
    configuration, :data:`DEFAULT_OPTIONS`).

    >>> parse_options({"method": "sito", "ratio": 0.5}).ratio
    0.5
    """
    if isinstance(options, PruneConfig):
        return options
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict such as {{'method': 'tome', 'ratio': 0.5}} or a config object "
                         f"(graphprune.ToMeConfig(...)), got {type(options).__name__} {options!r}")
    options = dict(options or {})
    if "method" not in options:
        options = {**DEFAULT_OPTIONS, **options}
    name = options.pop("method")
    config = build_config(config_class(name), options)
    for key, nested in getattr(config, "nested_options", dict)().items():  # e.g. deepcache's prune={...}
        inner = parse_options(nested)
        impl = method_for(inner)
        if impl.runtime(inner) != "none" or impl.context_inputs:
            raise ValueError(f"{key}={dict(nested)!r}: method {inner.method!r} works across steps itself; {key} takes "
                             f"a per-step token method (tome, sito, todo, random)")
    return config


def config_from_dict(blob: Mapping[str, Any] | str) -> PruneConfig:
    """Inverse of :func:`graphprune.config.config_to_dict` (also takes the JSON text)."""
    if isinstance(blob, str):
        blob = json.loads(blob)
    return parse_options(options_of_dict(blob))


__all__ = ["BUILTIN", "DEFAULT_OPTIONS", "DEFAULT_METHOD", "register_method", "method_names", "registered_methods", "config_class",
           "method_for", "parse_options", "config_from_dict"]
