"""diffusers integration: compile a pipeline's UNet with graphprune and undo it (entry points: :func:`apply`,
:func:`remove`).

    graphprune.apply(pipe, method="dato")          # pipe.unet becomes the compiled UNet; state resets per __call__
    graphprune.apply(pipe)                         # the default configuration (graphprune.methods.DEFAULT_OPTIONS)
    image = pipe(prompt_embeds=..., num_inference_steps=50).images[0]
    graphprune.remove(pipe)                        # the original UNet back

No module of the pipeline is patched: ``pipe.unet`` is replaced by ``torch.compile(unet, backend="graphprune")``
(the pattern diffusers documents for torch.compile), and the pipeline object's class is swapped for a subclass whose
``__call__`` resets graphprune's state and random draws first (step-aware runtimes also reset by themselves when the
timestep rises).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

from .config import PruneConfig
from .methods import parse_options
from .runtime import reset

log = logging.getLogger(__name__)

_ORIGINAL = "_graphprune_original_unet"


def _denoiser_name(pipe: Any) -> str:
    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise TypeError(f"{type(pipe).__name__} has no .unet or .transformer module to compile")


def apply(pipe: Any, method: str | None = None, options: dict[str, Any] | PruneConfig | None = None,
          **kwargs: Any) -> Any:
    """Compile ``pipe.unet`` (or ``pipe.transformer``) with graphprune; ``kwargs`` are options
    (``graphprune.apply(pipe, method="dato", ratio=0.4, cache_interval=3)``). Returns ``pipe``.

    Options are validated now (a bad option raises here, not at the first generation). Applying twice replaces the
    previous options. Every ``pipe(...)`` call restarts graphprune's state and random draws first
    (``graphprune.reset``), so the same generator seed gives the same image for every method; changes of batch or
    resolution between calls keep their pruning (one static graph per shape, see the README).
    """
    if isinstance(options, PruneConfig):
        if kwargs or method is not None:
            raise ValueError("pass either a typed config or keyword options, not both")
        config_options: Any = options
    else:
        if options is not None and not isinstance(options, dict):
            parse_options(options)  # raises, naming the accepted forms
        config_options = {**({"method": method} if method is not None else {}), **(options or {}), **kwargs}
        parse_options(config_options)  # validate eagerly
    if hasattr(pipe, _ORIGINAL):
        remove(pipe)
    name = _denoiser_name(pipe)
    original = getattr(pipe, name)
    compiled = torch.compile(original, backend="graphprune", options=config_options)
    setattr(pipe, name, compiled)
    object.__setattr__(pipe, _ORIGINAL, (name, original))
    base = type(pipe)
    pipe.__class__ = type(base.__name__, (base,), {"__call__": _call_with_reset, "_graphprune_base": base,
                                                   "__module__": base.__module__})
    log.info("graphprune.apply: %s.%s compiled with %s", base.__name__, name, config_options)
    return pipe


def _call_with_reset(self: Any, *args: Any, **kwargs: Any) -> Any:
    reset(self)
    return self._graphprune_base.__call__(self, *args, **kwargs)


def remove(pipe: Any) -> Any:
    """Undo :func:`apply`: the original module back in place and the pipeline's own class. Returns ``pipe``."""
    if not hasattr(pipe, _ORIGINAL):
        raise ValueError("graphprune.remove: this pipeline was not changed by graphprune.apply")
    name, original = getattr(pipe, _ORIGINAL)
    reset(pipe)
    setattr(pipe, name, original)
    object.__delattr__(pipe, _ORIGINAL)
    pipe.__class__ = type(pipe)._graphprune_base
    return pipe


@contextlib.contextmanager
def unpruned(pipe: Any, denoiser: Any = None) -> Iterator[Any]:
    """Inside the block the pipeline runs without graphprune: its original UNet (or ``denoiser``, e.g. the original
    compiled by plain Inductor) is put back, and graphprune's compiled one returns afterwards (nothing is recompiled).

        with graphprune.unpruned(pipe):
            baseline = pipe(prompt_embeds=...).images
    """
    if not hasattr(pipe, _ORIGINAL):
        raise ValueError("graphprune.unpruned: this pipeline was not changed by graphprune.apply")
    name, original = getattr(pipe, _ORIGINAL)
    compiled = getattr(pipe, name)
    setattr(pipe, name, denoiser if denoiser is not None else original)
    try:
        yield pipe
    finally:
        setattr(pipe, name, compiled)


__all__ = ["apply", "remove", "unpruned"]
