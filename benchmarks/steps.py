#!/usr/bin/env python
"""Whole denoising loops: step caching (deepcache, dato, catome) vs full steps, generations paired.

    python benchmarks/steps.py --quick                                  # tiny UNet, latent 16, 10 steps (smoke)
    python benchmarks/steps.py --latent 32 --out results/steps_cpu32.json --plot results/steps_cpu32.png
    python benchmarks/steps.py --latent 64 --variants inductor,deepcache3,dato-coco

The same as ``graphprune bench steps`` (graphprune/cli.py); the logic lives in graphprune/bench/steps.py.
See benchmarks/README.md.
"""

import sys
from pathlib import Path

# import the graphprune of this checkout (not another installed copy); this folder leaves the path: its profile.py
# would shadow the standard library's (cProfile, imported by torch._dynamo, reads profile.run)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from graphprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "steps", *sys.argv[1:]]))
