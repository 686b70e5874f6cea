#!/usr/bin/env python
"""Per-call speed of graphprune vs Inductor, eager and tomesd on one UNet, every timed call paired.

    python benchmarks/speed.py --quick                          # tiny UNet, latent 16, smoke test
    python benchmarks/speed.py --latents 64,32 --out results/speed_cpu.json

The same as ``graphprune bench speed`` (graphprune/cli.py); the logic lives in graphprune/bench/speed.py.
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
    sys.exit(main(["bench", "speed", *sys.argv[1:]]))
