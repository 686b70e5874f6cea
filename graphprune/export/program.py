"""export -> rewrite -> re-export (entry point: :func:`export_program`).

    ep = export_program(unet, (latents, t, text_embeddings), method="sito", ratio=0.5)
    out = ep.module()(latents, t, text_embeddings).sample          # same call and output type as the UNet

1. ``torch.export.export`` the model (the default, non-decomposed IR keeps ``linear`` and SDPA, which the matcher
   proves; after ``run_decompositions`` linear would be addmm/view).
2. The backend's matcher and rewrite (:func:`graphprune.passes.rewrite.prune_graph`) run on the lifted ATen graph.
3. The rewritten graph is wrapped in a module that owns the parameters and buffers again, and re-exported: the
   result is a normal :class:`torch.export.ExportedProgram` with the model's input and output pytree (a diffusers
   UNet still returns ``UNet2DConditionOutput``), whose plan ops are plain ATen ops.

Random inputs (SiTo noise, ToMe's random destinations), ``random=``:

* ``"fixed"`` (default): the tensors the compiled backend draws on its **first call** with the same seed
  (``RandomFeed(specs, seed).draw()``: one ``torch.Generator().manual_seed(seed)`` per device, one draw per site in
  graph order) are drawn once and stored in the program as buffers. The program is deterministic and its output
  equals the backend's first call for the same method, ratio and seed. Every call reuses the same draw.
* ``"inputs"``: the program takes them as a keyword argument ``graphprune_random`` (a list, in site order; see
  :func:`export_info` and :func:`random_feed`), so a caller can draw fresh ones per call as the backend does.
  Feeding ``random_feed(ep).draw()`` call after call reproduces the backend's calls one for one.

A method can also be made deterministic by its config instead (``noise_alpha=0`` for SiTo, ``use_rand=False`` for
ToMe); then there are no random inputs at all.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..config import PruneConfig
from ..inner import RandomFeed
from ..methods import RandomSpec, method_for, parse_options
from ..passes.rewrite import prune_graph
from ..progress import stage
from ..report import GraphReport

log = logging.getLogger(__name__)

RANDOM_MODES = ("fixed", "inputs")
RANDOM_KWARG = "graphprune_random"


@dataclass
class ExportInfo:
    """What :func:`export_program` did: the config, the pass report and the random inputs (in site order)."""

    config: PruneConfig
    report: GraphReport
    random_specs: list[tuple[RandomSpec, torch.device]] = field(default_factory=list)
    random: str = "fixed"
    arg_names: list[str] = field(default_factory=list)  # the model's forward parameter names (for ONNX inputs)

    @property
    def seed(self) -> int:
        return int(getattr(self.config, "seed", 0))


def export_info(ep: ExportedProgram) -> ExportInfo:
    """The :class:`ExportInfo` attached to a program made by :func:`export_program` (not kept by save/load)."""
    info = ep.graph_module.meta.get("graphprune")
    if info is None:
        raise ValueError("this ExportedProgram was not made by graphprune.export.export_program "
                         "(or was saved and loaded: the info is not serialized)")
    return info


def random_feed(ep_or_info: ExportedProgram | ExportInfo, seed: int | None = None):
    """A :class:`graphprune.inner.RandomFeed` for a program exported with ``random="inputs"``.

    ``feed.draw()`` gives the list to pass as ``graphprune_random=`` (the same tensors the backend draws)."""
    info = ep_or_info if isinstance(ep_or_info, ExportInfo) else export_info(ep_or_info)
    return RandomFeed(info.random_specs, info.seed if seed is None else seed)


def config_from(options: Mapping[str, Any] | PruneConfig | None, **overrides: Any) -> PruneConfig:
    """options dict or config, plus keyword overrides (``method=``, ``ratio=``, ...) -> a validated config."""
    if isinstance(options, PruneConfig):
        return dataclasses.replace(options, **overrides) if overrides else options
    merged = dict(options or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return parse_options(merged)


class _PrunedModule(torch.nn.Module):
    """Runs a rewritten, lifted export graph as a module that owns its parameters/buffers again.

    forward takes the original model's ``(*args, **kwargs)`` (plus ``graphprune_random=`` in "inputs" mode) and
    returns the original output pytree.
    """

    def __init__(self, ep: ExportedProgram, gm: torch.fx.GraphModule, n_random: int,
                 fixed: list[torch.Tensor] | None):
        super().__init__()
        self.gm = gm
        self.in_spec, self.out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
        self.n_random = n_random
        self._lifted: list[tuple[str, str]] = []  # (kind, attribute name) per lifted placeholder, in order
        state = ep.state_dict
        constants = ep.constants
        for i, spec in enumerate(s for s in ep.graph_signature.input_specs if s.kind != InputKind.USER_INPUT):
            name = f"lifted_{i}"
            if spec.kind == InputKind.PARAMETER:
                self.register_parameter(name, torch.nn.Parameter(state[spec.target], requires_grad=False))
            elif spec.kind == InputKind.BUFFER:
                value = state[spec.target] if spec.target in state else constants[spec.target]
                self.register_buffer(name, value, persistent=bool(spec.persistent))
            elif spec.kind in (InputKind.CONSTANT_TENSOR,):
                self.register_buffer(name, constants[spec.target], persistent=False)
            else:
                raise NotImplementedError(f"export input kind {spec.kind} is not supported ({spec.target})")
            self._lifted.append((spec.kind.name, name))
        self.fixed = fixed is not None
        for i, t in enumerate(fixed or []):
            self.register_buffer(f"graphprune_random_{i}", t, persistent=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        random = tuple(kwargs.pop(RANDOM_KWARG, ()))
        if self.fixed:
            random = tuple(getattr(self, f"graphprune_random_{i}") for i in range(self.n_random))
        if len(random) != self.n_random:
            raise ValueError(f"expected {self.n_random} tensors in {RANDOM_KWARG}= (see graphprune.export."
                             f"random_feed), got {len(random)}")
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise ValueError(f"inputs do not have the structure the model was exported with:\n{spec}\nvs\n"
                             f"{self.in_spec}")
        lifted = [getattr(self, name) for _, name in self._lifted]
        out = self.gm(*lifted, *flat, *random)
        return pytree.tree_unflatten(list(out), self.out_spec)


def _arg_names(model: torch.nn.Module) -> list[str]:
    """Names of the model's positional forward parameters (``sample``, ``timestep``, ... for a UNet)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def export_program(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *,
                   options: Mapping[str, Any] | PruneConfig | None = None, random: str = "fixed",
                   strict: bool = False, **config: Any) -> ExportedProgram:
    """Export ``model(*args, **kwargs)`` with every selected self-attention pruned; static shapes.

    Args:
        model: e.g. a diffusers ``UNet2DConditionModel`` in eval mode.
        args, kwargs: example inputs, e.g. ``(sample (B, 4, h, w), timestep (), encoder_hidden_states (B, L, D))``;
            the program accepts exactly these shapes.
        options / **config: the method's options, as for the backend (``method="sito", ratio=0.5, ...``).
        random: ``"fixed"`` (the backend's first draw for the seed, stored in the program) or ``"inputs"``
            (``graphprune_random=`` keyword input); see the module docstring.
        strict: forwarded to ``torch.export.export``.

    Returns a re-exported :class:`ExportedProgram`; :func:`export_info` gives its report and random specs.
    """
    if random not in RANDOM_MODES:
        raise ValueError(f"random must be one of {RANDOM_MODES}, got {random!r}")
    cfg = config_from(options, **config)
    method = method_for(cfg)
    if method.runtime(cfg) != "none":
        single = method.every_step_options(cfg.ratio)
        hint = "" if method.runtime(parse_options({"method": cfg.method, **single})) != "none" else \
            f", or pass {single} to export the graph every step would run"
        raise NotImplementedError(f"method {cfg.method!r} is step-aware (a runtime switches graphs between denoising "
                                  "steps); export_program exports one static graph: use a per-step method (tome, "
                                  f"sito, ...){hint}")
    kwargs = dict(kwargs or {})
    with torch.no_grad():
        with stage("torch.export of the model"):
            ep0 = torch.export.export(model, tuple(args), kwargs, strict=strict)
        gm = ep0.graph_module
        # the plan as plain aten ops (no Inductor-only custom op such as graphprune::best_match in the program)
        result = prune_graph(gm, dataclasses.replace(cfg, compiler="eager"), method)
        n_random = len(result.random_inputs)
        fixed = None
        if random == "fixed" and n_random:
            fixed = RandomFeed(result.random_inputs, int(getattr(cfg, "seed", 0))).draw()
        wrapper = _PrunedModule(ep0, gm, n_random, fixed)
        export_kwargs = dict(kwargs)
        if random == "inputs" and n_random:
            export_kwargs[RANDOM_KWARG] = list(RandomFeed(result.random_inputs, 0).examples())
        with stage("torch.export of the rewritten program"):
            ep = torch.export.export(wrapper, tuple(args), export_kwargs, strict=strict)
    ep.graph_module.meta["graphprune"] = ExportInfo(cfg, result.report, list(result.random_inputs), random,
                                                    _arg_names(model))
    log.info("graphprune export: %s, %d random input(s) (%s)", result.report.summary(), n_random, random)
    return ep


__all__ = ["export_program", "export_info", "random_feed", "ExportInfo", "RANDOM_MODES", "RANDOM_KWARG",
           "config_from"]
