#!/usr/bin/env python
"""Where the time of one UNet call goes: self time per op of each variant (torch.profiler), eager time per module.

    python benchmarks/profile.py --quick                          # tiny UNet, latent 16, smoke test
    python benchmarks/profile.py --latent 64 --threads 1 --variants inductor,tome0.5,tomesd --out results/profile64.json

The same as ``graphprune bench profile`` (graphprune/cli.py); the logic lives in graphprune/bench/profile.py.
See benchmarks/README.md.
"""

import sys
from pathlib import Path

# this file's name shadows the standard library's ``profile`` (which torch imports via cProfile): drop its folder
# from the path, and import the graphprune of this checkout (not another installed copy)
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from graphprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "profile", *sys.argv[1:]]))
