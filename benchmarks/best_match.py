#!/usr/bin/env python
"""ToMe's whole plan at one SD1.5 top-level site under Inductor, before/after graphprune::best_match, paired.

    python benchmarks/best_match.py --threads 1             # B=2, 64x64 tokens (N=4096), C=320, r=0.5
    python benchmarks/best_match.py --latent 32 --runs 5

'before': the plan with the best match as the plain ``(a @ b^T).max(dim=-1)``, lowered by Inductor (the config's
compiler is not ``inductor``, which is all :func:`graphprune.methods.tokens.best_match` reads); 'after': the same
plan with the match as the ``graphprune::best_match`` custom op (aten's bmm and max, opaque to Inductor), which is
what graphprune runs under Inductor on CPU. Both are ``torch.compile``d with Inductor; the plans are checked equal;
the speedup is the paired timer's median of per-pair ratios (graphprune/bench/timing.py).
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

from graphprune.bench.env import environment, format_header  # noqa: E402
from graphprune.bench.options import Protocol  # noqa: E402
from graphprune.bench.timing import PairedTimer, torch_setup  # noqa: E402
from graphprune.methods import SiteGeometry, ToMeConfig  # noqa: E402
from graphprune.methods.tome import ToMe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=64, help="token grid side at the site (64: SD1.5 at 512x512)")
    p.add_argument("--channels", type=int, default=320, help="C of the site's block input")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=11, help="timed pairs (median of the per-pair ratios)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    B, H, C = 2, args.latent, args.channels
    geo, method = SiteGeometry(B, H * H, C, H, H), ToMe()
    metric = torch.randn(B, H * H, C, generator=torch.Generator().manual_seed(0))
    loc = torch.randint(0, 4, (1, geo.cells(2, 2)), generator=torch.Generator().manual_seed(1))
    with torch_setup(args.threads, keep_inductor_cache=True, prefix="best_match"), torch.no_grad():
        print(format_header(environment("cpu", torch.float32, shape=[B, H * H, C], ratio=args.ratio)))
        plans = {}
        for name, compiler in (("before", "aot_eager"), ("after", "inductor")):
            cfg = ToMeConfig(ratio=args.ratio, compiler=compiler)
            plans[name] = torch.compile(lambda x, l, cfg=cfg: method.plan(cfg, geo, x, l))
        same = all(torch.equal(a, b) for a, b in zip(plans["before"](metric, loc), plans["after"](metric, loc)))
        protocol = Protocol(runs=args.runs, warmup=args.warmup, retries=0)
        timer = PairedTimer(protocol, lambda i: plans["before"](metric, loc), desc="plan, Inductor's max lowering")
        res = timer.time(lambda i: plans["after"](metric, loc), "plan, graphprune::best_match")
    print(f"plans identical: {same}; before median {timer.median_s:.4f} s, after median {res['median_s']:.4f} s; "
          f"speedup (median of {args.runs} paired ratios) {res['speedup']:.3f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
