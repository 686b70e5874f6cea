"""Inner compilation shared by the backend, the runtimes and export: the inner compilers (Inductor, eager,
aot_eager, torch-tensorrt) and the random feed.

Methods that need randomness get it as extra graph inputs, drawn on every call from graphprune's own generator
(seeded by the config), so the user's RNG stream is never touched and no RNG runs inside a graph.

torch-tensorrt is an optional extra, imported lazily (and only here and in :mod:`graphprune.export.tensorrt`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from .config import PruneConfig
from .methods.base import RandomSpec


class RandomFeed:
    """Draws the rewritten graph's random inputs on every call from a dedicated, seeded generator per device."""

    def __init__(self, specs: Sequence[tuple[RandomSpec, torch.device]], seed: int):
        self.specs = list(specs)
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}  # made at the first draw on each device

    def reseed(self) -> None:
        """Restart every generator from the seed (``graphprune.reset`` and every new generation do it)."""
        for g in self.generators.values():
            g.manual_seed(self.seed)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def draw(self) -> list[torch.Tensor]:
        """One tensor per spec, drawn from the seeded generator of its device (in spec order)."""
        out = []
        for spec, device in self.specs:
            g = self._generator(device)
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


log = logging.getLogger(__name__)

#: methods whose lazily built variants failed to compile in the static-shape tracing context (tried once per process)
_UNCACHED_LAZY: set[str] = set()


def compile_inner(gm: GraphModule, example_inputs: list[Any], config: PruneConfig) -> Callable[..., Any]:
    """Hand the (rewritten) graph to the configured inner compiler."""
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "tensorrt":  # same compile call as graphprune.export.to_tensorrt
        return compile_graph(gm, example_inputs)
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    from .passes.cut import copy_graph_module
    from .passes.inline import inline_calls

    patches = inductor_patches(config, example_inputs)
    rewritten = gm
    gm = copy_graph_module(gm)  # the rewritten graph stays as it is (inspect, graphprune_graph)
    inline_calls(gm)  # cacheable op identities: AOTAutograd's cache bypasses graphs holding Python closures
    if _shape_env() is not None:  # inside Dynamo's compile of the frame
        return compile_fx(gm, _static_fakes(example_inputs), config_patches=patches)
    # a variant compiled lazily at run time (a step kind's first call, a catome bucket): outside Dynamo's tracing
    # context the FX graph and AOTAutograd caches bypass it ("No shape env"); give it a static-shape context
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if config.method in _UNCACHED_LAZY:
        return compile_fx(copy_graph_module(rewritten), example_inputs, config_patches=patches)
    try:
        with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True))):
            return compile_fx(gm, example_inputs, config_patches=patches)
    except Exception as exc:  # noqa: BLE001  e.g. catome's bucket variants (KeyError in tensorify_python_scalars)
        log.info("graphprune[%s]: the cacheable compile of a lazily built variant failed (%s: %s); compiling it "
                 "as before, without the on-disk caches", config.method, type(exc).__name__, exc)
        _UNCACHED_LAZY.add(config.method)
        return compile_fx(copy_graph_module(rewritten), example_inputs, config_patches=patches)


#: graphprune's Inductor settings for graphs on the CPU: without freezing, Inductor's layout optimization runs every
#: convolution channels-last and copies each weight into that layout on every call (SD1.5 at latent 32, 1 thread:
#: 5.57 s per call with it, 4.13 s without; ``python benchmarks/inductor_layout.py --arch sd15``)
CPU_INDUCTOR_CONFIG: dict[str, Any] = {"layout_optimization": False}


def inductor_patches(config: PruneConfig, example_inputs: list[Any]) -> dict[str, Any] | None:
    """The ``torch._inductor.config`` patches of one compile: graphprune's CPU settings (every tensor input on the
    CPU), then the ``mode``'s options, then the user's ``inductor_config``; None when there are none."""
    patches: dict[str, Any] = {}
    devices = {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)}
    if devices == {"cpu"}:
        patches.update(CPU_INDUCTOR_CONFIG)
    if config.mode:
        patches.update(torch._inductor.list_mode_options(config.mode))
    patches.update(config.inductor_config or {})
    return patches or None


def _static_fakes(example_inputs: list[Any]) -> list[Any]:
    """Inside Dynamo's compile of a frame: the real tensors among ``example_inputs`` (zeros standing for a step
    runtime's state inputs) as static-shape fakes of the frame's fake mode. Converted by AOTAutograd instead, they
    would get fresh dynamic size symbols with no source in the frame, and any guard on them (the inlined ops' static
    sizes specialize them) breaks Dynamo's guard building (IndexError in ``produce_guards``)."""
    from torch._guards import TracingContext
    from torch._subclasses.fake_tensor import FakeTensor

    mode = TracingContext.get().fake_mode
    return [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor)
            else x for x in example_inputs]


def _shape_env() -> Any:
    """The shape environment of the active tracing context (None outside Dynamo's compile of a frame)."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    return getattr(getattr(ctx, "fake_mode", None), "shape_env", None)


INSTALL_HINT = ("TensorRT export needs an NVIDIA GPU with CUDA and torch-tensorrt built for your torch "
                "(torch {torch} -> torch-tensorrt {minor}.*): pip install 'graphprune[tensorrt]'")


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here (no CUDA, or torch-tensorrt missing), or None when it can."""
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    hint = INSTALL_HINT.format(torch=torch.__version__, minor=minor)
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}); {hint}"
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError as exc:
        return f"torch_tensorrt is not importable ({exc}); {hint}"
    return None


def require_tensorrt() -> Any:
    """Import and return ``torch_tensorrt``, or raise RuntimeError saying what to install."""
    reason = tensorrt_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    import torch_tensorrt

    return torch_tensorrt


def tensorrt_compile(ep: ExportedProgram, arg_inputs: list[Any], kwarg_inputs: dict[str, Any],
                     **compile_options: Any) -> torch.nn.Module:
    trt = require_tensorrt()
    return trt.dynamo.compile(ep, arg_inputs=arg_inputs, kwarg_inputs=kwarg_inputs, **compile_options)


class _FrozenParams(torch.nn.Module):
    """A Dynamo graph whose parameter inputs become module parameters again (so export lifts them as weights,
    which TensorRT folds into the engine, instead of runtime inputs). forward takes the other inputs only."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], param_positions: list[int]):
        super().__init__()
        self.gm = gm
        self.n = len(example_inputs)
        self.param_positions = param_positions
        for j, i in enumerate(param_positions):
            self.register_parameter(f"p{j}", torch.nn.Parameter(example_inputs[i].detach(), requires_grad=False))

    def forward(self, *inputs: Any) -> Any:
        it = iter(inputs)
        params = {i: getattr(self, f"p{j}") for j, i in enumerate(self.param_positions)}
        full = [params[i] if i in params else next(it) for i in range(self.n)]
        return self.gm(*full)


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any],
                  compile_options: Mapping[str, Any] | None = None,
                  compile_fn: Callable[..., torch.nn.Module] | None = None) -> Callable[..., Any]:
    """The backend's ``compiler="tensorrt"``: export the (rewritten) Dynamo graph with its parameters as weights,
    compile it with ``torch_tensorrt.dynamo.compile``, and return a callable taking Dynamo's full argument list."""
    if compile_fn is None:
        require_tensorrt()
    positions = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
    frozen = _FrozenParams(gm, list(example_inputs), positions)
    user = [x for i, x in enumerate(example_inputs) if i not in set(positions)]
    with torch.no_grad():
        ep = torch.export.export(frozen, tuple(user), strict=False)
    compile_fn = compile_fn or tensorrt_compile
    engine = compile_fn(ep, arg_inputs=user, kwarg_inputs={}, **dict(compile_options or {}))
    drop = set(positions)

    def run(*args: Any) -> Any:
        return engine(*[a for i, a in enumerate(args) if i not in drop])

    return run


__all__ = ["RandomFeed", "compile_inner", "compile_graph", "tensorrt_compile", "tensorrt_unavailable",
           "require_tensorrt"]
