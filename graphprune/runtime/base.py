"""What every stateful runtime shares (entry point: :class:`Runtime`; lookups :func:`runtimes`, :func:`reset`).

For a config whose graphs change between denoising steps, the backend returns a :class:`Runtime` subclass instead of
one compiled graph. The base class holds the machinery they all need:

* **generations**: a call whose timestep is higher than the previous call's starts a new generation and resets all
  state (an equal timestep, as PNDM/PLMS repeat at their start, does not); ``graphprune.reset(model)`` does it too;
* **the timestep**: found once in the traced graph (the input that reaches the time embedding), read on the host
  before each call (the only host read the base class makes);
* **ownership**: which model a runtime belongs to (its parameters were example inputs of the traced graph), so that
  ``graphprune.reset(pipe)`` and ``graphprune.inspect(fast)`` find it;
* **state accounting and description**: bytes of the cross-step tensors held, and ``describe()`` as plain data.

A subclass implements :meth:`Runtime.run_step` (one call: which kind it was, and the outputs), :meth:`reset_state`,
:meth:`state_tensors` and :meth:`describe_extra`.
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any, Iterable

import torch
from torch.fx import GraphModule

from ..config import PruneConfig, config_to_dict
from ..methods.base import TokenMethod
from ..passes.cut import find_timestep_input
from ..report import GraphReport

log = logging.getLogger(__name__)

#: Every live runtime (for ``graphprune.reset`` / ``graphprune.runtimes`` lookups by model).
_RUNTIMES: "weakref.WeakSet[Runtime]" = weakref.WeakSet()


class Runtime:
    """Base of the callables the backend returns for stateful configs.

    gm: the graph Dynamo traced (never edited in place); example_inputs: its example inputs; method: the method
    that serves ``config``; reports / all_reports: lists that receive every variant's :class:`GraphReport`;
    register: list the runtime for :func:`runtimes` lookups (``inspect`` passes False).
    """

    #: the runtime's name in reports and ``describe()`` (the value :meth:`TokenMethod.runtime` returns)
    name = ""

    def __init__(self, gm: GraphModule, example_inputs: list[Any], config: PruneConfig, method: TokenMethod,
                 reports: list[GraphReport] | None = None, all_reports: Any = None, register: bool = True):
        self.config = config
        self.method = method
        self.base = gm
        self._sinks = [r for r in (reports, all_reports) if r is not None]
        t_index = find_timestep_input(gm.graph)
        if t_index is None:
            raise ValueError(f"method {config.method!r} works across denoising steps, but the traced graph has no "
                             "timestep input: pass the timestep as a tensor (diffusers pipelines do), not a Python "
                             "number")
        self.t_index = t_index
        self.n_user = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = output.args[0]
        self.n_outputs = len(outs) if isinstance(outs, (list, tuple)) else 1
        self.device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        self._keys = {t.data_ptr() for t in example_inputs if isinstance(t, torch.Tensor) and t.numel() > 1}
        self.generation = 0
        self.step = 0
        self.last_t: float | None = None
        self.current_t: float | None = None
        self.kinds: list[str] = []  # kinds run in the current generation
        self.previous_kinds: list[str] = []  # kinds run in the previous generation
        if register:
            _RUNTIMES.add(self)

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

    def describe_extra(self) -> dict[str, Any]:
        """The subclass's part of :meth:`describe` (schedule, variants, counters)."""
        return {}

    # ---------------------------------------------------------------- stepping
    def record(self, report: GraphReport) -> None:
        """Hand a variant's report to the report lists the runtime was given."""
        for sink in self._sinks:
            sink.append(report)

    def timestep(self, args: tuple[Any, ...]) -> float:
        """The call's timestep, read on the host (the first element of the timestep input)."""
        t = args[self.t_index]
        return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)

    def __call__(self, *args: Any) -> Any:
        t = self.timestep(args)
        if self.last_t is not None and t > self.last_t:
            self.reset(reason=f"timestep rose from {self.last_t:g} to {t:g}")
        self.current_t = t  # the call's timestep, for run_step (read once per call)
        outputs, kind = self.run_step(args)
        self.kinds.append(kind)
        self.last_t = t
        self.step += 1
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
        """The runtime as plain data: method, config, generation, step, bytes of state, then the subclass's part."""
        return {"runtime": self.name, "method": self.config.method, "config": config_to_dict(self.config),
                "generation": self.generation, "step": self.step, "state_bytes": self.state_bytes(),
                **self.describe_extra()}

    def owns(self, tensors: Iterable[Any]) -> bool:
        """Whether any of ``tensors`` (a model's parameters) was an input of this runtime's graph."""
        return any(t.data_ptr() in self._keys for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 1)


def _module_of(obj: Any) -> torch.nn.Module | None:
    if isinstance(obj, torch.nn.Module):
        return getattr(obj, "_orig_mod", obj)
    for name in ("unet", "transformer"):
        inner = getattr(obj, name, None)
        if isinstance(inner, torch.nn.Module):
            return _module_of(inner)
    return None


def runtimes(obj: Any = None) -> list[Runtime]:
    """The live runtimes of a model (a compiled or plain module, or a pipeline), or all of them for ``None``."""
    if isinstance(obj, Runtime):
        return [obj]
    gc.collect()  # runtimes of graphs Dynamo dropped (torch._dynamo.reset, recompiles) may sit in reference cycles
    live = list(_RUNTIMES)
    if obj is None:
        return live
    module = _module_of(obj)
    if module is None:
        raise TypeError(f"expected a model, a compiled model or a pipeline with .unet, got {type(obj).__name__}")
    params = [*module.parameters(), *module.buffers()]
    return [r for r in live if r.owns(params)]


def reset(obj: Any = None) -> int:
    """Reset the cross-step state of every runtime of ``obj`` (all runtimes for ``None``). Returns how many."""
    found = runtimes(obj)
    for r in found:
        r.reset()
    if obj is not None and not found:
        log.info("graphprune.reset: no step-aware runtime found for this model (nothing compiled yet?)")
    return len(found)


__all__ = ["Runtime", "runtimes", "reset"]
