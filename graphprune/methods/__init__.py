"""Token-reduction methods: plain torch, one file per method, registered by config type."""

from . import atedm, catome, dato, random, sito, todo, tome  # noqa: F401  (registration side effect)
from .base import (Plan, RandomSpec, SiteGeometry, SiteSkip, TokenMethod, method_for, register_method,
                   registered_methods)

__all__ = ["Plan", "RandomSpec", "SiteGeometry", "SiteSkip", "TokenMethod", "method_for", "register_method",
           "registered_methods"]
