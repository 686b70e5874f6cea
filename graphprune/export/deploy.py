"""Put a compiled, exported or ONNX-runtime UNet back into a diffusers pipeline (entry point: :class:`DeployedUNet`).

    pipe.unet = DeployedUNet.from_onnx("unet_sito50.onnx", pipe.unet)         # or from_program(ep, unet),
    images = pipe(prompt_embeds=..., negative_prompt_embeds=...).images      # from_compiled(fn, unet)

The wrapper takes the pipeline's UNet call ``(sample, timestep, encoder_hidden_states, timestep_cond=None,
cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=True)`` and returns ``UNet2DConditionOutput``
(``.sample``) or a 1-tuple, and exposes ``.config``, ``.dtype`` and ``.device`` as the pipeline reads them.

Exported programs and ONNX files have static shapes: the wrapper converts the timestep to the exported dtype and
shape (a scalar or a (B,) vector of equal values) and raises a clear error for any other shape mismatch (e.g.
another batch size or resolution: export again for it). Conditioning a static program cannot take
(``timestep_cond``, ``cross_attention_kwargs``) raises ``NotImplementedError``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from .program import RANDOM_KWARG, export_info, random_feed

log = logging.getLogger(__name__)


def _sample_of(out: Any) -> torch.Tensor:
    """The noise prediction of a UNet output (dataclass with ``.sample``, tuple, or tensor)."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


class OnnxRunner:
    """Runs an ONNX file with onnxruntime as ``runner(*args, **kwargs) -> torch.Tensor`` (the first output).

    Inputs are flattened like the export (args, then kwargs leaves, then random inputs) and matched to the
    session's inputs by position. For a ``random="inputs"`` file pass ``feed`` (e.g.
    ``graphprune.export.random_feed(ep)``): it is drawn on every call, like the compiled backend.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, feed: Any = None,
                 threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("running ONNX files needs onnxruntime: pip install 'graphprune[onnx]'") from exc
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
        self.inputs = self.session.get_inputs()
        self.feed = feed

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        flat = pytree.tree_leaves((args, kwargs))
        if self.feed is not None:
            flat += list(self.feed.draw())
        if len(flat) != len(self.inputs):
            raise ValueError(f"the ONNX model takes {len(self.inputs)} inputs "
                             f"({[i.name for i in self.inputs]}), got {len(flat)}")
        feeds = {}
        for spec, value in zip(self.inputs, flat):
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            if list(array.shape) != list(spec.shape):
                raise ValueError(f"ONNX input {spec.name}: shape {tuple(array.shape)} but the model was exported "
                                 f"with static shape {tuple(spec.shape)}; export again for this shape")
            feeds[spec.name] = array
        return torch.from_numpy(self.session.run(None, feeds)[0])


class DeployedUNet(torch.nn.Module):
    """A UNet stand-in for diffusers pipelines around any callable ``run(sample, timestep, ehs, **kw)``.

    Args:
        run: returns the noise prediction (B, C, h, w) (or an output with ``.sample``, or a tuple).
        config: the original UNet's ``config`` (the pipeline reads ``in_channels``, ``sample_size``, ...).
        dtype, device: what ``.dtype`` / ``.device`` report, and where outputs are moved.
        timestep: an example of the timestep the program was exported with (its dtype and shape are enforced);
            ``None`` passes timesteps unchanged (compiled models).
    """

    def __init__(self, run: Callable[..., Any], config: Any, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", timestep: torch.Tensor | None = None):
        super().__init__()
        self.run = run
        self.config = config
        self._dtype = dtype
        self._device = torch.device(device)
        self._timestep = None if timestep is None else (tuple(timestep.shape), timestep.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    # -- construction ----------------------------------------------------------------------------------------
    @staticmethod
    def _facts(unet: torch.nn.Module) -> dict[str, Any]:
        param = next(unet.parameters(), None)
        return {"config": unet.config, "dtype": param.dtype if param is not None else torch.float32,
                "device": param.device if param is not None else torch.device("cpu")}

    @classmethod
    def from_compiled(cls, fn: Callable[..., Any], unet: torch.nn.Module) -> "DeployedUNet":
        """``fn``: e.g. ``torch.compile(unet, backend="graphprune", options=...)``."""
        return cls(fn, **cls._facts(unet))

    @classmethod
    def from_program(cls, ep: ExportedProgram, unet: torch.nn.Module, timestep: torch.Tensor | None = None,
                     seed: int | None = None) -> "DeployedUNet":
        """A program from :func:`graphprune.export.export_program` (``random="inputs"`` programs get fresh
        random inputs per call from the backend's generator, seeded with ``seed`` or the config's seed)."""
        module = ep.module()
        feed = None
        try:
            info = export_info(ep)
            if info.random == "inputs" and info.random_specs:
                feed = random_feed(info, seed)
        except ValueError:
            pass
        if timestep is None:
            timestep = _program_timestep(ep)

        def run(*args: Any, **kwargs: Any) -> Any:
            if feed is not None:
                kwargs[RANDOM_KWARG] = feed.draw()
            with torch.no_grad():
                return module(*args, **kwargs)

        return cls(run, **cls._facts(unet), timestep=timestep)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, unet: torch.nn.Module, providers: Sequence[str] | None = None,
                  feed: Any = None, threads: int | None = None) -> "DeployedUNet":
        """An ONNX file from :func:`graphprune.export.to_onnx`, run with onnxruntime (CPU by default)."""
        runner = OnnxRunner(path, providers, feed, threads)
        t = next((i for i in runner.inputs if i.name == "timestep"), runner.inputs[1])
        dtype = {"tensor(int64)": torch.int64, "tensor(float)": torch.float32, "tensor(int32)": torch.int32,
                 "tensor(float16)": torch.float16}.get(t.type, torch.int64)
        return cls(runner, **cls._facts(unet), timestep=torch.zeros(tuple(t.shape), dtype=dtype))

    # -- the call --------------------------------------------------------------------------------------------
    def _convert_timestep(self, timestep: Any, batch: int) -> Any:
        if self._timestep is None:
            return timestep
        shape, dtype = self._timestep
        t = torch.as_tensor(timestep)
        if tuple(t.shape) != shape:
            if shape == () and t.numel() >= 1 and bool((t.reshape(-1) == t.reshape(-1)[0]).all()):
                t = t.reshape(-1)[0]
            elif len(shape) == 1 and t.numel() == 1:
                t = t.reshape(()).expand(shape)
            else:
                raise ValueError(f"timestep of shape {tuple(t.shape)}; the program was exported with {shape}")
        if dtype in (torch.int64, torch.int32) and t.is_floating_point() and bool((t != t.round()).any()):
            log.warning("graphprune: fractional timestep %s truncated to the exported integer dtype", t)
        return t.to(dtype)

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                class_labels: Any = None, timestep_cond: Any = None, attention_mask: Any = None,
                cross_attention_kwargs: Any = None, added_cond_kwargs: dict[str, Any] | None = None,
                down_block_additional_residuals: Any = None, mid_block_additional_residual: Any = None,
                down_intrablock_additional_residuals: Any = None, encoder_attention_mask: Any = None,
                return_dict: bool = True) -> Any:
        """sample: (B, C, h, w), timestep: () or (B,), encoder_hidden_states: (B, L, D) -> output (B, C', h, w)."""
        unsupported = {"class_labels": class_labels, "timestep_cond": timestep_cond,
                       "attention_mask": attention_mask, "cross_attention_kwargs": cross_attention_kwargs,
                       "down_block_additional_residuals": down_block_additional_residuals,
                       "mid_block_additional_residual": mid_block_additional_residual,
                       "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
                       "encoder_attention_mask": encoder_attention_mask}
        given = [k for k, v in unsupported.items() if v is not None]
        if given:
            raise NotImplementedError(f"DeployedUNet runs a static program: {given} cannot be passed; export "
                                      "the model with them as inputs instead")
        kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
        t = self._convert_timestep(timestep, sample.shape[0])
        out = _sample_of(self.run(sample, t, encoder_hidden_states, **kwargs))
        out = out.to(device=sample.device, dtype=sample.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


def _program_timestep(ep: ExportedProgram) -> torch.Tensor | None:
    """An example timestep (dtype, shape) from the program's second user input, if it is a tensor."""
    users = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(users) < 2:
        return None
    node = next((n for n in ep.graph.nodes if n.op == "placeholder" and n.name == users[1].arg.name), None)
    val = node.meta.get("val") if node is not None else None
    return torch.zeros(tuple(val.shape), dtype=val.dtype) if isinstance(val, torch.Tensor) else None


def replace_unet(pipe: Any, unet: torch.nn.Module) -> Any:
    """``pipe.unet = unet`` (returns the old UNet). A plain attribute set; the pipeline's config keeps its entry."""
    old = pipe.unet
    pipe.unet = unet
    return old


__all__ = ["DeployedUNet", "OnnxRunner", "replace_unet"]
