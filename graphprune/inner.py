"""Inner compilation shared by the backend and the step-aware runtime: the inner compiler and the random feed.

Methods that need randomness get it as extra graph inputs, drawn on every call from graphprune's own generator
(seeded by the config), so the user's RNG stream is never touched and no RNG runs inside a graph.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from .config import PruneConfig
from .methods.base import RandomSpec


class RandomFeed:
    """Draws the rewritten graph's random inputs on every call from a dedicated, seeded generator per device."""

    def __init__(self, specs: Sequence[tuple[RandomSpec, torch.device]], seed: int):
        self.specs = list(specs)
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        for _, device in self.specs:
            if device not in self.generators:
                self.generators[device] = torch.Generator(device=device).manual_seed(seed)

    def reseed(self) -> None:
        """Restart every generator from the seed (the step-aware runtime does it at each new generation)."""
        for g in self.generators.values():
            g.manual_seed(self.seed)

    def draw(self) -> list[torch.Tensor]:
        out = []
        for spec, device in self.specs:
            g = self.generators[device]
            if spec.kind == "normal":
                out.append(torch.randn(spec.shape, generator=g, device=device))
            else:
                out.append(torch.randint(spec.high, spec.shape, generator=g, device=device))
        return out

    def examples(self) -> list[torch.Tensor]:
        """Example tensors (zeros) for compiling the graph."""
        return [torch.zeros(spec.shape, device=device,
                            dtype=torch.float32 if spec.kind == "normal" else torch.int64)
                for spec, device in self.specs]


def compile_inner(gm: GraphModule, example_inputs: list[Any], config: PruneConfig) -> Callable[..., Any]:
    """Hand the (rewritten) graph to the configured inner compiler."""
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "tensorrt":  # same path as graphprune.export.to_tensorrt
        from .export.tensorrt import compile_graph

        return compile_graph(gm, example_inputs)
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(config.mode) if config.mode else None
    return compile_fx(gm, example_inputs, config_patches=patches)


__all__ = ["RandomFeed", "compile_inner"]
