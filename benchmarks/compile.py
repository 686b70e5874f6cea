#!/usr/bin/env python
"""Compile time as a user sees it: cold and warm (fresh processes sharing the on-disk caches) per variant.

    python benchmarks/compile.py --quick                                   # tiny UNet (smoke)
    python benchmarks/compile.py --latent 32 --steps 4 --variants inductor,tome0.5 --out results/compile_sd15.json
    python benchmarks/compile.py --latent 32 --steps 50 --variants inductor,deepcache3,dato-imagenet,dato-coco

The same as ``graphprune bench compile`` (graphprune/cli.py); the logic lives in graphprune/bench/compile.py.
See benchmarks/README.md.
"""

import sys
from pathlib import Path

# import the graphprune of this checkout (not another installed copy); this folder leaves the path: its profile.py
# would shadow the standard library's (cProfile, imported by torch._dynamo, reads profile.run)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from graphprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "compile", *sys.argv[1:]]))
