"""TensorRT engines of pruned models through torch-tensorrt (entry points: :func:`to_tensorrt`, :func:`load_engine`).

    engine = to_tensorrt(unet.cuda(), (latents, t, text_embeddings), method="sito", ratio=0.5, path="unet.ep")
    out = engine(latents, t, text_embeddings)                    # a torch.fx.GraphModule running TensorRT engines
    engine = load_engine("unet.ep")                              # later, in another process

Path: :func:`graphprune.export.export_program` (export -> rewrite -> re-export) then
``torch_tensorrt.dynamo.compile(exported_program, arg_inputs=..., kwarg_inputs=...)``; saving goes through
``torch_tensorrt.save(module, path, output_format="exported_program", arg_inputs=..., kwarg_inputs=...)`` and loading
through ``torch_tensorrt.load(path).module()``. The backend's ``compiler="tensorrt"`` uses the same compile call on
the rewritten Dynamo graph (:func:`graphprune.inner.compile_graph`).

Needs an NVIDIA GPU with CUDA and ``pip install 'graphprune[tensorrt]'`` (torch-tensorrt of the same minor version as
torch: torch-tensorrt 2.13 for torch 2.13, TensorRT 11.0). Precision follows the model's dtype (torch-tensorrt 2.13
removed ``enabled_precisions``): export an fp16 model for an fp16 engine. Written against the documented API; not run
on this project's CPU machines (tests skip without CUDA and torch-tensorrt).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.export import ExportedProgram

from ..config import PruneConfig
from ..inner import compile_graph, require_tensorrt, tensorrt_compile, tensorrt_unavailable
from .program import RANDOM_KWARG, export_info, export_program, random_feed

log = logging.getLogger(__name__)

def to_tensorrt(model: torch.nn.Module | ExportedProgram, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
                *, path: str | os.PathLike | None = None, options: Mapping[str, Any] | PruneConfig | None = None,
                random: str = "fixed", compile_options: Mapping[str, Any] | None = None,
                compile_fn: Callable[..., torch.nn.Module] | None = None, **config: Any) -> torch.nn.Module:
    """Prune, export and compile ``model`` with TensorRT; optionally save the result to ``path`` (``.ep``).

    Args:
        model: the model on CUDA (pruned here with ``options`` / ``**config``) or a program from export_program.
        args, kwargs: example CUDA inputs; the engine has these static shapes.
        random: as in :func:`graphprune.export.export_program` (``"inputs"``: pass ``graphprune_random=`` per call).
        compile_options: extra keyword arguments of ``torch_tensorrt.dynamo.compile`` (e.g. ``min_block_size``,
            ``require_full_compilation``, ``optimization_level``).
        compile_fn: replaces ``torch_tensorrt.dynamo.compile`` (tests use a CPU stand-in).

    Returns the compiled module (a ``torch.fx.GraphModule``); call it like the model (flat tensor outputs).
    Raises RuntimeError naming what to install when CUDA or torch-tensorrt is missing.
    """
    if compile_fn is None:
        require_tensorrt()
    kwargs = dict(kwargs or {})
    ep = model if isinstance(model, ExportedProgram) else export_program(model, args, kwargs, options=options,
                                                                          random=random, **config)
    call_kwargs = dict(kwargs)
    try:
        info = export_info(ep)
        if info.random == "inputs" and info.random_specs:
            call_kwargs[RANDOM_KWARG] = random_feed(info).examples()
    except ValueError:
        pass
    compile_fn = compile_fn or tensorrt_compile
    engine = compile_fn(ep, arg_inputs=list(args), kwarg_inputs=call_kwargs, **dict(compile_options or {}))
    if path is not None:
        save_engine(engine, path, args, call_kwargs)
    return engine


def save_engine(engine: torch.nn.Module, path: str | os.PathLike, args: tuple[Any, ...],
                kwargs: dict[str, Any] | None = None, output_format: str = "exported_program") -> Path:
    """``torch_tensorrt.save(engine, path, output_format=..., arg_inputs=args, kwarg_inputs=kwargs)``."""
    trt = require_tensorrt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trt.save(engine, str(path), output_format=output_format, arg_inputs=list(args), kwarg_inputs=dict(kwargs or {}))
    log.info("graphprune: saved TensorRT program to %s", path)
    return path


def load_engine(path: str | os.PathLike) -> torch.nn.Module:
    """Load a saved engine program: ``torch_tensorrt.load(path).module()``."""
    trt = require_tensorrt()
    return trt.load(str(path)).module()


__all__ = ["to_tensorrt", "save_engine", "load_engine", "compile_graph", "tensorrt_unavailable", "require_tensorrt"]
