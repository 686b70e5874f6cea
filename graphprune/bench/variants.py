"""Every variant a benchmark can time, in one place, and how each builds its callable.

    v = variant("sito0.5")                       # the catalogue: graphprune configs, tomesd, DeepCache, baselines
    v = variant("sito0.5-fx")                    # any graphprune entry + "-fx": its rewritten graph without Inductor
    v = variant("todo:factor=3:max_downsample=2")   # METHOD:key=value:...: any graphprune options (JSON values)
    points = grid(["tome", "sito"], [0.3, 0.5], with_tomesd=True)   # the Pareto sweep: methods x ratios (+ tomesd)
    built = v.build(unet)                        # built.fn(sample, t, context) runs the variant
    built.close()                                # undoes a peer's module patching (DeepCache's helper)

Kinds: ``eager`` (the model), ``inductor`` (the model under ``torch.compile``: :func:`compiled_call`),
``dynamo-eager`` (Dynamo's graph, eager backend), ``graphprune`` (``torch.compile(model, backend="graphprune", options=...)``), and
the peers a user would pick instead, each on a deep copy of the model: ``tomesd`` (``tomesd.apply_patch(copy, ratio)``) and ``deepcache``
(the DeepCache package's ``DeepCacheSDHelper``); ``inductor=True`` compiles the patched copy. Catalogue names are
stable: the README's commands use them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from ..config import eager_compiler_options
from .options import resolve_methods

log = logging.getLogger(__name__)

TOMESD = "tomesd"
KINDS = ("eager", "inductor", "dynamo-eager", "graphprune", "tomesd", "deepcache")
UNPRUNED = ("eager", "inductor", "dynamo-eager")


def compiled_call(model: torch.nn.Module, backend: str, mode: str | None = None,
                  inductor_config: dict[str, Any] | None = None) -> Callable[..., Any]:
    """``torch.compile`` of a function that calls ``model`` (Dynamo inlines the model into its own graph).

    The compiled code object is this closure's, not ``type(model).forward``'s: Dynamo marks a code object it gave
    up on (a graph break in a loop, as in tomesd's patched blocks) to run uncompiled from then on, for *every*
    instance of the class, so a baseline compiled on the module itself would silently fall back to eager as soon
    as a patched copy of the same class was compiled in the process.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    extra = {"mode": mode} if mode else {"options": dict(inductor_config)} if inductor_config else {}
    return torch.compile(call, backend=backend, **extra)


@dataclass
class Built:
    """A variant's callable (``fn``), the patched copy of a peer (``patched``) and its helper (DeepCache)."""

    fn: Callable[..., Any]
    patched: torch.nn.Module | None = None
    helper: Any = None

    def close(self) -> None:
        if self.helper is not None:
            self.helper.disable()
            self.helper = None


@dataclass
class Variant:
    """One thing to time: an unpruned baseline, a graphprune config, or a peer (tomesd, the DeepCache package).

    ``key``: its name on the command line and in the JSON; ``label``: its name in tables and plots; ``options``:
    graphprune options (kind ``graphprune``); ``ratio``: the fraction pruned where there is one (the sweep's
    axis, tomesd's ratio); ``interval``: DeepCache's ``cache_interval``; ``inductor``: a peer's patched copy under
    ``torch.compile``; ``mode``: the ``torch.compile`` mode of the ``inductor`` kind (``"reduce-overhead"``: CUDA
    graphs); ``error``: why it cannot run (recorded, not raised: e.g. a ratio above a method's cap).
    """

    key: str
    label: str
    kind: str
    options: dict[str, Any] | None = None
    ratio: float | None = None
    interval: int | None = None
    inductor: bool = False
    mode: str | None = None
    inductor_config: dict[str, Any] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown variant kind {self.kind!r}; kinds are {KINDS}")

    @property
    def method(self) -> str:
        """The registered method (graphprune) or the kind (``tomesd``, ``deepcache``, ``eager``, ...)."""
        return self.options["method"] if self.kind == "graphprune" else self.kind

    @property
    def unpruned(self) -> bool:
        return self.kind in UNPRUNED

    @property
    def poisons_dynamo(self) -> bool:
        """True for a peer compiled by Dynamo (``tomesd+inductor``, ``DeepCache3+inductor``): their patched blocks
        break the graph inside the UNet's loops, and Dynamo then runs ``UNet2DConditionModel.forward`` uncompiled
        for every later ``torch.compile`` of any UNet in the process (a graphprune variant would see fragments and
        prune nothing) until ``torch._dynamo.reset()``: :meth:`~graphprune.bench.timing.PairedTimer.reset` after
        such a variant."""
        return self.kind in ("tomesd", "deepcache") and self.inductor

    @property
    def stateful(self) -> bool:
        """True where the variant carries state across calls (a graphprune runtime, DeepCache's helper)."""
        if self.kind == "deepcache":
            return True
        if self.kind != "graphprune":
            return False
        from ..methods import method_for, parse_options

        config = parse_options({k: v for k, v in self.options.items() if k != "compiler" and v is not None})
        return method_for(config).runtime(config) != "none"

    def with_options(self, **options: Any) -> "Variant":
        """A copy with its graphprune options updated (``label`` unchanged)."""
        if self.kind != "graphprune":
            raise ValueError(f"{self.key} is not a graphprune variant")
        return dataclasses.replace(self, options={**self.options, **options})

    def build(self, model: torch.nn.Module, compiler: str | None = None, scheduler: Any = None) -> Built:
        """The callable of this variant on ``model``.

        ``compiler``: graphprune's inner compiler, overriding the options' (``"eager"``: the rewritten graph
        without Inductor). ``scheduler``: the diffusers scheduler whose ``timesteps`` the DeepCache helper reads
        (its step index comes from the timestep's position in them).
        """
        if self.error:
            raise ValueError(f"{self.key} cannot run: {self.error}")
        if self.kind == "eager":
            return Built(model)
        if self.kind == "inductor":
            return Built(compiled_call(model, "inductor", self.mode, self.inductor_config))
        if self.kind == "dynamo-eager":
            return Built(compiled_call(model, "eager"))
        if self.kind == "graphprune":
            if compiler == "eager":
                options = eager_compiler_options(self.options)
            else:
                options = dict(self.options) if compiler is None else {**self.options, "compiler": compiler}
            return Built(torch.compile(model, backend="graphprune", options=options))
        patched = copy.deepcopy(model)
        helper = None
        if self.kind == "tomesd":
            import tomesd

            tomesd.apply_patch(patched, ratio=self.ratio)
        else:
            from DeepCache import DeepCacheSDHelper

            if scheduler is None:
                raise ValueError(f"{self.key}: the DeepCache package needs the loop's scheduler")
            helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=patched, scheduler=scheduler))
            helper.set_params(cache_interval=self.interval, cache_branch_id=0)
            helper.enable()
        return Built(torch.compile(patched) if self.inductor else patched, patched=patched, helper=helper)


def new_runtime(built: Built, before: set[int]) -> Any:
    """The graphprune runtime ``built.fn`` created since ``before`` (ids of :func:`~graphprune.runtime.base.runtimes`
    taken before it was built and run), or None (a peer, or not run yet)."""
    from ..runtime.base import Runtime, runtimes

    if built.helper is not None or not isinstance(built.fn, torch.nn.Module):  # a peer, or a compiled function
        return None
    found = [r for r in runtimes(built.fn) if id(r) not in before and isinstance(r, Runtime)]
    return found[-1] if found else None


def generation_kinds(built: Built, runtime: Any, steps: int) -> list[str]:
    """The step kind (full, shallow, reuse, refresh, cached) of each of the ``steps`` calls of the generation
    ``built`` just ran: its runtime's, the DeepCache helper's uniform interval, else all full."""
    kinds = (getattr(runtime, "previous_kinds", None) or getattr(runtime, "kinds", None)) if runtime else None
    if kinds:  # a step-aware runtime (a plain graph's runtime has no kinds: every call is full)
        return list(kinds)
    if built.helper is not None:
        n = built.helper.params["cache_interval"]
        return ["full" if i % n == 0 else "shallow" for i in range(steps)]
    return ["full"] * steps


def graphprune_variant(key: str, label: str, **options: Any) -> Variant:
    return Variant(key, label, "graphprune", options=options, ratio=options.get("ratio"))


def _catalogue() -> dict[str, Variant]:
    gp = graphprune_variant
    entries = [
        Variant("eager", "eager", "eager"),
        Variant("inductor", "inductor", "inductor"),
        Variant("inductor-cudagraphs", "inductor mode=reduce-overhead (CUDA graphs)", "inductor",
                mode="reduce-overhead"),
        # the best compiled baseline on CPU: Inductor without its per-call conv weight layout copies (graphprune's
        # own setting for CPU graphs; python benchmarks/inductor_layout.py)
        Variant("inductor-nolayout", "inductor layout_optimization=False", "inductor",
                inductor_config={"layout_optimization": False}),
        # Inductor with freezing (weights become constants: conv weights prepacked once, not per call); stale
        # results if the weights change after compiling, so an opt-in for users and for graphprune
        Variant("inductor-freezing", "inductor freezing=True", "inductor", inductor_config={"freezing": True}),
        Variant("dynamo-eager", "dynamo graph, eager backend", "dynamo-eager"),
        gp("sito0.5", "graphprune sito r=0.5", method="sito", ratio=0.5),
        gp("sito0.7", "graphprune sito r=0.7", method="sito", ratio=0.7),
        gp("tome0.5", "graphprune tome r=0.5", method="tome", ratio=0.5),
        Variant("tomesd", "tomesd r=0.5 eager", "tomesd", ratio=0.5),
        Variant("tomesd+inductor", "tomesd r=0.5 + inductor", "tomesd", ratio=0.5, inductor=True),
        # step caching (whole loops: graphprune bench steps)
        gp("deepcache3", "graphprune deepcache N=3", method="deepcache", cache_interval=3),
        gp("deepcache5", "graphprune deepcache N=5", method="deepcache", cache_interval=5),
        gp("dato3", "graphprune dato r=0.4 N=3", method="dato", cache_interval=3),
        gp("deepcache3+tome0.5", "graphprune deepcache N=3 + tome r=0.5", method="deepcache", cache_interval=3,
           prune={"method": "tome", "ratio": 0.5}),
        gp("deepcache3+todo2", "graphprune deepcache N=3 + ToDo f=2", method="deepcache", cache_interval=3,
           prune={"method": "todo", "factor": 2}),
        gp("todo2", "graphprune ToDo f=2", method="todo", factor=2),
        gp("todo2-freezing", "graphprune ToDo f=2, Inductor freezing", method="todo", factor=2,
           inductor_config={"freezing": True, "layout_optimization": True}),
        gp("dato-imagenet", "graphprune dato r=0.4 S_A", method="dato", schedule="dato-imagenet"),
        gp("dato-coco", "graphprune dato r=0.4 S_B", method="dato", schedule="dato-coco"),
        Variant("DeepCache3", "DeepCache pkg N=3 (eager)", "deepcache", interval=3),
        Variant("DeepCache3+inductor", "DeepCache pkg N=3 + inductor", "deepcache", interval=3, inductor=True),
        # CA-ToMe (T = 0.7, the official setting; T = 0.4 merges ~67% on random weights where 0.7 merges ~nothing)
        gp("catome-config3", "graphprune catome T=0.7 config3", method="catome", refresh="config3"),
        gp("catome-every5", "graphprune catome T=0.7 every5", method="catome", refresh="every5"),
        gp("catome-every1", "graphprune catome T=0.7 every call", method="catome", refresh=1),
        gp("catome0.4-config3", "graphprune catome T=0.4 config3", method="catome", threshold=0.4, refresh="config3"),
        gp("catome0.4-every5", "graphprune catome T=0.4 every5", method="catome", threshold=0.4, refresh="every5"),
        gp("catome0.4-every1", "graphprune catome T=0.4 every call", method="catome", threshold=0.4, refresh=1),
        # tome at the mean merged fraction the first catome variant of the run measured (ratio filled in by steps)
        gp("tome-matched", "graphprune tome r=catome's mean", method="tome", ratio=None),
    ]
    return {v.key: v for v in entries}


#: name -> variant; every graphprune entry also exists as ``<name>-fx`` (compiler="eager")
CATALOGUE: dict[str, Variant] = _catalogue()
FX = "-fx"


def catalogue_names() -> list[str]:
    """Every catalogue name, the ``-fx`` forms included."""
    return [n for k, v in CATALOGUE.items() for n in ([k, k + FX] if v.kind == "graphprune" else [k])]


def _parse_spec(spec: str) -> Variant:
    """``METHOD:key=value:key=value`` (values parsed as JSON where they can be) -> a graphprune variant."""
    from ..methods import parse_options

    method, *items = re.split(r":(?=[A-Za-z_]\w*=)", spec)  # a ':' inside a JSON value does not split
    options: dict[str, Any] = {"method": method}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"variant {spec!r}: expected METHOD:key=value:..., got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    resolve_methods([method])
    parse_options({k: v for k, v in options.items() if k != "compiler"})  # ValueError naming the valid choices
    return graphprune_variant(spec, f"graphprune {spec}", **options)


def variant(name: str) -> Variant:
    """The variant called ``name``: a catalogue entry, ``<entry>-fx``, ``tomesd<ratio>``, ``DeepCache<N>`` (each
    peer with ``+inductor``), or ``METHOD:key=value:...``. Raises ValueError listing the catalogue."""
    name = name.strip()
    if name in CATALOGUE:
        return copy.deepcopy(CATALOGUE[name])
    base = CATALOGUE.get(name[:-len(FX)]) if name.endswith(FX) else None
    if base is not None and base.kind == "graphprune":
        return dataclasses.replace(base, key=name, label=f"{base.label} (fx)",
                                   options=eager_compiler_options(base.options))
    peer = re.fullmatch(r"(tomesd|DeepCache)(\d+(?:\.\d+)?)(\+inductor)?", name)
    if peer:
        kind, number, ind = peer.groups()
        if kind == TOMESD:
            return Variant(name, f"tomesd r={float(number):g} " + ("+ inductor" if ind else "eager"), "tomesd",
                           ratio=float(number), inductor=bool(ind))
        return Variant(name, f"DeepCache pkg N={int(float(number))}" + (" + inductor" if ind else " (eager)"),
                       "deepcache", interval=int(float(number)), inductor=bool(ind))
    if ":" in name:
        return _parse_spec(name)
    raise ValueError(f"unknown variant {name!r}; choose from {catalogue_names()}, tomesd<ratio>, DeepCache<N> "
                     "(+inductor), or METHOD:key=value:... (graphprune options)")


def variants(names: Sequence[str]) -> list[Variant]:
    """:func:`variant` for each name (duplicates dropped, order kept)."""
    return [variant(n) for n in dict.fromkeys(n.strip() for n in names if n.strip())]


def grid(methods: Sequence[str], ratios: Sequence[float], with_tomesd: bool, **options: Any) -> list[Variant]:
    """The sweep: each method at each ratio (configs validated up front; a config that cannot run is recorded
    with its reason), then tomesd at each ratio. ``options``: extra graphprune options of every point."""
    from ..methods import parse_options

    out = []
    for m in resolve_methods(methods):
        for r in ratios:
            v = graphprune_variant(f"{m} r={r:g}", f"{m} r={r:g}", method=m, ratio=float(r), **options)
            try:
                parse_options(v.options)
            except (ValueError, NotImplementedError) as exc:
                v.error = str(exc)
                log.warning("%s: skipped: %s", v.label, exc)
            out.append(v)
    if with_tomesd:
        out += [Variant(f"tomesd r={r:g}", f"tomesd r={r:g}", TOMESD, ratio=float(r)) for r in ratios]
    return out


def build_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A built-in architecture with seeded random weights (``graphprune.archs.build_model``: UNets and DiTs)."""
    from .. import archs

    return archs.build_model(arch, dtype=dtype, seed=seed)


__all__ = ["Variant", "Built", "compiled_call", "new_runtime", "generation_kinds", "variant", "variants", "grid",
           "catalogue_names", "CATALOGUE", "TOMESD",
           "build_model", "graphprune_variant"]
