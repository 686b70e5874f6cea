#!/usr/bin/env python
"""Inductor's channels-last layout optimization on CPU: eager vs Inductor vs Inductor without it, paired.

    python benchmarks/inductor_layout.py --threads 1                      # one 1280->1280 3x3 conv at 16x16
    python benchmarks/inductor_layout.py --threads 1 --arch sd15 --latent 32 --runs 7   # the whole UNet

Without freezing, Inductor's layout optimization (``torch._inductor.config.layout_optimization``, on by default)
runs every convolution channels-last and copies each weight into that layout on every call (the generated code's
``cpp_fused_convolution_0``). This script times eager, Inductor, and Inductor with the optimization off, each timed
call paired with a call of default Inductor (graphprune/bench/timing.py), and checks the outputs agree.
"""

import argparse
import sys
from pathlib import Path

# benchmarks/profile.py shadows the standard library's ``profile`` (which torch imports via cProfile): drop this
# folder from the path, and import the graphprune of this checkout (not another installed copy)
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

from graphprune.bench.env import environment, format_header  # noqa: E402
from graphprune.bench.options import Protocol  # noqa: E402
from graphprune.bench.timing import PairedTimer, torch_setup  # noqa: E402


def compiled(model: torch.nn.Module, layout_optimization: bool):
    """``model`` under Inductor with the layout optimization on or off (compiled at the first call, in that mode).
    The two settings call the model through different functions: Dynamo keys its cache by code object, so one
    shared function would hand the second setting the first one's compiled graph."""
    if layout_optimization:
        def run_default(*a, **k):
            return model(*a, **k)
        fn = torch.compile(run_default)
    else:
        def run_without_layout_optimization(*a, **k):
            return model(*a, **k)
        fn = torch.compile(run_without_layout_optimization)

    def call(*a, **k):
        with inductor_config.patch(layout_optimization=layout_optimization):
            return fn(*a, **k)

    return call


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=None, help="a built-in UNet (graphprune.archs, e.g. sd15) instead of one conv")
    p.add_argument("--latent", type=int, default=32, help="latent side with --arch")
    p.add_argument("--channels", type=int, default=1280, help="conv channels (without --arch)")
    p.add_argument("--size", type=int, default=16, help="conv input side (without --arch)")
    p.add_argument("--runs", type=int, default=9, help="timed pairs (median of the per-pair ratios)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    with torch_setup(args.threads, keep_inductor_cache=False, prefix="inductor_layout"), torch.no_grad():
        if args.arch:
            from graphprune.archs import build_unet, example_inputs

            model = build_unet(args.arch).eval()
            inputs, kwargs = example_inputs(model, latent=args.latent, batch=2)
            shape = {"arch": args.arch, "latent": args.latent, "batch": 2}
        else:
            model = torch.nn.Conv2d(args.channels, args.channels, 3, padding=1).eval()
            inputs, kwargs = (torch.randn(2, args.channels, args.size, args.size),), {}
            shape = {"conv": f"{args.channels}->{args.channels} 3x3", "input": [2, args.channels, args.size, args.size]}
        print(format_header(environment("cpu", torch.float32, **shape)))
        variants = {"eager": model, "inductor, layout_optimization off": compiled(model, False)}
        baseline = compiled(model, True)

        def out(fn):
            y = fn(*inputs, **kwargs)
            return getattr(y, "sample", y)

        ref = out(model)
        agree = True
        for name, fn in [("inductor (default)", baseline)] + list(variants.items()):
            err = ((out(fn) - ref).norm() / ref.norm()).item()
            agree &= err < 1e-4
            print(f"{name}: rel. error vs eager {err:.2e}")
        protocol = Protocol(runs=args.runs, warmup=args.warmup, retries=0)
        timer = PairedTimer(protocol, lambda i: baseline(*inputs, **kwargs), desc="inductor (default)")
        for name, fn in variants.items():
            res = timer.time(lambda i, fn=fn: fn(*inputs, **kwargs), name)
            print(f"{name}: median {res['median_s']:.4f} s, speedup vs default Inductor (median of {args.runs} "
                  f"paired ratios) {res['speedup']:.3f}")
        print(f"inductor (default): median {timer.median_s:.4f} s")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
