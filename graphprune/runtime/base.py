"""What every callable the backend returns shares (entry points: :class:`Tracked`, :class:`Runtime`; lookups
:func:`runtimes`, :func:`reset`).

:class:`Tracked` is the base of all of them, the plain one-graph callable included: the config and method it serves,
the reports of every graph it compiled (with a variant label and the input shapes they were compiled for),
**ownership** (which model it belongs to: the model's parameters were example inputs of the traced graph, so that
``graphprune.reset(pipe)`` and ``graphprune.inspect(fast)`` find it), ``reset()`` and ``describe()``.

:class:`Runtime` adds what configs whose graphs change between denoising steps need:

* **generations**: a call whose timestep is higher than the previous call's starts a new generation and resets all
  state (an equal timestep, as PNDM/PLMS repeat at their start, does not); so does a call at another input shape of
  the same model in between (another static graph of the same traced code ran), and ``graphprune.reset(model)``;
* **the timestep**: found once in the traced graph (the input that reaches the time embedding), read on the host
  before each call (the only host read the base class makes);
* **state accounting**: bytes of the cross-step tensors held.

A runtime subclass implements :meth:`Runtime.run_step` (one call: which kind it was, and the outputs),
:meth:`Runtime.reset_state`, :meth:`Runtime.state_tensors` and :meth:`Tracked.describe_extra`.
"""

from __future__ import annotations

import gc
import itertools
import logging
import weakref
from typing import Any, Iterable

import torch
from torch.fx import GraphModule

from ..config import PruneConfig, config_to_dict
from ..methods.base import TokenMethod
from ..passes.cut import find_timestep_input
from ..passes.specialize import describe_signature
from ..report import GraphReport

log = logging.getLogger(__name__)

#: Every live tracked callable (for ``graphprune.reset`` / ``graphprune.runtimes`` lookups by model).
_TRACKED: "weakref.WeakSet[Tracked]" = weakref.WeakSet()
#: (model, traced code) -> the runtime that ran last: a call to another one of the group starts a new generation
_LAST_IN_GROUP: "dict[tuple[Any, ...], weakref.ref[Runtime]]" = {}
_SERIAL = itertools.count()


class Tracked:
    """Base of the callables the backend returns.

    gm: the graph Dynamo traced (never edited in place); example_inputs: its example inputs; method: the method
    that serves ``config``; reports / all_reports: lists that receive every compiled graph's :class:`GraphReport`;
    register: list it for :func:`runtimes` lookups (``inspect`` passes False); shape: the input shapes it was compiled
    for, as reports show them (default: from the example inputs).
    """

    #: the kind of callable in reports and ``describe()`` (the value :meth:`TokenMethod.runtime` returns)
    name = ""

    def __init__(self, gm: GraphModule, example_inputs: list[Any], config: PruneConfig, method: TokenMethod,
                 reports: list[GraphReport] | None = None, all_reports: Any = None, register: bool = True,
                 shape: str | None = None):
        self.config = config
        self.method = method
        self.base = gm
        self._sinks = [r for r in (reports, all_reports) if r is not None]
        #: (variant label, report) of every graph this callable compiled, in order
        self.graph_reports: list[tuple[str, GraphReport]] = []
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.n_user = len(placeholders)
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = output.args[0]
        self.n_outputs = len(outs) if isinstance(outs, (list, tuple)) else 1
        self.device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        self._keys = {t.data_ptr() for t in example_inputs if isinstance(t, torch.Tensor) and t.numel() > 1
                      and t.device.type != "meta"}
        self.shape = shape if shape is not None else describe_signature(gm, example_inputs)
        #: graphs of the same model, traced code and config (one per input shape) form a group
        self.group = (min(self._keys) if self._keys else id(self), repr(config),
                      tuple(str(n.target) for n, e in zip(placeholders, example_inputs) if isinstance(e, torch.Tensor)))
        self.calls = 0
        self.serial = next(_SERIAL)
        if register:
            _TRACKED.add(self)

    def record(self, report: GraphReport, variant: str = "-") -> None:
        """Keep a compiled graph's report (labelled with its variant) and hand it to the report lists given."""
        report.shape, report.variant = self.shape, variant
        self.graph_reports.append((variant, report))
        for sink in self._sinks:
            sink.append(report)

    def reset(self, reason: str = "explicit") -> None:
        """Restart: forget cross-step state, restart the random draws from the seed."""
        raise NotImplementedError

    def describe_extra(self) -> dict[str, Any]:
        """The subclass's part of :meth:`describe` (schedule, variants, counters)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The callable as plain data: kind, method, config, input shapes, calls, then the subclass's part."""
        return {"runtime": self.name, "method": self.config.method, "config": config_to_dict(self.config),
                "shape": self.shape, "calls": self.calls, **self.describe_extra()}

    def owns(self, tensors: Iterable[Any]) -> bool:
        """Whether any of ``tensors`` (a model's parameters) was an input of this callable's graph."""
        return any(t.data_ptr() in self._keys for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 1)


class Runtime(Tracked):
    """Base of the callables for configs whose graphs change between denoising steps (see the module docstring)."""

    def __init__(self, gm: GraphModule, example_inputs: list[Any], config: PruneConfig, method: TokenMethod,
                 reports: list[GraphReport] | None = None, all_reports: Any = None, register: bool = True,
                 shape: str | None = None):
        super().__init__(gm, example_inputs, config, method, reports, all_reports, register, shape)
        t_index = find_timestep_input(gm.graph)
        if t_index is None:
            raise ValueError(f"method {config.method!r} works across denoising steps, but the traced graph has no "
                             "timestep input: pass the timestep as a tensor (diffusers pipelines do), not a Python "
                             "number")
        self.t_index = t_index
        self.generation = 0
        self.step = 0
        self.last_t: float | None = None
        self.current_t: float | None = None
        self.kinds: list[str] = []  # kinds run in the current generation
        self.previous_kinds: list[str] = []  # kinds run in the previous generation

    # ---------------------------------------------------------------- subclass hooks
    def run_step(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], str]:
        """Run call ``self.step`` of the generation: (the graph's outputs, the kind of step it was)."""
        raise NotImplementedError

    def reset_state(self) -> None:
        """Drop every cross-step tensor and restart the random draws (called by :meth:`reset`)."""
        raise NotImplementedError

    def state_tensors(self) -> Iterable[Any]:
        """The cross-step tensors held now (for :meth:`state_bytes`)."""
        return ()

    def end_generation(self) -> None:
        """Called by :meth:`reset` when a generation with at least one call ends (before its state is dropped)."""

    # ---------------------------------------------------------------- stepping
    def timestep(self, args: tuple[Any, ...]) -> float:
        """The call's timestep, read on the host (the first element of the timestep input)."""
        t = args[self.t_index]
        return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)

    def __call__(self, *args: Any) -> Any:
        t = self.timestep(args)
        last = _LAST_IN_GROUP.get(self.group)
        if self.step > 0 and last is not None and last() is not self:
            self.reset(reason="the same model ran at other input shapes since this graph's last call")
        elif self.last_t is not None and t > self.last_t:
            self.reset(reason=f"timestep rose from {self.last_t:g} to {t:g}")
        _LAST_IN_GROUP[self.group] = weakref.ref(self)
        self.current_t = t  # the call's timestep, for run_step (read once per call)
        outputs, kind = self.run_step(args)
        self.kinds.append(kind)
        self.last_t = t
        self.step += 1
        self.calls += 1
        return outputs

    def reset(self, reason: str = "explicit") -> None:
        """Forget every cross-step tensor; the next call is call 0 of a new generation."""
        if self.kinds:
            self.end_generation()
            self.previous_kinds = self.kinds
            self.generation += 1
        self.step = 0
        self.kinds = []
        self.last_t = None
        self.reset_state()
        log.debug("graphprune[%s]: state reset (%s)", self.config.method, reason)

    # ---------------------------------------------------------------- reporting
    def state_bytes(self) -> int:
        """Bytes of the cross-step tensors held now (a tensor held twice counts once)."""
        seen: dict[int, int] = {}
        for t in self.state_tensors():
            if isinstance(t, torch.Tensor):
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    def describe(self) -> dict[str, Any]:
        """The runtime as plain data: generation, step and bytes of state besides :meth:`Tracked.describe`."""
        return {**super().describe(), "generation": self.generation, "step": self.step,
                "state_bytes": self.state_bytes()}


def module_of(obj: Any) -> torch.nn.Module | None:
    """The module behind a model, a compiled model (``_orig_mod``) or a pipeline (``.unet`` / ``.transformer``)."""
    if isinstance(obj, torch.nn.Module):
        return getattr(obj, "_orig_mod", obj)
    for name in ("unet", "transformer"):
        inner = getattr(obj, name, None)
        if isinstance(inner, torch.nn.Module):
            return module_of(inner)
    return None


def runtimes(obj: Any = None) -> list[Tracked]:
    """The live graphprune callables of a model (a compiled or plain module, or a pipeline) in the order they were
    made, or all of them for ``None``: runtimes and plain graphs, one per compiled graph and input shape."""
    if isinstance(obj, Tracked):
        return [obj]
    gc.collect()  # callables of graphs Dynamo dropped (torch._dynamo.reset, recompiles) may sit in reference cycles
    live = sorted(_TRACKED, key=lambda r: r.serial)
    if obj is None:
        return live
    module = module_of(obj)
    if module is None:
        raise TypeError(f"expected a model, a compiled model or a pipeline with .unet, got {type(obj).__name__}")
    params = [*module.parameters(), *module.buffers()]
    return [r for r in live if r.owns(params)]


def reset(obj: Any = None) -> int:
    """Restart every graphprune callable of ``obj`` (all of them for ``None``): cross-step state dropped, random
    draws restarted from their seed, so the next generation repeats the first one's. Returns how many."""
    found = runtimes(obj)
    for r in found:
        r.reset()
    if obj is not None and not found:
        log.info("graphprune.reset: nothing compiled by graphprune found for this model (not called yet?)")
    return len(found)


__all__ = ["Tracked", "Runtime", "runtimes", "reset"]
