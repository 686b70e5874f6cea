"""Token-reduction methods: one file per method (its config dataclass beside its token math, plain torch).

The registry (:mod:`.registry`) lists the built-in methods explicitly; import names from here.
"""

from .atedm import AtEdmConfig
from .base import KeepSlotRecovery, Plan, RandomSpec, SiteGeometry, SiteSkip, StateSpec, TokenMethod
from .caching import CachingConfig
from .catome import CaToMeConfig
from .dato import DaToConfig
from .deepcache import DeepCacheConfig
from .random import RandomConfig
from .registry import (BUILTIN, DEFAULT_METHOD, DEFAULT_OPTIONS, config_class, config_from_dict, method_for, method_names,
                       parse_options, register_method, registered_methods)
from .sito import SiToConfig
from .todo import ToDoConfig
from .tome import ToMeConfig

__all__ = ["Plan", "RandomSpec", "SiteGeometry", "SiteSkip", "StateSpec", "TokenMethod", "KeepSlotRecovery",
           "BUILTIN", "DEFAULT_METHOD", "DEFAULT_OPTIONS", "config_class", "config_from_dict", "method_for", "method_names",
           "parse_options", "register_method", "registered_methods", "ToMeConfig", "SiToConfig", "ToDoConfig",
           "RandomConfig", "CachingConfig", "DeepCacheConfig", "DaToConfig", "CaToMeConfig", "AtEdmConfig"]
