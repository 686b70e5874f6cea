"""One static graph per input shape for graphs Dynamo traced with symbolic sizes (entry point: :class:`ShapeSpecialized`).

After a change of batch or resolution Dynamo retraces the model with symbolic sizes (automatic dynamic shapes; also
``torch.compile(dynamic=True)``). Token budgets must be Python ints, so such a graph is never pruned as it is:
:class:`ShapeSpecialized` keeps it, and on every call looks up the call's signature (shapes, strides, dtypes,
devices, scalar inputs) in a small LRU cache of static callables. A new signature is specialized
(:func:`graphprune.passes.specialize.specialize`: sizes folded in, static metadata) and handed to the same builder the
backend uses for static graphs (a plain graph or a runtime), so every call runs a graph pruned for its own shapes,
exactly as a fresh ``dynamic=False`` compile at those shapes would be. At most ``max_shapes`` are kept; past that the
least recently used one is dropped (and compiled again if its shapes come back), with a warning that names the fix.

Dynamo looks up its graphs newest first, so a shape compiled in an older graph of the same code (the static graph of
the first call, say) can come back through a newer symbolic graph; :func:`share` / :func:`shared` let the newer graph
reuse that compiled callable (its inputs mapped by placeholder name) instead of compiling the shape again.
"""

from __future__ import annotations

import collections
import logging
import warnings
import weakref
from typing import Any, Callable, Hashable

from torch.fx import GraphModule

from ..passes.specialize import describe_signature, named_signature, signature, specialize
from .base import Tracked

log = logging.getLogger(__name__)

#: (specialized graph, example inputs, shape label) -> the callable that serves those shapes
Build = Callable[[GraphModule, list[Any], str], Tracked]

#: (model, config, tensor inputs by name) -> a compiled callable and its graph's placeholder names
_SHARED: "weakref.WeakValueDictionary[Hashable, Tracked]" = weakref.WeakValueDictionary()


def _placeholder_names(gm: GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]


def share(tracked: Tracked, gm: GraphModule, args: list[Any]) -> None:
    """Offer ``tracked`` (compiled from ``gm`` for the call ``args``) to newer graphs of the same model and config."""
    tracked.placeholder_names = _placeholder_names(gm)
    _SHARED[(tracked.group[0], repr(tracked.config), named_signature(gm, args))] = tracked


def shared(gm: GraphModule, args: tuple[Any, ...], owner: Any, config: Any) -> Callable[..., Any] | None:
    """A callable compiled earlier for these shapes by another graph of the same model and config, taking ``gm``'s
    arguments (mapped by placeholder name), or None."""
    found = _SHARED.get((owner, repr(config), named_signature(gm, args)))
    if found is None:
        return None
    names = _placeholder_names(gm)
    if not set(found.placeholder_names) <= set(names):
        return None
    index = [names.index(n) for n in found.placeholder_names]

    def call(*a: Any) -> Any:
        return found(*(a[i] for i in index))

    call.tracked = found  # type: ignore[attr-defined]
    return call


class ShapeSpecialized:
    """The callable the backend returns for a graph with symbolic sizes (see the module docstring)."""

    def __init__(self, gm: GraphModule, build: Build, max_shapes: int, owner: Any = None, config: Any = None,
                 label: str = ""):
        self.gm = gm
        self.build = build
        self.max_shapes = max_shapes
        self.owner, self.config = owner, config  # with a compiled shape's inputs, the key of _SHARED
        self.label = label
        self.variants: collections.OrderedDict[Hashable, Callable[..., Any]] = collections.OrderedDict()
        self.specialized = 0  # static graphs built so far (evicted ones included)
        self.evicted = 0

    def __call__(self, *args: Any) -> Any:
        key = signature(args)
        fn = self.variants.get(key)
        if fn is None:
            fn = self._specialize(key, args)
        else:
            self.variants.move_to_end(key)
        return fn(*args)

    def _specialize(self, key: Hashable, args: tuple[Any, ...]) -> Callable[..., Any]:
        shape = describe_signature(self.gm, args)
        if len(self.variants) >= self.max_shapes:
            _, dropped = self.variants.popitem(last=False)
            self.evicted += 1
            dropped_shape = getattr(getattr(dropped, "tracked", dropped), "shape", "?")
            warnings.warn(f"graphprune{self.label}: more than max_shapes={self.max_shapes} input shapes for one "
                          f"traced graph; dropped the least recently used ({dropped_shape}), which compiles again if "
                          "it comes back. Pass a larger options={'max_shapes': ...} to keep more.", stacklevel=3)
        fn = shared(self.gm, args, self.owner, self.config)
        if fn is not None:
            log.info("graphprune%s: %s was compiled by an earlier graph of this model: reused", self.label, shape)
        else:
            log.info("graphprune%s: specializing the symbolic graph for %s", self.label, shape)
            tracked = self.build(specialize(self.gm, args), list(args), shape)
            share(tracked, self.gm, list(args))
            fn = tracked
            self.specialized += 1
        self.variants[key] = fn
        return fn

    @property
    def graphprune_graph(self) -> GraphModule | None:
        """The most recently used shape's rewritten graph (for tests and debugging), or None before any call."""
        if not self.variants:
            return None
        last = next(reversed(self.variants.values()))
        return getattr(getattr(last, "tracked", last), "graphprune_graph", None)


__all__ = ["ShapeSpecialized", "share", "shared"]
