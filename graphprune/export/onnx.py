"""ONNX files of pruned models (entry points: :func:`to_onnx`, :func:`check_onnx`).

    to_onnx(unet, (latents, t, text_embeddings), "unet_sito50.onnx", method="sito", ratio=0.5)

The pruned :class:`~torch.export.ExportedProgram` (:func:`graphprune.export.export_program`) goes through the
torch ONNX exporter's dynamo path (``torch.onnx.export(ep, dynamo=True)``) with static shapes. Afterwards every
``TopK`` gets ``sorted=1``: TensorRT's parser requires it, and the ONNX spec leaves the order of ``sorted=0``
outputs unspecified, so sorted output is one of the behaviours the exported graph already allows (graphprune's
methods use TopK results as sets). :func:`check_onnx` checks a file against TensorRT's parser table
(:mod:`graphprune.export.trt_ops`): supported ops only, TopK k < 3840 with ``sorted=1``, no NonZero, every value
with a static shape.

Files above 2 GB (the SD1.5 UNet in fp32) are written with external data next to the ``.onnx`` file.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from ..config import PruneConfig
from ..progress import stage
from .program import RANDOM_KWARG, export_info, export_program
from .trt_ops import FORBIDDEN_OPS, SUPPORTED_OPS, TENSORRT_VERSION, TOPK_MAX_K

log = logging.getLogger(__name__)

_INSTALL = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'graphprune[onnx]'"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL) from exc


def input_names(arg_names: list[str], args: tuple[Any, ...], kwargs: Mapping[str, Any] | None,
                n_random: int = 0) -> list[str]:
    """ONNX input names: ``arg_names`` for ``args`` (``input_i`` beyond them), pytree paths of ``kwargs``, then
    ``graphprune_random_i`` (``random="inputs"`` programs)."""
    names: list[str] = []
    for i, a in enumerate(args):
        base = arg_names[i] if i < len(arg_names) else f"input_{i}"
        leaves = pytree.tree_leaves(a)
        names += [base] if len(leaves) == 1 else [f"{base}_{j}" for j in range(len(leaves))]
    for path, _ in pytree.tree_flatten_with_path(dict(kwargs or {}))[0]:
        names.append("_".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path))
    names += [f"{RANDOM_KWARG}_{i}" for i in range(n_random)]
    return names


def _sorted_topk(onnx_program: Any) -> int:
    """Set ``sorted=1`` on every TopK of the exported model (in place). Returns how many were changed."""
    import onnx_ir as ir

    changed = 0
    for node in ir.traversal.RecursiveGraphIterator(onnx_program.model.graph):
        if node.op_type == "TopK":
            attr = node.attributes.get("sorted")
            if attr is None or attr.value != 1:
                node.attributes["sorted"] = ir.AttrInt64("sorted", 1)
                changed += 1
    return changed


def to_onnx(model: torch.nn.Module | ExportedProgram, args: tuple[Any, ...], path: str | os.PathLike,
            kwargs: dict[str, Any] | None = None, *, options: Mapping[str, Any] | PruneConfig | None = None,
            random: str = "fixed", opset_version: int | None = None, optimize: bool = True,
            external_data: bool | None = None, check: bool = True, **config: Any) -> Path:
    """Export ``model`` pruned with ``method``/``ratio`` (or an already pruned program) to an ONNX file.

    Args:
        model: the model (pruned here with ``options`` / ``**config``) or a program from ``export_program``.
        args, kwargs: example inputs (static shapes), e.g. ``(sample (B, 4, h, w), t (), text (B, 77, D))``.
        path: the ``.onnx`` file to write (external data goes next to it when the model is above 2 GB).
        random: see :func:`graphprune.export.export_program`; ``"inputs"`` adds inputs ``graphprune_random_i``.
        opset_version, optimize: forwarded to ``torch.onnx.export``.
        check: run :func:`check_onnx` (checker + TensorRT rules) and raise if it fails.

    Returns the path written. Input names: the model's forward parameter names (``sample``, ``timestep``,
    ``encoder_hidden_states`` for a UNet); output: ``out_sample`` for a single-tensor output.
    """
    _require_onnx()
    path = Path(path)
    kwargs = dict(kwargs or {})
    if isinstance(model, ExportedProgram):
        ep = model
    else:
        ep = export_program(model, args, kwargs, options=options, random=random, **config)
    try:
        info = export_info(ep)
        n_random = len(info.random_specs) if info.random == "inputs" else 0
        arg_names = info.arg_names
    except ValueError:  # a program not made by export_program: the exporter names the inputs
        info, n_random, arg_names = None, 0, None
    call_kwargs = dict(kwargs)
    if n_random:
        from .program import random_feed

        call_kwargs[RANDOM_KWARG] = random_feed(ep).examples()
    names = input_names(arg_names, args, kwargs, n_random) if arg_names is not None else None
    n_out = len(ep.graph_signature.user_outputs)
    with torch.no_grad(), stage("ONNX export"):
        onnx_program = torch.onnx.export(ep, tuple(args), kwargs=call_kwargs, dynamo=True, input_names=names,
                                         output_names=["out_sample"] if n_out == 1 else None,
                                         opset_version=opset_version, optimize=optimize)
    n_topk = _sorted_topk(onnx_program)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path), external_data=external_data)
    log.info("graphprune: wrote %s (%d TopK set to sorted=1)%s", path, n_topk,
             f"; {info.report.summary()}" if info is not None else "")
    if check:
        with stage("ONNX checks (onnx.checker, TensorRT parser table)"):
            result = check_onnx(path)
        if not result.ok:
            raise RuntimeError(f"{path} fails the deployment checks:\n{result}")
    return path


@dataclass
class OnnxCheck:
    """What :func:`check_onnx` found. ``ok`` when there are no ``problems``."""

    op_counts: dict[str, int] = field(default_factory=dict)
    topk_ks: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    opset: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        ops = ", ".join(f"{k}x{v}" for k, v in sorted(self.op_counts.items()))
        lines = [f"opset {self.opset}; TopK k: {sorted(set(self.topk_ks))}; ops: {ops}"]
        lines += [f"PROBLEM: {p}" for p in self.problems] or ["all checks passed (TensorRT " + TENSORRT_VERSION +
                                                               " parser table)"]
        return "\n".join(lines)


def _constants(graph: Any) -> dict[str, Any]:
    """name -> numpy array of every initializer and Constant node output (without loading external data)."""
    from onnx import numpy_helper

    out: dict[str, Any] = {}
    for init in graph.initializer:
        if not init.external_data:
            out[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return out


def _static(type_proto: Any) -> bool:
    t = type_proto.tensor_type
    if not t.HasField("shape"):
        return False
    return all(d.HasField("dim_value") for d in t.shape.dim)


def check_onnx(path_or_model: str | os.PathLike | Any, full_check: bool = True) -> OnnxCheck:
    """Check an ONNX model for deployment with TensorRT (the rules of :mod:`graphprune.export.trt_ops`).

    ``onnx.checker`` (with shape inference when ``full_check``), then: every op in the default domain is in the
    TensorRT 10.15 parser table and none is data-dependent (NonZero, Unique, Compress); every TopK has a constant
    ``k < 3840`` and ``sorted=1``; ScatterND has no reduction; every graph input, output and value_info has a
    static shape; no functions or custom domains (besides what the checker accepts).
    """
    import onnx

    result = OnnxCheck()
    if isinstance(path_or_model, (str, os.PathLike)):
        onnx.checker.check_model(str(path_or_model), full_check=full_check)
        model = onnx.load(str(path_or_model), load_external_data=False)
    else:
        model = path_or_model
        onnx.checker.check_model(model, full_check=full_check)
    result.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    graph = model.graph
    consts = _constants(graph)
    counts: collections.Counter[str] = collections.Counter()
    for node in graph.node:
        domain = node.domain or ""
        counts[node.op_type if domain in ("", "ai.onnx") else f"{domain}::{node.op_type}"] += 1
        if domain not in ("", "ai.onnx"):
            result.problems.append(f"node {node.name}: op {domain}::{node.op_type} is outside the ONNX domain")
            continue
        if node.op_type not in SUPPORTED_OPS:
            result.problems.append(f"node {node.name}: {node.op_type} is not supported by TensorRT "
                                   f"{TENSORRT_VERSION}'s ONNX parser")
        if node.op_type in FORBIDDEN_OPS:
            result.problems.append(f"node {node.name}: {node.op_type} has a data-dependent output shape")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "TopK":
            k = consts.get(node.input[1]) if len(node.input) > 1 else attrs.get("k")
            if k is None:
                result.problems.append(f"node {node.name}: TopK k is not a constant")
            else:
                k = int(k.reshape(-1)[0]) if hasattr(k, "reshape") else int(k)
                result.topk_ks.append(k)
                if k >= TOPK_MAX_K:
                    result.problems.append(f"node {node.name}: TopK k={k} is not below TensorRT's {TOPK_MAX_K}")
            if attrs.get("sorted", 1) != 1:
                result.problems.append(f"node {node.name}: TopK sorted=0 (TensorRT needs sorted=1)")
        if node.op_type == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
            result.problems.append(f"node {node.name}: ScatterND reduction {attrs['reduction']!r} (TensorRT "
                                   "rejects reductions)")
    for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for v in values:
            if not _static(v.type) and v.type.HasField("tensor_type"):
                result.problems.append(f"{kind} {v.name} has no static shape")
    if model.functions:
        result.problems.append(f"{len(model.functions)} local function(s) left in the model")
    result.op_counts = dict(counts)
    return result


__all__ = ["to_onnx", "check_onnx", "OnnxCheck", "input_names"]
