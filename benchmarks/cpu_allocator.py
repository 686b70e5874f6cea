#!/usr/bin/env python
"""glibc's allocator on CPU: a UNet call with freed memory kept in the process vs glibc's defaults, paired.

    python benchmarks/cpu_allocator.py --threads 1 --latent 32                 # SD1.5, Inductor (layout opt. off)
    python benchmarks/cpu_allocator.py --threads 1 --latent 32 --model eager   # the eager UNet
    python benchmarks/cpu_allocator.py --threads 1 --latent 64 --model todo2   # graphprune's default

By default glibc serves every large allocation (above a dynamic threshold of at most 32 MiB) with a fresh ``mmap``
and unmaps it on free, so each UNet call page-faults and zeroes its activations again (~0.58 million minor
faults per SD1.5 call at latent 32). ``mallopt(M_MMAP_MAX, 0)`` with a large ``M_TRIM_THRESHOLD`` keeps freed
memory in the heap for reuse; the same as starting Python with
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824``. Both settings are switched at
run time here, so every timed call with memory kept is paired with a call under glibc's defaults in one process
(graphprune/bench/timing.py); the minor page faults of each call are counted (``getrusage``). Restoring the
"defaults" sets glibc's documented initial values (mmap_max 65536, trim threshold 128 KiB), which switches off the
dynamic mmap threshold: close to, not exactly, an untouched process. Linux + glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

# benchmarks/profile.py shadows the standard library's ``profile`` (which torch imports via cProfile): drop this
# folder from the path, and import the graphprune of this checkout (not another installed copy)
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from graphprune.bench.env import environment, format_header  # noqa: E402
from graphprune.bench.options import Protocol  # noqa: E402
from graphprune.bench.timing import PairedTimer, torch_setup  # noqa: E402

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}
KEEP_FREED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30}


def mallopt() -> Callable[[dict[int, int]], None]:
    """A function applying ``{param: value}`` with glibc's ``mallopt`` (SystemExit where there is no glibc)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        raise SystemExit("this C library has no mallopt (glibc only)")

    def apply(settings: dict[int, int]) -> None:
        for param, value in settings.items():
            if libc.mallopt(param, value) != 1:
                raise SystemExit(f"mallopt({param}, {value}) failed")

    return apply


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def model_call(kind: str, arch: str, latent: int) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The timed callable (one UNet call, batch 2) and the shape facts of the header."""
    from graphprune.archs import build_unet, example_inputs

    unet = build_unet(arch).eval()
    inputs, kwargs = example_inputs(unet, latent=latent, batch=2)
    if kind == "eager":
        fn = unet
    elif kind == "inductor":
        fn = torch.compile(unet, options={"layout_optimization": False})
    else:  # a graphprune catalogue variant, e.g. todo2
        from graphprune.bench.variants import variant

        fn = variant(kind).build(unet).fn
    return (lambda: fn(*inputs, **kwargs)), {"arch": arch, "latent": latent, "batch": 2, "model": kind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15", help="a built-in UNet (graphprune.archs)")
    p.add_argument("--latent", type=int, default=32, help="latent side")
    p.add_argument("--model", default="inductor",
                   help="eager, inductor (layout optimization off), or a graphprune bench variant (e.g. todo2)")
    p.add_argument("--runs", type=int, default=5, help="timed pairs (median of the per-pair ratios)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    apply = mallopt()
    with torch_setup(args.threads, keep_inductor_cache=True, prefix="cpu_allocator"), torch.no_grad():
        call, shape = model_call(args.model, args.arch, args.latent)
        print(format_header(environment("cpu", torch.float32, **shape)))
        faults: dict[str, list[int]] = {"glibc defaults": [], "freed memory kept": []}

        def under(settings: dict[int, int], name: str) -> Callable[[int], Any]:
            def timed(i: int) -> Any:
                apply(settings)
                before = minor_faults()
                out = call()
                faults[name].append(minor_faults() - before)
                return out
            return timed

        protocol = Protocol(runs=args.runs, warmup=args.warmup, retries=0)
        timer = PairedTimer(protocol, under(GLIBC_DEFAULTS, "glibc defaults"), desc="glibc defaults")
        res = timer.time(under(KEEP_FREED, "freed memory kept"), "freed memory kept")
        apply(GLIBC_DEFAULTS)
        for name, counts in faults.items():
            print(f"{name}: minor page faults per call, median {statistics.median(counts):.0f} "
                  f"(last {counts[-args.runs:]})")
        print(f"glibc defaults: median {timer.median_s:.3f} s; freed memory kept: median {res['median_s']:.3f} s, "
              f"speedup (median of {args.runs} paired ratios) {res['speedup']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
