#!/usr/bin/env python
"""Per-call speed of graphprune vs Inductor, eager and tomesd on one UNet, every timed call paired.

    python benchmarks/speed.py --quick                          # tiny UNet, latent 16, smoke test
    python benchmarks/speed.py --latents 64,32 --out results/speed_cpu.json

The same as ``graphprune bench speed`` (graphprune/cli.py); the logic lives in graphprune/bench/speed.py.
See benchmarks/README.md.
"""

import sys
from pathlib import Path

# import the graphprune of this checkout (not another installed copy); this folder leaves the path: its profile.py
# would shadow the standard library's (cProfile, imported by torch._dynamo, reads profile.run)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from graphprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "speed", *sys.argv[1:]]))
