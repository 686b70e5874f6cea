"""What graphprune does, or would do, to a model (entry point: :func:`inspect`; ``graphprune.inspect``).

    print(graphprune.inspect(fast))                                   # what the compiled model has run so far
    print(graphprune.inspect(unet, latents, t, emb, options={"method": "sito", "ratio": 0.5}))   # a dry run

* ``inspect(fast)`` (no inputs) lists every graph graphprune compiled for that model so far: per input shape and,
  for runtimes, per variant; the sites pruned (N -> K), the reasons for the others, each runtime's schedule and the
  state it holds.
* ``inspect(model, *args, **kwargs)`` traces the call and reports what ``options`` would do, **without weights and
  without compute**: the model is copied onto the meta device (parameters become meta tensors, nothing is
  materialized), the inputs too, and Dynamo traces that copy with static shapes; the rewrite runs on the traced
  graph, and the graph then "runs" on meta tensors (shapes only). Without ``options`` it uses the config the model was
  compiled with by graphprune (if it was), else the default. Earlier compiles of the same model class at other shapes
  do not change the result, and the user's compiled models are left alone (no global Dynamo reset).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from typing import Any

import torch

from .backend import graphprune_backend
from .config import PruneConfig, config_to_dict
from .methods import parse_options
from .passes.coverage import check_coverage, graph_break_counts
from .progress import stage
from .report import GraphReport, InspectReport
from .runtime import StepRuntime, Tracked, runtimes
from .runtime.base import module_of

log = logging.getLogger(__name__)

_TRACE_SERIAL = itertools.count()


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors (same shapes and dtypes, no storage)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) \
            if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def to_meta(value: Any) -> Any:
    """Tensors (inside tuples, lists and dicts too) -> meta tensors of the same shape, dtype and strides."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


def _module(obj: Any) -> torch.nn.Module:
    module = module_of(obj)
    if module is not None:
        return module
    raise TypeError(f"expected a model, a compiled model or a pipeline with .unet, got {type(obj).__name__}")


def compiled_configs(model: Any) -> list[PruneConfig]:
    """The distinct configs graphprune compiled ``model`` with (in compile order)."""
    seen: dict[str, PruneConfig] = {}
    for tracked in runtimes(model):
        seen.setdefault(repr(tracked.config), tracked.config)
    return list(seen.values())


def _live_report(model: Any) -> InspectReport:
    """``inspect(fast)``: every graph graphprune compiled for ``model`` so far."""
    found = runtimes(model)
    graphs = [report for tracked in found for _, report in tracked.graph_reports]
    notes = [] if found else ["graphprune has compiled nothing for this model yet: call it once (or pass example "
                              "inputs to inspect for a dry run)"]
    return InspectReport(graphs=graphs, runtimes=[t.describe() for t in found], notes=notes)


def _fresh_entry(module: torch.nn.Module) -> Any:
    """A function with a code object of its own that calls ``module``: Dynamo keeps its cache entries and its
    automatic-dynamic history per code object, so this trace neither reads nor changes the user's."""

    def call(*args: Any, self: torch.nn.Module = module, **kwargs: Any) -> Any:  # noqa: ANN001
        # ``self``: Dynamo names the module's paths L['self'].down_blocks[0]... as when it traces forward itself
        return self(*args, **kwargs)

    code = call.__code__.replace(co_name=f"graphprune_inspect_{next(_TRACE_SERIAL)}")
    fn = type(call)(code, call.__globals__, code.co_name, call.__defaults__, call.__closure__)
    fn.__kwdefaults__ = call.__kwdefaults__
    return fn


def inspect(model: Any, *args: Any, options: dict[str, Any] | PruneConfig | None = None,
            **kwargs: Any) -> InspectReport:
    """Report what graphprune did to ``model`` (no inputs) or would do to ``model(*args, **kwargs)`` (a dry run on
    the meta device: no weights materialized, no compute). See the module docstring. ``print`` the result for a
    table; ``.to_dict()`` for JSON.
    """
    if not args and not kwargs and options is None:
        return _live_report(model)
    notes: list[str] = []
    if options is None:
        live = compiled_configs(model)
        if len(live) > 1:
            raise ValueError(f"this model was compiled by graphprune with {len(live)} configs "
                             f"({[config_to_dict(c)['_type'] for c in live]}); pass options=... to choose one")
        if live:
            options = live[0]
            notes.append(f"options: the config this model was compiled with ({config_to_dict(live[0])['_type']})")
    config = dataclasses.replace(parse_options(options), compiler="eager", mode=None)
    shadow = meta_copy(_module(model)).eval()
    graphs: list[GraphReport] = []
    described: list[dict[str, Any]] = []
    traced: list[tuple[torch.fx.GraphModule, list[Any]]] = []  # as Dynamo handed them (for the coverage check)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        traced.append((gm, list(example_inputs)))
        fn = graphprune_backend(gm, example_inputs, options=config, reports=graphs, register_runtime=False)
        if isinstance(fn, StepRuntime):
            fn.build_variants()  # eager: the shallow graph too, without running it
        if isinstance(fn, Tracked):
            described.append(fn.describe())
        return gm.forward  # the traced graph on meta tensors: shapes only

    breaks_before = graph_break_counts()
    try:
        with torch.no_grad(), stage(f"trace {type(shadow).__name__} on the meta device and match its attention"):
            torch.compile(_fresh_entry(shadow), backend=backend, dynamic=False)(*to_meta(args), **to_meta(kwargs))
    except Exception as exc:  # noqa: BLE001  model code that cannot run on meta (a CPU tensor made in forward, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.info("graphprune.inspect: the meta-device dry run failed (%s); tracing on the model's own device", reason)
        notes.append(f"traced on the model's own device (real compute): it does not run on the meta device ({reason})")
        graphs.clear(), described.clear(), traced.clear()
        shadow = _module(model)
        breaks_before = graph_break_counts()
        with torch.no_grad(), stage(f"trace {type(shadow).__name__} and match its attention"):
            torch.compile(_fresh_entry(shadow), backend=backend, dynamic=False)(*args, **kwargs)
    coverage = check_coverage(shadow, traced, breaks_before)  # graph breaks, attention no graph proves
    return InspectReport(graphs=graphs, runtimes=[d for d in described if d.get("runtime") != "none"], notes=notes,
                         coverage=coverage)


__all__ = ["inspect", "meta_copy", "to_meta", "compiled_configs"]
