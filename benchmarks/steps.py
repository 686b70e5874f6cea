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

# benchmarks/profile.py shadows the standard library's ``profile`` (which torch imports via cProfile): drop this
# folder from the path, and import the graphprune of this checkout (not another installed copy)
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from graphprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "steps", *sys.argv[1:]]))
